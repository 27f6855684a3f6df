"""Long runs survive: SIGKILL at several points, resume, and compare pair by pair.

Each killed run is a real `mmpr build` process (local Ray + vLLM on CPU). The kill comes from inside
the process at a named point (MMPR_KILL_AT, see shards.kill_point): the same effect as an OOM kill,
but at a known moment. The uninterrupted reference and the last resume (nothing kills them) are the
same build in the test's process, on the session's Ray (tests/_build_process.py). Per-question seeds
(`sampling.reproducible`) make sampling independent of batching, so the resumed run must match an
uninterrupted one exactly.
"""

import json
import signal
from pathlib import Path

import _build_process as build_process
import pyarrow.parquet as pq
import pytest
from _shared_build import SHAPES_FAMILIES

from mmpr_pipeline import shards

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow

# In the driver: after the 2nd unit it saw finish (mid-stream), and between two pair shards (the
# commit). In a worker, killing the whole run: between a unit's pairs and counts files (the counts
# file is the unit's commit marker). Every kill after the first is of a resumed run. (Kills before
# the pair shards, before stats.json, between a unit's samples and pairs files and a second driver
# kill after a unit each cost a build of suite time and test no other rule: the unit's marker and
# the commit's temporary-then-rename are the same code at those points.)
KILL_POINTS = ["after_unit:2", "unit_wrote_pairs", "mid_write:1"]
WORKER_KILL_POINTS = {"unit_wrote_pairs": "pairs"}


def _build(run: Path, model: str, recipe_file: Path, kill_at: str | None = None, extra=()):
    """A real `mmpr build` process, killed at `kill_at` if given."""
    return build_process.run(recipe_file, run, model=model, kill_at=kill_at, args=extra, timeout=600)


def _pairs(run: Path) -> list[dict]:
    """Every pair row, in shard order: a pair written twice or lost shows."""
    return [r for p in sorted((run / "data").glob("train-*.parquet")) for r in pq.read_table(p).to_pylist()]


def _samples(run: Path) -> list[tuple[str, list[str]]]:
    return [(r["qid"], r["responses"]) for p in shards.unit_files(run) for r in pq.read_table(p).to_pylist()]


def _unit_files(run: Path) -> dict[str, int]:
    """Each unit file's modification time (ns), by path within the run."""
    return {
        str(p.relative_to(run)): p.stat().st_mtime_ns
        for kind in ("samples", "pairs", "rejects")
        for p in (run / kind).glob("*/unit-*")
    }


@pytest.fixture(scope="module")
def recipe_file(tmp_path_factory, trained_model):
    """The demo recipe at small scale, plus a source with a prompt longer than the context."""
    import yaml

    d = tmp_path_factory.mktemp("recipe")
    long_rows = [
        dict(image="img.png", question="How many shapes? " * 3, answer="3"),
        dict(image="img.png", question="word " * 1500 + "How many?", answer="3"),
        dict(image="img.png", question="How many shapes are there?", answer="3"),
        dict(image="img.png", question="Count the shapes.", answer="3"),  # unit 1 of this source
    ]
    from mmpr_pipeline import tasks

    (d / "img.png").write_bytes(next(tasks.generate(1))["image"])
    (d / "long.jsonl").write_text("".join(json.dumps(r) + "\n" for r in long_rows))
    data = yaml.safe_load((REPO / "data_cards" / "demo.yaml").read_text())
    data.update(
        unit_size=3, batch_size=6, shard_rows=1
    )  # one pair per shard: mid_write:1 always has a second shard
    data["sampling"].update(n=4, max_tokens=48)
    # One batch in flight (not the default 16) and 9 units: a kill after the second unit then still
    # leaves units for the resume to do (and to kill again), which is what the kill points test.
    data["engine"] = {"max_model_len": 1024, "max_concurrent_batches": 1}
    data["sources"][0]["limit"] = 18
    data["sources"][0]["generator"]["families"] = SHAPES_FAMILIES
    data["sources"][1]["limit"] = 3
    data["sources"].append(
        dict(name="long", loader="jsonl", path=str(d / "long.jsonl"), answer_type="number")
    )
    path = d / "small.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def uninterrupted(request, tmp_path_factory, recipe_file, trained_model):
    run = tmp_path_factory.mktemp("a") / "run"
    build_process.in_session(request, recipe_file, run, model=trained_model)
    return run


def test_engine_error_fails_only_that_request(uninterrupted):
    stats = json.loads((uninterrupted / "stats.json").read_text())
    long = stats["sources"]["long"]
    assert long["questions"] == 4 and long["engine_errors"] == 1
    rows = [
        r
        for p in shards.unit_files(uninterrupted)
        for r in pq.read_table(p).to_pylist()
        if r["source"] == "long"
    ]
    failed = [r for r in rows if r["error"]]
    assert len(failed) == 1 and "context length" in failed[0]["error"] and failed[0]["responses"] == []
    ok = [r for r in rows if not r["error"]]
    assert len(ok) == 3 and all(len(r["responses"]) == 4 for r in ok)


@pytest.mark.timeout(1800)  # four builds in a row: the suite's longest test
def test_kill_and_resume_matches_uninterrupted(request, tmp_path, recipe_file, trained_model, uninterrupted):
    """Killed at every point in turn, on a JSON Lines source with one row edited in place; the file is
    edited back (same row count) before the last resume, which must then redo that row's unit and
    only it, and end with exactly the uninterrupted run's samples and pairs."""
    run = tmp_path / "run"
    source = recipe_file.parent / "long.jsonl"
    original = source.read_text()
    lines = original.splitlines(keepends=True)
    total_units = None
    try:
        source.write_text("".join(lines[:3]) + lines[3].replace("Count the shapes.", "Count the figures."))
        for point in KILL_POINTS:
            res = _build(run, trained_model, recipe_file, kill_at=point)
            assert res.returncode == -signal.SIGKILL, (point, res.stdout[-3000:])
            # whatever is visible is whole: every non-temporary file reads
            for f in run.rglob("*.parquet"):
                if not f.name.startswith("."):
                    pq.read_table(f)
            if (run / "stats.json").exists():
                json.loads((run / "stats.json").read_text())
            if point in WORKER_KILL_POINTS:  # killed inside a unit's writes: its counts file is missing
                written = {
                    p.with_suffix("").relative_to(run / WORKER_KILL_POINTS[point])
                    for p in (run / WORKER_KILL_POINTS[point]).glob("*/unit-*.parquet")
                }
                counted = {
                    p.with_suffix("").relative_to(run / "samples")
                    for p in (run / "samples").glob("*/unit-*.json")
                }
                assert written - counted, point
            done = len(shards.unit_files(run))
            if point == "after_unit:2" and total_units is None:
                # the driver saw two units finish; workers may have finished one or two more meanwhile
                assert done >= 2
            total_units = done
    finally:
        source.write_text(original)  # the row as the uninterrupted run read it
    before = _unit_files(run)
    build_process.in_session(request, recipe_file, run, model=trained_model)  # nothing kills this one
    stats = json.loads((run / "stats.json").read_text())
    # every unit was finished before; only the edited row's unit is sampled again
    assert stats["resume"]["units_done_before"] == stats["resume"]["units"] - 1 == 8
    assert stats["resume"]["rows_sampled"] == 1
    after = _unit_files(run)
    assert sorted(f for f in after if after[f] != before.get(f)) == [
        "pairs/long/unit-00001.parquet",
        "samples/long/unit-00001.json",
        "samples/long/unit-00001.parquet",
    ]
    assert not list(run.rglob(".*.tmp"))
    # the same samples as the uninterrupted run, question by question, each once
    assert _samples(run) == _samples(uninterrupted)
    # and the same pairs, once each, in the same shards
    a, b = _pairs(uninterrupted), _pairs(run)
    assert len(a) == sum(stats["totals"]["pairs"].values()) and len({r["id"] for r in a}) == len(a)
    assert a == b
    assert json.loads((uninterrupted / "stats.json").read_text())["totals"] == stats["totals"]


def test_changed_recipe_is_refused_unless_overwrite(tmp_path, recipe_file, trained_model, uninterrupted):
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(uninterrupted, run)
    res = _build(run, trained_model, recipe_file, extra=["--set", "sampling.n=2"])
    assert res.returncode != 0 and "different recipe" in res.stdout and "sampling" in res.stdout
    assert len(shards.unit_files(run)) == len(shards.unit_files(uninterrupted))  # nothing touched
