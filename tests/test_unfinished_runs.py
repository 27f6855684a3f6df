"""Reading a run that is not finished (issue 25, item 5): a build that was stopped (no stats.json, a
unit without its counts file) or is still running (it holds the folder's lock).

`select` and `preview` say so in one line and use the finished units only; `export` and `train`
refuse it in one line (a dataset or a model made from part of a run would pass for the whole).
Before: `mmpr select` read the unfinished units with no warning.
"""

from __future__ import annotations

import fcntl
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from _run_fixture import make_run

from mmpr_pipeline import cli, run_status
from mmpr_pipeline.preview import render

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def run(tmp_path) -> Path:
    """A finished run of two samples units of shapes (the second one's counts file is removed below)."""
    run = make_run(tmp_path / "run", n_shapes=8, n_scenes=2, n_shards=1)
    (run / ".mmpr-run").write_text("made by mmpr-pipeline\n")
    unit = run / "samples" / "shapes" / "unit-00000.parquet"
    table = pq.read_table(unit)
    pq.write_table(table.slice(0, 5), unit)
    pq.write_table(table.slice(5), unit.with_name("unit-00001.parquet"))
    unit.with_name("unit-00001.json").write_text("{}")
    # each unit's pairs, as a build writes them next to its samples
    (run / "pairs" / "shapes").mkdir(parents=True)
    pairs = pq.read_table(next((run / "data").glob("*.parquet")))
    shapes = pairs.filter(pairs["source"].to_numpy(zero_copy_only=False) == "shapes")
    qids = set(table.slice(0, 5)["qid"].to_pylist())
    in_first = [q in qids for q in shapes["qid"].to_pylist()]
    pq.write_table(shapes.filter(in_first), run / "pairs" / "shapes" / "unit-00000.parquet")
    pq.write_table(shapes.filter([not x for x in in_first]), run / "pairs" / "shapes" / "unit-00001.parquet")
    return run


def stop_unit_1(run: Path) -> None:
    """As a build killed while unit 1 was written: its files are there, its counts file is not."""
    (run / "samples" / "shapes" / "unit-00001.json").unlink()
    (run / "stats.json").unlink()


def note_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("note: ")]


def selected_qids(out: Path) -> set[str]:
    return {q for f in (out / "data").glob("*.parquet") for q in pq.read_table(f)["qid"].to_pylist()}


def test_select_uses_the_finished_units_only_and_says_so(run, tmp_path, capsys):
    everything = tmp_path / "all"
    assert cli.main(["select", str(run), "--pass-rate", "0:1", "--out", str(everything)]) == 0
    assert note_lines(capsys.readouterr().err) == []  # a finished run: no note
    (run / "samples" / "shapes" / "unit-00001.json").unlink()  # stats.json stays: a unit's counts file alone
    part = tmp_path / "part"
    assert cli.main(["select", str(run), "--pass-rate", "0:1", "--out", str(part)]) == 0
    notes = note_lines(capsys.readouterr().err)
    assert notes == [
        f"note: {run} is not a finished run (2 of 3 started work units are finished): "
        "using its 2 finished work unit(s) only"
    ]
    first = set(pq.read_table(run / "samples" / "shapes" / "unit-00000.parquet")["qid"].to_pylist())
    assert selected_qids(part) == first and selected_qids(everything) > first
    assert json.loads((part / "selection.json").read_text())["run_finished"] is False


def test_a_build_still_running_is_named(run, tmp_path, capsys):
    with open(run / ".mmpr-lock", "w") as lock:
        lock.write("mmpr build (pid 4242)")
        lock.flush()
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert cli.main(["select", str(run), "--all-wrong", "--out", str(tmp_path / "s")]) == 0
        assert "(mmpr build (pid 4242) is still building it)" in note_lines(capsys.readouterr().err)[0]
        assert cli.main(["export", str(run), "--format", "trl", "--out", str(tmp_path / "x")]) == 2
    assert "mmpr build (pid 4242) is still building it" in capsys.readouterr().err
    assert run_status.status(run).finished  # the lock released: finished again


def test_preview_shows_the_finished_units_pairs_and_says_so(run, capsys):
    stop_unit_1(run)
    page = render(run, per_source=50)
    first = set(pq.read_table(run / "pairs" / "shapes" / "unit-00000.parquet")["qid"].to_pylist())
    assert "is not a finished run" in page and "using its 2 finished work unit(s) only" in page
    shown = {q for q in first if q in page}
    second = set(pq.read_table(run / "pairs" / "shapes" / "unit-00001.parquet")["qid"].to_pylist())
    assert shown and not any(q in page for q in second - first)
    assert cli.main(["preview", str(run)]) == 0
    assert len(note_lines(capsys.readouterr().err)) == 1


def test_export_and_train_refuse_an_unfinished_run(run, tmp_path, capsys):
    stop_unit_1(run)
    out = tmp_path / "export"
    assert cli.main(["export", str(run), "--format", "trl", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [
        f"error: {run} is not a finished run (2 of 3 started work units are finished; it has no stats.json "
        "(a build was stopped before its end)): an export of part of it would stand for the whole run; "
        "run the same `mmpr build` again to finish it first"
    ]
    assert not out.exists()
    train_out = tmp_path / "mpo"
    for data in (run, run / "data"):
        argv = ["train", str(ROOT / "data_cards" / "train_mpo.yaml"), "--set", f"data={data}"]
        assert cli.main([*argv, "--set", f"output_dir={train_out}"]) == 2
        lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error: ")]
        assert len(lines) == 1 and "training on part of it would stand for the whole run" in lines[0]
    assert not train_out.exists()
