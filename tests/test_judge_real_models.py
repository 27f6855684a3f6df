"""The answer styles of real models (issue 12): each class that used to turn a correct response
into a wrong or unparsable one, and the near miss that must stay wrong beside it."""

import pytest

from mmpr_pipeline.scoring import extract, judge

WORK = "We set up the equation from the figure and solve it step by step."
OPTIONS = ["12", "34", "56", "78"]


def math(response, reference):
    return judge(response, reference, "math", timeout=10.0)  # verdicts here; speed is bounded elsewhere


@pytest.mark.parametrize(
    "response,reference",
    [
        (f"{WORK}\nFinal Answer: The final answer is $28\\%$. I hope it is correct.", "28\\%"),
        (
            f"{WORK} So \\boxed{{28\\%}}.\nFinal Answer: The final answer is $28\\%$. I hope it is correct.",
            "28\\%",
        ),
        (
            f"{WORK}\nFinal Answer: The final answer is $[0, 1)$. I hope it is correct. <|im_start|>user",
            "[0,1)",
        ),
    ],
)
def test_minerva_closing_sentence(response, reference):
    v = math(response, reference)
    assert v.correct and v.format_ok and "hope" not in v.extracted


def test_words_on_the_answer_line():
    assert math(f"{WORK}\nFinal Answer: The largest $n$ is 34.", "34").correct
    assert judge(f"{WORK}\nFinal Answer: The largest $n$ is 34.", "34", "number").correct
    assert math(f"{WORK}\nFinal answer: The smallest value of $k$ is $\\frac{{3}}{{2}}$.", "1.5").correct
    assert math(
        f"{WORK}\nFinal answer: \\frac{{\\pi}}{{2}} radians", "\\pi/2"
    ).correct  # a unit, no delimiters
    assert not math(f"{WORK}\nFinal answer: \\frac{{\\pi}}{{3}} radians", "\\pi/2").correct
    assert not math(f"{WORK}\nFinal answer: \\frac{{\\pi}}{{2}} is wrong", "\\pi/2").correct
    wrong = math(f"{WORK}\nFinal Answer: The largest $n$ is 35.", "34")
    assert not wrong.correct and wrong.reason == "wrong answer"


def test_answer_inside_the_last_sentence_counts_only_when_right():
    assert math(f"{WORK}\nTherefore $x \\geq 5$ is the solution.", "[5, \\infty)").correct
    assert math(
        f"{WORK}\nThe identity matrix is $\\begin{{pmatrix}}1 & 0\\\\ 0 & 1\\end{{pmatrix}}$.",
        "\\begin{pmatrix}1&0\\\\0&1\\end{pmatrix}",
    ).correct
    v = math(f"{WORK}\nTherefore $x > 5$ is the solution.", "[5, \\infty)")
    assert not v.correct and v.extracted is None and v.reason == "no final answer"  # never a rejected one


def test_several_boxes():
    two = f"{WORK}\nThe solutions are $\\boxed{{(2, 2)}} \\text{{and}} \\boxed{{(6, 2)}}$."
    assert math(two, "(2,2),(6,2)").correct
    assert math(two, "\\boxed{(2, 2)} \\text{and} \\boxed{(6, 2)}").correct  # a reference with two boxes
    assert not math(
        f"{WORK}\nThe solution is $\\boxed{{(6, 2)}}$.", "\\boxed{(2, 2)} \\text{and} \\boxed{(6, 2)}"
    ).correct
    assert not math(f"{WORK}\nSo $x = \\boxed{{3}}$ or $x = \\boxed{{4}}$.", "4").correct  # a hedge, not 4
    hedge = judge(
        f"{WORK}\nThe correct option is \\(\\boxed{{C}}\\) or \\(\\boxed{{B}}\\).",
        "B",
        "multiple_choice",
        OPTIONS,
    )
    assert not hedge.correct and hedge.reason == "ambiguous answer"
    assert math(
        f"{WORK}\nThe sum is \\boxed{{\\frac{{7}}{{3}}}}... wait, redo: \\boxed{{\\frac{{7}}{{2}}}}", "3.5"
    ).correct


def test_only_box_against_a_later_final_line_is_ambiguous_but_intermediate_boxes_are_not():
    v = judge("The total is \\boxed{3}.\n\nFinal answer: 4", "4", "number")
    assert not v.correct and v.reason == "ambiguous answer"
    many = (
        f"{WORK} First \\boxed{{200}}, then \\boxed{{255}}.\n"
        "Final Answer: The final answer is $10,455$. I hope it is correct."
    )
    assert math(many, "10455").correct


@pytest.mark.parametrize(
    "said,reference,expected",
    [
        ("0.0833333333", "\\frac{1}{12}", True),
        ("0.083333", "\\frac{1}{12}", True),
        ("-0.75", "-\\frac{3}{4}", True),
        ("0.333333", "\\frac{1}{3}", True),
        ("0.0833", "\\frac{1}{12}", False),
        ("0.33", "\\frac{1}{3}", False),
        ("0.0843333333", "\\frac{1}{12}", False),
        ("0.0833333333", "\\frac{1}{11}", False),
    ],
)
def test_decimals_for_fractions_within_six_places(said, reference, expected):
    assert math(f"{WORK}\nFinal answer: {said}", reference).correct is expected


@pytest.mark.parametrize(
    "said,reference,answer_type,expected",
    [
        ("1000,99", "1000.99", "math", True),
        ("1000,99", "1000.99", "number", True),
        ("3,5", "\\frac{7}{2}", "math", True),
        ("0,111", "0.111", "math", True),
        ("1000,98", "1000.99", "math", False),
        ("1,234", "1.234", "math", False),
        ("1,234", "1234", "number", True),
    ],
)
def test_decimal_comma(said, reference, answer_type, expected):
    assert judge(f"{WORK}\nFinal answer: {said}", reference, answer_type, timeout=10.0).correct is expected


def test_display_maths_over_lines():
    assert math(f"{WORK}\nThe answer is\n\\[\n9\n\\]", "9").correct
    assert math(f"{WORK}\nFinal Answer:\n$$\n\\frac{{9}}{{2}}\n$$", "4.5").correct
    assert math(
        f"{WORK}\nFinal answer: \\boxed{{\n\\begin{{pmatrix}} 0 & 3 \\\\ 0 & -1 \\end{{pmatrix}}\n}}.",
        "\\begin{pmatrix} 0 & 3 \\\\ 0 & -1 \\end{pmatrix}",
    ).correct
    assert not math(f"{WORK}\nFinal Answer:\n\\[\n8\n\\]", "9").correct
    matrix = f"{WORK}\nFinal Answer:\n\\[\n\\begin{{pmatrix}} 1 & 0 \\\\\n 0 & 1\n\\end{{pmatrix}}\n\\]"
    assert math(matrix, "\\begin{pmatrix}1&0\\\\0&1\\end{pmatrix}").correct  # a block of several lines


def test_r1_thinking_is_not_the_answer():
    think = "<think>\nMaybe \\boxed{5}? Let me check again.\n</think>\n\n"
    assert math(think + "The value is $\\boxed{6}$.", "6").correct
    assert not math(think + "The value is $\\boxed{6}$.", "5").correct
    v = math("<think>\nSo the answer is 6.\nFinal answer: 6", "6")  # never closed: ran out of tokens
    assert v.extracted is None and v.reason == "no final answer"
    assert judge(
        "<think>\nIt is 34, option B.\n</think>\n\n**Final Answer**\n\\boxed{B}",
        "B",
        "multiple_choice",
        OPTIONS,
    ).correct


@pytest.mark.parametrize(
    "response,reference,answer_type",
    [
        ("根据图中的信息求解。\n\n最终答案：$\\frac{1}{2}$", "0.5", "math"),
        ("根据图中的信息求解。\n**最终答案**：$\\boxed{12}$", "12", "math"),
        ("根据图中的信息求解。\n所以答案是 $\\frac{1}{2}$。", "0.5", "math"),
        ("根据图中的信息求解。\n最终答案为 $x \\geq 5$", "[5, \\infty)", "math"),
        ("数一数图中的物体。\n最终答案：34", "34", "number"),
        ("图中柱子高度为34。\n\n答案：B", "B", "multiple_choice"),
    ],
)
def test_chinese_final_answer(response, reference, answer_type):
    assert judge(
        response, reference, answer_type, OPTIONS if answer_type == "multiple_choice" else None, timeout=10.0
    ).correct
    wrong = (
        response.replace("34", "43").replace("B", "C").replace("frac{1}{2}", "frac{1}{3}").replace("12", "13")
    )
    wrong = wrong.replace("geq", "leq")
    assert not judge(
        wrong, reference, answer_type, OPTIONS if answer_type == "multiple_choice" else None, timeout=10.0
    ).correct


@pytest.mark.parametrize(
    "answer_type,reference,right,wrong",
    [
        ("multiple_choice", "B", "The answer is (B) 34.", "The answer is (C) 56."),
        ("multiple_choice", "B", "**Answer:** B", "**Answer:** D"),
        (
            "multiple_choice",
            "B",
            "Final Answer: The final answer is (B). I hope it is correct.",
            "Final Answer: The final answer is (C). I hope it is correct.",
        ),
        (
            "number",
            "34",
            "Final Answer: The final answer is $34$. I hope it is correct.",
            "Final Answer: The final answer is $43$. I hope it is correct.",
        ),
        ("number", "34", "**Answer:** 34 apples", "**Answer:** 35 apples"),
        ("vqa", ["dog"] * 10, "The answer is a dog.", "The answer is a cat."),
        ("chart", "45", "**Answer:** 46", "**Answer:** 48"),
        (
            "document",
            "Acme Corporation",
            "Final Answer: The final answer is Acme Corporation. I hope it is correct.",
            "Final Answer: The final answer is Globex Inc. I hope it is correct.",
        ),
    ],
)
def test_other_types_read_the_same_styles(answer_type, reference, right, wrong):
    options = OPTIONS if answer_type == "multiple_choice" else None
    assert judge(f"Reading the figure.\n{right}", reference, answer_type, options).correct
    assert not judge(f"Reading the figure.\n{wrong}", reference, answer_type, options).correct


def test_latex_lambda_and_the_word_open_are_not_code():
    assert math(
        f"{WORK}\nFinal Answer: The final answer is $\\lambda = 3$. I hope it is correct.", "3"
    ).correct
    assert math(f"{WORK}\nFinal answer: The answer lies in the open interval $(1, 3)$.", "(1,3)").correct


def test_a_worked_solution_as_the_maths_reference():
    solution = (
        "Half of 56 is 28.\nSo the loss is 28 out of 100.\n"
        "Final Answer: The final answer is $28\\%$. I hope it is correct."
    )
    assert math(f"{WORK}\nThe total loss is $\\boxed{{28\\%}}$.", solution).correct
    assert not math(f"{WORK}\nThe total loss is $\\boxed{{27\\%}}$.", solution).correct


def test_extraction_keeps_the_segment_for_maths():
    found = extract(f"{WORK}\nFinal Answer: The largest $n$ is 34.")
    assert found.answer == "The largest n is 34" and found.segment == "The largest $n$ is 34."
    found = extract(f"{WORK}\nSo \\boxed{{(2, 2)}} \\text{{and}} \\boxed{{(6, 2)}}")
    assert found.answer == "(2, 2) or (6, 2)" and found.segment == "\\boxed{(2, 2)}, \\boxed{(6, 2)}"
