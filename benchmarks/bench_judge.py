"""The answer judge on its regression suite, against a plain exact-match baseline run in the same process.

    python benchmarks/bench_judge.py [--seconds 3] [--workers N] [--no-ray] [--figures-only] [--out PATH]

1. Regression suite (tests/data/judge_corpus.jsonl, the judge's own development set: a regression
   check, not an accuracy estimate). Two figures, for the judge and for the baseline:
   - pair safety: cases labelled correct that are judged wrong *with an extracted answer* (each
     would become a rejected response beside a correct one); must be 0;
   - false accepts: cases labelled wrong that are judged correct; must be 0;
   and agreement per answer type.
   The same for the rules alone on the labelled free-form corpus (tests/data/free_form_corpus.jsonl,
   scripts/make_free_form_corpus.py): per corpus, the decided share (verdicts that are not undecided),
   agreement (decided and matching the label), false accepts and pair-safety misses.
2. Speed in one process (one core): judgements/s and p50/p99 latency for the non-math types (the
   bar: >= 2,000 judgements/s per core) and for maths.
3. The same corpus over N Ray actors on a private local Ray.
Nothing is reused between calls: the maths verdict cache and the reference cache are cleared
before every timed call, in this process and in every actor.

Baseline: `exact_match_judge`, the simplest judge a pipeline could use: the text after the last
"Final answer:"/"Answer:" marker (else the last \\boxed{}), compared with the reference after
lower-casing and removing punctuation and spaces. It runs in this process on the same corpus.
Raw results: benchmarks/results/bench_judge.json.

`--math-verify-tests PATH` adds an independent check: the (reference, prediction, equal?) cases of
math-verify's own test file (tests/test_all.py of its source release, e.g. from
`pip download math-verify==0.9.0 --no-binary :all: --no-deps`), each judged as written and after a
"Final answer:" line; cases whose label depends on a non-default math-verify setting are left out.
The file is read with `ast.literal_eval`, never run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from mmpr_pipeline.scoring import judge, regression, safe_math, warm_up
from mmpr_pipeline.scoring.judge import _clean_reference

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "tests" / "data" / "judge_corpus.jsonl"
FREE_FORM = ROOT / "tests" / "data" / "free_form_corpus.jsonl"
OUT = ROOT / "benchmarks" / "results" / "bench_judge.json"

_MARKER = re.compile(r"(?i)(?:final answer|answer)\s*[:：]")
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
_NOT_WORD = re.compile(r"[\W_]+")


@dataclass(frozen=True)
class BaselineVerdict:
    extracted: str | None
    correct: bool


def exact_match_judge(response: str, answer, answer_type: str, options=None) -> BaselineVerdict:
    """The baseline: last marker line (else last box), exact match after normalisation."""
    markers = list(_MARKER.finditer(response))
    if markers:
        said = response[markers[-1].end() :].split("\n", 1)[0]
    else:
        boxes = _BOXED.findall(response)
        if not boxes:
            return BaselineVerdict(None, False)
        said = boxes[-1]
    said = _NOT_WORD.sub("", said.lower())
    golds = [answer] if isinstance(answer, str) else list(answer)
    return BaselineVerdict(
        said or None, bool(said) and any(said == _NOT_WORD.sub("", str(g).lower()) for g in golds)
    )


def uncached_judge(response, answer, answer_type, options):
    safe_math._cache.clear()
    _clean_reference.cache_clear()
    return judge(response, answer, answer_type, options)


def percentiles(latencies: list[float], cpu: list[float] | None = None) -> dict:
    """Calls, judgements/s over the summed wall latency (and over the summed CPU time of this
    process, when given: "per core", robust to other processes on a shared machine), p50 and p99."""
    ordered = sorted(latencies)
    out = {
        "calls": len(ordered),
        "per_s": len(ordered) / sum(ordered),
        "p50_us": statistics.median(ordered) * 1e6,
        "p99_us": ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] * 1e6,
    }
    if cpu is not None:
        out["per_cpu_s"] = len(cpu) / max(sum(cpu), 1e-9)
    return out


def timed_passes(rows: list[dict], seconds: float, fn=judge) -> dict:
    """Judge `rows` again and again for about `seconds`, caches cleared before every call; the wall
    latency and this process's CPU time of every call (a maths check's CPU is spent in the bounded
    worker process, so for maths only the wall latency means anything)."""
    latencies, cpu, deadline = [], [], time.perf_counter() + seconds
    while time.perf_counter() < deadline or not latencies:
        for r in rows:
            safe_math._cache.clear()
            _clean_reference.cache_clear()
            start, start_cpu = time.perf_counter(), time.process_time()
            fn(r["response"], r["answer"], r["answer_type"], r["options"])
            cpu.append(time.process_time() - start_cpu)
            latencies.append(time.perf_counter() - start)
    return percentiles(latencies, cpu)


def show(name: str, stats: dict) -> None:
    per_cpu = f"   {stats['per_cpu_s']:9.0f} per CPU-second" if "per_cpu_s" in stats else ""
    print(
        f"  {name:30} {stats['calls']:7d} calls {stats['per_s']:9.0f} judgements/s{per_cpu}"
        f"   p50 {stats['p50_us']:9.1f} us   p99 {stats['p99_us']:10.1f} us"
    )


def suite(rows: list[dict]) -> dict:
    out = {}
    for name, fn in [("judge", uncached_judge), ("baseline_exact_match", exact_match_judge)]:
        report = regression.run_suite(rows, fn)
        print(f"{name}:\n{report.figures()}\n{report.table()}")
        out[name] = report.as_dict()
    return out


def rules_figures(corpora: dict[str, list[dict]]) -> dict:
    """The rules alone on each labelled corpus: decided share, agreement, false accepts, pair-safety
    misses (undecided verdicts make no pair, so they count as neither)."""
    out = {}
    head = f"{'corpus':12} {'cases':>6} {'decided':>8} {'agree':>6} {'false acc.':>10} {'pair-unsafe':>11}"
    print(f"rules alone: {head}")
    for name, rows in corpora.items():
        r = regression.run_suite(rows, uncached_judge)
        out[name] = dict(
            cases=r.cases,
            decided=r.decided,
            decided_share=round(r.decided / r.cases, 4),
            agree=r.agree,
            false_accepts=r.false_accepts,
            pair_unsafe=r.pair_unsafe,
        )
        print(
            f"             {name:12} {r.cases:6d} {r.decided / r.cases:8.1%} {r.agree:6d} "
            f"{len(r.false_accepts):10d} {len(r.pair_unsafe):11d}"
        )
    return out


def single_process(rows: list[dict], seconds: float) -> dict:
    non_math = [r for r in rows if r["answer_type"] != "math"]
    math = [r for r in rows if r["answer_type"] == "math"]
    print(
        f"one process (pid {os.getpid()}): {len(non_math)} non-math and {len(math)} maths cases, "
        "caches cleared per call"
    )
    out = {
        "non_math": timed_passes(non_math, seconds),
        "non_math_baseline_exact_match": timed_passes(non_math, seconds, exact_match_judge),
        "math": timed_passes(math, seconds),
    }
    show("non-math types", out["non_math"])
    show("non-math, exact-match baseline", out["non_math_baseline_exact_match"])
    for answer_type in sorted({r["answer_type"] for r in non_math}):
        out[answer_type] = timed_passes([r for r in rows if r["answer_type"] == answer_type], seconds / 4)
        show(f"  {answer_type}", out[answer_type])
    show("maths", out["math"])
    return out


def across_ray(rows: list[dict], workers: int, repeats: int) -> dict:
    import ray

    ray.init(
        address="local",
        num_cpus=workers,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
    )
    try:

        @ray.remote(num_cpus=1)
        class Judge:
            def __init__(self):
                warm_up()

            def run(self, batch: list[dict]) -> tuple[list[float], list[float]]:
                from mmpr_pipeline.scoring import judge, safe_math
                from mmpr_pipeline.scoring.judge import _clean_reference

                wall, cpu = [], []
                for r in batch:
                    safe_math._cache.clear()  # uncached: every maths call does its check
                    _clean_reference.cache_clear()
                    start, start_cpu = time.perf_counter(), time.process_time()
                    judge(r["response"], r["answer"], r["answer_type"], r["options"])
                    cpu.append(time.process_time() - start_cpu)
                    wall.append(time.perf_counter() - start)
                return wall, cpu

        actors = [Judge.remote() for _ in range(workers)]
        ray.get([a.run.remote(rows) for a in actors])  # started, warm, every code path compiled
        out = {}
        for name, subset in [
            ("non_math", [r for r in rows if r["answer_type"] != "math"]),
            ("math", [r for r in rows if r["answer_type"] == "math"]),
        ]:
            work = subset * repeats
            chunks = [work[i::workers] for i in range(workers)]
            start = time.perf_counter()
            parts = ray.get([a.run.remote(c) for a, c in zip(actors, chunks)])
            wall = time.perf_counter() - start
            stats = percentiles([x for p in parts for x in p[0]], [x for p in parts for x in p[1]])
            stats.update(
                workers=workers, wall_per_s=len(work) / wall, wall_per_s_per_worker=len(work) / wall / workers
            )
            out[name] = stats
            print(
                f"  {name:26} {len(work):7d} calls over {workers} Ray actors: "
                f"{stats['wall_per_s']:9.0f} judgements/s "
                f"({stats['wall_per_s_per_worker']:.0f} per worker)   "
                f"p50 {stats['p50_us']:9.1f} us   p99 {stats['p99_us']:10.1f} us"
            )
        return out
    finally:
        ray.shutdown()


def math_verify_cases(path: Path) -> list[tuple[str, str, str, bool]]:
    """(test name, reference, prediction, equal?) from math-verify's parametrized tests, read as data."""
    import ast

    cases = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if not isinstance(node, ast.FunctionDef):
            continue
        for decorator in node.decorator_list:
            if not (isinstance(decorator, ast.Call) and getattr(decorator.func, "attr", "") == "parametrize"):
                continue
            try:
                names, values = ast.literal_eval(decorator.args[0]), ast.literal_eval(decorator.args[1])
            except ValueError:  # values built by code (f-strings): not data, skipped
                continue
            names = [n.strip() for n in (names.split(",") if isinstance(names, str) else names)]
            for value in values:
                row = dict(zip(names, value))
                if row.get("precision", 6) != 6 or row.get("allow_set_relation_comp") is False:
                    continue  # labels that test a non-default setting
                if {"gold", "pred", "expected"} <= row.keys():
                    cases.append((node.name, row["gold"], row["pred"], bool(row["expected"])))
    return cases


def math_verify_suite(path: Path) -> dict:
    cases = math_verify_cases(path)
    out = {
        "path": str(path),
        "cases": len(cases),
        "calls": 0,
        "agree": 0,
        "false_accepts": [],
        "pair_unsafe": [],
        "no_answer": 0,
        "undecided": 0,
    }
    for test, gold, pred, expected in cases:
        for form in (pred, "Let me solve this.\nFinal answer: " + pred):
            v = uncached_judge(form, gold, "math", None)
            out["calls"] += 1
            out["agree"] += v.correct == expected
            if v.correct and not expected:
                out["false_accepts"].append([test, gold[:80], form[-120:]])
            if expected and not v.correct:
                if v.extracted is None:
                    out["no_answer"] += 1
                elif v.undecided:  # no pair either way
                    out["undecided"] += 1
                else:
                    out["pair_unsafe"].append([test, gold[:80], form[-120:], v.reason])
    print(
        f"math-verify's own tests ({len(cases)} cases, {out['calls']} calls): agree {out['agree']} "
        f"({out['agree'] / max(out['calls'], 1):.1%}), false accepts {len(out['false_accepts'])}, "
        f"equal judged wrong with an extracted answer {len(out['pair_unsafe'])}, "
        f"undecided {out['undecided']}, without an answer {out['no_answer']}"
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="time per single-process measurement")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="Ray actors (1 CPU each)")
    parser.add_argument("--repeats", type=int, default=5, help="corpus passes in the Ray measurement")
    parser.add_argument("--no-ray", action="store_true")
    parser.add_argument("--figures-only", action="store_true", help="the corpora's figures, no timing")
    parser.add_argument("--out", type=Path, default=OUT, help="raw results (JSON)")
    parser.add_argument("--math-verify-tests", type=Path, help="math-verify's tests/test_all.py (see above)")
    args = parser.parse_args()
    rows = regression.load_corpus(CORPUS)
    warm_up()
    result = {
        "machine": {
            "cpus": os.cpu_count(),
            "load_average_at_start": os.getloadavg(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "corpus": {"path": str(CORPUS.relative_to(ROOT)), "cases": len(rows)},
        "baseline": "exact_match_judge: last 'Final answer:'/'Answer:' line or last \\boxed{}, "
        "normalised exact match; same process, same corpus",
    }
    print(f"regression suite: {len(rows)} labelled cases")
    result["suite"] = suite(rows)
    result["rules_alone"] = rules_figures({"judge": rows, "free_form": regression.load_corpus(FREE_FORM)})
    if args.math_verify_tests:
        result["math_verify_suite"] = math_verify_suite(args.math_verify_tests)
    if not args.figures_only:
        result["single_process"] = single_process(rows, args.seconds)
    if not args.no_ray and not args.figures_only:
        print(f"Ray, corpus x {args.repeats}:")
        result["ray"] = across_ray(rows, args.workers, args.repeats)
    result["machine"]["load_average_at_end"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"raw results: {args.out}")


if __name__ == "__main__":
    main()
