"""Memory and time of `mmpr select` as a run grows, against reading samples/ whole.

    python benchmarks/bench_select.py [--questions 500 2000 8000] [--image-kb 30]

For each size, writes a synthetic run folder's samples/ (the pipeline's SAMPLE_SCHEMA, 64 questions
per unit file, one noise JPEG of about --image-kb per question, 8 responses of ~120 words; the
questions' pass rates cycle through 0, 1/8, ..., 1), then, each in a fresh process:
  baseline   pq.read_table of samples/ (every unit at once: what a select that gathers first would do)
  select     mmpr_pipeline.selection.select(run, out, band=(0.2, 0.8))
and reports each one's peak Arrow memory and peak RSS, and the ratio select / baseline. select reads
one unit file at a time (its verdict columns, then the kept rows' images), so its peak follows the
unit size, not the run. Raw numbers go to benchmarks/results/bench_select.json.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.bench_preview import noise_jpeg, side_for  # noqa: E402
from mmpr_pipeline import records  # noqa: E402

UNIT = 64
MEASURE = r"""
import json, resource, sys, time
import pyarrow as pa, pyarrow.parquet as pq
from pathlib import Path
run, what = Path(sys.argv[1]), sys.argv[2]
t0 = time.perf_counter()
if what == "baseline":
    table = pq.read_table(run / "samples")
    del table
else:
    from mmpr_pipeline.selection import select
    selected = select(run, run.parent / (run.name + "-selected"), band=(0.2, 0.8))["selected"]
print(json.dumps(dict(seconds=time.perf_counter() - t0,
                      arrow_peak_mb=pa.default_memory_pool().max_memory() / 2**20,
                      rss_peak_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)))
"""


def make_samples(run: Path, n_questions: int, image_kb: int) -> None:
    rng = random.Random(0)
    side = side_for(image_kb)
    words = "the bar chart shows four bars labelled A to D and the tallest one is".split()
    (run / "samples" / "charts").mkdir(parents=True)
    for u in range(0, n_questions, UNIT):
        rows = []
        for q in range(u, min(u + UNIT, n_questions)):
            correct = [i < q % 9 for i in range(8)]  # pass rate q % 9 / 8, 0 to 1
            rows.append(
                dict(
                    qid=f"{q:016x}",
                    source="charts",
                    row_index=q,
                    unit=q // UNIT,
                    pipeline="correctness",
                    task="bars",
                    images=[noise_jpeg(rng, side)],
                    question="Which bar is the tallest?",
                    answer="A",
                    answers=["A"],
                    answer_type="multiple_choice",
                    options=[],
                    given_response="",
                    rationale="",
                    prompt_template="cot_final_answer",
                    responses=[" ".join(rng.choices(words, k=120)) + "\nFinal answer: A"] * 8,
                    n_tokens=[120] * 8,
                    finish_reasons=["stop"] * 8,
                    error="",
                    extracted=["A"] * 8,
                    correct=correct,
                    score=[float(c) for c in correct],
                    reason=["correct" if c else "wrong answer" for c in correct],
                )
            )
        pq.write_table(
            pa.Table.from_pylist(rows, schema=records.SAMPLE_SCHEMA),
            run / "samples" / "charts" / f"unit-{u // UNIT:05d}.parquet",
            compression="zstd",
        )


def measure(run: Path, what: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", MEASURE, str(run), what], cwd=REPO, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--questions", type=int, nargs="+", default=[500, 2000, 8000])
    ap.add_argument("--image-kb", type=int, default=30)
    args = ap.parse_args()
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-select-") as tmp:
        for n in args.questions:
            run = Path(tmp) / f"run-{n}"
            t0 = time.perf_counter()
            make_samples(run, n, args.image_kb)
            samples_mb = sum(p.stat().st_size for p in (run / "samples").rglob("*.parquet")) / 2**20
            base, sel = measure(run, "baseline"), measure(run, "select")
            kept = json.loads((Path(tmp) / f"run-{n}-selected" / "selection.json").read_text())["selected"]
            results.append(
                dict(questions=n, selected=kept, samples_mb=round(samples_mb, 1), baseline=base, select=sel)
            )
            print(
                f"{n:>6,} questions, {samples_mb:6.1f} MB of samples "
                f"(made in {time.perf_counter() - t0:.0f}s), "
                f"{kept:,} selected: peak Arrow memory baseline {base['arrow_peak_mb']:7.1f} MB, select "
                f"{sel['arrow_peak_mb']:6.1f} MB (ratio {sel['arrow_peak_mb'] / base['arrow_peak_mb']:.2f}); "
                f"peak RSS {base['rss_peak_mb']:.0f} / {sel['rss_peak_mb']:.0f} MB; "
                f"time {base['seconds']:.2f}s / {sel['seconds']:.2f}s"
            )
    out = REPO / "benchmarks" / "results" / "bench_select.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(
        json.dumps(dict(image_kb=args.image_kb, unit_questions=UNIT, results=results), indent=2) + "\n"
    )
    print(f"raw results: {out}")


if __name__ == "__main__":
    main()
