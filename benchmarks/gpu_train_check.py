"""One short GPU check of the MPO trainer (about 3 minutes on one H100): correctness on the GPU path,
then the benchmark against TRL on a randomly initialised Qwen2-VL of 2B shapes in bf16.

Needs torch, transformers, peft, accelerate, pandas, pyarrow and pillow; TRL and `datasets` (for
the TRL baseline only) are installed from wheels in `.whl/` when missing (no network needed):

    python benchmarks/gpu_train_check.py          # results: $OUT/gpu_train_check.json (or build/bench/)
    python benchmarks/gpu_train_check.py --size tiny   # a dry run of the script itself, e.g. on a CPU

1. correctness (a tiny model, bf16 autocast): live vs precomputed reference give the same losses;
   LoRA starts from zero rewards and moves them; SFT only (weights 0, 0, 1) trains.
2. fsdp_one_gpu: `strategy: fsdp` on one GPU (world size 1): its losses against the unsharded
   trainer's, LoRA under FSDP, and the memory plan against the measured peak (`small` shapes).
3. benchmark: `bench_train.py --size 2b --bf16` (TRL, ours with a live reference, ours with a
   precomputed one): median time per step (with the precomputed reference's pass spread over the
   steps), the whole run, tokens/s, peak GPU memory and every step's loss, each in its own process.
Every part that fails is recorded with its error; the JSON is written after each part.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
DEADLINE_S = 230  # stop starting new parts after this many seconds
START = time.perf_counter()
OUT = Path(os.environ["OUT"]) if os.environ.get("OUT") else ROOT / "build" / "bench"
RESULT: dict = {"parts": {}}
SIZE = sys.argv[sys.argv.index("--size") + 1] if "--size" in sys.argv else "2b"


def save() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    RESULT["elapsed_s"] = round(time.perf_counter() - START, 1)
    (OUT / "gpu_train_check.json").write_text(json.dumps(RESULT, indent=2, default=str))


def part(name: str, fn) -> None:
    if time.perf_counter() - START > DEADLINE_S:
        RESULT["parts"][name] = {"skipped": "out of time"}
        save()
        return
    t0 = time.perf_counter()
    try:
        RESULT["parts"][name] = {"ok": True, **(fn() or {})}
    except Exception as e:  # record and go on: one failure must not hide the other results
        RESULT["parts"][name] = {
            "ok": False,
            "error": f"{type(e).__name__}: {e}",
            "trace": traceback.format_exc()[-3000:],
        }
    RESULT["parts"][name]["seconds"] = round(time.perf_counter() - t0, 1)
    print(f"[gpu-check] {name}: {json.dumps(RESULT['parts'][name], default=str)[:600]}", flush=True)
    save()


def environment() -> dict:
    import torch

    env = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "bf16": torch.cuda.is_available() and torch.cuda.is_bf16_supported(),
    }
    for mod in ("transformers", "peft", "accelerate", "pyarrow", "trl", "datasets"):
        try:
            env[mod] = importlib.import_module(mod).__version__
        except Exception as e:
            env[mod] = f"missing ({type(e).__name__})"
    return env


def install_wheels() -> dict:
    """TRL and datasets from the carried wheels, without deps (the machine has the rest)."""
    missing = []
    for mod, wheel in (
        ("dill", "dill"),
        ("multiprocess", "multiprocess"),
        ("xxhash", "xxhash"),
        ("datasets", "datasets"),
        ("trl", "trl"),
    ):
        try:
            importlib.import_module(mod)
        except Exception:
            missing.append(wheel)
    if not missing:
        return {"installed": []}
    wheels = ROOT / ".whl"
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "-q",
        "--no-deps",
        "--no-index",
        "--find-links",
        str(wheels),
        *missing,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    importlib.invalidate_caches()
    return {
        "installed": missing,
        "pip_rc": proc.returncode,
        "pip_output": (proc.stdout + proc.stderr)[-1500:],
    }


def correctness() -> dict:
    import shutil

    import bench_train
    import torch

    from mmpr_pipeline.train import MPOConfig, train

    work = OUT / "gpu-correctness"
    shutil.rmtree(work, ignore_errors=True)
    bench_train.write_pairs(work, 24, repeat=1)
    processor = bench_train.make_processor(112)
    tok = processor.tokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"

    def run(name, **kw):
        model = bench_train.build_model("tiny", torch.float32, device, tok, seed=0)
        cfg = MPOConfig(
            model="random-qwen2-vl-tiny",
            data=str(work),
            output_dir=str(work / name),
            batch_size=4,
            max_steps=4,
            learning_rate=1e-3,
            warmup_ratio=0.0,
            eval_fraction=0.2,
            max_length=2048,
            bf16=True,
            progress_bar=False,
            resume=False,
            save_every=-1,
            save_model=False,
            **kw,
        )
        summary = train(cfg, model=model, processor=processor)
        rows = [json.loads(r) for r in (work / name / "metrics.jsonl").read_text().splitlines()]
        return summary, [r for r in rows if r["split"] == "train"]

    live, live_rows = run("live")
    pre, pre_rows = run("precomputed", reference="precomputed")
    diffs = [abs(a["loss"] - b["loss"]) for a, b in zip(live_rows, pre_rows)]
    lora, lora_rows = run("lora", lora=True, lora_r=4)
    sft, sft_rows = run("sft", weights=[0.0, 0.0, 1.0])
    checks = {
        "live_vs_precomputed_max_loss_diff": max(diffs),
        "live_vs_precomputed_close": max(diffs) < 2e-2,
        "loss_falls": live_rows[-1]["loss"] < live_rows[0]["loss"],
        # LoRA's B starts at zero, so the policy equals its adapter-disabled reference at step 1; on a
        # GPU the grad and no-grad forwards may pick different bf16 kernels, hence a tolerance.
        "lora_step1_rewards_zero": max(
            abs(lora_rows[0]["chosen_reward"]), abs(lora_rows[0]["rejected_reward"])
        )
        < 5e-3,
        "lora_rewards_move": lora_rows[-1]["reward_margin"] != 0.0,
        "sft_only_falls": sft_rows[-1]["sft"] < sft_rows[0]["sft"],
        "all_finite": all(math.isfinite(r["loss"]) for r in live_rows + pre_rows + lora_rows + sft_rows),
    }
    checks["passed"] = all(v for k, v in checks.items() if isinstance(v, bool))
    return {
        **checks,
        "live_losses": [r["loss"] for r in live_rows],
        "precomputed_losses": [r["loss"] for r in pre_rows],
        "live_eval": live["last_eval"],
        "lora_step1_rewards": [lora_rows[0]["chosen_reward"], lora_rows[0]["rejected_reward"]],
        "tokens_per_s_tiny": live_rows[-1]["tokens_per_s"],
    }


def fsdp_one_gpu() -> dict:
    """strategy: fsdp at world size 1 (a process group of one): the sharded code path, FSDP's mixed
    precision (bf16 compute, float32 sharded weights and gradient reduction), a consolidated final
    model, and the memory plan against torch.cuda.max_memory_allocated, on the `small` shapes."""
    import shutil

    import bench_train
    import torch

    from mmpr_pipeline.train import MPOConfig, train
    from mmpr_pipeline.train.plan import count_parameters, plan

    work = OUT / "gpu-fsdp"
    shutil.rmtree(work, ignore_errors=True)
    bench_train.write_pairs(work, 24, repeat=1)
    processor = bench_train.make_processor(112)
    device = "cuda" if torch.cuda.is_available() else "cpu"

    def run(name, size="tiny", **kw):
        model = bench_train.build_model(size, torch.float32, device, processor.tokenizer, seed=0)
        cfg = MPOConfig(
            model=f"random-qwen2-vl-{size}",
            data=str(work),
            output_dir=str(work / name),
            batch_size=4,
            max_steps=4,
            learning_rate=1e-3,
            warmup_ratio=0.0,
            eval_fraction=0.2,
            max_length=2048,
            bf16=True,
            progress_bar=False,
            resume=False,
            save_every=-1,
            save_model=False,
            **kw,
        )
        counts = count_parameters(model, cfg)
        if device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        summary = train(cfg, model=model, processor=processor)
        peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
        rows = [json.loads(r) for r in (work / name / "metrics.jsonl").read_text().splitlines()]
        return summary, [r for r in rows if r["split"] == "train"], plan(counts, cfg, 1, cfg.strategy), peak

    _, ddp_rows, _, _ = run("ddp")
    _, fsdp_rows, _, _ = run("fsdp", strategy="fsdp")
    _, lora_rows, _, _ = run("fsdp-lora", strategy="fsdp", lora=True, lora_r=4)
    _, _, ddp_plan, ddp_peak = run("ddp-small", size="small", batch_size=1)
    _, _, fsdp_plan, fsdp_peak = run("fsdp-small", size="small", batch_size=1, strategy="fsdp")
    diffs = [abs(a["loss"] - b["loss"]) for a, b in zip(ddp_rows, fsdp_rows)]
    checks = {
        "fsdp_vs_ddp_max_loss_diff": max(diffs),
        "fsdp_vs_ddp_close": max(diffs) < 2e-2,  # bf16 compute: FSDP casts weights, autocast casts ops
        "fsdp_loss_falls": fsdp_rows[-1]["loss"] < fsdp_rows[0]["loss"],
        "fsdp_lora_rewards_move": lora_rows[-1]["reward_margin"] != 0.0,
        "all_finite": all(math.isfinite(r["loss"]) for r in ddp_rows + fsdp_rows + lora_rows),
    }
    checks["passed"] = all(v for k, v in checks.items() if isinstance(v, bool))
    return {
        **checks,
        "ddp_losses": [r["loss"] for r in ddp_rows],
        "fsdp_losses": [r["loss"] for r in fsdp_rows],
        "small_peak_gib": {"ddp": ddp_peak and ddp_peak / 2**30, "fsdp": fsdp_peak and fsdp_peak / 2**30},
        "small_plan_gib": {"ddp": ddp_plan["total"] / 2**30, "fsdp": fsdp_plan["total"] / 2**30},
    }


def benchmark() -> dict:
    import bench_train

    left = int(DEADLINE_S + 60 - (time.perf_counter() - START))
    # one epoch (32 pairs): the precomputed reference's pass scores exactly the pairs trained on
    argv = [
        "--size",
        SIZE,
        "--bf16",
        "--batch-size",
        "4",
        "--steps",
        "6",
        "--warmup",
        "2",
        "--repeat",
        "4",
        "--image-side",
        "448",
        "--timeout",
        str(max(60, left // 3)),
        "--workdir",
        str(OUT / "gpu-bench"),
        "--out",
        str(OUT / "bench_train_gpu.json"),
    ]
    results = bench_train.main(argv)
    by = {r["contender"]: r for r in results if "step_s" in r}
    summary = {"command": "python benchmarks/bench_train.py " + " ".join(argv[:-4]), "results": results}
    if "trl" in by:
        for name in ("ours", "ours_pre"):
            if name in by:
                summary[f"{name}_time_vs_trl"] = by[name]["step_s_with_reference"] / by["trl"]["step_s"]
                summary[f"{name}_run_vs_trl"] = by[name]["run_s"] / by["trl"]["run_s"]
                summary[f"{name}_memory_vs_trl"] = by[name]["peak_memory_gib"] / by["trl"]["peak_memory_gib"]
                # same weights at step 1 and the same batch order (both seed 0): where a loss gap starts
                summary[f"{name}_first_step_loss_minus_trl"] = (
                    by[name]["loss_first_step"] - by["trl"]["loss_first_step"]
                )
    return summary


if __name__ == "__main__":
    part("environment", environment)
    part("wheels", install_wheels)
    RESULT["parts"]["environment_after_wheels"] = environment()
    part("correctness", correctness)
    part("fsdp_one_gpu", fsdp_one_gpu)
    part("benchmark", benchmark)
    print(f"[gpu-check] wrote {OUT / 'gpu_train_check.json'} in {time.perf_counter() - START:.0f} s")
