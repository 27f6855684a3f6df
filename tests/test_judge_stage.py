"""The judge model stage for real: a judge on vLLM, in a build on local Ray.

The session's shared build (tests/_shared_build.py) holds this file's source `words`, under
`judge: rules+model`, and the recipe's judge model: counting questions whose reference is a phrase
in words ("three circles"), so the rules leave the policy's right digits undecided and the judge stage
(its own engine replica) rules on them; the samples, stats.json, the card and the preview say who
decided; the verdict cache answers a second pass over the same samples without any engine. The judge
here is the demo judge's architecture with seeded random weights (built in seconds): what is tested is
the stage, not the judge's accuracy (that is benchmarks/bench_model_judge.py's), so replies count
whatever their probability (`min_probability: 0`) and both agreeing and disagreeing pairs occur.
"""

import asyncio
import re

import pytest
from _shared_build import SOURCES, recipe, samples, shared_build

from mmpr_pipeline import pipeline
from mmpr_pipeline.scoring import undecided

pytestmark = pytest.mark.slow

QUESTIONS = 8


@pytest.fixture(scope="module")
def judged_run(request, trained_model):
    run, stats = shared_build(request, trained_model)
    return recipe(run), run, stats


def _samples(run):
    """This file's rows of the shared run."""
    return samples(run, SOURCES["judge_stage"])


def test_the_judge_stage_decides_what_the_rules_left_and_records_who_did(judged_run):
    _, run, stats = judged_run
    rows = _samples(run)
    assert len(rows) == QUESTIONS
    reply = re.compile(r"^(?:off-format: )?(?:yes|no|Yes|No) p=[01]\.\d{3}$|^failed: ")
    asked = model = 0
    for row in rows:
        for i, found in enumerate(row["extracted"]):
            state, jv = row["rules_verdict"][i], row["judge_verdict"][i]
            if not found:  # no final answer: the rules' format case, never sent to the judge
                assert jv == "" and row["decided_by"][i] == "rules"
                continue
            asked += 1
            assert jv in ("correct", "wrong", "undecided")  # agreement_sample 1.0: every answer asked
            assert all(reply.match(r) for r in row["judge_replies"][i].split(" | ")), row["judge_replies"][i]
            if state == "undecided" and jv != "undecided":  # the judge decided it: its verdict counts
                model += 1
                assert row["decided_by"][i] == "model" and row["correct"][i] == (jv == "correct")
                assert not undecided(row["reason"][i])
            elif state == "undecided":
                assert row["decided_by"][i] == "" and undecided(row["reason"][i]) and not row["correct"][i]
            else:  # rules decided: their verdict stands, the judge's is kept for the agreement
                assert row["decided_by"][i] == "rules" and row["correct"][i] == (state == "correct")
    st = stats["sources"]["words"]
    hits = st["judge_model"]["cache_hits"]  # a later unit's same question and answer: asked once
    assert st["judge_model"]["asked"] == asked > 0 and 0 <= hits < asked
    assert st["verdicts"]["model"] == model
    assert sum(st["verdicts"].values()) == st["samples"] == QUESTIONS * 4
    assert any(row["rules_verdict"].count("undecided") for row in rows)  # "3" for "three circles"
    card = (run / "README.md").read_text()
    line = next(ln for ln in card.splitlines() if ln.startswith("| `words` | rules+model |"))
    v = st["verdicts"]
    assert f"| {v['rules']} | {v['model']} | {v['undecided']} | {asked} | {hits} |" in line
    preview = (run / "preview.html").read_text()
    assert f"{v['rules']:,} / {v['model']:,} / {v['undecided']:,}" in preview


def test_a_second_pass_over_the_same_answers_is_answered_from_the_cache(judged_run):
    """What a resumed or re-run build does with a unit it redoes: every verdict comes from the cache
    the first build's workers wrote, and no judge engine is started."""
    from stages.judge import JudgeStage
    from stages.score import score_batch

    recipe, run, _ = judged_run
    jm = recipe.judge_model
    stage = JudgeStage(
        "unused",
        {},
        0,
        recipe.judge_modes(),
        pipeline.judge_id(jm.model),
        str(run / pipeline.JUDGE_CACHE),
        jm.min_probability,
        jm.agreement_sample,
        jm.timeout_s,
    )

    async def no_engine():
        raise AssertionError("the judge engine was started for a cached verdict")

    stage.judge = no_engine
    before = _samples(run)
    import pyarrow as pa

    from mmpr_pipeline.records import SAMPLE_SCHEMA

    fresh = [dict(r, extracted=[], correct=[], score=[], reason=[]) for r in before]  # as sampled
    scored = score_batch(pa.Table.from_pylist(fresh, schema=SAMPLE_SCHEMA))

    async def go():
        return [t async for t in stage(scored)][0].to_pylist()

    again = asyncio.run(go())
    for old, new in zip(before, again):
        assert new["correct"] == old["correct"] and new["decided_by"] == old["decided_by"]
        assert new["judge_replies"] == old["judge_replies"]
        assert all(new["judge_cached"][i] for i, v in enumerate(new["judge_verdict"]) if v)
