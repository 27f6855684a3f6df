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
