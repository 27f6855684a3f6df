"""The paper's pairing rules, fed hand-written responses."""

from mmpr_pipeline.pairing import pair_correctness


def _pairs(responses, correct, extracted, **kw):
    return pair_correctness(responses, correct, extracted, qid="q1", **kw)


def test_every_correct_wrong_combination():
    r = ["a\nFinal answer: 1", "b\nFinal answer: 1", "c\nFinal answer: 2", "d\nFinal answer: 3"]
    qp = _pairs(r, [True, True, False, False], ["1", "1", "2", "3"])
    assert sorted(qp.correctness) == [(0, 2), (0, 3), (1, 2), (1, 3)]
    assert qp.format == [] and not qp.all_right and not qp.all_wrong


def test_chosen_contained_in_rejected_is_dropped():
    r = ["Final answer: 1", "Final answer: 1 or maybe Final answer: 2"]
    qp = _pairs(r, [True, False], ["1", "2"])
    assert qp.correctness == []


def test_duplicates_are_removed_by_text():
    r = ["x\nFinal answer: 1", "x\nFinal answer: 1", "y\nFinal answer: 2", "y\nFinal answer: 2"]
    qp = _pairs(r, [True, True, False, False], ["1", "1", "2", "2"])
    assert len(qp.correctness) == 1


def test_unparsable_give_format_pairs_only_against_correct():
    r = ["good\nFinal answer: 1", "rambling", "bad\nFinal answer: 4"]
    qp = _pairs(r, [True, False, False], ["1", None, "4"])
    assert qp.correctness == [(0, 2)]
    assert qp.format == [(0, 1)]
    assert _pairs(r, [True, False, False], ["1", None, "4"], format_pairs=False).format == []


def test_all_right_and_all_wrong_give_no_pairs():
    qp = _pairs(["a", "b"], [True, True], ["1", "1"])
    assert qp.all_right and not qp.correctness and not qp.format
    qp = _pairs(["a", "b", "c"], [False, False, False], ["2", None, "3"])
    assert qp.all_wrong and not qp.correctness and not qp.format
    assert _pairs([], [], []).correctness == []


def test_cap_is_a_seeded_sample_independent_of_call_order():
    r = [f"right {i}\nFinal answer: 1" for i in range(6)] + [f"wrong {i}\nFinal answer: 2" for i in range(6)]
    correct = [True] * 6 + [False] * 6
    ext = ["1"] * 6 + ["2"] * 6
    a = _pairs(r, correct, ext, max_pairs_per_question=15, seed=3)
    b = _pairs(r, correct, ext, max_pairs_per_question=15, seed=3)
    c = _pairs(r, correct, ext, max_pairs_per_question=15, seed=4)
    assert len(a.correctness) == 15 and a.correctness == b.correctness
    assert a.correctness != c.correctness
    assert len(set(a.correctness)) == 15


def test_responses_the_judge_failed_on_are_never_paired():
    r = ["good\nFinal answer: 1", "odd", "bad\nFinal answer: 4"]
    qp = _pairs(r, [True, False, False], ["1", "", "4"], unjudged=frozenset({1}))
    assert qp.correctness == [(0, 2)] and qp.format == []
    qp = _pairs(r[:2], [True, False], ["1", ""], unjudged=frozenset({1}))
    assert qp.all_right and not qp.correctness  # the only other response was not judged


def test_score_stage_contains_a_failing_judge():
    from mmpr_pipeline.scoring import JUDGE_ERROR
    from stages.score import score_row

    row = dict(
        pipeline="correctness",
        answers=["3"],
        answer="3",
        answer_type="number",
        options=[],
        responses=["x\nFinal answer: 3", "y\nFinal answer: 5"],
    )
    out = score_row(dict(row))
    assert out["correct"] == [True, False]
    broken = score_row(dict(row, answer_type="not-a-type"))  # the judge raises ValueError
    assert broken["correct"] == [False, False]
    assert all(r.startswith(JUDGE_ERROR) for r in broken["reason"])


def _scored_row(responses, correct, extracted, pipeline="correctness", reason=None):
    """A Sample row as the score stage leaves it (records.SAMPLE_SCHEMA), hand-written."""
    n = len(responses)
    return dict(
        qid="q1",
        source="s",
        task="t",
        images=[b"png"],
        question="How many?",
        answer="3",
        pipeline=pipeline,
        prompt_template="cot_final_answer",
        sampling="{}",
        error="",
        responses=responses,
        correct=correct,
        extracted=extracted,
        reason=reason or ["r"] * n,
        prefix_words=[],
        continuations=[],
    )


def test_pair_rows_puts_the_correct_response_on_the_chosen_side():
    from mmpr_pipeline.recipe import Source
    from stages.pair import pair_rows

    row = _scored_row(
        ["right\nFinal answer: 3", "wrong\nFinal answer: 4", "no answer at all"],
        [True, False, False],
        ["3", "4", None],
    )
    pairs, counts = pair_rows(row, Source(name="s", loader="generated"), seed=0, model="m")
    by_type = {p["pair_type"]: p for p in pairs}
    assert counts["correctness"] == 1 and counts["format"] == 1
    assert by_type["correctness"]["chosen"] == "right\nFinal answer: 3"
    assert by_type["correctness"]["rejected"] == "wrong\nFinal answer: 4"
    assert (by_type["correctness"]["chosen_index"], by_type["correctness"]["rejected_index"]) == (0, 1)
    assert by_type["format"]["chosen"] == "right\nFinal answer: 3"
    assert by_type["format"]["rejected"] == "no answer at all"
    assert by_type["correctness"]["images"] == [{"bytes": b"png", "path": None}]
    assert all("How many?" in p["question"] for p in pairs)


def test_a_response_the_math_check_could_not_decide_is_never_rejected():
    """A check that ran out of its time bound says nothing about the answer (issue 12)."""
    from mmpr_pipeline.recipe import Source
    from stages.pair import pair_rows

    row = _scored_row(
        ["a\nFinal answer: (x+1)^2", "b\nFinal answer: x^2+2x+1", "c\nFinal answer: 7"],
        [True, False, False],
        ["(x+1)^2", "x^2+2x+1", "7"],
        reason=["match", "math check timed out", "wrong answer"],
    )
    pairs, _ = pair_rows(row, Source(name="s", loader="generated"), seed=0, model="m")
    assert [(p["chosen_index"], p["rejected_index"]) for p in pairs] == [(0, 2)]
