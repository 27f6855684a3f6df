"""Fail-safe `mmpr build` (issue 17): never delete a user's files, one process per run folder, and
source rows that could hang a reader are set aside with their reason."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from mmpr_pipeline import recipe as recipe_mod
from mmpr_pipeline import run_folder, tasks
from stages.load import load_source

REPO = Path(__file__).resolve().parent.parent


def _cli(*args, timeout=120) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env.pop("RAY_ADDRESS", None)
    return subprocess.run(
        [sys.executable, "-m", "mmpr_pipeline.cli", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_build_refuses_a_folder_that_is_not_a_run_folder_and_touches_nothing(tmp_path):
    """Case 2: before, `--out` an existing folder deleted the user's shards, .tmp files and README."""
    out = tmp_path / "mine"
    files = {
        out / "data" / "train-00000-of-00001.parquet": b"my shard",
        out / ".notes.tmp": b"my draft",
        out / "sub" / ".x.tmp": b"mine too",
        out / "README.md": b"# my dataset",
    }
    for path, data in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    res = _cli("build", "data_cards/demo.yaml", "--out", str(out), "--limit", "2")
    assert res.returncode == 2, res.stderr
    assert "not a run folder" in res.stderr and "Traceback" not in res.stderr
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    assert all(path.read_bytes() == data for path, data in files.items())


def test_a_run_folder_is_only_cleaned_of_what_the_tool_made(tmp_path):
    rec = recipe_mod.load(REPO / "data_cards" / "demo.yaml")
    run = tmp_path / "run"
    run_folder.prepare_run_dir(run, rec, overwrite=False)
    (run / "samples" / "shapes").mkdir(parents=True)
    ours = run / "samples" / "shapes" / ".unit-00000.parquet.dead.tmp"
    ours.write_bytes(b"left by a killed run")
    user = run / "notes" / ".draft.tmp"
    user.parent.mkdir()
    user.write_bytes(b"a user's file")
    run_folder.prepare_run_dir(run, rec, overwrite=False)
    assert not ours.exists() and user.read_bytes() == b"a user's file"
    changed = recipe_mod.load(REPO / "data_cards" / "demo.yaml", {"sampling.n": 2})
    run_folder.prepare_run_dir(run, changed, overwrite=True)  # --overwrite: our folders go, the user's stay
    assert not (run / "samples").exists() and user.exists()
    assert json.loads((run / "recipe.json").read_text())["sampling"]["n"] == 2


def test_a_second_build_on_the_same_folder_is_refused_naming_the_holder(tmp_path):
    """Case 10: the lock is an flock: held while its process lives, gone with it even on kill -9."""
    run = tmp_path / "run"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            (
                "import sys, time; from mmpr_pipeline.run_folder import RunLock\n"
                f"with RunLock({str(run)!r}):\n    print('locked', flush=True); time.sleep(60)"
            ),
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        res = _cli("build", "data_cards/demo.yaml", "--out", str(run), "--limit", "2")
        assert res.returncode == 2, res.stderr
        assert f"pid {holder.pid}" in res.stderr and "in use" in res.stderr
    finally:
        holder.kill()
        holder.wait()
    with run_folder.RunLock(run):  # free again once the holder is gone
        pass


def _jsonl_source(tmp_path, rows: list[str]) -> recipe_mod.Source:
    img = next(tasks.generate(1))["image"]
    (tmp_path / "ok.png").write_bytes(img)
    (tmp_path / "rows.jsonl").write_text("".join(r + "\n" for r in rows))
    return recipe_mod.Source(
        name="src", loader="jsonl", path=str(tmp_path / "rows.jsonl"), answer_type="number"
    )


def test_fifo_and_device_image_paths_are_set_aside_without_hanging(tmp_path):
    """Case 7: a FIFO hung the reader; /dev/zero read until memory ran out."""
    os.mkfifo(tmp_path / "pipe.png")
    rows = [
        json.dumps(dict(image=str(tmp_path / "pipe.png"), question="How many?", answer="1")),
        json.dumps(dict(image="/dev/zero", question="How many?", answer="2")),
        json.dumps(dict(image="ok.png", question="How many?", answer="3")),
    ]
    t0 = time.monotonic()
    questions, rejects, n = load_source(_jsonl_source(tmp_path, rows), unit_size=8)
    assert time.monotonic() - t0 < 60  # a bound against a hang, not a speed claim
    assert n == 3 and [q["answer"] for q in questions] == ["3"]
    assert [r["row_index"] for r in rejects] == [0, 1]
    assert all("is not a regular file" in r["reason"] for r in rejects)


def test_jsonl_lines_that_are_not_objects_are_set_aside_and_reading_goes_on(tmp_path):
    """Case 13: a line `[1,2]` or `null` stopped the whole source."""
    good = json.dumps(dict(image="ok.png", question="How many?", answer="3"))
    questions, rejects, n = load_source(
        _jsonl_source(tmp_path, ["[1, 2]", "null", good, '"text"']), unit_size=8
    )
    assert n == 4 and len(questions) == 1
    assert [r["row_index"] for r in rejects] == [0, 1, 3]
    assert all("is not an object" in r["reason"] for r in rejects)
