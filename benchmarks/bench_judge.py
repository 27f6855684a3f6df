"""Judge throughput and latency on the labelled corpus, in one process and across Ray workers.

    python benchmarks/bench_judge.py [--seconds 3] [--workers N] [--no-ray]

Prints judgements/s and p50/p99 latency for all answer types, the non-math types (the bar:
>= 2000 judgements/s per core) and math (with the verdict cache cleared on every pass, so each
math call does its real symbolic check), then the same corpus spread over N Ray actors.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

from mmpr_pipeline.scoring import judge, safe_math, warm_up

CORPUS = Path(__file__).resolve().parent.parent / "tests" / "data" / "judge_corpus.jsonl"


def load() -> list[dict]:
    return [json.loads(line) for line in CORPUS.read_text().splitlines() if line.strip()]


def timed_passes(rows: list[dict], seconds: float) -> list[float]:
    """Judge `rows` again and again for about `seconds`; the latency of every call."""
    latencies, deadline = [], time.perf_counter() + seconds
    while time.perf_counter() < deadline or not latencies:
        safe_math._cache.clear()
        for r in rows:
            start = time.perf_counter()
            judge(r["response"], r["answer"], r["answer_type"], r["options"])
            latencies.append(time.perf_counter() - start)
    return latencies


def report(name: str, latencies: list[float]) -> None:
    ordered = sorted(latencies)
    p50 = statistics.median(ordered)
    p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
    print(f"  {name:22} {len(ordered):7d} calls {len(ordered) / sum(ordered):10.0f} judgements/s"
          f"   p50 {p50 * 1e6:8.1f} us   p99 {p99 * 1e6:9.1f} us")


def single_process(rows: list[dict], seconds: float) -> None:
    warm_up()
    for r in rows:                                          # warm regex caches and the math server
        judge(r["response"], r["answer"], r["answer_type"], r["options"])
    non_math = [r for r in rows if r["answer_type"] != "math"]
    math = [r for r in rows if r["answer_type"] == "math"]
    print(f"single process (pid {os.getpid()}), corpus: {len(rows)} cases "
          f"({len(non_math)} non-math, {len(math)} math)")
    report("all (math uncached)", timed_passes(rows, seconds))
    report("non-math types", timed_passes(non_math, seconds))
    for answer_type in sorted({r["answer_type"] for r in non_math}):
        report(f"  {answer_type}", timed_passes([r for r in rows if r["answer_type"] == answer_type], seconds / 4))
    report("math (uncached)", timed_passes(math, seconds))


def across_ray(rows: list[dict], workers: int, repeats: int) -> None:
    import ray

    ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        @ray.remote(num_cpus=1)
        class Judge:
            def __init__(self):
                warm_up()

            def run(self, batch: list[dict]) -> list[float]:
                out = []
                for r in batch:
                    start = time.perf_counter()
                    judge(r["response"], r["answer"], r["answer_type"], r["options"])
                    out.append(time.perf_counter() - start)
                return out

        actors = [Judge.remote() for _ in range(workers)]
        ray.get([a.run.remote(rows[:10]) for a in actors])  # started and warm
        # each actor keeps its math verdict cache, as a pipeline worker does: repeats hit it
        for name, subset in [("all (math cached)", rows), ("non-math types", [r for r in rows if r["answer_type"] != "math"])]:
            work = subset * repeats
            chunks = [work[i::workers] for i in range(workers)]
            start = time.perf_counter()
            latencies = [x for part in ray.get([a.run.remote(c) for a, c in zip(actors, chunks)]) for x in part]
            wall = time.perf_counter() - start
            ordered = sorted(latencies)
            print(f"  {name:22} {len(work):7d} calls over {workers} Ray actors: {len(work) / wall:10.0f} judgements/s "
                  f"({len(work) / wall / workers:.0f} per worker)   p50 {statistics.median(ordered) * 1e6:8.1f} us"
                  f"   p99 {ordered[int(0.99 * (len(ordered) - 1))] * 1e6:9.1f} us")
    finally:
        ray.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="time per single-process measurement")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="Ray actors (1 CPU each)")
    parser.add_argument("--repeats", type=int, default=20, help="corpus passes in the Ray measurement")
    parser.add_argument("--no-ray", action="store_true")
    args = parser.parse_args()
    rows = load()
    single_process(rows, args.seconds)
    if not args.no_ray:
        print(f"Ray, corpus: {len(rows)} cases x {args.repeats}")
        across_ray(rows, args.workers, args.repeats)


if __name__ == "__main__":
    main()
