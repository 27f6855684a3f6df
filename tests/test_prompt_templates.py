"""The prompt templates of MMPR's releases and the format rule each one states (issue 13, item 3).

Pure logic on hand-written responses: each rule, the judge under it, and the pairs a scored row
gives. The real-vLLM build under a non-default template is at the end (marked slow).
"""

import json

import pytest

from mmpr_pipeline import prompts
from mmpr_pipeline.recipe import Source
from mmpr_pipeline.scoring import FORMAT_REASONS, REASONS, WRONG_FORMAT, judge
from mmpr_pipeline.scoring.format_rules import violation
from stages.pair import pair_rows
from stages.score import score_row

R1_GOOD = "<think>\nThree red circles and no other shape.\n</think>\n\nThere are three circles: \\boxed{3}"


def test_each_release_format_is_a_template_with_its_own_rule():
    got = {t: (prompts.template(t).language, prompts.format_rule(t)) for t in prompts.available()}
    assert got == {
        "cot_final_answer": ("en", "final_answer_line"),
        "cot_final_answer_zh": ("zh", "final_answer_line"),
        "cot_boxed": ("en", "boxed"),
        "r1_think_boxed": ("en", "think_then_boxed"),
        "raw": ("any", "final_answer_line"),
    }


@pytest.mark.parametrize(
    "template_id,marker", [("cot_final_answer_zh", "答案: ..."), ("r1_think_boxed", "within \\boxed{}.")]
)
def test_short_answer_suffix_is_stripped_before_templating(template_id, marker):
    text = prompts.render(template_id, "How many circles? Answer the question using a single word or phrase.")
    assert "How many circles?" in text and marker in text
    assert "single word" not in text and "{question}" not in text


def test_a_template_file_without_a_known_rule_is_refused_naming_file_and_key(tmp_path, monkeypatch):
    (tmp_path / "mine.yaml").write_text("id: mine\ntemplate: '{question}'\nformat: bold_answer\n")
    monkeypatch.setattr(prompts, "PROMPTS_DIR", tmp_path)
    prompts._templates.cache_clear()
    try:
        with pytest.raises(ValueError, match=r"mine\.yaml: format: unknown rule 'bold_answer'"):
            prompts.available()
    finally:
        monkeypatch.undo()
        prompts._templates.cache_clear()


# --- think_then_boxed: exactly one think block, the boxed answer after it ------------------------


@pytest.mark.parametrize(
    "response,why",
    [
        (R1_GOOD, ""),
        ("<THINK>count them</THINK>\n\\boxed{3}", ""),
        ("<think>a \\boxed{2} first guess, then recount</think>\nSo \\boxed{3}", ""),  # scratch box: fine
        ("<think>count</think>\n<think>recount</think>\n\\boxed{3}", "more than one <think> block"),
        ("<think>count</think>\n\\boxed{3}\n</think>", "more than one <think> block"),
        ("<think>I count three, so the answer is \\boxed{3}</think>", "no \\boxed{} answer after </think>"),
        ("<think>I count three.</think>\nThe answer is 3.", "no \\boxed{} answer after </think>"),
        ("I count three circles.\n\\boxed{3}", "no <think> block"),
        ("<think>I count three circles and", "<think> block never closed"),
        ("counting...</think>\n\\boxed{3}", "</think> without <think>"),
        ("Sure!\n<think>count</think>\n\\boxed{3}", "text before <think>"),
        ("<think>  </think>\n\\boxed{3}", "empty <think> block"),
    ],
)
def test_think_then_boxed_rule(response, why):
    assert violation("think_then_boxed", response) == why
    v = judge(response, "3", "number", format_rule="think_then_boxed")
    if why:
        assert (v.extracted, v.correct, v.reason, v.format_ok) == (None, False, WRONG_FORMAT, False)
    else:
        assert v.correct and v.extracted == "3" and v.format_ok


def test_the_rule_not_the_answer_decides_an_r1_response_with_two_think_blocks():
    two = "<think>count</think>\n<think>recount</think>\nThree circles.\n\\boxed{3}"
    assert judge(two, "3", "number").correct  # no rule: the answer is right
    assert judge(two, "3", "number", format_rule="think_then_boxed").reason == WRONG_FORMAT
    assert WRONG_FORMAT in REASONS and WRONG_FORMAT in FORMAT_REASONS


# --- boxed and final_answer_line ------------------------------------------------------------------


def test_boxed_rule_wants_the_answer_in_a_box():
    assert violation("boxed", "I count three.\nAnswer: \\boxed{3}") == ""
    assert violation("boxed", "<think>x</think>\nI count three.\n\\boxed{3}") == ""
    assert violation("boxed", "I count three.\nFinal answer: 3") == "no \\boxed{} answer"
    assert violation("boxed", "<think>\\boxed{3}</think>\nFinal answer: 3") == "no \\boxed{} answer"
    v = judge("I count three.\nFinal answer: 3", "3", "number", format_rule="boxed")
    assert (v.extracted, v.reason) == (None, WRONG_FORMAT)
    # an unboxed maths last line is not taken as the answer under a boxed rule either
    assert judge("So $x = 3$.", "3", "math").correct
    assert judge("So $x = 3$.", "3", "math", format_rule="boxed").reason == WRONG_FORMAT


def test_final_answer_line_is_the_judges_own_extraction():
    for response in (
        "I count three.\nFinal answer: 3",
        "I count three.\n\\boxed{3}",
        "So the answer is 3.",
        "3",
        "I count three.\nFinal answer: 3\nI hope it is correct.",
        "I am not sure.",
    ):
        assert violation("final_answer_line", response) == ""
        assert judge(response, "3", "number", format_rule="final_answer_line") == judge(
            response, "3", "number"
        )


@pytest.mark.parametrize(
    "response,answer,answer_type,extracted",
    [
        ("图中有三个红色的圆。\n答案: 3", "3", "number", "3"),
        ("图中有三个红色的圆。\n答案：3", "3", "number", "3"),
        ("逐步推理：颜色是红色，所以选 B。\n\n答案: B", "B", "multiple_choice", "B"),
        ("图中有三个圆。\n最终答案：\\boxed{3}", "3", "number", "3"),
        ("图中有两个圆。\n答案: 2", "3", "number", "2"),
    ],
)
def test_chinese_answer_lines_are_read_under_the_chinese_template(response, answer, answer_type, extracted):
    rule = prompts.format_rule("cot_final_answer_zh")
    v = judge(
        response,
        answer,
        answer_type,
        options=["红色", "蓝色"] if answer_type == "multiple_choice" else None,
        format_rule=rule,
    )
    assert v.extracted == extracted and v.correct == (extracted == answer) and v.format_ok


def test_a_chinese_response_without_an_answer_line_is_a_format_failure():
    v = judge(
        "图中有一些圆，颜色各不相同，很难说清楚到底有几个，需要进一步观察。\n我不确定。",
        "3",
        "number",
        format_rule=prompts.format_rule("cot_final_answer_zh"),
    )
    assert v.extracted is None and v.reason in FORMAT_REASONS


# --- the verdicts a scored row carries decide its pairs --------------------------------------------


def _sample_row(template_id: str, responses: list[str]) -> dict:
    return dict(
        qid="q1",
        source="s",
        task="t",
        images=[b"png"],
        question="How many circles?",
        answer="3",
        answers=["3"],
        answer_type="number",
        options=[],
        pipeline="correctness",
        prompt_template=template_id,
        sampling="{}",
        error="",
        responses=responses,
        prefix_words=[],
        continuations=[],
    )


def test_r1_rule_decides_the_pairs_of_a_scored_row():
    responses = [
        R1_GOOD,  # right, keeps the rule
        "<think>count</think>\n<think>recount</think>\n\\boxed{3}",  # right answer, two blocks
        "<think>It is \\boxed{3}</think>",  # answer inside the thinking
        "<think>I count four.</think>\n\\boxed{4}",
    ]  # keeps the rule, wrong
    row = score_row(_sample_row("r1_think_boxed", responses))
    assert row["reason"] == ["correct", WRONG_FORMAT, WRONG_FORMAT, "wrong answer"]
    assert row["extracted"] == ["3", None, None, "4"]
    pairs, counts = pair_rows(row, Source(name="s", loader="generated"), seed=0, model="m")
    got = sorted((p["pair_type"], p["chosen_index"], p["rejected_index"]) for p in pairs)
    assert got == [("correctness", 0, 3), ("format", 0, 1), ("format", 0, 2)]
    # the same responses under the default template: the two-block one is a right answer, chosen
    default = score_row(_sample_row("cot_final_answer", responses))
    assert default["correct"][:2] == [True, True]


# --- real vLLM: a tiny build under the R1 template --------------------------------------------------


@pytest.mark.slow
def test_build_under_the_r1_template_judges_by_its_rule(request, trained_model):
    """The "r1" source of the session's shared build (tests/_shared_build.py): 6 shape questions, n=4,
    48 tokens, under its own `prompt_template: r1_think_boxed` (the recipe's stays the default). The
    demo model was trained to write "...\\nFinal answer: X" and writes no think block: under
    r1_think_boxed every response breaks the rule, so samples/ holds "wrong format" verdicts (even
    where the answer is right: the judge without the rule finds right ones) and no response is
    chosen. (Under the default template the same model gives correctness pairs: test_build_e2e.)"""
    from _shared_build import pairs, shared_build
    from _shared_build import samples as samples_of

    run, stats = shared_build(request, trained_model)
    samples = samples_of(run, ["r1"])
    assert len(samples) == 6 and all(r["prompt_template"] == "r1_think_boxed" for r in samples)
    responses = [t for r in samples for t in r["responses"]]
    assert len(responses) == 24 and not [t for t in responses if "<think>" in t.lower()]
    assert [reason for r in samples for reason in r["reason"]] == [WRONG_FORMAT] * 24
    assert all(x is None for r in samples for x in r["extracted"])
    # the rule, not the answer, decided: without it the judge finds right answers among them
    assert any(
        judge(t, r["answer"], r["answer_type"], options=r["options"] or None).correct
        for r in samples
        for t in r["responses"]
    )
    mine = stats["sources"]["r1"]["pairs"]
    assert pairs(run, ["r1"]) == [] and mine["correctness"] == mine["format"] == 0
    recorded = json.loads((run / "recipe.json").read_text())
    assert [s["prompt_template"] for s in recorded["sources"] if s["name"] == "r1"] == ["r1_think_boxed"]
    assert recorded["prompt_template"] == "cot_final_answer"
