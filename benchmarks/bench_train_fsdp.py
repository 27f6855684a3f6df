"""Peak memory per process of `strategy: ddp` vs `strategy: fsdp` on 2 processes, against the memory
plan (`mmpr train --plan`), on a randomly initialised Qwen2-VL whose parameters dominate memory.

Each strategy is one `torchrun --nproc_per_node 2` launch (gloo on CPU, NCCL on GPUs); every process
builds the same model (same seed), trains a few steps (float32, live frozen reference, vision frozen,
a short pair per step) and reports its VmHWM (the kernel's peak resident set) and its resident set
before the model was built (libraries imported). "measured" is the difference: the training state
and activations, which is what the plan counts (minus activations).

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


def worker(strategy: str, work: Path, steps: int) -> None:
    import torch

    import mmpr_pipeline.train  # noqa: F401  (imported before the baseline)
    from mmpr_pipeline.train import MPOConfig, train
    from mmpr_pipeline.train.plan import count_parameters, plan

    torch.set_num_threads(1)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    processor = bench_train.make_processor(56)
    baseline = kib("VmRSS")
    model = bench_train.build_model(SIZE, torch.float32, "cpu", processor.tokenizer)
    cfg = MPOConfig(
        model=f"random-qwen2-vl-{SIZE}",
        data=str(work),
        output_dir=str(work / f"out-{strategy}"),
        strategy=strategy,
        batch_size=1,
        max_steps=steps,
        learning_rate=1e-5,
        warmup_ratio=0.0,
        eval_fraction=0.0,
        max_length=4096,
        bf16=False,
        dtype="float32",
        resume=False,
        save_every=-1,
        save_model=False,
        progress_bar=False,
        seed=0,
    )
    counts = count_parameters(model, cfg)
    train(cfg, model=model, processor=processor)
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


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", choices=("ddp", "fsdp"), help=argparse.SUPPRESS)
    ap.add_argument("--workdir", default=str(ROOT / "runs" / "bench_train_fsdp"))
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "bench_train_fsdp.json"))
    args = ap.parse_args(argv)
    work = Path(args.workdir)
    if args.worker:
        worker(args.worker, work, args.steps)
        return {}
    work.mkdir(parents=True, exist_ok=True)
    bench_train.write_pairs(work, 8, 1)
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
            launch + [__file__, "--worker", strategy, "--workdir", str(work), "--steps", str(args.steps)],
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
            f"plan {r['plan_mib']['total']:.0f} MiB"
        )
    print(
        f"fsdp / ddp peak per process: {result['fsdp_over_ddp']:.2f}; plan / measured: "
        + ", ".join(f"{s} {v:.2f}" for s, v in result["plan_over_measured"].items())
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
