"""The answer judge: extraction, every answer type, reasons, and the labelled corpus."""

from pathlib import Path

import numpy as np
import pytest

from mmpr_pipeline import tasks
from mmpr_pipeline.recipe import ANSWER_TYPES
from mmpr_pipeline.scoring import FORMAT_REASONS, REASONS, Verdict, extract, judge, regression
from mmpr_pipeline.scoring.modes import anls, normalize_vqa

CORPUS = Path(__file__).parent / "data" / "judge_corpus.jsonl"
COLORS = ["blue", "red", "green", "yellow"]


def load_corpus() -> list[dict]:
    return regression.load_corpus(CORPUS)


def test_corpus_regression_suite_pair_safety_and_false_accepts():
    """The regression suite (the judge's own development set): every labelled case keeps its
    verdict. Printed (pytest -s): pair safety, false accepts, and agreement per type."""
    rows = load_corpus()
    assert len(rows) >= 600
    assert len({r["id"] for r in rows}) == len(rows)
    assert {r["answer_type"] for r in rows} == set(ANSWER_TYPES)
    assert sum(r["style"] in regression.REAL_MODEL_STYLES for r in rows) >= 250, "real models' answer styles"
    assert sum(not r["expected"] for r in rows) >= 150, "the corpus needs its near misses"

    def checked_judge(*args):
        v = judge(*args, timeout=10.0)  # verdicts, not speed (test_scoring_safety bounds the time)
        assert isinstance(v, Verdict) and 0.0 <= v.score <= 1.0 and v.reason in REASONS
        return v

    report = regression.run_suite(rows, checked_judge)
    print(f"\njudge regression suite, {report.cases} labelled cases:\n{report.figures()}\n{report.table()}")
    assert report.pair_unsafe == [], f"correct responses that would be rejected: {report.pair_unsafe}"
    assert report.false_accepts == [], f"wrong responses judged correct: {report.false_accepts}"
    failures = [f"{i} ({note}): {v}" for i, note, v in report.disagreements]
    assert not failures, "judge regressions:\n" + "\n".join(failures) + "\n" + report.table()


def test_generated_demo_responses_are_judged_right():
    """tasks.py writes '...reasoning...\\nFinal answer: X': every one is correct and well formatted."""
    for row in tasks.generate(40, seed=3):
        v = judge(row["response"], row["answer"], row["answer_type"], row["options"])
        assert v.correct and v.score == 1.0 and v.format_ok, (row["response"], v)
        wrong = (
            "No"
            if row["answer"] == "Yes"
            else "Yes"
            if row["answer"] == "No"
            else "A"
            if row["answer"] != "A" and row["answer_type"] == "multiple_choice"
            else "B"
            if row["answer_type"] == "multiple_choice"
            else str(int(row["answer"]) + 1)
        )
        bad = judge(
            f"{row['rationale']}\nFinal answer: {wrong}", row["answer"], row["answer_type"], row["options"]
        )
        assert not bad.correct and bad.reason == "wrong answer"


@pytest.mark.parametrize(
    "response",
    [
        "The shape is red.\nFinal answer: B",
        "The shape is red.\nFinal Answer: (B)",
        "The shape is red.\nAnswer: B.",
        "The shape is red.\n**Final Answer:** **B**",
        "The shape is red.\nFinal answer: B) red",
        "The shape is red.\nFinal answer: option B",
        "The shape is red.\nFinal answer: red",
        "The shape is red, so the answer is $\\boxed{B}$.",
        "The shape is red.\n### Final Answer\nB",
        "B",
        "(B)",
        "The correct option is (B) red.",
        "The shape is red.\nFinal answer: \\text{B}",
    ],
)
def test_option_letter_dresses(response):
    v = judge(response, "B", "multiple_choice", COLORS)
    assert (v.extracted, v.correct, v.reason) == ("B", True, "correct")


@pytest.mark.parametrize(
    "response,reason",
    [
        ("It is red or blue.\nFinal answer: A or B", "ambiguous answer"),
        ("It is red.\nFinal answer: C. red", "ambiguous answer"),  # letter C, text of B
        ("It is red.\nFinal answer: C", "wrong answer"),
        ("It is hard to say.\nFinal answer: I cannot tell", "unparsable answer"),
    ],
)
def test_multiple_choice_near_misses(response, reason):
    v = judge(response, "B", "multiple_choice", COLORS)
    assert not v.correct and v.score == 0.0 and v.reason == reason


def test_no_final_answer_is_a_format_failure():
    for response in [
        "The image shows a red circle.\nIt is in the middle.",
        "",
        "   \n  ",
        "Let me think.\nFinal answer:",
        "x" * 10_000,
    ]:
        v = judge(response, "B", "multiple_choice", COLORS)
        assert v.extracted is None and not v.correct and v.score == 0.0
        assert v.reason == "no final answer" and v.reason in FORMAT_REASONS and not v.format_ok
    v = judge("Long thoughts.\nFinal answer: " + "red " * 400, "B", "multiple_choice", COLORS)
    assert v.extracted is None and v.reason == "answer too long"


def test_format_ok_follows_the_papers_rules():
    assert judge("I count three.\nFinal answer: 3", "3", "number").format_ok
    assert judge("I count three.\n\\boxed{3}", "3", "number").format_ok
    no_rationale = judge("Final answer: 3", "3", "number")
    assert no_rationale.correct and not no_rationale.format_ok  # reported, not judged
    trailing = judge("I count three.\nFinal answer: 3\nHope this helps.", "3", "number")
    assert trailing.correct and not trailing.format_ok
    assert not judge("3", "3", "number").format_ok  # terse: no rationale


def test_last_final_answer_and_last_box_count():
    assert judge("Final answer: A\nWait, no.\nFinal answer: C", "C", "multiple_choice", []).correct
    assert judge("\\boxed{\\frac{7}{\\boxed{2}}} no: \\boxed{\\frac{7}{2}}", "3.5", "number").correct
    assert extract("so \\boxed{\\{1, \\{2\\}\\}} done").answer == "\\{1, \\{2\\}\\}"


def test_two_different_final_answers_are_not_correct():
    v = judge("The total is \\boxed{3}.\nFinal answer: 4", "4", "number")
    assert not v.correct and v.reason == "ambiguous answer"
    assert judge("The total is \\boxed{4}.\nFinal answer: 4 apples", "4", "number").correct


@pytest.mark.parametrize(
    "said,reference,expected",
    [
        ("1/2", "0.5", True),
        ("0.5", "1/2", True),
        ("50%", "1/2", True),
        ("\\frac{1}{2}", "0.5", True),
        ("\\dfrac{1}{2}", "50%", True),
        ("1,234", "1234", True),
        ("-7", "-7", True),
        ("−7", "-7", True),
        ("12 cm", "12", True),
        ("$45", "45", True),
        ("45°", "45", True),
        ("45^\\circ", "45", True),
        ("1.5e3", "1500", True),
        ("1.5 \\times 10^{3}", "1500", True),
        ("three", "3", True),
        ("x = 7", "7", True),
        ("0.33", "1/3", True),
        ("2\\frac{1}{2}", "2.5", True),
        ("50", "0.5", False),
        ("0.3", "1/3", False),
        ("0.34", "1/3", False),
        ("3.1", "3.14159", False),
        ("7", "-7", False),
        ("3 or 4", "3", False),
        ("between 3 and 4", "3", False),
    ],
)
def test_number_equivalence(said, reference, expected):
    assert judge(f"Computing it.\nFinal answer: {said}", reference, "number").correct is expected


@pytest.mark.parametrize(
    "said,reference,expected",
    [
        ("\\frac{1}{2}", "0.5", True),
        ("x = 3", "3", True),
        ("(1, 3]", "(1,3]", True),
        ("\\{1,2\\}", "\\{2,1\\}", True),
        ("2\\sqrt{2}", "\\sqrt{8}", True),
        ("x^2+2x+1", "(x+1)^2", True),
        ("\\frac{\\pi}{2}", "\\pi/2", True),
        ("(1, 3)", "(1,3]", False),
        ("0.33", "\\frac{1}{3}", False),
        ("x = 4", "3", False),
        ("3 \\text{ or } 4", "3", False),
    ],
)
def test_math_symbolic_equivalence(said, reference, expected):
    assert judge(f"We simplify.\n\\boxed{{{said}}}", reference, "math").correct is expected


@pytest.mark.parametrize(
    "said,expected",
    [
        ("Yes", True),
        ("yes.", True),
        ("YES!", True),
        ("**Yes**", True),
        ("Yes, there are more circles.", True),
        ("No", False),
        ("yes or no", False),
        ("maybe", False),
    ],
)
def test_yes_no(said, expected):
    assert judge(f"I count them.\nFinal answer: {said}", "Yes", "yes_no").correct is expected


def test_text_and_reference_lists():
    assert judge("Looking.\nFinal answer: The Eiffel Tower.", "Eiffel Tower", "text").correct
    assert judge("Looking.\nFinal answer: navy", ["navy", "dark blue"], "text").correct
    assert not judge("Looking.\nFinal answer: light blue", ["navy", "dark blue"], "text").correct
    assert judge("Looking.\nFinal answer: B", np.array(["B"]), "multiple_choice", np.array(COLORS)).correct


def test_vqa_accuracy_matches_the_official_formula():
    refs = ["2"] * 3 + ["3"] * 7  # leave-one-out: (3 * 2/3 + 7 * 1) / 10
    v = judge("2", refs, "vqa")
    assert v.score == pytest.approx(0.9) and v.correct
    v = judge("2", ["2"] * 2 + ["3"] * 8, "vqa")  # (2 * 1/3 + 8 * 2/3) / 10
    assert v.score == pytest.approx(0.6) and not v.correct and v.reason == "partial match"
    assert judge("Two.", ["2"] * 10, "vqa").score == 1.0
    assert normalize_vqa("A dog!") == "dog" and normalize_vqa("dont") == "don't"


def test_chart_relaxed_accuracy():
    for said, ref, ok in [
        ("21", "20", True),
        ("22", "20", False),
        ("45%", "45", True),
        ("0.45", "45%", True),
        ("2018", "2019", False),
        ("Asia", "asia", True),
        ("0.1", "0", False),
    ]:
        assert judge(f"Reading the chart.\nFinal answer: {said}", ref, "chart").correct is ok, (said, ref)


def test_document_anls():
    assert anls("invoice", "invoice") == 1.0
    assert anls("Jon Smith", "John Smith") == pytest.approx(0.9)
    assert anls("abc", "xyz") == 0.0  # NL >= 0.5 -> 0
    # a high ANLS alone decides nothing: an OCR slip and another word look alike to it
    v = judge("Reading the header.\nFinal answer: Acme Corporaton Ltd", "Acme Corporation Ltd", "document")
    assert (v.correct, v.reason, v.undecided) == (False, "partial match", True)
    assert v.score == pytest.approx(0.95)
    # ... and never makes an answer correct when its numbers or dates differ
    v = judge("Reading the header.\nFinal answer: 12/03/2012", "12/03/2021", "document")
    assert (v.correct, v.reason) == (False, "wrong answer") and v.score == pytest.approx(0.8)
    v = judge("Reading the header.\nFinal answer: March 4, 2019", "March 3, 2019", "document")
    assert (v.correct, v.reason) == (False, "wrong answer") and v.score > 0.9


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="unknown answer_type 'numeric'"):
        judge("Final answer: 3", "3", "numeric")
    with pytest.raises(ValueError, match="reference answer is empty"):
        judge("Final answer: 3", "  ", "number")
    with pytest.raises(TypeError, match="response must be a string"):
        judge(None, "3", "number")


def test_verdict_as_dict():
    d = judge("I count.\nFinal answer: 3", "3", "number").as_dict()
    assert d == {"extracted": "3", "correct": True, "score": 1.0, "reason": "correct", "format_ok": True}


@pytest.mark.parametrize(
    "reference,letter",
    [("B. red", "B"), ("(C) 12", "C"), ("D) bar D", "D"), ("[A] yes", "A"), ("B: the bars", "B")],
)
def test_a_multiple_choice_reference_that_leads_with_its_letter_names_that_option(reference, letter):
    """Regression: a reference written as letter plus text ("B. red") named no option, so every
    response, the right letter included, was judged wrong."""
    right = judge(f"The red one is second.\nFinal answer: {letter}", reference, "multiple_choice")
    wrong = judge(
        "The red one is second.\nFinal answer: " + ("A" if letter != "A" else "B"),
        reference,
        "multiple_choice",
    )
    assert (right.correct, wrong.correct) == (True, False)
    # a text reference that merely starts with a capital is not a letter
    assert not judge("It barks.\nFinal answer: A", "A dog", "multiple_choice").correct
    # only a reference that leads with its letter names an option, not one that ends with one
    assert not judge("The label says so.\nFinal answer: B", "Type B", "multiple_choice").correct
