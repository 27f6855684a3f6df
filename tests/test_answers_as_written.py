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

    from mmpr_pipeline.sources import number_text

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


def _scored_row(source, pipeline, i, question, answer, responses, **extra):
    """A Sample row as sampling leaves it, then scored by the real judge (stages/score.py)."""
    from mmpr_pipeline import records
    from stages.sample import empty_sample_columns
    from stages.score import score_row

    png = _chart_png()
    row = dict(
        qid=records.question_id(source, [png], question, answer), source=source, row_index=i, unit=0,
        unit_plan="", pipeline=pipeline, task="", images=[png], question=question, answer=answer,
        answers=[answer] if answer else [], answer_type="multiple_choice", options=["red", "blue"],
        given_response="", rationale="",
    )  # fmt: skip
    empty_sample_columns(row, "raw", "{}")
    row.update(responses=responses, n_tokens=[9] * len(responses), finish_reasons=["stop"] * len(responses))
    row.update(extra)
    return score_row(row)


def test_judge_errors_and_same_text_pairs_are_counted_per_source_and_reported(tmp_path, capsys):
    """Regression: a judge error was visible only in samples/ (the build said nothing), and a pair
    whose chosen and rejected differ only in white space (a DropoutNTP continuation that reproduces
    the original) was written and trained on."""
    import pyarrow.parquet as pq

    from mmpr_pipeline import build_summary, pipeline
    from mmpr_pipeline import recipe as recipe_mod
    from mmpr_pipeline.units import BuildStats, WorkUnit

    rec = recipe_mod.from_dict(
        dict(
            name="r",
            sources=[
                dict(name="mc", loader="generated", fields=dict(rationale="solution")),
                dict(name="desc", loader="generated", pipeline="dropout_ntp", dropout=dict(min_words=4)),
            ],
        )
    )
    right, wrong = "The shape is red.\nFinal answer: A", "The shape is blue.\nFinal answer: B"
    solution = wrong.replace(" ", "  ")  # the source's worked solution: a wrong sample up to white space
    mc_rows = [
        # a reference the judge cannot use: every response a judge error, never paired
        _scored_row("mc", "correctness", 0, "Which colour?", "", [right, wrong, right]),
        _scored_row("mc", "correctness", 1, "Which now?", "A", [right, wrong], rationale=solution),
    ]
    assert [r.startswith("judge error") for r in mc_rows[0]["reason"]] == [True] * 3
    original = "The image shows a red circle on a white background today."
    desc_rows = [
        _scored_row(
            "desc", "dropout_ntp", 0, "Describe this image.", "", [original, original],
            prefix_words=[5, 5],
            continuations=[" circle on a  white\nbackground today.", " beside a sleeping dog."],
        )
    ]  # fmt: skip
    stats = BuildStats.for_recipe(rec)
    sources = {s.name: s for s in rec.sources}
    for name, rows in (("mc", mc_rows), ("desc", desc_rows)):
        unit = WorkUnit(source=name, unit=0, path="", start=0, stop=len(rows), first_row=0)
        counts = pipeline.write_unit_files(str(tmp_path), unit, rows, [], sources, seed=0, model="m")
        stats.add_unit(name, counts)
        pairs = pq.read_table(tmp_path / "pairs" / name / "unit-00000.parquet").to_pylist()
        assert all("".join(p["chosen"].split()) != "".join(p["rejected"].split()) for p in pairs)
    per_source = stats.to_dict()["sources"]
    assert (per_source["mc"]["judge_errors"], per_source["desc"]["judge_errors"]) == (3, 0)
    assert per_source["mc"]["same_text_pairs"] == 1  # the worked solution against its own copy
    assert per_source["desc"]["same_text_pairs"] == 1 and per_source["desc"]["pairs"]["dropout_ntp"] == 1
    assert per_source["mc"]["pairs"]["correctness"] == 1  # the sampled right answer vs the wrong one

    build_summary.print_summary(
        tmp_path, {**stats.to_dict(), "stage_seconds": dict.fromkeys(("total", "plan", "generate_wall"), 0.0)}
    )
    out = " ".join(capsys.readouterr().out.split())
    assert "mc: the judge failed on 3 response(s)" in out
    assert "desc: 1 pair(s) dropped: chosen and rejected the same text" in out


def test_the_card_reports_judge_errors_and_dropped_pairs_per_source(tmp_path):
    import json

    from _run_fixture import make_run

    from mmpr_pipeline import card

    run = make_run(tmp_path / "run", n_shapes=2, n_scenes=1, n_shards=1)
    assert "judge errors" not in card.render_card(card.read_run(run))  # none: no table
    stats = json.loads((run / "stats.json").read_text())
    stats["sources"]["shapes"].update(judge_errors=3, same_text_pairs=0)
    stats["sources"]["scenes"].update(judge_errors=0, same_text_pairs=2)
    (run / "stats.json").write_text(json.dumps(stats))
    text = card.render_card(card.read_run(run))
    assert "| `shapes` | 3 | 0 |" in text and "| `scenes` | 0 | 2 |" in text
