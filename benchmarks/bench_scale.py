"""Memory at scale: does the build's driver stay flat as the number of questions grows?

    python benchmarks/bench_scale.py [--sizes 300,3000] [--max-tokens 48] [--repo DIR] [--out results.json]

Writes a Parquet source of each size, each question with its own photo-sized JPEG (random smooth
colour fields plus grain, ~87 KB) and a reference solution, and runs `mmpr build` on it (a real
process: local Ray + vLLM on the demo model, n = 4 samples of at most `--max-tokens` tokens,
`unit_size` 128, `shard_rows` 5000: the data path is what is measured, not the engine). The question
is the demo model's own counting question, so with enough tokens (the default 48; its answers take
26-40) its samples end in a final answer; the reference is a chosen candidate, so a question with a
wrong sample makes one pair (with its image). Samples the rules cannot judge make no pair.

Every peak is the kernel's high-water mark, `VmHWM` of /proc/PID/status. The driver's comes from
the build itself: with MMPR_PEAK_MEMORY_LOG set, each phase (plan, stream, rejects, counts, shards,
stats, preview, card, summary; mmpr_pipeline/peak_memory.py) logs its own peak, and the process logs
its VmHWM at exit (the whole run's, for code without the phase hook). Every other process of the
build (Ray's daemons, its workers, the engine) is read every 0.5 s; a high-water mark only rises, so
a read misses at most a process's last half second. Printed: per size, the driver's peak and the
phase that sets it, each phase's peak, the largest other process; then the ratios of each size to
the one before. `--repo` runs another checkout's code (e.g. the commit before a change) with this
environment, for a before/after in one command.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PEAK_LOG_ENV = "MMPR_PEAK_MEMORY_LOG"  # mmpr_pipeline/peak_memory.py reads it


def photo_jpeg(i: int, side: int = 400) -> bytes:
    """A distinct photo-like JPEG of ~87 KB: smooth random colour fields plus grain."""
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
            k = i % 7 + 1
            # the demo model's own counting question: its samples then end in a final answer that the
            # rules judge (a question it was not trained on gets rambling, undecided samples: no pairs)
            rows.append(
                dict(
                    image=image,
                    question="How many circles are there?",
                    answer=str(k),
                    solution=f"I look at the image and count the circles: "
                    f"{', '.join(map(str, range(1, k + 1)))}. In total there are {k}.\nFinal answer: {k}",
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
sampling: {{n: 4, max_tokens: {max_tokens}}}
unit_size: 128
batch_size: 64
shard_rows: 5000
sources:
  - name: photos
    loader: parquet
    path: {path}
    answer_type: number
    # The reference solution is a chosen candidate: with samples cut at a few tokens (no final answer)
    # every question still makes a pair with its image, as a real run does; one pair per question.
    fields: {{rationale: solution}}
    pairing: {{max_pairs_per_question: 1}}
"""

# `mmpr build` with its VmHWM logged at exit: the whole run's peak for code without the phase hook,
# the peak since the last phase (Ray's shutdown) for code with it
DRIVER = """
import atexit, json, os, runpy, sys

def exit_peak():
    vm = dict(l.split(":", 1) for l in open("/proc/self/status").read().splitlines() if l.startswith("Vm"))
    with open(os.environ["{env}"], "a") as f:
        mib = lambda k: round(int(vm[k].split()[0]) / 1024, 1)
        f.write(json.dumps(dict(phase="exit", peak_mib=mib("VmHWM"), rss_mib=mib("VmRSS"))) + "\\n")

atexit.register(exit_peak)
sys.argv = ["mmpr", *sys.argv[1:]]
runpy.run_module("mmpr_pipeline.cli", run_name="__main__", alter_sys=True)
""".replace("{env}", PEAK_LOG_ENV)


def vm_hwm_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def follow_tree(pid: int, stop: threading.Event, peaks: dict[int, tuple[str, int]]) -> None:
    """VmHWM of every process under `pid` (not `pid` itself: it logs its own), read every 0.5 s."""
    import psutil

    root = psutil.Process(pid)
    while not stop.is_set():
        try:
            procs = root.children(recursive=True)
        except psutil.NoSuchProcess:
            return
        for p in procs:
            hwm = vm_hwm_kib(p.pid)
            try:
                name = " ".join(p.cmdline()[:3])[:80] or p.name()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            if hwm is not None:  # the latest name: vLLM's engine process renames itself
                peaks[p.pid] = (name, max(hwm, peaks.get(p.pid, ("", 0))[1]))
        stop.wait(0.5)


def read_phases(log: Path) -> tuple[dict[str, float], dict[str, float], float, str]:
    """From the build's peak log: ({phase: its peak MiB}, {phase: its rise over the RSS it started
    from}, the driver's peak, the phase that set it). Each phase's peak counts the RSS it started from
    (the kernel's mark is reset to the RSS then), so the peak is set where it was first reached (within
    2%), not by a later phase that kept the RSS."""
    phases: dict[str, float] = {}
    rises: dict[str, float] = {}
    start = 0.0
    for line in log.read_text().splitlines() if log.exists() else []:
        d = json.loads(line)
        phases[d["phase"]] = max(d["peak_mib"], phases.get(d["phase"], 0.0))
        rises[d["phase"]] = round(d["peak_mib"] - start, 1) if start else d["peak_mib"]
        start = d["rss_mib"]
    if not phases:
        raise SystemExit(f"{log}: the build logged no peak")
    peak = max(phases.values())
    return phases, rises, peak, next(k for k, v in phases.items() if v >= 0.98 * peak)


RAY_START_TIMEOUT = "timed out during startup"  # Ray waits 30 s for its node: too short on a loaded machine


def run_build(repo: Path, recipe: Path, out: Path, tries: int = 3) -> dict:
    for _ in range(tries - 1):
        try:
            return run_build_once(repo, recipe, out)
        except BuildError as e:
            if RAY_START_TIMEOUT not in str(e):
                raise
            print("Ray's node did not start in time (a loaded machine): trying again", flush=True)
            shutil.rmtree(out, ignore_errors=True)
    return run_build_once(repo, recipe, out)


class BuildError(SystemExit):
    pass


def run_build_once(repo: Path, recipe: Path, out: Path) -> dict:
    log = out.with_suffix(".peaks.jsonl")
    log.unlink(missing_ok=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", VLLM_CPU_KVCACHE_SPACE="1", **{PEAK_LOG_ENV: str(log)})
    env.pop("RAY_ADDRESS", None)
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-c", DRIVER, "build", str(recipe), "--out", str(out)],
        cwd=repo,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    peaks: dict[int, tuple[str, int]] = {}
    stop = threading.Event()
    follower = threading.Thread(target=follow_tree, args=(proc.pid, stop, peaks), daemon=True)
    follower.start()
    output, _ = proc.communicate()
    stop.set()
    follower.join()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise BuildError(f"build failed (rc {proc.returncode}):\n{output[-3000:]}")
    phases, rises, driver, phase = read_phases(log)
    # The engine (VLLM::EngineCore, its worker) holds the model and KV cache: not data, reported apart.
    engine = {pid: v for pid, v in peaks.items() if "VLLM" in v[0] or "EngineCore" in v[0]}
    others = {pid: v for pid, v in peaks.items() if pid not in engine}
    top_name, top = max(others.values(), key=lambda v: v[1])
    stats = json.loads((out / "stats.json").read_text())
    return dict(
        wall_s=round(wall, 1),
        driver_mib=driver,
        driver_phase=phase,
        driver_phases=phases,
        driver_rises=rises,
        process_mib=round(top / 1024),
        process=top_name,
        engine_mib=round(max((v[1] for v in engine.values()), default=0) / 1024),
        pairs=sum(stats["totals"]["pairs"].values()),
        questions=stats["totals"]["questions"],
        shards=len(stats["shards"]),
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="300,3000", help="question counts, comma-separated (default 300,3000)")
    ap.add_argument(
        "--max-tokens", type=int, default=48, help="per sample (enough for the demo model's final answer)"
    )
    ap.add_argument("--model", default=None, help="default: the trained demo model")
    ap.add_argument(
        "--repo", type=Path, default=REPO, help="the checkout whose code runs (default: this one)"
    )
    ap.add_argument("--tmp", type=Path, default=None, help="folder for the sources and run folders")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "bench_scale.json")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    if args.model is None:
        from mmpr_pipeline import demo_model

        args.model = str(demo_model.ensure_trained())
    results = dict(
        repo=str(args.repo),
        commit=subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=args.repo, capture_output=True, text=True
        ).stdout.strip(),
        max_tokens=args.max_tokens,
        sizes={},
        ratios={},
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        for n in sizes:
            src = Path(tmp) / f"photos-{n}.parquet"
            kb = write_source(src, n)
            recipe = Path(tmp) / f"scale-{n}.yaml"
            recipe.write_text(RECIPE.format(model=args.model, path=src, max_tokens=args.max_tokens))
            r = run_build(args.repo, recipe, Path(tmp) / f"run-{n}")
            r["image_kb"] = round(kb, 1)
            results["sizes"][n] = r
            phases = ", ".join(
                f"{k} {v:.0f} (+{r['driver_rises'][k]:.0f})" for k, v in r["driver_phases"].items()
            )
            print(
                f"{n:>6} questions ({kb:.0f} KB images): driver peak {r['driver_mib']:.0f} MiB (VmHWM, "
                f"set in {r['driver_phase']}; per phase, peak (rise): {phases}), largest other process "
                f"{r['process_mib']} MiB ({r['process']}), engine {r['engine_mib']} MiB, "
                f"wall {r['wall_s']} s, {r['pairs']} pairs in {r['shards']} shard(s)",
                flush=True,
            )
            args.out.write_text(json.dumps(results, indent=2) + "\n")  # kept if a larger size fails
            shutil.rmtree(Path(tmp) / f"run-{n}", ignore_errors=True)
            src.unlink()
    for small, large in zip(sizes, sizes[1:]):
        a, b = results["sizes"][small], results["sizes"][large]
        ratio = dict(
            driver=round(b["driver_mib"] / a["driver_mib"], 3),
            process=round(b["process_mib"] / a["process_mib"], 3),
            phases={
                k: round(v / a["driver_phases"][k], 3)
                for k, v in b["driver_phases"].items()
                if a["driver_phases"].get(k)
            },
        )
        results["ratios"][f"{large}/{small}"] = ratio
        print(
            f"ratio {large}/{small}: driver {ratio['driver']:.2f}x (target <= 1.2), largest other process "
            f"{ratio['process']:.2f}x  [{results['commit']}]"
        )
    args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
