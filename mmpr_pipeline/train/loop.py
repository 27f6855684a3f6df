"""The MPO training loop: one function, `train(config)`, to read top to bottom (at the end of this
file), as nanoGPT's train.py reads: set up once, take the steps (each followed by its metrics row,
and the evaluation and checkpoint it is due), then save the model and the summary.

    policy log-probs of chosen and rejected responses (one forward over both)
    reference log-probs (a frozen copy, the policy with its LoRA adapters off, or a precomputed table)
    -> mpo_loss -> backward (x grad_accum_steps) -> all-reduce grads -> clip -> AdamW -> cosine lr

Runs on one device as it is, and data-parallel with the same command under a launcher:
`torchrun --nproc_per_node N -m mmpr_pipeline.cli train CONFIG` or `accelerate launch --multi_gpu
--num_processes N -m mmpr_pipeline.cli train CONFIG`. Each process reads its own slice of every
epoch's permutation (a batch is `batch_size` pairs per process).

Writes to `output_dir`: `metrics.jsonl` (one row per step and per evaluation), `checkpoint-NNNNNN/`
(trainable weights, optimizer, BCO shift, RNG: a resumed run ends where an uninterrupted one
does), `reference_logps.pt` (with `reference: precomputed`), `final/` (the trained model, LoRA
merged, loadable by transformers and vLLM) and `summary.json`.

The parts, in the order the loop uses them: splits.py (which pairs), policy.py (the model, its
optimizer, the final save), reference.py (log pi_ref), checkpoint.py (output_dir, save and resume),
batches.py (the order of the pairs), step.py (the loss and one optimizer step), evaluation.py,
reporting.py (metrics.jsonl, progress, summary.json); distributed.py (processes and devices);
cli.py (`mmpr train`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from mmpr_pipeline.shards import kill_point
from mmpr_pipeline.train import fsdp
from mmpr_pipeline.train.batches import micro_batches, run_length
from mmpr_pipeline.train.checkpoint import find_checkpoint, make_output_dir, resume, save_checkpoint
from mmpr_pipeline.train.config import MPOConfig
from mmpr_pipeline.train.data import PairDataset, PairEncoder
from mmpr_pipeline.train.distributed import Dist, setup_distributed
from mmpr_pipeline.train.evaluation import evaluate
from mmpr_pipeline.train.model import load_processor
from mmpr_pipeline.train.policy import (
    check_model,
    load_policy,
    make_optimizer,
    make_sharded,
    make_trainable,
    save_final,
    uses_bf16,
)
from mmpr_pipeline.train.reference import Reference, make_reference
from mmpr_pipeline.train.reporting import (
    announce,
    keep_metrics_until,
    progress_bar,
    show_eval,
    show_step,
    state_summary,
    train_row,
    warn_dropped_over_run,
    write_row,
    write_summary,
)
from mmpr_pipeline.train.splits import load_splits, reject_counts, write_rejects
from mmpr_pipeline.train.step import State, learning_rate, optimizer_step


@dataclass
class Run:
    """What a run sets up once, before its first step."""

    cfg: MPOConfig
    d: Dist
    out: Path
    ckpt: Path | None  # the checkpoint to resume from
    rejects: list[dict]  # pairs set aside before training (rejects.jsonl)
    processor: Any
    pad_id: int
    train_set: PairDataset
    eval_set: PairDataset
    model: Any
    ref: Reference
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    autocast: Any
    use_bf16: bool
    per_epoch: int  # micro-batches per epoch of one process's slice
    total_steps: int


def set_up(cfg: MPOConfig, model, processor, ref_model) -> Run:
    """The data, output_dir, the policy with its reference and optimizer, and the run's length."""
    d = setup_distributed(sharded=cfg.strategy == "fsdp")
    # Data first: a run without data says so (not that a checkpoint differs), and leaves no
    # output_dir behind (`make build-mmpr` would refuse it).
    rejects: list[dict] = []
    train_table, eval_table = load_splits(cfg, d, rejects)
    if model is None:
        check_model(cfg)
    out, ckpt = find_checkpoint(cfg)
    make_output_dir(out, cfg, d)
    write_rejects(out, rejects, d)
    torch.manual_seed(cfg.seed)  # the same initial weights (e.g. LoRA's) in every process
    processor = processor or load_processor(cfg.model, cfg.max_pixels, cfg.trust_remote_code)
    pad_id = getattr(processor, "tokenizer", processor).pad_token_id
    encoder = PairEncoder(processor, cfg.max_length, with_rejected=cfg.needs_reference)
    train_set, eval_set = PairDataset(train_table, encoder), PairDataset(eval_table, encoder)

    if d.device.type == "cpu" or cfg.cpu_offload:  # the training state lives in host memory
        fsdp.fix_mmap_threshold()
    loaded = model is None
    model = load_policy(model, cfg, d)
    use_bf16 = uses_bf16(cfg, d)
    autocast = partial(torch.autocast, d.device.type, dtype=torch.bfloat16, enabled=use_bf16)
    splits = {"train": train_set, "eval": eval_set}
    if d.sharded:
        model, ref = make_sharded(model, ref_model, cfg, d, splits, autocast, pad_id, out, use_bf16, loaded)
    else:
        ref = make_reference(model, ref_model, cfg, d, splits, autocast, pad_id, out)
        model = make_trainable(model, cfg)
    params, optimizer = make_optimizer(model, cfg, d)
    per_epoch, total_steps = run_length(len(train_set), cfg, d)
    return Run(
        cfg=cfg,
        d=d,
        out=out,
        ckpt=ckpt,
        rejects=rejects,
        processor=processor,
        pad_id=pad_id,
        train_set=train_set,
        eval_set=eval_set,
        model=model,
        ref=ref,
        params=params,
        optimizer=optimizer,
        autocast=autocast,
        use_bf16=use_bf16,
        per_epoch=per_epoch,
        total_steps=total_steps,
    )


def after_step(run: Run, state: State, metrics: Path, bar) -> None:
    """The step's metrics row (every `log_every` steps), then the evaluation and checkpoint it is due;
    the last step has all three."""
    cfg, d = run.cfg, run.d
    done = state.step == run.total_steps
    if state.step % cfg.log_every == 0 or done:
        write_row(metrics, state.last_train, d)
        show_step(bar, state.last_train, run.total_steps, cfg, d)
    bar.update(1)
    if len(run.eval_set) and (done or (cfg.eval_every and state.step % cfg.eval_every == 0)):
        scores = evaluate(
            run.model,
            run.eval_set,
            ref=run.ref,
            running=state.running,
            cfg=cfg,
            d=d,
            autocast=run.autocast,
            pad_id=run.pad_id,
        )
        state.last_eval = {"split": "eval", "step": state.step, **scores}
        write_row(metrics, state.last_eval, d)
        show_eval(bar, state.last_eval, cfg, d)
    if cfg.save_every >= 0 and (done or (cfg.save_every and state.step % cfg.save_every == 0)):
        extra = {"dropped": state.dropped}
        save_checkpoint(run.out, state.step, run.model, run.optimizer, state.running, cfg, d, extra)


def take_steps(run: Run, state: State, metrics: Path) -> None:
    """The optimizer steps from `state.step` to the last, each followed by `after_step`."""
    cfg, d = run.cfg, run.d
    bar = progress_bar(run.total_steps, state.step, cfg, d)
    stream = micro_batches(run.train_set, state.step * cfg.grad_accum_steps, cfg, d, run.pad_id)
    started = time.perf_counter()
    while state.step < run.total_steps:
        lr = learning_rate(state.step, run.total_steps, cfg)
        sums, grad_norm, step_s = optimizer_step(
            run.model,
            run.optimizer,
            stream,
            state,
            params=run.params,
            ref=run.ref,
            lr=lr,
            cfg=cfg,
            d=d,
            autocast=run.autocast,
        )
        state.step += 1
        # Test seam: a crash here loses this step (no metrics row, no checkpoint); the resume redoes it.
        kill_point("train_step", state.step)
        state.dropped += int(sums.dropped.item())
        state.last_train = train_row(
            state,
            sums,
            grad_norm=grad_norm,
            lr=lr,
            cfg=cfg,
            per_epoch=run.per_epoch,
            step_s=step_s,
            elapsed_s=time.perf_counter() - started,
        )
        after_step(run, state, metrics, bar)
    bar.close()


def train(config: MPOConfig, *, model=None, processor=None, ref_model=None) -> dict:
    """Train with MPO as `config` says; returns the run's summary (also written to summary.json).

    `model`, `processor` and `ref_model` may be given as objects (e.g. a model built from a config
    in a benchmark); by default they are loaded from `config.model`. SFT on chosen responses only
    is `weights: [0, 0, 1]`: then no reference and no rejected responses are computed at all.
    """
    run_started = time.perf_counter()
    run = set_up(config, model, processor, ref_model)
    cfg, d = run.cfg, run.d
    state = resume(run.ckpt, run.model, run.optimizer, cfg, d)
    metrics = run.out / "metrics.jsonl"
    keep_metrics_until(metrics, state.step, d)
    n_params = sum(p.numel() for p in run.params)
    announce(cfg, d, n_params, len(run.train_set), len(run.eval_set), run.total_steps, run.use_bf16)
    started = time.perf_counter()
    take_steps(run, state, metrics)
    steps_s = time.perf_counter() - started  # the steps, with their evaluations and checkpoints

    warn_dropped_over_run(state, cfg, d)
    model_dir = save_final(run.model, run.processor, run.out, cfg, d)
    summary = {
        "output_dir": str(run.out),
        "model_dir": str(model_dir) if model_dir else None,
        "steps": run.total_steps,
        "train_pairs": len(run.train_set),
        "eval_pairs": len(run.eval_set),
        "trainable_parameters": n_params,
        **state_summary(state),
        "set_aside": reject_counts(run.rejects),  # pairs left out before training, by reason (rejects.jsonl)
        "reference_s": run.ref.precompute_s,
        "setup_s": started - run_started,
        "steps_s": steps_s,
        "run_s": time.perf_counter() - run_started,
    }
    write_summary(run.out, summary, d)
    return summary
