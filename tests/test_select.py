"""`mmpr select RUN_DIR --pass-rate LO:HI | --all-wrong --out DIR` and the card's pass-rate histogram
(issue 13 item 6), on a fixture run folder (tests/_run_fixture.py: real Parquet, real images) whose
samples unit carries hand-set verdicts, one question per case below. The selection is loaded back
with `datasets` and with a recipe's own loader. tests/test_answer_fix.py runs it on a real build.
"""

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from _run_fixture import finish_unit, make_run

from mmpr_pipeline import records
from mmpr_pipeline.cli import main
from mmpr_pipeline.scoring import JUDGE_ERROR

T, F = True, False
UNDECIDED = f"{JUDGE_ERROR}: boom"
# (correct, reason per response or None for "r", engine error): the pass rate is correct / judged
CASES = [
    ([F, F, F, F], None, ""),  # 0    all wrong
    ([T, F, F, F, F], None, ""),  # 0.2  the band's lower end, included
    ([T, F, F, F], None, ""),  # 0.25
    ([T, T, F, F], None, ""),  # 0.5
    ([T, T, T, T, F], None, ""),  # 0.8  the upper end, included
    ([T, T, T, F], None, ""),  # 0.75
    ([T, T, T, T], None, ""),  # 1    all right
    ([T, F, F, F, F, F], None, ""),  # 0.17 below
    ([T, F], None, "engine died"),  #      no rate: the engine failed on it
    ([F, F], [UNDECIDED, UNDECIDED], ""),  #      no rate: nothing judged
    ([T, T, F, F], ["r", "r", UNDECIDED, "r"], ""),  # 2/3: the unjudged one counts for neither side
    ([F, F], ["math check timed out", "r"], ""),  # 0/1: all wrong
]
IN_BAND = [1, 2, 3, 4, 5, 10]
ALL_WRONG = [0, 11]


@pytest.fixture
def run(tmp_path) -> Path:
    run = make_run(tmp_path / "run", n_shapes=len(CASES))
    unit = run / "samples" / "shapes" / "unit-00000.parquet"
    rows = pq.read_table(unit).to_pylist()
    for i, (row, (correct, reason, error)) in enumerate(zip(rows, CASES)):
        row.update(
            correct=correct,
            reason=reason or ["r"] * len(correct),
            error=error,
            responses=["Final answer: 1"] * len(correct),
            extracted=["1"] * len(correct),
            rationale=f"worked solution {i}",
            answers=[row["answer"], f"alt {i}"],
        )
    pq.write_table(pa.Table.from_pylist(rows, schema=records.SAMPLE_SCHEMA), unit)
    return run


def _samples(run: Path) -> list[dict]:
    return pq.read_table(run / "samples" / "shapes" / "unit-00000.parquet").to_pylist()


def test_select_writes_the_questions_whose_pass_rate_lies_in_the_band(run, tmp_path, capsys):
    from datasets import load_dataset

    out = tmp_path / "band"
    assert main(["select", str(run), "--pass-rate", "0.2:0.8", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "selected 6 of 12 questions (pass rate 0.2-0.8)" in printed
    assert [line.split() for line in printed.splitlines() if line.startswith("shapes")] == [
        ["shapes", "12", "6", "3", "1", "2"]
    ]  # questions, selected, below, above, no rate
    samples = _samples(run)
    got = load_dataset("parquet", data_dir=str(out / "data"), split="train")
    assert got["qid"] == [samples[i]["qid"] for i in IN_BAND]
    assert got["pass_rate"] == pytest.approx([0.2, 0.25, 0.5, 0.8, 0.75, 2 / 3])
    assert got["n_judged"] == [5, 4, 4, 5, 4, 3]
    for row, i in zip(got, IN_BAND):
        s = samples[i]
        assert (
            row["question"],
            row["answer"],
            row["answers"],
            row["options"],
            row["answer_type"],
            row["task"],
        ) == (s["question"], s["answer"], s["answers"], s["options"], s["answer_type"], s["task"])
        assert row["rationale"] == f"worked solution {i}" and row["source"] == "shapes"
        assert row["image"][0].size == records.decode_image(s["images"][0]).size  # decoded to PIL
    raw = pq.read_table(out / "data" / "train-00000-of-00001.parquet").to_pylist()
    assert [r["image"][0]["bytes"] for r in raw] == [
        samples[i]["images"][0] for i in IN_BAND
    ]  # bytes as sampled
    summary = json.loads((out / "selection.json").read_text())
    assert summary["pass_rate"] == [0.2, 0.8] and summary["selected"] == 6
    assert "scenes" not in summary["sources"]  # DropoutNTP questions have no pass rate


def test_all_wrong_writes_the_questions_no_sample_answered_right(run, tmp_path):
    out = tmp_path / "hard"
    assert main(["select", str(run), "--all-wrong", "--out", str(out)]) == 0
    got = pq.read_table(out / "data" / "train-00000-of-00001.parquet").to_pylist()
    assert [r["qid"] for r in got] == [_samples(run)[i]["qid"] for i in ALL_WRONG]
    assert [(r["n_correct"], r["n_judged"]) for r in got] == [(0, 4), (0, 1)]


def test_a_recipe_loads_the_selection_and_gets_the_same_questions(run, tmp_path):
    from mmpr_pipeline import recipe as recipe_mod
    from stages.load import load_source

    out = tmp_path / "band"
    assert main(["select", str(run), "--pass-rate", "0.2:0.8", "--out", str(out)]) == 0
    data = dict(
        name="rl-prompts",
        model="demo",
        sources=[
            dict(
                name="picked",
                loader="parquet",
                path=str(out / "data"),
                fields={"answer_type": "answer_type", "answer": "answers", "rationale": "rationale"},
            )
        ],
    )
    (tmp_path / "rl.yaml").write_text(yaml.safe_dump(data))
    recipe = recipe_mod.load(tmp_path / "rl.yaml")  # validation passes
    questions, rejects, _ = load_source(recipe.sources[0], recipe.unit_size)
    samples = _samples(run)
    assert not rejects and len(questions) == len(IN_BAND)
    for q, i in zip(questions, IN_BAND):
        s = samples[i]
        assert (q["images"], q["question"], q["answers"], q["answer_type"], q["rationale"]) == (
            s["images"],
            s["question"],
            s["answers"],
            s["answer_type"],
            f"worked solution {i}",
        )


def test_selection_is_written_in_parts_one_unit_at_a_time(run, tmp_path, monkeypatch):
    from datasets import load_dataset

    from mmpr_pipeline import selection

    unit = run / "samples" / "shapes" / "unit-00000.parquet"
    table = pq.read_table(unit)  # two units of six questions
    pq.write_table(table.slice(0, 6), unit)
    pq.write_table(table.slice(6), unit.with_name("unit-00001.parquet"))
    finish_unit(unit.with_name("unit-00001.parquet"))
    monkeypatch.setattr(selection, "PART_ROWS", 2)
    read = []
    original = selection._kept_rows
    monkeypatch.setattr(
        selection, "_kept_rows", lambda path, keep: read.append([k[0] for k in keep]) or original(path, keep)
    )
    assert main(["select", str(run), "--pass-rate", "0:1", "--out", str(tmp_path / "parts")]) == 0
    names = sorted(p.name for p in (tmp_path / "parts" / "data").iterdir())
    assert names == ["train-00000-of-00002.parquet", "train-00001-of-00002.parquet"]
    assert read == [[0, 1, 2, 3, 4, 5], [0, 1, 4, 5]]  # per unit file, images of the kept rows only
    assert len(load_dataset("parquet", data_dir=str(tmp_path / "parts" / "data"), split="train")) == 10


def test_a_band_nothing_falls_in_writes_no_part_and_says_so(run, tmp_path, capsys):
    out = tmp_path / "none"
    assert main(["select", str(run), "--pass-rate", "0.9:0.95", "--out", str(out)]) == 0
    assert "no question matched (pass rate 0.9-0.95)" in capsys.readouterr().out
    assert (
        list((out / "data").iterdir()) == []
        and json.loads((out / "selection.json").read_text())["selected"] == 0
    )


@pytest.mark.parametrize(
    "band, reason",
    [
        ("0.8", "expected LO:HI"),
        ("a:b", "expected LO:HI"),
        ("0.9:0.1", "need 0 <= LO <= HI <= 1"),
        ("-0.1:0.5", "need 0 <= LO <= HI <= 1"),
        ("0.2:1.5", "need 0 <= LO <= HI <= 1"),
    ],
)
def test_a_bad_band_is_one_line_naming_it(run, tmp_path, capsys, band, reason):
    assert main(["select", str(run), f"--pass-rate={band}", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: --pass-rate {band!r}") and reason in err and "\n" not in err
    assert not (tmp_path / "x").exists()


def test_bad_folders_and_flags_are_refused_and_nothing_is_touched(run, tmp_path, capsys):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    assert main(["select", str(run), "--all-wrong", "--out", str(busy)]) == 2
    assert "is not empty" in capsys.readouterr().err and [p.name for p in busy.iterdir()] == ["notes.txt"]
    assert main(["select", str(tmp_path / "nope"), "--all-wrong", "--out", str(tmp_path / "y")]) == 2
    assert "no samples/ folder" in capsys.readouterr().err and not (tmp_path / "y").exists()
    for flags in (["--all-wrong", "--pass-rate", "0:1"], []):  # exactly one of the two
        with pytest.raises(SystemExit) as e:
            main(["select", str(run), *flags, "--out", str(tmp_path / "z")])
        assert e.value.code == 2
    assert not list(tmp_path.glob(".y.*")) and not list(tmp_path.glob(".busy.*"))  # no temporary folder left


def test_the_card_shows_the_pass_rate_histogram(run):
    from mmpr_pipeline import card, card_figures

    text = card.write_card(run).read_text()
    assert f"![Pass rate per question]({card.FIGURES['pass_rate']})" in text
    assert "over 10 questions of correctness sources: 2 all wrong, 1 all right, 6 (60%) in 0.2-0.8" in text
    png = run / card.FIGURES["pass_rate"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert card.check_card(run) == []
    assert card_figures.pass_rates(run) == {
        "shapes": pytest.approx([0, 0.2, 0.25, 0.5, 0.8, 0.75, 1, 1 / 6, 2 / 3, 0])
    }
