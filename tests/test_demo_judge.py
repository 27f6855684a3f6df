"""The shipped demo judge on vLLM: rules + the judge model decide more free-form answers than the rules
alone, with no more false accepts.

The demo judge (mmpr_pipeline/demo_judge.py) is trained only on made-up structural cases
(judge_cases.structural), never on the labelled corpus, so the whole free-form corpus is held out. It is
asked exactly as the judge stage asks (scoring/model_judge.ModelJudge: one constrained token, greedy,
both places, the stage's default `min_probability`) about every answer the rules left undecided;
the figures are judge_cases.mode_figures', as benchmarks/bench_model_judge.py prints them.
"""

import asyncio
from pathlib import Path

import pytest

from mmpr_pipeline import judge_cases
from mmpr_pipeline.recipe import JUDGE_MIN_PROBABILITY
from mmpr_pipeline.scoring import model_judge as mj

pytestmark = pytest.mark.slow

CORPUS = Path(__file__).parent / "data" / "free_form_corpus.jsonl"
# The demo judge's one miss on the corpus ("Research and Development" for "R&D": it takes "and" for
# an added item) is no longer a rejection: a "no" on an initialism stays undecided
# (model_judge.decision). "red, white" and "one and a half" the rules now decide.


async def _ask(engine, requests: dict[int, tuple]) -> dict[int, bool | None]:
    # the stage's default min_probability; all asked at once, on a busy CPU
    judge = mj.ModelJudge(engine, JUDGE_MIN_PROBABILITY, timeout_s=600)
    found = await asyncio.gather(*(judge.replies(*r) for r in requests.values()))
    failed = [raw for readings, raw in found if mj.FAILED in readings]
    assert not failed, f"{len(failed)} judge requests failed, e.g. {failed[0]}"
    return {i: mj.agreement(*readings) for i, (readings, _) in zip(requests, found)}


@pytest.fixture(scope="module")
def judged():
    """The corpus, the rules' verdicts, and the demo judge's verdicts on what the rules left undecided."""
    from mmpr_pipeline import demo_judge
    from mmpr_pipeline.engine import Engine

    cases = judge_cases.corpus_cases(CORPUS)
    rules = judge_cases.rules_verdicts(cases)
    requests = judge_cases.judge_requests(cases, rules, only_undecided=True)
    engine = Engine(str(demo_judge.ensure_judge()), {"max_model_len": 512})
    try:
        verdicts = asyncio.run(_ask(engine, requests))
    finally:
        engine.shutdown()
    return cases, rules, verdicts


def test_rules_and_demo_judge_decide_more_with_no_more_false_accepts(judged):
    cases, rules, verdicts = judged
    alone = judge_cases.mode_figures(cases, rules, {}, "rules")
    both = judge_cases.mode_figures(cases, rules, verdicts, "rules+model")
    print(f"\nrules alone {alone}\nrules+model {both}")
    # more than a token few (measured: 30 of 717 more, 4.2%)
    assert both["decided"] - alone["decided"] >= 0.03 * len(cases)
    assert both["false_accepts"] == alone["false_accepts"] == 0
    said = [v for v in verdicts.values() if v is not None]
    assert True in said and False in said  # it says both, not only ever yes
    assert both["pair_safety_misses"] == alone["pair_safety_misses"] == 0
