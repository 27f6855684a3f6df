"""The cost of resuming: a build killed part-way and resumed, against the same build uninterrupted.

    python benchmarks/bench_resume.py [--model PATH] [--kill-at after_unit:2]

Runs `mmpr build` three times on the demo recipe (each a real process: local Ray + vLLM):
  full     uninterrupted
  killed   SIGKILLed at a kill point (MMPR_KILL_AT, see mmpr_pipeline/shards.kill_point)
  resumed  the same command again on the killed run's folder
and prints the time the resumed run took against a full run, and the overhead of the kill:
(killed + resumed - full), i.e. the work lost plus the second start-up.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
import _build_process as build_process  # noqa: E402 - after the path it is found on

# The 1-minute load average at the start and end of each build: the times depend on what else runs
# on the machine, and a shared one can go from idle to overloaded between two builds.
LOADS: list[list[float]] = []


def build(out: Path, model: str, kill_at: str | None, limit: int) -> tuple[float, int]:
    load_before = round(os.getloadavg()[0], 1)
    t0 = time.perf_counter()
    proc = build_process.run(
        "data_cards/demo.yaml",
        out,
        model=model,
        limit=limit,
        sets=["unit_size=16"],
        kill_at=kill_at,
        timeout=None,
    )
    LOADS.append([load_before, round(os.getloadavg()[0], 1)])
    return time.perf_counter() - t0, proc.returncode


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="default: the trained demo model")
    ap.add_argument("--kill-at", default="after_unit:4")
    ap.add_argument("--limit", type=int, default=96, help="questions per source")
    args = ap.parse_args()
    from mmpr_pipeline import demo_model

    model = args.model or str(demo_model.ensure_trained())
    work = Path(tempfile.mkdtemp(prefix="bench-resume-"))
    full_s, rc = build(work / "full", model, None, args.limit)
    assert rc == 0, "the uninterrupted build failed"
    killed_s, rc = build(work / "run", model, args.kill_at, args.limit)
    assert rc == -9, f"expected a SIGKILL at {args.kill_at}, got exit code {rc}"
    resumed_s, rc = build(work / "run", model, None, args.limit)
    assert rc == 0, "the resumed build failed"
    stats = json.loads((work / "run" / "stats.json").read_text())["resume"]
    print(f"demo recipe, {args.limit} questions per source, {stats['units']} units, killed at {args.kill_at}")
    print(f"full run           {full_s:6.1f}s")
    print(
        f"killed run         {killed_s:6.1f}s  ({stats['units_done_before']} of {stats['units']} units kept)"
    )
    print(f"resumed run        {resumed_s:6.1f}s  ratio resumed/full: {resumed_s / full_s:.2f}")
    print(f"cost of the kill   {killed_s + resumed_s - full_s:6.1f}s  (lost work + one more start-up)")
    print(f"load average (1 min) at the start and end of each build: {LOADS} on {os.cpu_count()} CPUs")
    out = REPO / "benchmarks" / "results" / "bench_resume.json"
    out.write_text(
        json.dumps(
            dict(
                limit=args.limit,
                kill_at=args.kill_at,
                units=stats["units"],
                units_kept=stats["units_done_before"],
                full_s=round(full_s, 1),
                killed_s=round(killed_s, 1),
                resumed_s=round(resumed_s, 1),
                resumed_over_full=round(resumed_s / full_s, 3),
                cpus=os.cpu_count(),
                load_average_1min=dict(zip(("full", "killed", "resumed"), LOADS)),
            ),
            indent=2,
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
