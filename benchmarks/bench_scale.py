"""Memory at scale: does the driver stay flat as the number of questions grows?

    python benchmarks/bench_scale.py [--n 300] [--factor 10] [--repo DIR] [--out results.json]

Writes a Parquet source of N and factor x N questions, each with its own photo-sized JPEG (random
smooth colour fields, >= 60 KB), and runs `mmpr build` on each (a real process: local Ray + vLLM on
the demo model, n = 4 samples of at most 16 tokens: the data path is what is measured, not the
engine). A sampler thread follows the build's whole process tree (the driver, Ray's daemons, the
workers, the engine) and records each process's peak RSS. Printed: the driver's peak and the
largest worker's peak at both sizes, and their ratios (10N / N). `--repo` runs another checkout's
code (e.g. the commit before a change) with this environment, for a before/after in one command.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def photo_jpeg(i: int, side: int = 352) -> bytes:
    """A distinct photo-like JPEG of ~60-90 KB: smooth random colour fields plus grain."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(i)
    coarse = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
    base = np.asarray(Image.fromarray(coarse).resize((side, side), Image.BICUBIC), dtype=np.int16)
    grain = rng.integers(-40, 40, size=base.shape, dtype=np.int16)
    img = Image.fromarray(np.clip(base + grain, 0, 255).astype(np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_source(path: Path, n: int) -> float:
    """A Parquet file of n questions; returns the mean image size in KB."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    writer, sizes = None, []
    for start in range(0, n, 200):
        rows = []
        for i in range(start, min(n, start + 200)):
            image = photo_jpeg(i)
            sizes.append(len(image))
            rows.append(
                dict(
                    image=image,
                    question=f"Photo {i}: how many colour fields are there?",
                    answer=str(i % 7 + 1),
                )
            )
        table = pa.Table.from_pylist(rows)
        writer = writer or pq.ParquetWriter(path, table.schema)
        writer.write_table(table)
    writer.close()
    return sum(sizes) / len(sizes) / 1024


RECIPE = """name: scale
model: {model}
engine: {{max_model_len: 1024}}
sampling: {{n: 4, max_tokens: 16}}
unit_size: 64
batch_size: 64
sources:
  - name: photos
    loader: parquet
    path: {path}
    answer_type: number
"""


def peak_rss_of_tree(
    pid: int, stop: threading.Event, peaks: dict[int, tuple[str, int]], uss_peaks: dict[int, int]
) -> None:
    """Peak RSS of every process of the build, and peak USS (its private memory: RSS less the pages
    it shares, such as Ray's object store it reads blocks from)."""
    import psutil

    root = psutil.Process(pid)
    while not stop.is_set():
        try:
            procs = [root] + root.children(recursive=True)
        except psutil.NoSuchProcess:
            return
        for p in procs:
            try:
                rss = p.memory_info().rss
                uss = p.memory_full_info().uss
                name = " ".join(p.cmdline()[:3])[:80] or p.name()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            # the latest name: vLLM's engine process starts as `python -c ...` and renames itself
            peaks[p.pid] = (name, max(rss, peaks.get(p.pid, ("", 0))[1]))
            uss_peaks[p.pid] = max(uss, uss_peaks.get(p.pid, 0))
        time.sleep(0.2)


def run_build(repo: Path, recipe: Path, out: Path) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", VLLM_CPU_KVCACHE_SPACE="1")
    env.pop("RAY_ADDRESS", None)
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mmpr_pipeline.cli", "build", str(recipe), "--out", str(out)],
        cwd=repo,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    peaks: dict[int, tuple[str, int]] = {}
    uss: dict[int, int] = {}
    stop = threading.Event()
    sampler = threading.Thread(target=peak_rss_of_tree, args=(proc.pid, stop, peaks, uss), daemon=True)
    sampler.start()
    log, _ = proc.communicate()
    stop.set()
    sampler.join()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"build failed (rc {proc.returncode}):\n{log[-3000:]}")
    driver = peaks.pop(proc.pid)[1]
    # The engine (VLLM::EngineCore, its worker) holds the model and KV cache: not data, reported apart.
    engine = {pid: v for pid, v in peaks.items() if "VLLM" in v[0] or "EngineCore" in v[0]}
    workers = {pid: v for pid, v in peaks.items() if pid not in engine}
    top_pid = max(workers, key=lambda pid: workers[pid][1])
    top_name, top = workers[top_pid]
    stats = json.loads((out / "stats.json").read_text())
    return dict(
        wall_s=round(wall, 1),
        driver_mib=round(driver / 2**20),
        worker_mib=round(top / 2**20),
        worker_uss_mib=round(uss.get(top_pid, 0) / 2**20),
        worker=top_name,
        pairs=sum(stats["totals"]["pairs"].values()),
        questions=stats["totals"]["questions"],
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--factor", type=int, default=10)
    ap.add_argument("--model", default=None, help="default: the trained demo model")
    ap.add_argument(
        "--repo", type=Path, default=REPO, help="the checkout whose code runs (default: this one)"
    )
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "bench_scale.json")
    args = ap.parse_args()
    if args.model is None:
        from mmpr_pipeline import demo_model

        args.model = str(demo_model.ensure_trained())
    results = dict(
        repo=str(args.repo),
        commit=subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=args.repo, capture_output=True, text=True
        ).stdout.strip(),
        sizes={},
    )
    with tempfile.TemporaryDirectory() as tmp:
        for n in (args.n, args.n * args.factor):
            src = Path(tmp) / f"photos-{n}.parquet"
            kb = write_source(src, n)
            recipe = Path(tmp) / f"scale-{n}.yaml"
            recipe.write_text(RECIPE.format(model=args.model, path=src))
            r = run_build(args.repo, recipe, Path(tmp) / f"run-{n}")
            r["image_kb"] = round(kb, 1)
            results["sizes"][n] = r
            print(
                f"{n:>6} questions ({kb:.0f} KB images): driver peak {r['driver_mib']} MiB, largest worker "
                f"{r['worker_mib']} MiB, its own (USS) {r['worker_uss_mib']} MiB ({r['worker']}), "
                f"wall {r['wall_s']} s, {r['pairs']} pairs",
                flush=True,
            )
    small, large = (results["sizes"][k] for k in (args.n, args.n * args.factor))
    results["driver_ratio"] = round(large["driver_mib"] / small["driver_mib"], 3)
    results["worker_ratio"] = round(large["worker_mib"] / small["worker_mib"], 3)
    results["worker_uss_ratio"] = round(large["worker_uss_mib"] / max(1, small["worker_uss_mib"]), 3)
    print(
        f"ratio {args.factor}N/N: driver {results['driver_ratio']:.2f}x (target <= 1.2), "
        f"largest worker {results['worker_ratio']:.2f}x (USS {results['worker_uss_ratio']:.2f}x)  "
        f"[{results['commit']}]"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
