"""Time per step and peak memory of the MPO trainer against TRL's DPOTrainer running the same MPO loss.

Contenders, each in a fresh process (so that each peak is its own), all on the same randomly
initialised Qwen2-VL, the same Parquet pairs, batch size, optimizer and schedule:
  trl          TRL's DPOTrainer, loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0],
               a frozen reference copy passed as ref_model (TRL refuses precomputed reference
               log-probs for vision data)
  ours         `mmpr_pipeline.train.train` with a live reference (a frozen copy)
  ours_pre     the same with `reference: precomputed` (one model in memory while training)
The vision encoder is frozen in all (the trainer's default). Time per step is the wall time of the
steps after `--warmup`, data loading included; peak memory is `torch.cuda.max_memory_allocated` on
a GPU and the peak resident set size on a CPU.

The precomputed reference costs a pass over every pair before the first step. By default the run is
one epoch (`--pairs` = steps x batch size), so that pass scores exactly the pairs trained on, and it
is reported both per step (`step_s_with_reference`: the median step plus the pass divided by the
run's steps) and in the whole run (`run_s`: from the trainer's construction, or `train()`'s call,
to its last step, the reference copy or pass and data preparation included, the same for all three).

Final losses are single-batch values and the contenders draw their batches in different orders
(TRL's sampler, our seeded permutation), so `final_loss` differs between them even when the losses
agree: `loss_first_step` is on the same weights but also on different pairs, and `loss_mean` over
the run is the closer comparison. tests/test_train_trl.py shows the two compute the same loss on the
same batch (each term to 1e-4), apart from the newline TRL scores after `<|im_end|>`.

    # CPU
    .venv/bin/python benchmarks/bench_train.py --threads 1 --out benchmarks/results/bench_train_cpu.json
    # a GPU
    python benchmarks/bench_train.py --size 2b --bf16 --image-side 448 --repeat 4

TRL (`trl==1.16.0`) is a benchmark-only dependency. Results are printed and written as JSON to
`--out` (default: $OUT/bench_train_{cpu,gpu}.json if OUT is set, else benchmarks/results/).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Qwen2-VL shapes. `2b` is Qwen2-VL-2B's (1.5B language model, 0.6B vision encoder, tied embeddings).
SIZES = {
    "tiny": dict(
        hidden=64,
        intermediate=128,
        layers=2,
        heads=2,
        kv=1,
        vision_depth=1,
        vision_embed=64,
        vision_heads=2,
        vocab=1024,
        tie=False,
    ),
    "small": dict(
        hidden=256,
        intermediate=768,
        layers=4,
        heads=4,
        kv=2,
        vision_depth=2,
        vision_embed=256,
        vision_heads=4,
        vocab=32768,
        tie=False,
    ),
    # `small` with Qwen2-VL's vocabulary and tied embeddings: the LM head's share of a real model, on a CPU
    "small-151k": dict(
        hidden=256,
        intermediate=768,
        layers=4,
        heads=4,
        kv=2,
        vision_depth=2,
        vision_embed=256,
        vision_heads=4,
        vocab=151936,
        tie=True,
    ),
    "2b": dict(
        hidden=1536,
        intermediate=8960,
        layers=28,
        heads=12,
        kv=2,
        vision_depth=32,
        vision_embed=1280,
        vision_heads=16,
        vocab=151936,
        tie=True,
    ),
}
CONTENDERS = ("trl", "ours", "ours_pre")
LABELS = {
    "trl": "TRL DPOTrainer (live ref)",
    "ours": "mmpr train (live ref)",
    "ours_pre": "mmpr train (precomputed ref)",
}


# --- the shared set-up: model, processor, pairs ----------------------------------------------------


def build_model(size: str, dtype, device, tokenizer, seed: int = 0):
    """A randomly initialised Qwen2VLForConditionalGeneration of the given shapes, built on `device`.
    The vocabulary is the real model's size (the LM head's cost), of which the demo tokenizer uses the
    first ids."""
    import torch
    from transformers import Qwen2VLForConditionalGeneration

    from mmpr_pipeline.demo_model import qwen2_vl_config, vision_token_ids

    s = SIZES[size]
    config = qwen2_vl_config(
        vocab=s["vocab"],
        hidden=s["hidden"],
        intermediate=s["intermediate"],
        layers=s["layers"],
        heads=s["heads"],
        kv_heads=s["kv"],
        vision_depth=s["vision_depth"],
        vision_embed=s["vision_embed"],
        vision_heads=s["vision_heads"],
        token_ids={"bos": 0, "eos": 2, "pad": 0},
        vision_tokens=vision_token_ids(tokenizer),
        rope_theta=1e6,
        max_positions=32768,
        tie=s["tie"],
        legacy_rope=True,  # a GPU machine's transformers may be 4.x, which reads only this spelling
    )
    torch.manual_seed(seed)
    with torch.device(device):
        model = Qwen2VLForConditionalGeneration._from_config(config, dtype=dtype, attn_implementation="sdpa")
    model.config.use_cache = False
    return model


def make_processor(image_side: int):
    """The demo model's tokenizer and chat template with a Qwen2-VL image processor that sizes every
    image to `image_side`^2 pixels. Without torchvision (no video processor), an image-only subclass."""
    from transformers import Qwen2VLProcessor
    from transformers.processing_utils import ProcessorMixin

    from mmpr_pipeline.demo_model import CHAT_TEMPLATE, build_tokenizer

    try:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
            Qwen2VLImageProcessorPil as ImageProc,
        )
    except ImportError:  # transformers 4.x
        from transformers import Qwen2VLImageProcessor as ImageProc
    tok = build_tokenizer(1024)
    image_processor = ImageProc(min_pixels=image_side**2, max_pixels=image_side**2)
    try:
        from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

        return Qwen2VLProcessor(
            image_processor=image_processor,
            tokenizer=tok,
            video_processor=Qwen2VLVideoProcessor(),
            chat_template=CHAT_TEMPLATE,
        )
    except Exception:

        class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
            def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
                self.image_token, self.video_token = "<|image_pad|>", "<|video_pad|>"
                self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
                self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
                ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

        return ImageOnlyQwen2VLProcessor(
            image_processor=image_processor, tokenizer=tok, chat_template=CHAT_TEMPLATE
        )


def write_pairs(folder: Path, n: int, repeat: int) -> Path:
    """`n` pairs in the pipeline's Parquet layout; responses are the reference chain of thought
    repeated `repeat` times (MMPR's chains of thought run to hundreds of tokens)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mmpr_pipeline import prompts, records, tasks

    rows = []
    for _i, q in enumerate(tasks.generate(n, seed=7)):
        body = " ".join([q["rationale"]] * repeat)
        chosen = f"{body}\nFinal answer: {q['answer']}"
        wrong = "No" if q["answer"] == "Yes" else "Yes" if q["answer"] == "No" else "A" + q["answer"]
        rejected = f"{body}\nFinal answer: {wrong}"
        question = prompts.render("cot_final_answer", q["question"])
        qid = records.question_id("bench", q["image"], question, q["answer"])
        rows.append(
            dict(
                id=records.pair_id(qid, "correctness", chosen, rejected),
                qid=qid,
                source="bench",
                task=q["task"],
                images=[{"bytes": q["image"], "path": None}],
                question=question,
                answer=q["answer"],
                chosen=chosen,
                rejected=rejected,
                pair_type="correctness",
                model="bench",
                prompt_template="cot_final_answer",
                sampling="{}",
                chosen_index=0,
                rejected_index=1,
                cut_ratio=None,
                prefix_words=None,
            )
        )
    (folder / "data").mkdir(parents=True, exist_ok=True)
    pq.write_table(
        pa.Table.from_pylist(rows, schema=records.PAIR_SCHEMA),
        folder / "data" / "train-00000-of-00001.parquet",
    )
    return folder


# --- measuring -------------------------------------------------------------------------------------


class PeakMemory:
    """Peak GPU memory allocated (CUDA) or peak resident set size (CPU, sampled every 5 ms), in GiB."""

    def __init__(self, device: str):
        import torch

        self.cuda = device == "cuda"
        self.peak_rss = self.baseline = 0
        self._stop = threading.Event()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        else:
            import psutil

            self._proc = psutil.Process()
            self.baseline = self._proc.memory_info().rss / 2**30  # libraries imported, nothing built yet
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_rss = max(self.peak_rss, self._proc.memory_info().rss)
            time.sleep(0.005)

    def gib(self) -> float:
        import torch

        if self.cuda:
            return torch.cuda.max_memory_allocated() / 2**30
        self._stop.set()
        self._thread.join()
        return max(self.peak_rss, self._proc.memory_info().rss) / 2**30


def run_contender(name: str, args) -> dict:
    """Train `args.warmup + args.steps` steps with one contender in this process; return its numbers."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    work = Path(args.workdir)
    if args.threads:
        torch.set_num_threads(args.threads)
    if name != "trl":
        import mmpr_pipeline.train  # noqa: F401  (import before measuring, like trl below)
    else:
        import trl  # noqa: F401
    memory = PeakMemory(device)
    processor = make_processor(args.image_side)
    model = build_model(args.size, dtype, device, processor.tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    total = args.warmup + args.steps
    lr = 1e-5
    if name in ("ours", "ours_pre"):
        from mmpr_pipeline.train import MPOConfig, train

        cfg = MPOConfig(
            model=f"random-qwen2-vl-{args.size}",
            data=str(work),
            output_dir=str(work / f"out-{name}"),
            batch_size=args.batch_size,
            max_steps=total,
            learning_rate=lr,
            warmup_ratio=0.0,
            weight_decay=0.05,
            eval_fraction=0.0,
            max_length=32768,
            bf16=args.bf16,
            dtype="bfloat16" if args.bf16 else "float32",
            reference="precomputed" if name == "ours_pre" else "live",
            gradient_checkpointing=args.gradient_checkpointing,
            resume=False,
            save_every=-1,
            save_model=False,
            progress_bar=False,
            seed=0,
        )
        t0 = time.perf_counter()
        summary = train(cfg, model=model, processor=processor)
        wall = time.perf_counter() - t0
        rows = [json.loads(r) for r in (work / f"out-{name}" / "metrics.jsonl").read_text().splitlines()]
        rows = [r for r in rows if r["split"] == "train"]
        elapsed = [0.0] + [r["elapsed_s"] for r in rows]
        steps = [b - a for a, b in zip(elapsed, elapsed[1:])][args.warmup :]
        tokens = sum(r["tokens"] for r in rows[args.warmup :])
        losses = [r["loss"] for r in rows]
        trace = {"lr": [r["lr"] for r in rows], "grad_norm": [r["grad_norm"] for r in rows]}
        reference_s = summary["reference_s"]
    else:
        steps, tokens, losses, wall, trace = run_trl(model, processor, args, total, lr, device)
        reference_s = 0.0
    step_s = statistics.median(steps)  # robust to other work on a shared machine
    return {
        "contender": name,
        "label": LABELS[name],
        "device": device,
        "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
        "size": args.size,
        "parameters": n_params,
        "dtype": str(dtype).replace("torch.", ""),
        "batch_size": args.batch_size,
        "steps_measured": len(steps),
        "step_s": step_s,
        "step_s_mean": sum(steps) / len(steps),
        "step_s_all": steps,
        "tokens_per_s": tokens / sum(steps) if tokens else None,
        "peak_memory_gib": memory.gib(),
        "baseline_memory_gib": memory.baseline,
        "final_loss": losses[-1] if losses else None,
        "loss_first_step": losses[0] if losses else None,
        "loss_mean": sum(losses) / len(losses) if losses else None,
        "losses": losses,
        "reference_s": reference_s,
        "step_s_with_reference": step_s + reference_s / total,
        "steps_total": total,
        "pairs": args.pairs,
        "run_s": wall,
        "wall_s": wall,
        **trace,
    }


def run_trl(model, processor, args, total: int, lr: float, device: str):
    import datasets
    import torch
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from mmpr_pipeline.train.model import freeze_vision

    t_run = time.perf_counter()  # the whole run: data, reference copy, the trainer's set-up and its steps
    ds = datasets.load_dataset(
        "parquet", data_files=str(Path(args.workdir) / "data" / "*.parquet"), split="train"
    )
    ds = ds.cast_column("images", datasets.List(datasets.Image()))
    ds = ds.map(
        lambda r: {
            "prompt": [{"role": "user", "content": r["question"]}],
            "chosen": [{"role": "assistant", "content": r["chosen"]}],
            "rejected": [{"role": "assistant", "content": r["rejected"]}],
        },
        remove_columns=[c for c in ds.column_names if c not in ("images",)],
    )
    freeze_vision(model)
    ref = (
        copy.deepcopy(model).eval().requires_grad_(False)
    )  # TRL would load it by name; ours is built from a config

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.ends, self.tokens = [], []

        def on_step_end(self, args, state, control, **kwargs):
            if device == "cuda":
                torch.cuda.synchronize()
            self.ends.append(time.perf_counter())
            self.tokens.append(state.num_input_tokens_seen)

    timer = StepTimer()
    config = DPOConfig(
        output_dir=str(Path(args.workdir) / "out-trl"),
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=1,
        max_steps=total,
        learning_rate=lr,
        lr_scheduler_type="cosine",
        warmup_steps=0,
        weight_decay=0.05,
        max_grad_norm=1.0,
        beta=0.1,
        loss_type=["sigmoid", "bco_pair", "sft"],
        loss_weights=[0.8, 0.2, 1.0],
        max_length=None,
        gradient_checkpointing=args.gradient_checkpointing,
        bf16=args.bf16,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
        include_num_input_tokens_seen="non_padding",
        optim="adamw_torch_fused" if device == "cuda" else "adamw_torch",
        use_cpu=device == "cpu",
    )
    trainer = DPOTrainer(
        model=model,
        ref_model=ref,
        args=config,
        train_dataset=ds,
        processing_class=processor,
        callbacks=[timer],
    )
    if args.trl_unscored_newline:  # score what ours scores: not the template's "\n" after <|im_end|>
        collate, tok = trainer.data_collator, processor.tokenizer
        end, newline = (
            tok.convert_tokens_to_ids("<|im_end|>"),
            tok("\n", add_special_tokens=False)["input_ids"],
        )

        def without_newline(examples):
            batch = collate(examples)
            mask = batch["completion_mask"]
            for i in range(mask.shape[0]):
                last = int(mask[i].nonzero().max())
                if [int(batch["input_ids"][i, last])] == newline and batch["input_ids"][i, last - 1] == end:
                    mask[i, last] = 0
            return batch

        trainer.data_collator = without_newline
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t_run
    ends = [t0] + timer.ends
    tokens = [0] + timer.tokens
    logged = [h for h in trainer.state.log_history if "loss" in h]
    trace = {
        "lr": [h.get("learning_rate") for h in logged],
        "grad_norm": [h.get("grad_norm") for h in logged],
    }
    return (
        [b - a for a, b in zip(ends, ends[1:])][args.warmup :],
        tokens[-1] - tokens[args.warmup],
        [h["loss"] for h in logged],
        wall,
        trace,
    )


# --- the command -----------------------------------------------------------------------------------


def report(results: list[dict]) -> str:
    by = {r["contender"]: r for r in results if "step_s" in r}
    base = by.get("trl")
    lines = [
        f"{'contender':32} {'s/step':>8} {'+ref pass':>9} {'run s':>7} {'tokens/s':>9} {'peak GiB':>9} "
        f"{'(libs)':>7} {'time vs TRL':>12} {'run vs TRL':>11} {'memory vs TRL':>14} {'mean loss':>10}"
    ]
    for r in results:
        if "error" in r:
            lines.append(f"{LABELS[r['contender']]:32} failed: {r['error'][-300:]}")
            continue
        vs_t = f"{r['step_s_with_reference'] / base['step_s']:.2f}x" if base else "-"
        vs_r = f"{r['run_s'] / base['run_s']:.2f}x" if base else "-"
        vs_m = f"{r['peak_memory_gib'] / base['peak_memory_gib']:.2f}x" if base else "-"
        tps = f"{r['tokens_per_s']:.0f}" if r.get("tokens_per_s") else "-"
        lines.append(
            f"{r['label']:32} {r['step_s']:8.3f} {r['step_s_with_reference']:9.3f} {r['run_s']:7.1f} "
            f"{tps:>9} {r['peak_memory_gib']:9.2f} {r['baseline_memory_gib']:7.2f} {vs_t:>12} {vs_r:>11} "
            f"{vs_m:>14} {r['loss_mean']:10.4f}"
        )
    lines.append(
        "s/step: median over the measured steps; +ref pass: that plus the precomputed reference's pass "
        "divided by the run's steps (time vs TRL uses it); run s: the whole run, set-up included; peak "
        "GiB: GPU memory allocated, or the process's resident set on a CPU, of which (libs) was resident "
        "before the model was built; mean loss: over the run's steps (batches differ between trainers)"
    )
    return "\n".join(lines)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", choices=list(SIZES), default="small")
    ap.add_argument(
        "--pairs", type=int, default=None, help="default: one epoch, (warmup + steps) x batch size"
    )
    ap.add_argument("--batch-size", type=int, default=4, help="pairs per step")
    ap.add_argument("--steps", type=int, default=6, help="measured steps")
    ap.add_argument("--warmup", type=int, default=2, help="steps run before measuring")
    ap.add_argument("--repeat", type=int, default=2, help="response length: the chain of thought repeated")
    ap.add_argument(
        "--image-side", type=int, default=224, help="every image is resized to this many pixels squared"
    )
    ap.add_argument("--bf16", action="store_true", help="bf16 weights and autocast (a GPU)")
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--contenders", default=",".join(CONTENDERS))
    ap.add_argument(
        "--trl-unscored-newline",
        action="store_true",
        help="TRL leaves the template's newline after <|im_end|> unscored, as ours does",
    )
    ap.add_argument("--workdir", default=str(ROOT / "build" / "bench" / "train"))
    ap.add_argument("--out", default=None)
    ap.add_argument("--timeout", type=int, default=1200, help="seconds per contender")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own)")
    ap.add_argument("--contender", help=argparse.SUPPRESS)  # internal: run one contender in this process
    return ap.parse_args(argv)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.pairs is None:
        args.pairs = (args.warmup + args.steps) * args.batch_size
    if args.contender:
        import logging

        logging.basicConfig(level=logging.WARNING)
        print("RESULT " + json.dumps(run_contender(args.contender, args)), flush=True)
        return []
    work = Path(args.workdir)
    write_pairs(work, args.pairs, args.repeat)
    results = []
    for name in args.contenders.split(","):
        cmd = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]), "--contender", name]
        print(f"[bench] {LABELS[name]} ...", flush=True)
        try:
            env = {**os.environ, **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {})}
            proc = subprocess.run(
                cmd, capture_output=True, text=True, timeout=args.timeout, cwd=ROOT, env=env
            )
            line = next((text for text in proc.stdout.splitlines() if text.startswith("RESULT ")), None)
            results.append(
                json.loads(line[7:])
                if line
                else {"contender": name, "error": (proc.stderr or proc.stdout)[-2000:]}
            )
        except subprocess.TimeoutExpired:
            results.append({"contender": name, "error": f"timed out after {args.timeout} s"})
    print(report(results))
    import torch

    default = f"bench_train_{'gpu' if torch.cuda.is_available() else 'cpu'}.json"
    out = (
        Path(args.out)
        if args.out
        else (
            Path(os.environ["OUT"]) / default
            if os.environ.get("OUT")
            else ROOT / "benchmarks" / "results" / default
        )
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {"args": {k: v for k, v in vars(args).items() if k != "contender"}, "results": results}, indent=2
        )
    )
    print(f"[bench] wrote {out}")
    return results


if __name__ == "__main__":
    main()
