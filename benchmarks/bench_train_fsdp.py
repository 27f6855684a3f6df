"""Peak memory per process of `strategy: ddp` vs `strategy: fsdp` on 2 processes, against the memory
plan (`mmpr train --plan`), on a randomly initialised Qwen2-VL whose parameters dominate memory.

The model is saved once to a folder, which the trainer loads as it loads any model (so the loading
and sharding are measured as a user's run does them). Each strategy is one `torchrun
--nproc_per_node 2` launch (gloo on CPU, NCCL on GPUs); every process trains a few steps (float32,
live frozen reference, vision frozen, one pair per step, max_length the longest pair's length) and
reports its VmHWM (the kernel's peak resident set) and its resident set before the model was loaded
(libraries imported). "measured" is the difference: the training state and activations, what the
plan counts.

    .venv/bin/python benchmarks/bench_train_fsdp.py   # -> benchmarks/results/bench_train_fsdp.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import bench_train  # noqa: E402  (the shared model, processor and pairs of the trainer benchmarks)

# ~100M parameters, most in the language model, a small vocabulary: weights, gradients and AdamW
# states dominate over activations and the libraries.
bench_train.SIZES["fsdp-100m"] = dict(
    hidden=1024,
    intermediate=2816,
    layers=8,
    heads=8,
    kv=8,
    vision_depth=1,
    vision_embed=256,
    vision_heads=4,
    vocab=4096,
    tie=False,
)
SIZE = "fsdp-100m"


def kib(key: str) -> int:
    from mmpr_pipeline.peak_memory import status_kib

    return status_kib()[key]


def config(strategy: str, work: Path, steps: int, max_length: int):
    from mmpr_pipeline.train import MPOConfig

    return MPOConfig(
        model=str(work / "model"),
        data=str(work),
        output_dir=str(work / f"out-{strategy}"),
        strategy=strategy,
        batch_size=1,
        max_steps=steps,
        learning_rate=1e-5,
        warmup_ratio=0.0,
        eval_fraction=0.0,
        max_length=max_length,
        bf16=False,
        dtype="float32",
        resume=False,
        save_every=-1,
        save_model=False,
        progress_bar=False,
        seed=0,
    )


def worker(strategy: str, work: Path, steps: int, max_length: int) -> None:
    import torch

    import mmpr_pipeline.train  # noqa: F401  (imported before the baseline)
    from mmpr_pipeline.train import train
    from mmpr_pipeline.train.plan import counts_from_config, plan

    torch.set_num_threads(1)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    processor = bench_train.make_processor(56)
    cfg = config(strategy, work, steps, max_length)
    counts = counts_from_config(cfg)  # on the meta device, as `mmpr train --plan` does
    baseline = kib("VmRSS")
    train(cfg, processor=processor)
    row = {
        "strategy": strategy,
        "rank": rank,
        "world": world,
        "parameters": counts.total,
        "baseline_mib": baseline / 1024,
        "peak_mib": kib("VmHWM") / 1024,
        "measured_mib": (kib("VmHWM") - baseline) / 1024,
        "plan_mib": {k: v / 2**20 for k, v in plan(counts, cfg, world, strategy).items()},
    }
    (work / f"{strategy}-{rank}.json").write_text(json.dumps(row))


def longest_pair(work: Path) -> int:
    """Tokens of the longest pair (prompt and the longer response), the run's max_length."""
    import pyarrow.parquet as pq

    from mmpr_pipeline.train.data import PairEncoder

    encoder = PairEncoder(bench_train.make_processor(56), 10**6)
    rows = pq.read_table(next((work / "data").glob("*.parquet"))).to_pylist()
    encoded = [encoder.encode(row, i) for i, row in enumerate(rows)]
    return max(e.prompt["input_ids"].shape[1] + max(len(e.chosen_ids), len(e.rejected_ids)) for e in encoded)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", choices=("ddp", "fsdp"), help=argparse.SUPPRESS)
    ap.add_argument("--workdir", default=str(ROOT / "runs" / "bench_train_fsdp"))
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--max-length", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "bench_train_fsdp.json"))
    args = ap.parse_args(argv)
    work = Path(args.workdir)
    if args.worker:
        worker(args.worker, work, args.steps, args.max_length)
        return {}
    import torch

    work.mkdir(parents=True, exist_ok=True)
    bench_train.write_pairs(work, 8, 1)
    processor = bench_train.make_processor(56)
    bench_train.build_model(SIZE, torch.float32, "cpu", processor.tokenizer).save_pretrained(work / "model")
    max_length = longest_pair(work)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    rows = []
    for strategy in ("ddp", "fsdp"):
        launch = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={args.nproc}",
        ]
        subprocess.run(
            launch
            + [__file__, "--worker", strategy, "--workdir", str(work), "--steps", str(args.steps)]
            + ["--max-length", str(max_length)],
            check=True,
            env=env,
            cwd=ROOT,
        )
        rows += [json.loads((work / f"{strategy}-{r}.json").read_text()) for r in range(args.nproc)]
    peak = {s: max(r["measured_mib"] for r in rows if r["strategy"] == s) for s in ("ddp", "fsdp")}
    result = {
        "size": SIZE,
        "nproc": args.nproc,
        "steps": args.steps,
        "max_length": max_length,
        "processes": rows,
        "fsdp_over_ddp": peak["fsdp"] / peak["ddp"],
        "plan_over_measured": {
            s: max(r["plan_mib"]["total"] for r in rows if r["strategy"] == s) / peak[s] for s in peak
        },
    }
    for r in rows:
        print(
            f"{r['strategy']:5} rank {r['rank']}: peak {r['peak_mib']:.0f} MiB "
            f"(baseline {r['baseline_mib']:.0f}), measured {r['measured_mib']:.0f} MiB, "
            f"plan {r['plan_mib']['total']:.0f} MiB ({r['plan_mib']['total'] / r['measured_mib']:.2f})"
        )
    for s in peak:
        terms = next(r["plan_mib"] for r in rows if r["strategy"] == s)
        print(f"plan {s}: " + ", ".join(f"{k} {v:.0f}" for k, v in terms.items() if k != "host") + " MiB")
    print(
        f"fsdp / ddp peak per process: {result['fsdp_over_ddp']:.2f}; plan / measured: "
        + ", ".join(f"{s} {v:.2f}" for s, v in result["plan_over_measured"].items())
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
