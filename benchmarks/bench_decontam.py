"""Decontamination: how well edited copies of benchmark images are found, how often distinct photos are
taken for one another, and what hashing and lookup cost on Ray workers.

    .venv/bin/python benchmarks/bench_decontam.py [--bench 1000 --distinct 2000 --train 4000 --build 0]
    .venv/bin/python benchmarks/bench_decontam.py --distinct 0 --train 0 --build 10000 --bench 1000

1. Quality (one process). `--bench` procedural photos (tests/_photos.py: 1/f colour fields, gradients,
   shapes, noise; NOT real photos: nothing can be downloaded here) are indexed as a benchmark
   (mmpr_pipeline/decontam.py, with its crops); for each, one copy per edit (JPEG re-encode at quality
   60-90, resize 0.5-1.5x, crop up to 10%, PNG->JPEG and JPEG->PNG, mild colour jitter, and all of them at
   once) is looked up: recall per edit. `--distinct` other photos (other seeds), as JPEG, are looked up
   too: the share of them that match any benchmark image (false matches per query) and per pair.
2. Cost on Ray (the build's own functions): a benchmark of `--bench` images in Parquet files is indexed
   by stages/decontaminate.start_index (Ray tasks, one per file); `--train` training images (640x480
   JPEG, the distinct photos cycled) in Parquet files are checked by Ray tasks calling
   set_aside_leaks with the index's reference; the driver receives counts only. The lookup is also
   timed against an index of 10,000 benchmark rows (random hashes; lookup cost does not depend on the
   pixels), and the figures are extrapolated to 100k training images against 10k benchmark images.
3. `--build N`: real builds (`mmpr build`, fresh processes, tiny random model, cheap per question:
   `--n` 1 sample of `--max-tokens` 4) of N photo questions (bench_scale's ~87 KB JPEGs) with a
   benchmark of `--bench` photos (`--leaked` of them re-encoded copies of training photos) and
   without, alternated off/on `--rounds` times: wall seconds, their ratio, the builds' stage seconds
   and set-aside counts. Then the decontamination stage alone on the same rows, in this process (the
   build's own index and check functions): its wall and CPU seconds.
Raw output: benchmarks/results/bench_decontam.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from _photos import copy_of, crop, encode, jitter, photo, resize  # noqa: E402

from mmpr_pipeline import decontam  # noqa: E402
from mmpr_pipeline.records import decode_image  # noqa: E402

EDITS = {
    "jpeg_q60_90": lambda p, r: encode(p, "JPEG", r.randint(60, 90)),
    "resize_0.5_1.5x": lambda p, r: encode(resize(p, r.uniform(0.5, 1.5))),
    "crop_up_to_10pct": lambda p, r: encode(crop(p, r.uniform(0, 0.10), r)),
    "png_to_jpeg_and_back": lambda p, r: encode(p, "JPEG", 85),
    "colour_jitter": lambda p, r: encode(jitter(p, r)),
    "all_at_once": lambda p, r: copy_of(p, r),
}
NO_COLOUR = bytes(decontam.COLOUR_BYTES)
H, W = 240, 320  # procedural photos: smaller than real ones to keep generation quick; hashes read <= 256 px


def quality(n_bench: int, n_distinct: int, seed: int) -> dict:
    r = random.Random(seed)
    t0 = time.perf_counter()
    bench = [photo(s, H, W) for s in range(n_bench)]
    # half the benchmark is stored as JPEG, so a PNG copy of those is JPEG->PNG
    stored = [encode(p, "JPEG", 90) if i % 2 else encode(p) for i, p in enumerate(bench)]
    t_gen = time.perf_counter() - t0
    t0 = time.perf_counter()
    entries = [
        decontam.benchmark_entry("bench", i, f"q{i}", [b], decontam.NGRAM) for i, b in enumerate(stored)
    ]
    t_index = time.perf_counter() - t0
    index = decontam.Benchmarks.build(
        ["bench"], {"bench": (decontam.IMAGE_DISTANCE, decontam.NGRAM)}, entries
    )
    out = {"generate_seconds": round(t_gen, 1), "index_seconds_per_image": round(t_index / n_bench, 4)}
    recall, distances = {}, {}
    for name, edit in EDITS.items():
        found, dist = 0, []
        for i, p in enumerate(bench):
            if (
                name == "png_to_jpeg_and_back" and i % 2
            ):  # the JPEG-stored half goes the other way: JPEG -> PNG
                copy = encode(decode_image(stored[i]))
            else:
                copy = edit(p, r)
            hit = index.match_image(decontam.image_hash(copy))
            found += hit is not None and index.describe(hit[0]) == ("bench", i)
            dist.append(hit[1] if hit else None)
        recall[name] = round(found / n_bench, 4)
        seen = [d for d in dist if d is not None]
        distances[name] = dict(median=float(np.median(seen)) if seen else None, max=max(seen, default=None))
    t0 = time.perf_counter()
    false = 0
    nearest = []
    for s in range(n_distinct):
        h = decontam.image_hash(encode(photo(100_000 + s, H, W), "JPEG", 85))
        false += index.match_image(h) is not None
        d = np.bitwise_count(index.phash ^ np.uint64(h[0])) + np.bitwise_count(index.dhash ^ np.uint64(h[1]))
        nearest.append(int(d.min()))
    out.update(
        recall=recall,
        matched_distance=distances,
        recall_all_edits=round(float(np.mean(list(recall.values()))), 4),
        distinct_queries=n_distinct,
        distinct_matched=false,
        false_match_rate_per_query=false / n_distinct,
        false_match_rate_per_pair=false / (n_distinct * n_bench),
        distinct_nearest_distance=dict(min=min(nearest), p1=float(np.percentile(nearest, 1))),
        image_distance=decontam.IMAGE_DISTANCE,
        distinct_seconds=round(time.perf_counter() - t0, 1),
    )
    return out


def cpu_costs(n: int = 60) -> dict:
    """CPU seconds (process time, so a busy machine inflates them less than wall time) of the steps,
    in this process: hashing one 640x480 JPEG, indexing one benchmark image with its crops, one
    lookup against 10,000 benchmark rows; extrapolated to 100k training against 10k benchmark images."""
    imgs = [encode(photo(300_000 + s, H, W).resize((640, 480)), "JPEG", 85) for s in range(n)]
    t = time.process_time()
    for data in imgs:
        decontam.image_hash(data)
    hash_cpu = (time.process_time() - t) / n
    t = time.process_time()
    for i, data in enumerate(imgs):
        decontam.benchmark_entry("b", i, "q", [data], decontam.NGRAM)
    index_cpu = (time.process_time() - t) / n
    lookup = _lookup_10k(0)
    return dict(
        hash_cpu_seconds_per_image=round(hash_cpu, 4),
        index_cpu_seconds_per_benchmark_image=round(index_cpu, 4),
        lookup_cpu_seconds_per_query_against_10k=round(lookup, 5),
        cpu_seconds_100k_against_10k=dict(
            index=round(10_000 * index_cpu), check=round(100_000 * (hash_cpu + lookup))
        ),
    )


def _lookup_10k(seed: int) -> float:
    """Process seconds of one image lookup against 10,000 benchmark rows with their crops (random
    hashes: the lookup's cost does not depend on the pixels)."""
    rng = np.random.default_rng(seed)
    big = decontam.Benchmarks.build(
        ["b"],
        {"b": (decontam.IMAGE_DISTANCE, decontam.NGRAM)},
        [
            dict(
                benchmark="b",
                row=i,
                hashes=[
                    (int(p), int(d), NO_COLOUR)
                    for p, d in rng.integers(0, 2**63, (1 + len(decontam.CROPS), 2))
                ],
                words=[],
                ngrams=[],
            )
            for i in range(10_000)
        ],
    )
    queries = [decontam.ImageHash(int(p), int(d), NO_COLOUR) for p, d in rng.integers(0, 2**63, (300, 2))]
    t0 = time.process_time()
    for q in queries:
        big.match_image(q)
    return (time.process_time() - t0) / len(queries)


def _parquet_files(folder: Path, rows: list[dict], per_file: int) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(0, len(rows), per_file):
        path = folder / f"part-{k // per_file:05d}.parquet"
        pq.write_table(pa.Table.from_pylist(rows[k : k + per_file]), path)
        paths.append(str(path))
    return paths


def check_file(path: str, index_ref) -> dict:
    """On a worker: one Parquet file of training rows -> counts (the driver never sees the rows)."""
    from stages.decontaminate import set_aside_leaks

    t0, cpu0 = time.perf_counter(), time.process_time()
    rows = pq.read_table(path).to_pylist()
    questions = [
        dict(source="train", row_index=i, images=[r["image"]], question=r["question"])
        for i, r in enumerate(rows)
    ]
    kept, leaks = set_aside_leaks(questions, index_ref)
    return dict(
        rows=len(rows), leaks=len(leaks), wall=time.perf_counter() - t0, cpu=time.process_time() - cpu0
    )


def cost(n_bench: int, n_train: int, tmp: Path, seed: int) -> dict:
    import ray

    from mmpr_pipeline.recipe import Benchmark
    from stages.decontaminate import start_index

    cpus = os.cpu_count() or 2
    ray.init(
        address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False, configure_logging=False
    )
    bench_rows = [
        dict(image=encode(photo(s, H, W).resize((640, 480)), "JPEG", 85), question=f"Benchmark question {s}")
        for s in range(n_bench)
    ]
    _parquet_files(tmp / "bench", bench_rows, max(1, n_bench // (2 * cpus)))
    n_unique = min(n_train, 500)
    unique = [encode(photo(200_000 + s, H, W).resize((640, 480)), "JPEG", 85) for s in range(n_unique)]
    train_rows = [dict(image=unique[i % n_unique], question=f"Training question {i}") for i in range(n_train)]
    train_files = _parquet_files(tmp / "train", train_rows, 500)
    del bench_rows, train_rows, unique
    t0 = time.perf_counter()
    index, summary = start_index([Benchmark(name="bench", loader="parquet", path=str(tmp / "bench"))])
    summary = ray.get(summary)
    t_index = time.perf_counter() - t0
    t0 = time.perf_counter()
    task = ray.remote(num_cpus=1)(check_file)
    results = ray.get([task.remote(p, index) for p in train_files])
    t_check = time.perf_counter() - t0
    cpu_per_image = sum(r["cpu"] for r in results) / n_train
    lookup_10k = _lookup_10k(seed)
    lookup_here = cpu_per_image  # hash + lookup per training image, against n_bench rows
    index_cpu_per_image = t_index * cpus / n_bench  # upper bound: tasks spread over every core
    ray.shutdown()
    per_train_10k = lookup_here + lookup_10k  # the lookup against n_bench rows is a small part of it
    return dict(
        cpus=cpus,
        bench_images=n_bench,
        train_images=n_train,
        index_wall_seconds=round(t_index, 2),
        index=summary["benchmarks"],
        check_wall_seconds=round(t_check, 2),
        check_images_per_second=round(n_train / t_check, 1),
        check_cpu_seconds_per_image=round(cpu_per_image, 5),
        lookup_seconds_per_query_against_10k=round(lookup_10k, 5),
        leaks_found=sum(r["leaks"] for r in results),
        extrapolated_100k_vs_10k=dict(
            index_cpu_seconds=round(index_cpu_per_image * 10_000, 1),
            check_cpu_seconds=round(per_train_10k * 100_000, 1),
            wall_seconds_on_these_cpus=round(
                (index_cpu_per_image * 10_000 + per_train_10k * 100_000) / cpus, 1
            ),
            note="hash+lookup per training image measured against this run's benchmark, plus the "
            "lookup against 10k rows measured alone; index cost per benchmark image measured here",
        ),
    )


def build_ratio(
    n_questions: int,
    n_bench: int,
    tmp: Path,
    *,
    rounds: int,
    leaked: int,
    n: int,
    max_tokens: int,
    repo: Path,
) -> dict:
    """The same build of `n_questions` photo questions with and without a benchmark of `n_bench` photos
    (`leaked` of them re-encoded copies of training photos), alternated off/on `rounds` times in fresh
    processes, so a change in the machine's load weighs on both; cheap per question (n, max_tokens
    small) so what differs is the pipeline's decontamination. Then the decontamination stage alone on
    the same rows, in this process: the index (hash_benchmark_input + merge_index) and the check
    (set_aside_leaks), the functions the build runs on its Ray workers."""
    import _build_process as build_process
    import yaml

    sys.path.insert(0, str(REPO / "benchmarks"))
    from bench_scale import photo_jpeg

    from mmpr_pipeline import demo_model
    from mmpr_pipeline.recipe import Benchmark
    from stages.decontaminate import hash_benchmark_input, merge_index, set_aside_leaks

    model = str(demo_model.build(tmp / "tiny", "tiny"))
    source = tmp / "train" / "photos.parquet"
    source.parent.mkdir()
    t0 = time.perf_counter()
    # photo-sized JPEGs (bench_scale's), each question its own text; 1,000 distinct images cycled: the
    # check hashes every row's image however often it repeats, and generating 10k takes minutes here.
    # `leaked` rows, spread over the source, have a photo of their own, of which the benchmark holds a
    # re-encoded copy: exactly those rows are set aside.
    train_images = [photo_jpeg(i) for i in range(min(n_questions, 1000))]
    image_kb = sum(map(len, train_images)) / len(train_images) / 1024
    step = max(1, n_questions // max(1, leaked))
    leaked_images = {k * step: photo_jpeg(3_000_000 + k) for k in range(min(leaked, n_questions))}
    rows = [
        dict(
            image=leaked_images.get(i, train_images[i % len(train_images)]),
            question=f"Photo {i}: how many colour fields?",
            answer="3",
        )
        for i in range(n_questions)
    ]
    pq.write_table(pa.Table.from_pylist(rows), source, row_group_size=1000)
    del rows
    copies = [encode(decode_image(image), "JPEG", 75) for image in leaked_images.values()]
    bench_rows = [
        dict(
            image=copies[k] if k < len(copies) else photo_jpeg(5_000_000 + k),
            question=f"Benchmark question number {k} about the picture",
        )
        for k in range(n_bench)
    ]
    del train_images, leaked_images, copies
    bench_files = _parquet_files(tmp / "bench", bench_rows, max(1, n_bench // 4))
    del bench_rows
    out: dict = dict(
        questions=n_questions,
        image_kb=round(image_kb, 1),
        bench_images=n_bench,
        leaked_copies=leaked,
        sampling=dict(n=n, max_tokens=max_tokens),
        generate_inputs_seconds=round(time.perf_counter() - t0, 1),
        runs=[],
    )
    bench = Benchmark(name="bench", loader="parquet", path=str(tmp / "bench"))
    for r in range(rounds):
        for name in ("off", "on"):
            recipe = dict(
                name=f"bench-{name}",
                model=model,
                engine={"max_model_len": 512},
                sampling=dict(n=n, max_tokens=max_tokens),
                unit_size=256,
                batch_size=64,
                preview=False,
                sources=[
                    dict(name="photos", loader="parquet", path=str(source.parent), answer_type="number")
                ],
            )
            if name == "on":
                recipe["decontamination"] = [dict(name="bench", loader="parquet", path=bench.path)]
            path = tmp / f"{name}.yaml"
            path.write_text(yaml.safe_dump(recipe))
            run_dir = tmp / f"run-{name}-{r}"
            t0 = time.perf_counter()
            p = build_process.run(path, run_dir, timeout=None, repo=repo)  # that checkout's code
            wall = time.perf_counter() - t0
            if p.returncode != 0:
                raise SystemExit(f"build {name} round {r} failed (rc {p.returncode}):\n{p.stdout[-4000:]}")
            stats = json.loads((run_dir / "stats.json").read_text())
            run = dict(
                decontamination=name,
                round=r,
                wall_seconds=round(wall, 1),
                stage_seconds=stats["stage_seconds"],
                set_aside=stats.get("decontamination") or {},
                questions_sampled=stats["totals"]["questions"],
            )
            out["runs"].append(run)
            print(json.dumps(run), flush=True)
            shutil.rmtree(run_dir, ignore_errors=True)
    walls = {k: [x["wall_seconds"] for x in out["runs"] if x["decontamination"] == k] for k in ("off", "on")}
    if rounds:
        out["wall_seconds"] = {k: dict(each=v, mean=round(sum(v) / len(v), 1)) for k, v in walls.items()}
        out["ratio_on_over_off"] = round(
            out["wall_seconds"]["on"]["mean"] / out["wall_seconds"]["off"]["mean"], 3
        )
        out["ratio_per_round"] = [round(b / a, 3) for a, b in zip(walls["off"], walls["on"])]

    # the stage alone, one process: wall and CPU seconds of building the index and checking every row
    t0, c0 = time.perf_counter(), time.process_time()
    parts = [hash_benchmark_input(bench, f) for f in bench_files]
    index = merge_index(["bench"], {"bench": (bench.image_distance, bench.ngram)}, {"bench": None}, *parts)
    t_index, c_index = time.perf_counter() - t0, time.process_time() - c0
    t_check = c_check = 0.0
    set_aside = 0
    f = pq.ParquetFile(source)
    offset = 0
    for batch in f.iter_batches(batch_size=256, columns=["image", "question"]):
        questions = [
            dict(source="photos", row_index=offset + i, images=[row["image"]], question=row["question"])
            for i, row in enumerate(batch.to_pylist())
        ]
        offset += len(questions)
        t0, c0 = time.perf_counter(), time.process_time()
        set_aside += len(set_aside_leaks(questions, index)[1])
        t_check += time.perf_counter() - t0
        c_check += time.process_time() - c0
    out["stage_alone"] = dict(
        index_wall_seconds=round(t_index, 1),
        index_cpu_seconds=round(c_index, 1),
        check_wall_seconds=round(t_check, 1),
        check_cpu_seconds=round(c_check, 1),
        check_ms_per_question=round(1000 * c_check / n_questions, 2),
        set_aside=set_aside,
    )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bench", type=int, default=1000, help="benchmark images")
    ap.add_argument(
        "--distinct", type=int, default=2000, help="distinct photos looked up (false matches); 0 skips part 1"
    )
    ap.add_argument("--train", type=int, default=4000, help="training images checked on Ray (cost)")
    ap.add_argument("--build", type=int, default=0, help="questions of the on/off build comparison (0: skip)")
    ap.add_argument("--rounds", type=int, default=2, help="off/on build pairs, alternated")
    ap.add_argument("--leaked", type=int, default=100, help="benchmark images copied from training photos")
    ap.add_argument("--n", type=int, default=1, help="samples per question in the builds")
    ap.add_argument("--max-tokens", type=int, default=4, help="per sample in the builds")
    ap.add_argument("--repo", type=Path, default=REPO, help="checkout whose code the builds run")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(REPO / "benchmarks/results/bench_decontam.json"))
    args = ap.parse_args()
    result = dict(args={k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()})
    if args.distinct or args.train:
        result["cpu"] = cpu_costs()
        print(json.dumps(result["cpu"], indent=1), flush=True)
    if args.distinct:
        result["quality"] = quality(args.bench, args.distinct, args.seed)
        print(json.dumps(result["quality"], indent=1), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        if args.train:
            result["cost"] = cost(args.bench, args.train, Path(tmp), args.seed)
            print(json.dumps(result["cost"], indent=1), flush=True)
        if args.build:
            result["build"] = build_ratio(
                args.build,
                args.bench,
                Path(tmp),
                rounds=args.rounds,
                leaked=args.leaked,
                n=args.n,
                max_tokens=args.max_tokens,
                repo=args.repo,
            )
            print(json.dumps(result["build"], indent=1), flush=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
