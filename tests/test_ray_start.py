"""Starting the private local Ray: a start that times out on a busy machine is tried again; any other
failure, or a third time-out, is the user's error as Ray wrote it. Its processes leave a terminal's
Ctrl-C to the command, which ends them itself."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import ray

from mmpr_pipeline import pipeline

TIMEOUT = Exception(
    "The current node timed out during startup. This could happen because some of the raylet failed "
    "to startup or the GCS has become overloaded."
)


def _fake_init(monkeypatch, failures: list[Exception]) -> tuple[list[dict], list[int]]:
    calls, shutdowns = [], []

    def init(**kwargs):
        calls.append(kwargs)
        if failures:
            raise failures.pop(0)

    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(ray, "shutdown", lambda: shutdowns.append(1))
    return calls, shutdowns


def test_a_start_that_times_out_is_tried_again_as_a_private_local_ray(monkeypatch):
    calls, shutdowns = _fake_init(monkeypatch, [TIMEOUT, TIMEOUT])
    pipeline.start_local_ray(verbose=False)
    assert len(calls) == 3 and len(shutdowns) == 2
    assert all(c["address"] == "local" and c["include_dashboard"] is False for c in calls)


def test_a_third_time_out_or_another_error_is_raised_at_once(monkeypatch):
    calls, _ = _fake_init(monkeypatch, [TIMEOUT, TIMEOUT, TIMEOUT])
    with pytest.raises(Exception, match="timed out during startup"):
        pipeline.start_local_ray(verbose=False)
    assert len(calls) == 3
    calls, _ = _fake_init(monkeypatch, [ValueError("bad num_cpus")])
    with pytest.raises(ValueError, match="bad num_cpus"):
        pipeline.start_local_ray(verbose=False)
    assert len(calls) == 1


# Run in a fresh process: the test session's own Ray (ray_local) may already be up in this one.
SIGINT_PROBE = """
import json, os, signal
import psutil, ray
from mmpr_pipeline import pipeline

def ignores_sigint(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("SigIgn:"):
            return bool(int(line.split()[1], 16) & (1 << (signal.SIGINT - 1)))

pipeline.start_local_ray(verbose=False)
try:
    worker = ray.get(ray.remote(num_cpus=0)(lambda: os.getpid()).remote())
    names = {p.pid: p.name() for p in psutil.Process().children(recursive=True)}
    core = [pid for pid, name in names.items() if name in ("raylet", "gcs_server")] + [worker]
    print(json.dumps(dict(
        ignored={("worker" if pid == worker else names[pid]): ignores_sigint(pid) for pid in core},
        driver_handler_is_default=signal.getsignal(signal.SIGINT) is signal.default_int_handler,
    )))
finally:
    ray.shutdown()
"""


def test_ray_ignores_a_terminals_ctrl_c_and_the_command_still_receives_it():
    """Regression: Ctrl-C (SIGINT to the whole process group) killed Ray's raylet and workers at the
    moment the command began to clean up, and Ray's driver then ended the command with exit code 1
    before it could say how to resume (test_fail_safe's Ctrl-C test, once in a CI run)."""
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run(
        [sys.executable, "-c", SIGINT_PROBE],
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    found = json.loads(r.stdout.strip().splitlines()[-1])
    assert found["ignored"] == {"raylet": True, "gcs_server": True, "worker": True}, found
    assert found["driver_handler_is_default"] is True


# --- Ctrl-C while Ray Data streams: nothing may call into Ray as it shuts down ------------------
# A thread that does (Ray Data's executor, the garbage collector freeing an object reference) makes
# Ray end the process with exit code 1 instead of the command's 130 ("The core worker has already
# been shutdown"); under load, 2 of 5 Ctrl-Cs during sampling did.


def _units(n: int):
    from mmpr_pipeline.units import WorkUnit

    return [WorkUnit(source="s", unit=i, path="", start=i, stop=i + 1, first_row=i) for i in range(n)]


def test_a_ctrl_c_in_the_streams_loop_stops_ray_datas_threads(request, monkeypatch, tmp_path):
    """The interrupt lands in run_units' own loop (between two finished units): its iterator is closed
    there, so Ray Data's executor ends before Ray may be shut down (left to the garbage collector, the
    traceback the handler holds would keep it running)."""
    import time

    from mmpr_pipeline import shards, stopping
    from mmpr_pipeline.stream import SUMMARY_COLUMNS, UNIT_COLUMNS, StreamStage

    request.getfixturevalue("ray_local")

    def summaries(batch):
        time.sleep(0.2)  # units finish one by one: the stream is still running at the interrupt
        return {c: [1] * batch.num_rows if c != "source" else ["s"] * batch.num_rows for c in SUMMARY_COLUMNS}

    stage = StreamStage("summarize", summaries, UNIT_COLUMNS, SUMMARY_COLUMNS, dict(batch_format="pyarrow"))
    monkeypatch.setattr(pipeline, "stream_stages", lambda *a, **k: [stage])

    def interrupt(name, count=None, **_):
        if name == "after_unit":
            raise KeyboardInterrupt

    monkeypatch.setattr(shards, "kill_point", interrupt)
    with pytest.raises(KeyboardInterrupt) as caught:  # holds the traceback, as cli.main's handler does
        pipeline.run_units(None, tmp_path, "model", _units(20), 1)
    stopping.settle_before_ray_shutdown(timeout_s=30)
    assert stopping.ray_data_executors() == [], caught


def test_ray_shuts_down_after_the_interrupts_traceback_is_garbage(monkeypatch, tmp_path):
    """cli.main ends the run (and Ray) outside its except block: what the interrupted frames held is
    freed while Ray is up, not by the garbage collector during or after its shutdown."""
    import gc
    import weakref

    from mmpr_pipeline import cli, stopping

    class Held:  # stands for an object reference in an interrupted frame
        pass

    held = []

    def command(args):
        ref = Held()
        held.append(weakref.ref(ref))
        raise KeyboardInterrupt

    at_end_run = []

    def end_run():
        gc.collect()
        at_end_run.append(held[0]() is None)

    monkeypatch.setattr(stopping, "end_run", end_run)
    monkeypatch.setattr(cli, "cmd_build", command)
    assert cli.main(["build", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "run")]) == cli.INTERRUPTED
    assert at_end_run == [True]
