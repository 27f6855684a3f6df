"""Memory and time of `write_preview` as a run grows, against reading the pair shards whole.

    python benchmarks/bench_preview.py [--pairs 2000 8000 16000] [--shard-rows 2000] [--image-kb 30]

For each size, writes a synthetic run folder in the pipeline's layout and schemas (pair shards with
one noise JPEG of about --image-kb per pair, sample units, rejects), then, each in a fresh process:
  baseline   pq.read_table of data/ (all shards at once: what a naive preview would do)
  preview    mmpr_pipeline.preview.write_preview(run, per_source=20)
and reports each one's peak Arrow memory and peak RSS, and the ratio preview / baseline. The preview
reads a shard's row group at a time, so its peak follows the largest row group (a shard is one row
group today), not the run; the baseline's follows the run.
Raw numbers go to benchmarks/results/bench_preview.json.
"""

from __future__ import annotations

import argparse
import io
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

from mmpr_pipeline import records  # noqa: E402

MEASURE = r"""
import json, resource, sys, time
import pyarrow as pa, pyarrow.parquet as pq
from pathlib import Path
run, what = Path(sys.argv[1]), sys.argv[2]
t0 = time.perf_counter()
if what == "baseline":
    table = pq.read_table(run / "data")
    del table
else:
    from mmpr_pipeline.preview import write_preview
    write_preview(run, per_source=20)
print(json.dumps(dict(seconds=time.perf_counter() - t0,
                      arrow_peak_mb=pa.default_memory_pool().max_memory() / 2**20,
                      rss_peak_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)))
"""


def noise_jpeg(rng: random.Random, side: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.frombytes("RGB", (side, side), rng.randbytes(side * side * 3)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def side_for(kb: int) -> int:
    """Side of a noise JPEG of about `kb` kilobytes (noise does not compress: every run row is new data)."""
    rng, side = random.Random(0), 32
    while len(noise_jpeg(rng, side)) < kb * 1024 and side < 2048:
        side += 16
    return side


def make_run(run: Path, n_pairs: int, shard_rows: int, image_kb: int) -> None:
    rng = random.Random(0)
    side = side_for(image_kb)
    words = "the bar chart shows four bars labelled A to D and the tallest one is".split()
    n_questions, per_q = n_pairs // 4, 4
    samples, pairs = [], []
    for q in range(n_questions):
        source = "charts" if q % 2 == 0 else "scenes"
        qid = f"{q:016x}"
        image = noise_jpeg(rng, side)  # one per question, repeated in its pairs (as a build writes them)
        responses = [
            " ".join(rng.choices(words, k=120)) + f"\nFinal answer: {'ABCD'[i % 4]}" for i in range(8)
        ]
        correct = [i % 4 == 0 for i in range(8)]
        samples.append(
            dict(
                qid=qid,
                source=source,
                row_index=q,
                unit=q // 64,
                pipeline="correctness",
                task="bars",
                image=image,
                question="Which bar is the tallest?",
                answer="A",
                answers=["A"],
                answer_type="multiple_choice",
                options=[],
                given_response="",
                prompt_template="cot_final_answer",
                responses=responses,
                n_tokens=[120] * 8,
                finish_reasons=["stop"] * 8,
                error="",
                extracted=["ABCD"[i % 4] for i in range(8)],
                correct=correct,
                score=[float(c) for c in correct],
                reason=["correct" if c else "wrong answer" for c in correct],
                prefix_words=[],
                continuations=[],
                continuation_tokens=[],
                continuation_image_tokens=[],
                sample_seconds=0.0,
                continue_seconds=0.0,
                score_seconds=0.0,
            )
        )
        for r in range(1, per_q + 1):
            pairs.append(
                dict(
                    id=f"{q:08x}{r:08x}",
                    qid=qid,
                    source=source,
                    task="bars",
                    images=[{"bytes": image, "path": None}],
                    question="Which bar is the tallest?",
                    answer="A",
                    chosen=responses[0],
                    rejected=responses[r],
                    pair_type="correctness",
                    model="demo",
                    prompt_template="cot_final_answer",
                    sampling="{}",
                    chosen_index=0,
                    rejected_index=r,
                    cut_ratio=None,
                    prefix_words=None,
                )
            )
    n_shards = -(-len(pairs) // shard_rows)
    (run / "data").mkdir(parents=True)
    for s in range(n_shards):
        pq.write_table(
            pa.Table.from_pylist(pairs[s * shard_rows : (s + 1) * shard_rows], schema=records.PAIR_SCHEMA),
            run / "data" / f"train-{s:05d}-of-{n_shards:05d}.parquet",
            compression="zstd",
        )
    for source in ("charts", "scenes"):
        rows = [r for r in samples if r["source"] == source]
        (run / "samples" / source).mkdir(parents=True)
        for u in range(0, len(rows), 64):
            pq.write_table(
                pa.Table.from_pylist(rows[u : u + 64], schema=records.SAMPLE_SCHEMA),
                run / "samples" / source / f"unit-{u // 64:05d}.parquet",
                compression="zstd",
            )
    (run / "stats.json").write_text(json.dumps({"recipe": "bench", "model": "demo", "sources": {}}))


def measure(run: Path, what: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", MEASURE, str(run), what], cwd=REPO, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, nargs="+", default=[2000, 8000, 16000])
    ap.add_argument("--shard-rows", type=int, default=2000)
    ap.add_argument("--image-kb", type=int, default=30)
    args = ap.parse_args()
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-preview-") as tmp:
        for n in args.pairs:
            run = Path(tmp) / f"run-{n}"
            t0 = time.perf_counter()
            make_run(run, n, args.shard_rows, args.image_kb)
            shards_mb = sum(p.stat().st_size for p in (run / "data").glob("*.parquet")) / 2**20
            base, prev = measure(run, "baseline"), measure(run, "preview")
            html_mb = (run / "preview.html").stat().st_size / 2**20
            results.append(
                dict(
                    pairs=n,
                    shard_rows=args.shard_rows,
                    shards_mb=round(shards_mb, 1),
                    baseline=base,
                    preview=prev,
                    preview_html_mb=round(html_mb, 3),
                )
            )
            print(
                f"{n:>7,} pairs, {shards_mb:6.1f} MB of shards (made in {time.perf_counter() - t0:.0f}s): "
                f"peak Arrow memory baseline {base['arrow_peak_mb']:7.1f} MB, "
                f"preview {prev['arrow_peak_mb']:6.1f} MB "
                f"(ratio {prev['arrow_peak_mb'] / base['arrow_peak_mb']:.2f}); "
                f"peak RSS {base['rss_peak_mb']:.0f} / "
                f"{prev['rss_peak_mb']:.0f} MB; time {base['seconds']:.2f}s / {prev['seconds']:.2f}s; "
                f"preview.html {html_mb:.2f} MB"
            )
    out = REPO / "benchmarks" / "results" / "bench_preview.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(dict(image_kb=args.image_kb, results=results), indent=2) + "\n")
    print(f"raw results: {out}")


if __name__ == "__main__":
    main()
