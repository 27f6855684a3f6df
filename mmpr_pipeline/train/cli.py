"""`mmpr train CONFIG [--set KEY=VALUE ...]`: the run's outcome as one JSON document on stdout, and
on stderr whether it learnt (the training loss and the held-out reward accuracy)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from mmpr_pipeline.errors import TrainInputError
from mmpr_pipeline.train import config as config_mod
from mmpr_pipeline.train.checkpoint import latest_checkpoint
from mmpr_pipeline.train.config import MPOConfig
from mmpr_pipeline.train.data import PairError
from mmpr_pipeline.train.loop import train


def cli_train(args) -> int:
    """rc 0 on success; a bad config or data is a TrainInputError (rc 2, error_policy.error_message), a
    non-finite loss a NonFiniteLossError (rc 1: nothing non-finite is saved)."""
    from mmpr_pipeline.recipe import parse_overrides

    try:
        cfg = config_mod.load(args.config, parse_overrides(args.set))
        args.resume_hint = (
            f"the last checkpoint in {cfg.output_dir} is kept: run the same command again to resume"
        )
        summary = train(cfg)
    except (config_mod.ConfigError, FileNotFoundError, NotADirectoryError, FileExistsError, ValueError) as e:
        raise TrainInputError(f"{e}{kept_checkpoint(cfg) if isinstance(e, PairError) else ''}") from e
    if int(os.environ.get("RANK", "0")) == 0:
        print_outcome(summary)
    return 0


def print_outcome(summary: dict) -> None:
    """The summary's main keys and the training loss's quarters on stdout, one JSON document; the
    learning report on stderr."""
    rows = (Path(summary["output_dir"]) / "metrics.jsonl").read_text().splitlines()
    losses = [r["loss"] for r in map(json.loads, rows) if r["split"] == "train"]
    q = max(1, len(losses) // 4)
    print(
        json.dumps(
            {k: summary[k] for k in ("output_dir", "model_dir", "steps", "dropped", "set_aside")}
            | {
                "train_loss": {
                    "first_quarter": round(sum(losses[:q]) / q, 4),
                    "last_quarter": round(sum(losses[-q:]) / q, 4),
                },
                "last_eval": summary["last_eval"],
            },
            indent=2,
        )
    )
    print(learning_report(losses, summary["last_eval"]), file=sys.stderr)


def kept_checkpoint(cfg: MPOConfig) -> str:
    """For the error line of a run stopped part-way by a pair: the checkpoint it kept, if any."""
    out = Path(cfg.output_dir)
    ckpt = latest_checkpoint(out) if out.is_dir() else None
    kept = f"{ckpt} is kept" if ckpt else "no checkpoint was saved yet (save_every)"
    return f"; {kept}: fix or remove that pair, then run the same command again"


def learning_report(losses: list[float], last_eval: dict) -> str:
    """What a user should see at the end of a run: whether the training loss fell (the mean of the
    first vs the last quarter of the logged steps; single steps are noisy) and the held-out reward
    accuracy, overall and per pair type (chance is 0.5)."""
    q = max(1, len(losses) // 4)
    first, last = sum(losses[:q]) / q, sum(losses[-q:]) / q
    lines = [
        f"train loss: {first:.4f} (first quarter of {len(losses)} steps) -> {last:.4f} (last quarter), "
        + ("falling" if last < first else "NOT falling")
    ]
    if "eval_reward_accuracy" in last_eval:
        kinds = sorted(k[len("eval_pairs_") :] for k in last_eval if k.startswith("eval_pairs_"))
        per_type = ", ".join(
            f"{t} {last_eval[f'eval_reward_accuracy_{t}']:.3f} ({last_eval[f'eval_pairs_{t}']} pairs)"
            for t in kinds
        )
        lines.append(
            f"held-out reward accuracy: {last_eval['eval_reward_accuracy']:.3f} on "
            f"{last_eval['eval_pairs']} pairs (chance 0.5)" + (f"; by pair type: {per_type}" if kinds else "")
        )
    elif "eval_loss" in last_eval:
        lines.append(f"held-out loss: {last_eval['eval_loss']:.4f} on {last_eval['eval_pairs']} pairs")
    return "\n".join(lines)
