"""The real pipeline end to end: local Ray, vLLM on CPU, the demo recipe with small limits.

Checked as a user would: the shards load with `datasets` (images back as PIL), counts agree with
stats.json, every source row is accounted for, DropoutNTP's rejected texts start with exactly the
recorded prefix and their continuation prompts carried no image.
"""

import json

import pytest
from _shared_build import SOURCES, recipe, samples, shared_build

from mmpr_pipeline import pipeline
from mmpr_pipeline.pairing import prefix_of

MINE = SOURCES["build_e2e"]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def built(request, trained_model):
    """The session's shared build (tests/_shared_build.py): the demo recipe with small limits (shapes
    12, describe 6, n=4, 48 tokens, units of 4, shards of 20 pairs) and other files' sources."""
    return shared_build(request, trained_model)


def test_shards_load_with_datasets_and_match_stats(built):
    import datasets
    from PIL import Image

    run, stats = built
    names = sorted(p.name for p in (run / "data").glob("*.parquet"))
    ds = datasets.load_dataset("parquet", data_dir=str(run / "data"), split="train")
    total = sum(stats["totals"]["pairs"].values())
    assert len(ds) == total > 0
    n = -(-total // 20)  # shard_rows = 20
    # the Hub's naming, written out here (not with the code's own shard_name)
    assert names == [f"train-{i:05d}-of-{n:05d}.parquet" for i in range(n)]
    assert stats["shards"] == [f"data/{name}" for name in names]
    row = ds[0]
    assert isinstance(row["images"][0], Image.Image) and row["images"][0].size == (112, 112)
    assert set(ds["pair_type"]) <= {"correctness", "format", "dropout_ntp"}
    assert len(set(ds["id"])) == len(ds)  # stable ids, no duplicates
    for kind in ("correctness", "format", "dropout_ntp"):
        assert ds["pair_type"].count(kind) == stats["totals"]["pairs"][kind]
    on_disk = json.loads((run / "stats.json").read_text())
    assert on_disk["totals"] == stats["totals"]


def test_every_row_and_sample_is_accounted_for(built):
    run, stats = built
    rows = samples(run, stats["sources"])
    for name, st in stats["sources"].items():
        mine = [r for r in rows if r["source"] == name]
        assert st["rows"] == st["questions"] + st["rejects"]
        assert len(mine) == st["questions"] == len({r["qid"] for r in mine})  # each sampled once
        assert st["samples"] == sum(len(r["responses"]) for r in mine)
    shapes = [r for r in rows if r["source"] == "shapes"]
    assert all(len(r["responses"]) == 4 == len(r["correct"]) == len(r["extracted"]) for r in shapes)
    assert stats["sources"]["shapes"]["correct"] == sum(sum(r["correct"]) for r in shapes)
    with_pairs = stats["sources"]["shapes"]["questions_with_pairs"]
    st = stats["sources"]["shapes"]
    assert with_pairs + st["all_right"] + st["all_wrong"] + st["engine_errors"] <= st["questions"]
    assert stats["all_wrong_qids"].get("shapes", []) == [r["qid"] for r in shapes if not any(r["correct"])]


def test_dropout_pairs_start_with_the_recorded_prefix_and_continued_without_image(built):
    import datasets

    run, stats = built
    ds = datasets.load_dataset("parquet", data_dir=str(run / "data"), split="train")
    dntp = [r for r in ds if r["pair_type"] == "dropout_ntp"]
    assert len(dntp) == stats["totals"]["pairs"]["dropout_ntp"] > 0
    for r in dntp:
        prefix = prefix_of(r["chosen"], r["prefix_words"])
        assert r["rejected"].startswith(prefix) and r["rejected"] != r["chosen"]
        assert r["cut_ratio"] == 0.5
    # this file's sources: others' may continue with_image
    dropout = [r for r in samples(run, MINE) if r["pipeline"] == "dropout_ntp"]
    continued = [
        t for r in dropout for t, k in zip(r["continuation_image_tokens"], r["prefix_words"]) if k >= 0
    ]
    assert continued and all(t == 0 for t in continued)
    d = stats["sources"]["describe"]["dropout"]
    assert d["sampled"] == 6 and d["cut"] + d["too_short"] == 6


def test_provenance_and_prompts(built):
    import datasets

    run, _ = built
    ds = datasets.load_dataset("parquet", data_dir=str(run / "data"), split="train")
    r = next(x for x in ds if x["pair_type"] in ("correctness", "format") and x["source"] in MINE)
    assert r["prompt_template"] == "cot_final_answer"
    assert r["question"].startswith("Your task is to answer the question below.")
    assert "Answer with the option's letter" not in r["question"]
    assert json.loads(r["sampling"])["n"] == 4
    assert r["chosen_index"] != r["rejected_index"]


def test_build_writes_a_preview_the_card_links_to_unless_switched_off(built, ray_local, tmp_path):
    import shutil

    from _browser import preview_facts

    run, stats = built
    facts = preview_facts(run / "preview.html")
    expected = {name: min(20, sum(s["pairs"].values())) for name, s in stats["sources"].items()}
    assert facts["by_source"] == expected and sum(expected.values()) > 0
    assert facts["images"] > 0 and facts["images_not_loaded"] == 0
    assert facts["console_errors"] == [] and facts["scroll_width"] <= 1280
    assert "[preview.html](preview.html)" in (run / "README.md").read_text()

    # switched off: a resumed build of the finished run (nothing left to sample) writes none
    again = tmp_path / "run"
    shutil.copytree(run, again)
    (again / "preview.html").unlink()
    pipeline.build(recipe(run, preview=False), again)
    assert not (again / "preview.html").exists()
    assert "preview.html" not in (again / "README.md").read_text()
