"""A dead engine never hangs a build (issue 17, case 1): kill -9 of vLLM's engine process mid-run,
as an out-of-memory kill would. The build stops with a message naming the cause, finished units
stay, and the same build resumes to exactly the pairs of an uninterrupted run: the session's shared
build (tests/_shared_build.py), whose demo sources are this recipe's (per-question seeds make the
pairs independent of units and batches). The killed build is a real `mmpr build` process; the resume
runs in the test's process on the session's Ray (tests/_build_process.py)."""

import json
import time
from pathlib import Path

import _build_process as build_process
import psutil
import pyarrow.parquet as pq
import pytest
from _shared_build import SHAPES_FAMILIES, shared_build

DEMO = Path(__file__).resolve().parent.parent / "data_cards" / "demo.yaml"
pytestmark = pytest.mark.slow
# One batch in flight (not the default 16): when the first unit is done the engine is still busy
# with the next, so there is a live engine to kill.
# 6 + 3 units of 2 questions (not 4): three builds of this test were 520 s of the suite. The limits,
# families, n and max_tokens are the shared build's.
SETS = [
    "sources[0].limit=12",
    "sources[1].limit=6",
    f"sources[0].generator.families=[{', '.join(SHAPES_FAMILIES)}]",
    "sampling.n=4",
    "sampling.max_tokens=48",
    "unit_size=2",
    "engine.max_concurrent_batches=1",
]


def _pairs(run: Path, sources=None) -> set[str]:
    """The ids of the run's pairs (of `sources`, else all)."""
    return {
        r["id"]
        for p in (run / "data").glob("train-*.parquet")
        for r in pq.read_table(p, columns=["id", "source"]).to_pylist()
        if sources is None or r["source"] in sources
    }


def _engine_cores(pid: int) -> list[psutil.Process]:
    out = []
    for p in psutil.Process(pid).children(recursive=True):
        try:
            if "EngineCore" in p.name() or "EngineCore" in " ".join(p.cmdline()):
                out.append(p)
        except psutil.NoSuchProcess:
            continue
    return out


def test_killed_engine_stops_the_build_with_a_message_and_resume_finishes(tmp_path, trained_model, request):
    run, log = tmp_path / "run", tmp_path / "build.log"
    proc = build_process.start(DEMO, run, log, model=trained_model, sets=SETS)
    try:
        deadline = time.time() + 600
        while time.time() < deadline and not list((run / "samples").glob("*/unit-*.json")):
            assert proc.poll() is None, log.read_text()[-3000:]
            time.sleep(0.3)
        cores = _engine_cores(proc.pid)
        assert cores, "no VLLM::EngineCore process under the build"
        for core in cores:
            core.kill()
        proc.wait(timeout=300)  # the point: it ends, it does not hang
    finally:
        build_process.kill_group(proc)
    out = log.read_text()
    # the build stops (exit code 1, an environment error) with one message naming the engine and
    # how to resume, no traceback; the units finished before the kill stay, and some were left to do
    assert proc.returncode == 1, out[-3000:]
    last = out.strip().splitlines()[-1]
    assert last.startswith("error:") and "engine" in last.lower() and "resume" in last.lower(), out[-3000:]
    assert "Traceback" not in out
    assert not (run / "stats.json").exists() and not list((run / "data").glob("*.parquet"))
    done = list((run / "samples").glob("*/unit-*.json"))
    assert 0 < len(done) < 9, "finished units must stay, and the kill must meet work still to do"
    # the same build again (nothing kills it: in this process, on the session's Ray)
    build_process.in_session(request, DEMO, run, model=trained_model, sets=SETS)
    resumed = json.loads((run / "stats.json").read_text())["resume"]
    assert resumed["units"] == 9 and resumed["units_done_before"] == len(done)
    reference, _ = shared_build(request, trained_model)
    assert _pairs(run) == _pairs(reference, sources=("shapes", "describe")) != set()
