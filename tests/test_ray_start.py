"""Starting the private local Ray: a start that times out on a busy machine is tried again; any other
failure, or a third time-out, is the user's error as Ray wrote it."""

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
