"""Every pair of a real build agrees with the verdicts the build recorded (issue 18): chosen was judged
correct, rejected wrong (or unparsable, for format pairs), both are samples of the same question;
a DropoutNTP pair is the original against its own prefix continued without the image. A swap of
chosen and rejected anywhere in the pipeline fails here.

One build (local Ray, vLLM on CPU, the trained demo model) of the demo recipe at small scale plus a
JSON Lines source whose rows carry their own response (`fields.response`).
"""

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from mmpr_pipeline import pipeline, shards, tasks
from mmpr_pipeline import recipe as recipe_mod
from stages.dropout_ntp import prefix_of

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow
CAPTIONS = [
    "A plain picture with a few coloured shapes placed on a light background, nothing else at all.",
    "Several small geometric shapes in different colours are scattered across this simple image.",
    "The picture shows coloured circles and squares of various sizes against a pale backdrop.",
]


@pytest.fixture(scope="module")
def built(tmp_path_factory, ray_local, trained_model):
    d = tmp_path_factory.mktemp("direction")
    for i, row in enumerate(tasks.generate(3, seed=11, families=["describe"])):
        (d / f"img{i}.png").write_bytes(row["image"])
    (d / "captions.jsonl").write_text(
        "".join(
            json.dumps(dict(image=f"img{i}.png", question="Describe this image.", caption=c)) + "\n"
            for i, c in enumerate(CAPTIONS)
        )
    )
    data = yaml.safe_load((REPO / "data_cards" / "demo.yaml").read_text())
    data.update(model=trained_model, unit_size=4, shard_rows=50, engine={"max_model_len": 1024})
    data["sampling"].update(n=6, max_tokens=48)
    data["sources"][0]["limit"] = 16
    data["sources"][1]["limit"] = 4
    data["sources"].append(
        dict(
            name="captions",
            loader="jsonl",
            path=str(d / "captions.jsonl"),
            pipeline="dropout_ntp",
            fields={"response": "caption"},
            dropout={"ratio": 0.5, "min_words": 8},
        )
    )
    path = d / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    run = d / "run"
    stats = pipeline.build(recipe_mod.load(path), run)
    pairs = [r for p in sorted((run / "data").glob("train-*.parquet")) for r in pq.read_table(p).to_pylist()]
    samples = {r["qid"]: r for p in shards.unit_files(run) for r in pq.read_table(p).to_pylist()}
    return run, stats, pairs, samples


def test_correctness_and_format_pairs_follow_the_recorded_verdicts(built):
    _, stats, pairs, samples = built
    checked = {"correctness": 0, "format": 0}
    for p in pairs:
        if p["pair_type"] not in checked:
            continue
        s = samples[p["qid"]]
        c, r = p["chosen_index"], p["rejected_index"]
        assert p["chosen"] == s["responses"][c] and p["rejected"] == s["responses"][r]
        assert s["correct"][c] is True and s["extracted"][c] is not None
        assert s["correct"][r] is False
        if p["pair_type"] == "correctness":
            assert s["extracted"][r] is not None  # a wrong answer, not a missing one
        else:
            assert s["extracted"][r] is None  # no parsable final answer
        checked[p["pair_type"]] += 1
    assert checked["correctness"] == stats["totals"]["pairs"]["correctness"] > 0
    assert checked["format"] == stats["totals"]["pairs"]["format"]


def test_dropout_pairs_are_the_original_against_its_image_free_continuation(built):
    _, _, pairs, samples = built
    dntp = [p for p in pairs if p["pair_type"] == "dropout_ntp"]
    assert {p["source"] for p in dntp} == {"describe", "captions"}
    for p in dntp:
        s = samples[p["qid"]]
        i = p["chosen_index"]
        assert p["rejected_index"] == i and p["chosen"] == s["responses"][i]
        assert p["prefix_words"] == s["prefix_words"][i] > 0
        assert p["rejected"] == prefix_of(p["chosen"], p["prefix_words"]) + s["continuations"][i]
        assert s["continuation_image_tokens"][i] == 0  # continued without the image...
        if s["finish_reasons"] != ["given"]:
            assert s["image_tokens"] > 0  # ...while the sampling prompt had it
            # what the request asked (dropout.n = 1), not the recipe's n = 6, is what both record
            assert len(s["responses"]) == 1
            assert json.loads(p["sampling"])["n"] == json.loads(s["sampling"])["n"] == 1


def test_fields_response_makes_the_given_response_chosen(built):
    _, stats, pairs, samples = built
    mine = [p for p in pairs if p["source"] == "captions"]
    assert {p["chosen"] for p in mine} <= set(CAPTIONS)
    assert len(mine) == stats["sources"]["captions"]["pairs"]["dropout_ntp"] > 0
    rows = [s for s in samples.values() if s["source"] == "captions"]
    assert all(r["responses"] in ([c] for c in CAPTIONS) and r["finish_reasons"] == ["given"] for r in rows)


def test_the_card_of_a_real_build_states_its_numbers(built):
    run, stats, _, _ = built
    card = (run / "README.md").read_text()
    assert card.startswith("---\n")  # Hub YAML header
    for name, _st in stats["sources"].items():
        assert name in card
    total = sum(stats["totals"]["pairs"].values())
    assert f"{total:,}" in card or str(total) in card
    assert (run / "figures").is_dir() and any((run / "figures").glob("*.png"))
