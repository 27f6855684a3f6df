"""Every pair of a real build agrees with the verdicts the build recorded (issue 18): chosen was judged
correct, rejected wrong (or unparsable, for format pairs), both are samples of the same question;
a DropoutNTP pair is the original against its own prefix continued without the image. A swap of
chosen and rejected anywhere in the pipeline fails here.

The session's shared build (tests/_shared_build.py: local Ray, vLLM on CPU, the trained demo model):
the demo recipe at small scale plus a JSON Lines source whose rows carry their own response
(`fields.response`); this file checks those sources.
"""

import json

import pytest
from _shared_build import CAPTIONS, SOURCES, pairs, samples, shared_build

from mmpr_pipeline.pairing import prefix_of

pytestmark = pytest.mark.slow
MINE = SOURCES["pair_direction"]


@pytest.fixture(scope="module")
def built(request, trained_model):
    """This file's sources of the session's shared build (tests/_shared_build.py): (run, stats, their
    pairs, their samples by qid)."""
    run, stats = shared_build(request, trained_model)
    return run, stats, pairs(run, MINE), {r["qid"]: r for r in samples(run, MINE)}


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
    made = {kind: sum(stats["sources"][name]["pairs"][kind] for name in MINE) for kind in checked}
    assert checked["correctness"] == made["correctness"] > 0
    assert checked["format"] == made["format"]


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
            # what the request asked (dropout.n = 1), not the recipe's n = 4, is what both record
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
