"""The judge model's rules, as pure logic: swapped-roles agreement, reading a reply, which responses are
asked, what a verdict does to a sample row, the verdict cache, and the recipe's `judge` keys. The real
judge stage (vLLM on Ray, the demo judge) is tests/test_judge_stage.py."""

import asyncio
import copy
import math

import pyarrow as pa
import pytest

from mmpr_pipeline import recipe as recipe_mod
from mmpr_pipeline.recipe import RecipeError
from mmpr_pipeline.records import SAMPLE_SCHEMA
from mmpr_pipeline.scoring import model_judge as mj
from stages.pair import pair_rows, undecided
from stages.score import score_row


def test_only_two_agreeing_replies_count():
    assert mj.agreement(mj.YES, mj.YES) is True
    assert mj.agreement(mj.NO, mj.NO) is False
    for a, b in [
        (mj.YES, mj.NO),
        (mj.NO, mj.YES),
        (mj.YES, mj.OFF_FORMAT),
        (mj.OFF_FORMAT, mj.OFF_FORMAT),
        (mj.FAILED, mj.FAILED),
        (mj.NO, mj.FAILED),
    ]:
        assert mj.agreement(a, b) is None, (a, b)


def test_a_reply_counts_only_as_a_yes_or_no_the_model_meant():
    assert mj.read_reply("Yes", math.log(0.9), 0.5) == mj.YES
    assert mj.read_reply(" no.", None, 0.5) == mj.NO  # no logprobs given: the text decides
    assert mj.read_reply("maybe", math.log(0.99), 0.5) == mj.OFF_FORMAT
    assert mj.read_reply("", None, 0.5) == mj.OFF_FORMAT
    assert mj.read_reply("yes", math.log(0.3), 0.5) == mj.OFF_FORMAT  # constrained, not meant
    assert mj.read_reply("yes", float("nan"), 0.5) == mj.OFF_FORMAT


def test_the_prompt_shows_the_final_answer_and_swaps_the_two_places():
    refs = ["umbrella", "umbrella", "an umbrella", "parasol"]
    plain = mj.render_messages("What is it?", refs, "a black umbrella", swapped=False)[0]["content"]
    swapped = mj.render_messages("What is it?", refs, "a black umbrella", swapped=True)[0]["content"]
    assert "Reference answer: umbrella | an umbrella | parasol\nProposed answer: a black umbrella" in plain
    assert "Reference answer: a black umbrella\nProposed answer: umbrella | an umbrella | parasol" in swapped
    assert mj.references_text([str(i % 7) for i in range(70)]).count("|") == mj.MAX_REFERENCES - 1


def test_the_cache_key_is_judge_question_references_answer_and_threshold():
    key = mj.cache_key("j", "Q?", ["a", "b"], "x", 0.7)
    assert key == mj.cache_key("j", "Q? ", ["b", "a"], " x", 0.7)  # the same text the judge sees
    for other in [("k", "Q?", ["a", "b"], "x"), ("j", "R?", ["a", "b"], "x"), ("j", "Q?", ["a"], "x")]:
        assert mj.cache_key(*other, 0.7) != key
    assert mj.cache_key("j", "Q?", ["a", "b"], "y", 0.7) != key
    # Regression: the cache holds readings made at one threshold ("yes p=0.6" is off-format at 0.7);
    # a run sharing the cache with another min_probability got the other run's readings.
    assert mj.cache_key("j", "Q?", ["a", "b"], "x", 0.5) != key


def _row(reasons, correct, extracted, qid="q1", answers=("umbrella",)) -> dict:
    n = len(reasons)
    return dict(
        qid=qid,
        source="s",
        pipeline="correctness",
        question="What is it?",
        answer=answers[0],
        answers=list(answers),
        responses=[f"Final answer: {e}" for e in extracted],
        correct=list(correct),
        reason=list(reasons),
        extracted=list(extracted),
        score=[0.0] * n,
    )


UNDECIDED = "undecided"


def test_which_responses_each_mode_sends_to_the_judge():
    row = _row(
        [UNDECIDED, "correct", "wrong answer", "no final answer", "judge error: boom"],
        [False, True, False, False, False],
        ["a black umbrella", "umbrella", "hat", None, ""],
    )
    assert mj.to_ask(row, "rules", 1.0) == []
    assert mj.to_ask(row, "rules+model", 0.0) == [0]  # the undecided one only
    assert mj.to_ask(row, "rules+model", 1.0) == [0, 1, 2]  # + the agreement sample; never format/error
    assert mj.to_ask(row, "model", 0.0) == [0, 1, 2]
    assert mj.to_ask(dict(row, pipeline="dropout_ntp"), "model", 1.0) == []
    picked = sum(mj.in_agreement_sample(f"q{i}", 0, 0.1) for i in range(2000))
    assert 150 < picked < 250 and mj.in_agreement_sample("q7", 0, 0.1) == mj.in_agreement_sample("q7", 0, 0.1)


def test_rules_plus_model_decides_only_what_the_rules_left_undecided():
    row = _row(
        [UNDECIDED, UNDECIDED, UNDECIDED, "correct"], [False] * 3 + [True], ["x", "y", "z", "umbrella"]
    )
    asked = {
        0: ([mj.YES, mj.YES], ["yes p=0.9", "yes p=0.8"], False),
        1: ([mj.YES, mj.NO], ["yes p=0.9", "no p=0.7"], True),
        2: ([mj.NO, mj.FAILED], ["no p=0.9", "failed: TimeoutError"], False),
        3: ([mj.NO, mj.NO], ["no p=0.9", "no p=0.9"], False),  # agreement sample: it disagrees
    }
    mj.apply_verdicts(row, "rules+model", asked)
    assert row["correct"] == [True, False, False, True]
    assert row["decided_by"] == ["model", "", "", "rules"]
    assert [undecided(r) for r in row["reason"]] == [False, True, True, False]
    assert row["judge_verdict"] == ["correct", "undecided", "undecided", "wrong"]
    assert row["judge_replies"][1] == "yes p=0.9 | no p=0.7" and row["judge_cached"] == [
        False,
        True,
        False,
        False,
    ]
    verdicts, judged = mj.verdict_counts(row)
    assert verdicts == {"rules": 1, "model": 1, "undecided": 2}
    assert judged == dict(asked=4, cache_hits=1, failed=1, off_format=0, disagreed=1, both_decided=1, agree=0)


def test_a_no_on_an_initialism_leaves_it_undecided_and_a_yes_decides_it():
    """The model's "no" never rejects an answer that is an initialism of the reference or the reverse
    (it may not know the abbreviation); its "yes" still decides, and other "no"s still reject."""
    row = _row(
        [UNDECIDED] * 3,
        [False] * 3,
        ["Research and Development", "Research and Development", "Marketing"],
        answers=("R&D",),
    )
    no, yes = ([mj.NO, mj.NO], ["no p=0.9"] * 2, False), ([mj.YES, mj.YES], ["yes p=0.9"] * 2, False)
    mj.apply_verdicts(row, "rules+model", {0: no, 1: yes, 2: no})
    assert row["decided_by"] == ["", "model", "model"]
    assert row["correct"][:3] == [False, True, False] and undecided(row["reason"][0])
    assert row["judge_verdict"][0] == "wrong"  # what the model said, for the agreement figure
    model_mode = _row(["correct"], [True], ["NYC"], answers=("New York City",))
    mj.apply_verdicts(model_mode, "model", {0: no})
    assert model_mode["decided_by"] == [""] and undecided(model_mode["reason"][0])
    assert mj.decision(False, "R&D", ["Research and Development"]) is None
    assert mj.decision(False, "rd", ["Research and Development"]) is False  # not written in capitals
    assert mj.decision(False, "Research", ["R&D"]) is False


def test_model_mode_decides_every_answer_and_its_doubt_is_undecided():
    row = _row(
        ["correct", "wrong answer", "no final answer"], [True, False, False], ["umbrella", "hat", None]
    )
    asked = {
        0: ([mj.YES, mj.OFF_FORMAT], ["yes p=0.9", "no p=0.2"], False),
        1: ([mj.YES, mj.YES], ["yes p=0.9", "yes p=0.9"], False),
    }
    mj.apply_verdicts(row, "model", asked)
    assert row["correct"] == [False, True, False]
    assert row["decided_by"] == ["", "model", "rules"]  # no final answer stays the rules' format case
    assert undecided(row["reason"][0]) and row["judge_replies"][0] == "yes p=0.9 | off-format: no p=0.2"
    assert mj.verdict_counts(row)[1]["off_format"] == 1
    assert mj.verdict_counts(row)[1]["both_decided"] == 1


def test_an_undecided_response_is_neither_chosen_nor_rejected_after_the_judge():
    """Pairing reads only correct/reason/extracted: a model-decided verdict pairs like a rules one."""
    row = score_row(
        dict(
            _row([], [], []),
            responses=["I see it.\nFinal answer: a black umbrella", "Final answer: hat", "Final answer: dog"],
            answer_type="text",
            options=[],
            prompt_template="cot_final_answer",
            sampling="{}",
            error="",
            rationale="",
            images=[],
            task="",
        )
    )
    assert row["decided_by"][0] == ""  # "a black umbrella" for "umbrella": the rules cannot tell

    class Cfg:  # noqa: E306 - the two settings pair_rows reads
        class pairing:  # noqa: N801
            answer_fix, max_pairs_per_question, format_pairs = False, 15, True

    def pairs_of(r):
        return {(p["chosen_index"], p["rejected_index"]) for p in pair_rows(r, Cfg, seed=0, model="m")[0]}

    assert pairs_of(dict(row)) == set()  # nothing correct yet
    yes, no = ([mj.YES, mj.YES], ["yes", "yes"], False), ([mj.NO, mj.NO], ["no", "no"], False)
    assert pairs_of(mj.apply_verdicts(copy.deepcopy(row), "rules+model", {0: yes, 1: no})) == {(0, 1)}
    assert pairs_of(mj.apply_verdicts(copy.deepcopy(row), "rules+model", {0: yes, 1: no, 2: no})) == {
        (0, 1),
        (0, 2),
    }


class _Judge:
    """Stands in for ModelJudge: counts what it is asked (the engine part is tested for real)."""

    def __init__(self, reply=mj.YES, fail=False):
        self.asked, self.reply, self.fail = [], reply, fail

    async def replies(self, question, references, answer):
        self.asked.append(answer)
        if self.fail:
            return [mj.FAILED, mj.FAILED], ["failed: EngineStalled", "failed: EngineStalled"]
        return [self.reply, self.reply], [self.reply, self.reply]


def _stage(tmp_path, judge):
    from stages.judge import JudgeStage

    stage = JudgeStage("m", {}, 0, {"s": "rules+model"}, "j", str(tmp_path / "cache"), 0.5, 0.0, 5.0)

    async def fake():
        return judge

    stage.judge = fake
    return stage


def _batch(rows):
    full = []
    for r in rows:
        full.append({**{f.name: None for f in SAMPLE_SCHEMA}, **r, "unit_plan": "{}", "images": []})
    return pa.Table.from_pylist(full, schema=SAMPLE_SCHEMA)


def _run(stage, batch):
    async def go():
        return [t async for t in stage(batch)][0].to_pylist()

    return asyncio.run(go())


def test_verdicts_are_cached_so_a_rerun_never_asks_twice_and_failures_are_asked_again(tmp_path):
    rows = [_row([UNDECIDED] * 3, [False] * 3, ["x", "x", "y"], qid=f"q{i}") for i in range(2)]
    first = _Judge()
    out = _run(_stage(tmp_path, first), _batch(rows))
    assert sorted(first.asked) == ["x", "y"]  # one request per distinct answer of the batch
    assert all(r["decided_by"] == ["model"] * 3 for r in out)
    again = _Judge(reply=mj.NO)  # a fresh replica (a resumed or re-run build) reads the cache
    out = _run(_stage(tmp_path, again), _batch(rows))
    assert again.asked == [] and all(r["judge_cached"] == [True] * 3 for r in out)
    assert all(r["correct"] == [True] * 3 for r in out)  # the cached verdict, not the new judge's
    failing = _Judge(fail=True)
    other = [_row([UNDECIDED], [False], ["z"], qid="q9")]
    out = _run(_stage(tmp_path, failing), _batch(other))
    assert out[0]["decided_by"] == [""] and undecided(out[0]["reason"][0])  # never a crash or a guess
    later = _Judge()
    _run(_stage(tmp_path, later), _batch(other))
    assert later.asked == ["z"]  # the failure was not cached


def test_a_damaged_cache_file_only_costs_its_verdicts(tmp_path):
    cache = mj.VerdictCache(tmp_path)
    cache.put("j", {"k1": ("x", [mj.YES, mj.YES], ["yes", "yes"])})
    (tmp_path / "verdicts-broken.parquet").write_bytes(b"not parquet")
    fresh = mj.VerdictCache(tmp_path)
    fresh.refresh()
    assert fresh.get("k1") == ([mj.YES, mj.YES], ["yes", "yes"]) and fresh.get("k2") is None


def _recipe(**source_keys) -> dict:
    return dict(name="r", sources=[dict(name="a", loader="generated", limit=2, **source_keys)])


def test_judge_rules_keeps_the_fingerprint_and_the_judge_keys_are_checked():
    plain = recipe_mod.from_dict(_recipe())
    assert "judge_model" not in plain.to_dict() and "judge" not in plain.to_dict()["sources"][0]
    assert recipe_mod.from_dict(_recipe(judge="rules")).fingerprint() == plain.fingerprint()
    judged = recipe_mod.from_dict(_recipe(judge="rules+model"))
    assert judged.fingerprint() != plain.fingerprint() and judged.judge_modes() == {"a": "rules+model"}
    moved = recipe_mod.from_dict(dict(_recipe(judge="rules+model"), judge_model=dict(cache_dir="/x")))
    assert moved.fingerprint() == judged.fingerprint()  # where verdicts are kept changes none of them
    for data, message in [
        (
            _recipe(judge="llm"),
            r"sources\[0\]\.judge: unknown judge 'llm' \(expected one of: rules, rules\+model",
        ),
        (_recipe(judge="model", pipeline="dropout_ntp"), r"sources\[0\]\.judge: .*correctness sources only"),
        (
            dict(_recipe(), judge_model=dict(temperature=0.7)),
            r"judge_model\.temperature: the judge is greedy",
        ),
        (dict(_recipe(), judge_model=dict(agreement_sample=2)), r"judge_model\.agreement_sample: must be in"),
    ]:
        with pytest.raises(RecipeError, match=message):
            recipe_mod.from_dict(data)


def _words(text: str) -> list[str]:
    return [w.strip(".,") for w in text.lower().replace("|", " ").split() if w.strip(".,")]


def test_the_demo_judges_training_cases_say_yes_only_where_one_answer_holds_the_others_words():
    """judge_cases.structural (what the demo judge learns): yes only where one answer's words are all in
    the other's and the extra words add no item or negation; no only where they do; unsure otherwise.
    Seeded: the same cases every time."""
    from mmpr_pipeline import judge_cases

    cases = list(judge_cases.structural(600, seed=3))
    assert cases == list(judge_cases.structural(600, seed=3))
    shares = {v: sum(c["verdict"] == v for c in cases) / len(cases) for v in ("yes", "no", "unsure")}
    assert min(shares.values()) >= 0.15, shares  # each verdict well represented
    for c in cases:
        ref, ans = _words(c["reference"].split(" | ")[0]), _words(c["answer"].split(" | ")[0])
        short, long = sorted((set(ref), set(ans)), key=len)
        extra = long - short
        if c["verdict"] == "yes":
            assert short <= long | {"&", "and"} and not extra & set(judge_cases.JOINERS) - {"and"}, c
        elif c["verdict"] == "no":
            assert extra & set(judge_cases.JOINERS), c
        assert c["equivalent"] == {"yes": True, "no": False}.get(c["verdict"]), c
