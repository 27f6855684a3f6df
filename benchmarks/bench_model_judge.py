"""Rules alone against rules + the demo judge model, on labelled answers; and the verdict cache.

    python benchmarks/bench_model_judge.py [--judge PATH] [--heldout 400] [--questions 48] [--no-build]
        [--min-probability 0.5,0.7]

1. Labelled cases: the judge corpora in tests/data (`*corpus*.jsonl`: response, answer, answer_type,
   expected) and held-out synthetic cases (mmpr_pipeline/judge_cases.py, a seed the demo judge never
   trained on). The rules judge every case; the judge model is asked about every case with a final
   answer (twice, swapped), so one pass gives all three modes. Per corpus and mode: decided share,
   agreement with the rules where both decided, false accepts (a wrong answer judged correct),
   pair-safety misses (a right answer judged wrong), and the judge's throughput (verdicts/s, each
   verdict two requests, all in flight at once on one engine). Baseline: rules alone, same cases.
2. Resumed build: `mmpr build` of counting questions with references in words (`judge: rules+model`),
   SIGKILLed after its first unit (MMPR_KILL_AT=after_unit:1), then resumed; the hit rate is the share
   of the judge's verdicts in the units the resumed run redid that came from the cache. Then the same
   recipe into a new run folder sharing the verdict cache (`judge_model.cache_dir`): every unit sampled
   and judged again, its hit rate.
Raw output: benchmarks/results/bench_model_judge.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
import _build_process as build_process  # noqa: E402 - after the path it is found on


async def ask(judge_path: str, jobs: list[tuple[str, list[str], str]], thresholds: list[float]) -> dict:
    """threshold -> (verdicts, seconds): every job asked at each `min_probability`, on one engine."""
    from mmpr_pipeline.engine import Engine
    from mmpr_pipeline.scoring import model_judge as mj

    engine = Engine(judge_path, {"max_model_len": 512})
    out = {}
    try:
        await mj.ModelJudge(engine, thresholds[0]).replies(*jobs[0])  # warm-up: graph set-up
        for threshold in thresholds:
            # all in flight at once: on a slow CPU the last ones wait minutes in the queue, which the
            # stage's 60 s per-request limit would count as failures (undecided), not as verdicts
            judge = mj.ModelJudge(engine, min_probability=threshold, timeout_s=1200)
            t0 = time.perf_counter()
            found = await asyncio.gather(*(judge.replies(*j) for j in jobs))
            out[threshold] = ([mj.agreement(*readings) for readings, _ in found], time.perf_counter() - t0)
    finally:
        engine.shutdown()
    return out


def figures(judge_path: str, corpora: dict[str, list[dict]], thresholds: list[float]) -> dict:
    """Per `min_probability`: per corpus and mode, the judge_cases.mode_figures; and the throughput."""
    from mmpr_pipeline.judge_cases import judge_requests, mode_figures, rules_verdicts

    jobs, where = [], []
    rules = {name: rules_verdicts(cases) for name, cases in corpora.items()}
    for name, cases in corpora.items():
        for i, job in judge_requests(cases, rules[name]).items():
            jobs.append(job)
            where.append((name, i))
    result = {}
    for threshold, (verdicts, seconds) in asyncio.run(ask(judge_path, jobs, thresholds)).items():
        out: dict = {}
        judged: dict[str, dict[int, bool | None]] = {name: {} for name in corpora}
        for (name, i), v in zip(where, verdicts):
            judged[name][i] = v
        for name, cases in corpora.items():
            out[name] = [
                mode_figures(cases, rules[name], judged[name] if m != "rules" else {}, m)
                for m in ("rules", "rules+model", "model")
            ]
            # agreement is measured with the judge asked about every answer, whatever the mode
            agreement = mode_figures(cases, rules[name], judged[name], "rules")["agreement"]
            for row in out[name]:
                row["agreement"] = agreement
        out["throughput"] = dict(
            verdicts=len(jobs),
            requests=2 * len(jobs),
            seconds=round(seconds, 2),
            verdicts_per_s=round(len(jobs) / seconds, 1),
        )
        result[f"min_probability {threshold}"] = out
    return result


def mmpr_build(recipe: Path, out: Path, *extra: str, kill_at: str | None = None) -> int:
    return build_process.run(recipe, out, args=extra, kill_at=kill_at, timeout=None).returncode


def unit_judge_counts(run: Path, since: float = 0.0) -> tuple[int, int]:
    """(verdicts asked, from the cache) over the units whose counts file was written after `since`."""
    asked = hits = 0
    for f in (run / "samples").glob("*/unit-*.json"):
        if f.stat().st_mtime >= since:
            judged = json.loads(f.read_text())["stats"].get("judge_model") or {}
            asked += judged.get("asked", 0)
            hits += judged.get("cache_hits", 0)
    return asked, hits


def resumed_build(judge_path: str, questions: int) -> dict:
    from mmpr_pipeline.judge_cases import write_count_words_source

    tmp = Path(tempfile.mkdtemp(prefix="bench_model_judge_"))
    source = write_count_words_source(tmp / "src", questions)
    recipe = tmp / "recipe.yaml"
    recipe.write_text(
        yaml.safe_dump(
            dict(
                name="judged",
                engine=dict(max_model_len=1024),
                sampling=dict(n=4, max_tokens=48),
                unit_size=8,
                sources=[
                    dict(name="words", loader="jsonl", path=source, answer_type="text", judge="rules+model")
                ],
                judge_model=dict(
                    model=judge_path,
                    agreement_sample=0.1,
                    engine=dict(max_model_len=512),
                    cache_dir=str(tmp / "verdicts"),  # shared by the runs below
                ),
            )
        )
    )
    run = tmp / "run"
    t0 = time.perf_counter()
    killed_rc = mmpr_build(recipe, run, kill_at="after_unit:1")
    t_killed = time.perf_counter() - t0
    first = unit_judge_counts(run)
    since = time.time()
    t0 = time.perf_counter()
    resumed_rc = mmpr_build(recipe, run)
    t_resumed = time.perf_counter() - t0
    redone = unit_judge_counts(run, since)
    stats = json.loads((run / "stats.json").read_text())["sources"]["words"]
    t0 = time.perf_counter()
    rerun_rc = mmpr_build(recipe, tmp / "run2")  # another run folder, the same verdict cache
    t_rerun = time.perf_counter() - t0
    rerun = json.loads((tmp / "run2" / "stats.json").read_text())["sources"]["words"]["judge_model"]
    return dict(
        questions=questions,
        killed=dict(rc=killed_rc, seconds=round(t_killed, 1), units_kept_asked=first[0]),
        resumed=dict(
            rc=resumed_rc,
            seconds=round(t_resumed, 1),
            asked_in_redone_units=redone[0],
            cache_hits=redone[1],
            hit_rate=round(redone[1] / redone[0], 4) if redone[0] else None,
            verdicts=stats["verdicts"],
            judge_model=stats["judge_model"],
        ),
        rerun_new_folder=dict(
            rc=rerun_rc,
            seconds=round(t_rerun, 1),
            asked=rerun["asked"],
            cache_hits=rerun["cache_hits"],
            hit_rate=round(rerun["cache_hits"] / rerun["asked"], 4) if rerun["asked"] else None,
        ),
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--judge", default=None, help="judge model folder (default: the demo judge)")
    ap.add_argument("--heldout", type=int, default=400, help="held-out synthetic cases")
    ap.add_argument("--questions", type=int, default=48, help="questions of the resumed build")
    ap.add_argument("--no-build", action="store_true", help="skip the resumed build")
    ap.add_argument(
        "--min-probability",
        default=None,
        help="comma-separated thresholds compared on one engine (default: 0.5 and the recipe's default)",
    )
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "bench_model_judge.json"))
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from mmpr_pipeline import demo_judge, judge_cases

    judge_path = args.judge or str(demo_judge.ensure_judge())
    heldout = list(judge_cases.generate(args.heldout, seed=judge_cases.HELDOUT_SEED))
    corpora = {"heldout_synthetic": heldout}
    for path in sorted((REPO / "tests" / "data").glob("*corpus*.jsonl")):
        corpora[path.stem] = judge_cases.corpus_cases(path)
    from mmpr_pipeline.recipe import JUDGE_MIN_PROBABILITY

    thresholds = (
        [float(t) for t in args.min_probability.split(",")]
        if args.min_probability
        else sorted({0.5, JUDGE_MIN_PROBABILITY})
    )
    result = dict(judge=judge_path, figures=figures(judge_path, corpora, thresholds))
    if not args.no_build:
        result["resumed_build"] = resumed_build(judge_path, args.questions)
    print(json.dumps(result, indent=1))
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
