"""SIGTERM is a clean stop (issue 25, item 1): how Kubernetes, SLURM and spot instances end a job.

`mmpr build` gets SIGTERM (to its own process only, as `kill PID` or a container runtime sends it)
while its vLLM engine samples: it ends with rc 143 and the one-line resume hint, and every process it
started (Ray's, the engine's) is gone within seconds. A second SIGTERM while it stops still leaves a
folder the same command finishes. `mmpr train` keeps its last checkpoint and resumes from it.

Before: rc 134 with a C++ stack trace (`*** SIGTERM received ... PC: @ ...`), no hint, and a 700 MB
`ray::MapWorker` left running for minutes with PID 1 as its parent.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import _build_process as build_process
import psutil
import pytest
import torch
from _run_fixture import make_run

from mmpr_pipeline import cli

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def start(args: list[str], log: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "MMPR_"))}
    with open(log, "w") as f:
        return subprocess.Popen(
            [sys.executable, "-m", "mmpr_pipeline.cli", *args],
            cwd=ROOT,
            stdout=f,
            stderr=f,
            env={**env, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"},
            start_new_session=True,  # the test's own clean-up can reach the whole group
        )


def wait_for(condition, proc: subprocess.Popen, log: Path, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.3)


def descendants(proc: subprocess.Popen) -> dict[int, tuple[psutil.Process, str]]:
    """The processes under `proc` now, with their names and command lines."""
    out = {}
    for p in psutil.Process(proc.pid).children(recursive=True):
        with contextlib.suppress(psutil.Error):
            out[p.pid] = (p, p.name() + " " + " ".join(p.cmdline()))
    return out


DEMO = ROOT / "data_cards" / "demo.yaml"


def stop_build(model: str, out: Path, log: Path, sigterms: int) -> tuple[int, list[psutil.Process]]:
    """A build that SIGTERM stops once its vLLM engine runs: (rc, every process it had started).

    The engine is seen as a `VLLM::EngineCore` process under the build or, should a poll miss it,
    as the progress bar's "sampling"; what was seen is in the message if the build ends first."""
    proc = build_process.start(DEMO, out, log, model=model, limit=8)
    seen: dict[int, tuple[psutil.Process, str]] = {}

    def engine_runs() -> bool:
        seen.update(descendants(proc))
        text = log.read_text() if log.exists() else ""
        return any("EngineCore" in name for _, name in seen.values()) or "sampling" in text

    try:
        deadline = time.monotonic() + 300
        while not engine_runs():
            names = sorted({name[:60] for _, name in seen.values()})
            assert proc.poll() is None and time.monotonic() < deadline, (names, log.read_text()[-3000:])
            time.sleep(0.2)
        for _ in range(sigterms):
            os.kill(proc.pid, signal.SIGTERM)
            time.sleep(0.2)
        rc = proc.wait(timeout=60)
    finally:
        build_process.kill_group(proc)
    return rc, [p for p, _ in seen.values()]


def assert_all_ended(procs: list[psutil.Process]) -> None:
    _, alive = psutil.wait_procs(procs, timeout=5)
    left = [(p.pid, p.name()) for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()  # never leave them to the next test
    assert not left, f"still running after the build ended: {left}"


def test_sigterm_stops_a_build_cleanly_and_the_run_resumes(request, trained_model, tmp_path):
    out = tmp_path / "run"
    rc, procs = stop_build(trained_model, out, tmp_path / "first.log", sigterms=1)
    stderr = (tmp_path / "first.log").read_text()
    assert rc == 143, stderr[-3000:]
    last = stderr.rstrip().splitlines()[-1]
    assert last == (
        f"terminated (SIGTERM): finished work units are kept in {out}: run the same command again to resume"
    )
    assert "Traceback" not in stderr and "SIGTERM received" not in stderr
    assert len(procs) >= 3  # Ray's own processes, the sampling actor and its engine
    assert_all_ended(procs)

    # A second SIGTERM while it stops: it ends at once, and the folder is still resumable.
    rc, procs = stop_build(trained_model, out, tmp_path / "second.log", sigterms=2)
    assert rc == 143, (tmp_path / "second.log").read_text()[-3000:]
    assert_all_ended(procs)

    # The same build finishes the folder (nothing stops it: in this process, on the session's Ray).
    build_process.in_session(request, DEMO, out, model=trained_model, limit=8)
    stats = json.loads((out / "stats.json").read_text())
    assert stats["resume"]["units"] == 2 and sum(stats["totals"]["pairs"].values()) > 0


def test_sigterm_stops_training_and_keeps_the_last_checkpoint(tiny_model, tmp_path):
    run = make_run(tmp_path / "run", n_shapes=4, n_scenes=2, n_shards=1)
    out, log = tmp_path / "out", tmp_path / "train.log"
    args = ["train", "data_cards/train_mpo.yaml"]
    for s in (f"model={tiny_model}", f"data={run}", f"output_dir={out}", "max_steps=100000", "save_every=1"):
        args += ["--set", s]
    args += ["--set", "progress_bar=false", "--set", "eval_fraction=0", "--set", "batch_size=2"]
    proc = start(args, log)
    try:
        wait_for(lambda: len(list(out.glob("checkpoint-*"))) > 0, proc, log)
        procs = psutil.Process(proc.pid).children(recursive=True)
        os.kill(proc.pid, signal.SIGTERM)
        rc = proc.wait(timeout=60)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    stderr = log.read_text()
    assert rc == 143, stderr[-3000:]
    assert stderr.rstrip().splitlines()[-1] == (
        f"terminated (SIGTERM): the last checkpoint in {out} is kept: run the same command again to resume"
    )
    assert "Traceback" not in stderr
    assert_all_ended(procs)
    assert not list(out.glob(".tmp-checkpoint-*"))  # the checkpoint being written was finished first
    last = sorted(out.glob("checkpoint-*"))[-1]
    step = torch.load(last / "state.pt", weights_only=True)["step"]
    assert step >= 1 and not (out / "final").exists()

    # The same run continues from that checkpoint (here to one step more).
    more = [a.replace("max_steps=100000", f"max_steps={step + 1}") for a in args]
    assert cli.main([*more, "--set", "resume_with_changes=true", "--set", "save_model=false"]) == 0
    rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["split"] == "train"] == list(range(1, step + 2))


def test_sigterm_after_ray_has_shut_down_still_reaches_the_handler():
    """ray.shutdown resets SIGTERM to the default action beneath Python, so a second SIGTERM that came
    after it (while the command ended the processes left) killed the build with -15, not 143
    (test_sigterm_stops_a_build_cleanly_and_the_run_resumes, once in CI). end_run sets the handler
    again."""
    script = (
        "import os, signal, sys, time\n"
        "from mmpr_pipeline import pipeline, stopping\n"
        "stopping.install()\n"
        "pipeline.init_ray(None)\n"
        "stopping.end_run()\n"
        "try:\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    time.sleep(5)\n"
        "except stopping.Terminated:\n"
        "    print('handled')\n"
        "    sys.exit(0)\n"
        "sys.exit(3)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS" and not k.startswith("MMPR_")}
    res = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        env={**env, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert (res.returncode, res.stdout.strip()) == (0, "handled"), res.stderr[-3000:]
