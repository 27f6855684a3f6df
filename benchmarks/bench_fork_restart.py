"""Can the sampling actor start vLLM's engine faster by forking it? What a killed actor then costs.

    python benchmarks/bench_fork_restart.py [--child-s 40] [--methods spawn,fork,forkserver]

vLLM starts its engine core (and the core its worker) as child processes. On CPU it starts them by
`spawn` (platforms/cpu.py, with OMP_NUM_THREADS and an LD_PRELOAD of libgomp and tcmalloc that only a
freshly executed process picks up), and inside a Ray actor it forces spawn in any case
(utils/system_utils.py, _maybe_force_spawn): each child imports vLLM and torch again. Forking them
from the actor would skip that import. The cost measured here: a Ray actor (max_restarts=1) starts
one child that sleeps --child-s seconds, by spawn, fork or forkserver; the actor is killed (SIGKILL,
as an out-of-memory kill would) and the seconds until its restarted replica answers are timed. A
forked child holds the actor's sockets to Ray, so Ray sees the death only when the child ends: Ray
Data's restart of a replica whose process died would wait on the engine. (A forkserver holds none,
but its children get the server's environment, not the one vLLM sets before each start.)

Raw output: benchmarks/results/bench_fork_restart.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
METHODS = ("spawn", "fork", "forkserver")


def restart_part(methods: list[str], child_s: float) -> dict:
    import multiprocessing

    import psutil
    import ray

    @ray.remote(num_cpus=0.1, max_restarts=1, max_task_retries=-1)
    class Parent:
        def __init__(self, method: str):
            self.child = multiprocessing.get_context(method).Process(target=time.sleep, args=(child_s,))
            self.child.start()

        def pids(self) -> tuple[int, int]:
            return os.getpid(), self.child.pid

    out = {}
    for method in methods:
        actor = Parent.remote(method)
        pid, child = ray.get(actor.pids.remote())
        time.sleep(2)
        os.kill(pid, signal.SIGKILL)
        t0 = time.perf_counter()
        ray.get(actor.pids.remote(), timeout=child_s + 60)
        seconds = time.perf_counter() - t0
        out[method] = dict(restart_s=round(seconds, 1), old_child_alive=psutil.pid_exists(child))
        print(
            f"  restart, child by {method:<10}: the killed actor answered again after {seconds:5.1f} s "
            f"(the old child alive then: {out[method]['old_child_alive']})",
            flush=True,
        )
        ray.kill(actor)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--child-s", type=float, default=40.0)
    ap.add_argument("--label", default="")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "bench_fork_restart.json")
    args = ap.parse_args()
    import ray

    methods = args.methods.split(",")
    result = dict(
        child_s=args.child_s,
        label=args.label,
        started=time.strftime("%Y-%m-%d %H:%M:%S"),
        load_average_at_start=os.getloadavg()[0],
    )
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        result["restart"] = restart_part(methods, args.child_s)
    finally:
        ray.shutdown()
    result["load_average_at_end"] = os.getloadavg()[0]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"raw output: {args.out}")


if __name__ == "__main__":
    main()
