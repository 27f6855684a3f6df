"""Answers and options as people wrote them: any number of options (letters past Z, numbered options),
numbers read from typed columns in their shortest exact text, judge errors counted per source, and no
pair whose chosen and rejected are the same text."""

import pytest

from mmpr_pipeline.scoring import judge
from mmpr_pipeline.scoring.modes import labelled_by_question, letter_label, option_labels

THIRTY = [f"city {i}" for i in range(1, 31)]  # options A..Z, AA..AD


def _mc(final: str, reference: str, options) -> tuple[str | None, bool, str]:
    v = judge(f"I compare them all.\nFinal answer: {final}", reference, "multiple_choice", options)
    return v.extracted, v.correct, v.reason


def test_letters_go_on_past_z_as_spreadsheets_count():
    assert [letter_label(i) for i in (0, 25, 26, 27, 51, 52, 701, 702)] == [
        "A", "Z", "AA", "AB", "AZ", "BA", "ZZ", "AAA",
    ]  # fmt: skip
    assert option_labels(THIRTY)[0][26:] == ["AA", "AB", "AC", "AD"]
    # options that carry their own letters keep them, past Z too
    own = [f"{letter_label(i)}. {o}" for i, o in enumerate(THIRTY)]
    assert option_labels(own)[:2] == (option_labels(THIRTY)[0], THIRTY)
    assert _mc("option AC", "AC", own)[:2] == ("AC", True)
    # a short word as the reference is the option's text, not letters past Z
    animals = THIRTY[:27] + ["dog", "cat", "owl"]
    assert _mc("AD", "owl", animals)[:2] == ("AD", True)


@pytest.mark.parametrize(
    "reference,final,expected",
    [
        ("AB", "AB", ("AB", True, "correct")),  # option 28 by its letters
        ("AB", "(AB)", ("AB", True, "correct")),
        ("AB", "option AB", ("AB", True, "correct")),
        ("AB", "AB. city 28", ("AB", True, "correct")),
        ("city 28", "AB", ("AB", True, "correct")),  # the reference as the option's text
        ("AB", "city 28", ("AB", True, "correct")),
        ("AB", "AA", ("AA", False, "wrong answer")),
        ("AB", "A", ("A", False, "wrong answer")),  # A is not AB
        ("AB", "AB. city 27", (None, False, "ambiguous answer")),  # letters of one, text of another
        ("B", "B", ("B", True, "correct")),  # the first 26 as before
    ],
)
def test_a_reference_past_option_26_is_judged_not_a_judge_error(reference, final, expected):
    """Regression: a reference naming option 27 or later raised IndexError on every response."""
    extracted, correct, reason = _mc(final, reference, THIRTY)
    assert (extracted if expected[0] else None, correct, reason) == expected


NUMBERED = ["(1) cat", "(2) dog", "(3) bird"]


@pytest.mark.parametrize(
    "reference,final,expected",
    [
        ("2", "2", ("2", True)),
        ("(2)", "(2)", ("2", True)),
        ("2", "dog", ("2", True)),
        ("2", "2. dog", ("2", True)),
        ("2", "option 2", ("2", True)),
        ("2", "1", ("1", False)),
        ("dog", "2", ("2", True)),
        ("2", "1.2", ("1.2", False)),  # a decimal names no option (not 2)
    ],
)
def test_numbered_options_are_judged_by_their_numbers(reference, final, expected):
    extracted, correct, _ = _mc(final, reference, NUMBERED)
    assert (extracted, correct) == expected


def test_options_numbered_in_the_question_take_their_numbers():
    q = "Which animal barks?\n1. cat\n2. dog\n3) bird"
    assert labelled_by_question(q, ["cat", "dog", "bird"]) == ["1. cat", "2. dog", "3. bird"]
    assert labelled_by_question("Which? (1) cat (2) dog", ["cat", "dog"]) == ["1. cat", "2. dog"]
    lettered = "Which animal barks?\nA. cat\nB. dog"
    assert labelled_by_question(lettered, ["cat", "dog"]) == ["cat", "dog"]  # lettered as before
    assert labelled_by_question("Is 1. cat or dog?", ["cat", "dog"]) == ["cat", "dog"]  # not every one


def test_the_score_stage_judges_numbered_and_long_option_lists():
    from stages.score import score_row

    def row(question, options, answer, responses):
        return dict(
            pipeline="correctness", answer=answer, answers=[answer], answer_type="multiple_choice",
            options=options, question=question, prompt_template="", responses=responses,
        )  # fmt: skip

    numbered = score_row(
        row(
            "Which animal barks?\n1. cat\n2. dog\n3. bird",
            ["cat", "dog", "bird"],
            "2",
            ["It barks.\nFinal answer: 2", "It barks.\nFinal answer: dog", "Meow.\nFinal answer: 1"],
        )
    )
    assert numbered["correct"] == [True, True, False]
    long = score_row(
        row("Which city?", THIRTY, "AC", ["Final answer: AC", "Final answer: city 29", "Final answer: C"])
    )
    assert long["correct"] == [True, True, False]
    assert not any(r.startswith("judge error") for r in long["reason"])


def _chart_png() -> bytes:
    import io

    from PIL import Image, ImageDraw

    img = Image.new("RGB", (32, 32), "white")
    ImageDraw.Draw(img).line((0, 0, 31, 31), fill="black", width=3)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_number_text_is_the_shortest_exact_decimal():
    from decimal import Decimal

    from stages.load import number_text

    cases = {
        0.3: "0.3",
        0.1 + 0.2: "0.3",  # 0.30000000000000004, computed upstream
        3.0: "3",  # an int column with a missing value is float in pandas
        -0.0: "0",
        2.5: "2.5",
        1e-05: "0.00001",
        123456789.123: "123456789.123",
        7: "7",
        10**20: "100000000000000000000",  # ints stay ints, whatever their size
        Decimal("0.300"): "0.3",
        Decimal("1E+2"): "100",
    }
    assert {v: number_text(v) for v in cases} == cases


def test_numbers_from_typed_columns_keep_the_text_people_wrote(tmp_path):
    """Regression: Parquet floats became str(float): a float32 0.3 was the reference
    '0.30000001192092896', a float64 0.1 + 0.2 '0.30000000000000004', 3.0 from a float column '3.0'."""
    from decimal import Decimal

    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mmpr_pipeline.recipe import Fields, Source
    from stages.load import load_source

    png = _chart_png()
    n = 4
    table = pa.table(
        {
            "image": [png] * n,
            "question": [f"Value {i}?" for i in range(n)],
            "a64": pa.array([0.3, 0.1 + 0.2, 3.0, 2.5], pa.float64()),
            "a32": pa.array([0.3, 0.1, 3.0, 1677721.5], pa.float32()),
            "aint": pa.array([3, 0, -12, 7], pa.int64()),
            "adec": pa.array(
                [Decimal("0.300"), Decimal("1.000"), Decimal("12.50"), Decimal("3")], pa.decimal128(9, 3)
            ),
            "alist": pa.array([[0.3, 2.0]] * n, pa.list_(pa.float32())),
            "opts": pa.array([[0.3, 1.0, 2.5]] * n, pa.list_(pa.float32())),
        }
    )
    pq.write_table(table, tmp_path / "rows.parquet")
    datasets.Dataset(table.drop_columns(["adec"])).save_to_disk(str(tmp_path / "disk"))
    expected = {
        "a64": ["0.3", "0.3", "3", "2.5"],
        "a32": ["0.3", "0.1", "3", "1677721.5"],
        "aint": ["3", "0", "-12", "7"],
        "adec": ["0.3", "1", "12.5", "3"],
    }
    for loader, path in (("parquet", tmp_path / "rows.parquet"), ("hf_disk", tmp_path / "disk")):
        for column, want in expected.items():
            if loader == "hf_disk" and column == "adec":
                continue
            src = Source(
                name="s", loader=loader, path=str(path), answer_type="number", fields=Fields(answer=column)
            )
            questions, rejects, _ = load_source(src, unit_size=8)
            assert not rejects, rejects
            assert [q["answer"] for q in questions] == want, (loader, column)
        src = Source(
            name="s",
            loader=loader,
            path=str(path),
            answer_type="vqa",
            fields=Fields(answer="alist", options="opts"),
        )
        q = load_source(src, unit_size=8)[0][0]
        assert (q["answers"], q["options"]) == (["0.3", "2"], ["0.3", "1", "2.5"]), loader
