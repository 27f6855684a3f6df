"""What a run reports as it goes: metrics.jsonl (one row per step and per evaluation), the progress
bar or log lines, and summary.json at the end."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from mmpr_pipeline.train.config import MPOConfig
from mmpr_pipeline.train.distributed import Dist
from mmpr_pipeline.train.step import LossSums, State

log = logging.getLogger("mmpr.train")


def announce(
    cfg: MPOConfig, d: Dist, n_params: int, n_train: int, n_eval: int, total_steps: int, use_bf16: bool
) -> None:
    if d.main:
        log.info(
            "training %s (%.2fM trainable parameters) on %d pairs (%d held out), %d steps, %s%s",
            cfg.model,
            n_params / 1e6,
            n_train,
            n_eval,
            total_steps,
            d.device,
            ", bf16 autocast" if use_bf16 else "",
        )


def progress_bar(total_steps: int, step: int, cfg: MPOConfig, d: Dist) -> tqdm:
    return tqdm(
        total=total_steps,
        initial=step,
        desc="mpo",
        dynamic_ncols=True,
        disable=not (d.main and cfg.progress_bar),
        file=sys.stderr,
    )


def train_row(
    state: State,
    sums: LossSums,
    *,
    grad_norm: torch.Tensor,
    lr: float,
    cfg: MPOConfig,
    per_epoch: int,
    step_s: float,
    elapsed_s: float,
) -> dict:
    """metrics.jsonl's row for the step just taken (`state.step`), from the step's summed `sums`."""
    tokens = sums.tokens.item()
    return {
        "split": "train",
        "step": state.step,
        "epoch": round(state.step * cfg.grad_accum_steps / per_epoch, 4),
        "lr": lr,
        **sums.means(),
        "grad_norm": float(grad_norm),
        "pairs": int(sums.pairs.item()),
        "tokens": int(tokens),
        "tokens_per_s": tokens / step_s,
        "step_s": step_s,
        "elapsed_s": elapsed_s,
        "dropped": state.dropped,
    }


def keep_metrics_until(path: Path, step: int, d: Dist) -> None:
    """Drop metrics rows after `step`: written after the checkpoint, they belong to the abandoned
    continuation."""
    if d.main:
        old = path.read_text().splitlines() if path.exists() else []
        kept = [r for r in old if r.strip() and json.loads(r)["step"] <= step]
        path.write_text("".join(r + "\n" for r in kept))


def write_row(path: Path, row: dict, d: Dist) -> None:
    if d.main:
        with path.open("a") as f:
            f.write(json.dumps(row) + "\n")


def show_step(bar, row: dict, total_steps: int, cfg: MPOConfig, d: Dist) -> None:
    postfix = {"loss": f"{row['loss']:.4f}"}
    if cfg.needs_reference:
        postfix.update(
            margin=f"{row['reward_margin']:.4f}",
            acc=f"{row['reward_accuracy']:.2f}",
            delta=f"{row['delta']:.4f}",
        )
    bar.set_postfix(postfix, refresh=False)
    if not cfg.progress_bar and d.main:
        log.info("step %d/%d %s", row["step"], total_steps, " ".join(f"{k}={v}" for k, v in postfix.items()))


def show_eval(bar, row: dict, cfg: MPOConfig, d: Dist) -> None:
    if not d.main:
        return
    line = " ".join(
        f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items() if k != "split"
    )
    if cfg.progress_bar:
        bar.write(line, file=sys.stderr)
    else:
        log.info(line)


def warn_dropped_over_run(state: State, cfg: MPOConfig, d: Dist) -> None:
    if state.dropped and d.main:
        log.warning(
            "%d pair(s) longer than max_length=%d were dropped over the run (not cut)",
            state.dropped,
            cfg.max_length,
        )


def state_summary(state: State) -> dict:
    """What the run ended with, for summary.json."""
    return {
        "dropped": state.dropped,
        "last_train": state.last_train,
        "last_eval": state.last_eval,
        "delta": float(state.running.mean),
    }


def write_summary(out: Path, summary: dict, d: Dist) -> None:
    if d.main:
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
    if d.world > 1:
        dist.barrier()
