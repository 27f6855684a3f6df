"""Checkpoints: `checkpoint-NNNNNN/` holds the trainable weights (or the FSDP shards), the optimizer,
BCO's shift and every process's RNG, so that a resumed run ends where an uninterrupted one does. A
checkpoint exists whole or not at all, is read as data only, and is refused under a config that
would change the result."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from mmpr_pipeline import stopping
from mmpr_pipeline.train import config as config_mod
from mmpr_pipeline.train import fsdp
from mmpr_pipeline.train.config import MPOConfig
from mmpr_pipeline.train.distributed import Dist
from mmpr_pipeline.train.loss import RunningMean
from mmpr_pipeline.train.step import State

log = logging.getLogger("mmpr.train")

# Keys that may change between an interrupted run and its resumption without changing the result.
RESUMABLE_KEYS = {
    "resume",
    "resume_with_changes",
    "progress_bar",
    "log_every",
    "eval_every",
    "save_every",
    "save_total_limit",
    "num_workers",
    "eval_batch_size",
    "save_model",
    "output_dir",
}


def latest_checkpoint(output_dir: Path) -> Path | None:
    done = sorted(p for p in output_dir.glob("checkpoint-*") if (p / "state.pt").exists())
    return done[-1] if done else None


def find_checkpoint(cfg: MPOConfig) -> tuple[Path, Path | None]:
    """output_dir and the checkpoint to resume from, checked before anything is written: a refused
    resume leaves the folder as it was."""
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise config_mod.ConfigError(cfg.file, "output_dir", f"{out} is a file, not a folder")
    ckpt = latest_checkpoint(out) if cfg.resume and out.is_dir() else None
    if ckpt is not None:
        check_resumable(ckpt, cfg)
    return out, ckpt


def config_changes(path: Path, cfg: MPOConfig) -> dict:
    """{key: (saved, now)} for the keys that change the result, between checkpoint `path`'s config
    and `cfg`."""
    saved_file = path / "config.json"
    saved = json.loads(saved_file.read_text()) if saved_file.exists() else read_state(path)["config"]
    now = cfg.to_dict()
    return {k: (v, now.get(k)) for k, v in saved.items() if k not in RESUMABLE_KEYS and now.get(k) != v}


def check_resumable(path: Path, cfg: MPOConfig) -> None:
    """Refuse to continue checkpoint `path` under a config that changes the result (as `mmpr build`
    refuses a run folder built from another recipe), unless `resume_with_changes` says so."""
    changed = config_changes(path, cfg)
    if not changed:
        return
    diff = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())
    if not cfg.resume_with_changes:
        raise config_mod.ConfigError(
            cfg.file,
            "output_dir",
            f"{path} was saved with another config ({diff}); use a new output_dir, "
            "--set resume=false to start over in it, or --set resume_with_changes=true to continue it anyway",
        )
    log.warning("resuming %s with a config that differs from the one it was saved with: %s", path, diff)


def read_state(path: Path) -> dict:
    """Checkpoint `path`'s state.pt, read as data only (`weights_only`: tensors, numbers, strings and
    containers of them): a state.pt from someone else that would run code is refused, never run."""
    import pickle

    file = path / "state.pt"
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, AttributeError, TypeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ValueError(
            f"{file}: not a checkpoint this trainer can read as data ({first}); nothing in it was run: "
            f"remove {path} to resume from an earlier one, or use a new output_dir"
        ) from None


def gather_rng_states(d: Dist) -> list[dict]:
    """Every process's RNG state, in rank order (each draws its own LoRA dropout)."""
    rng = {
        "cpu": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if d.device.type == "cuda" else None,
    }
    if d.world == 1:
        return [rng]
    rngs = [None] * d.world
    dist.all_gather_object(rngs, rng)
    return rngs


def save_checkpoint(
    output_dir: Path, step: int, model, optimizer, running: RunningMean, cfg: MPOConfig, d: Dist, extra: dict
) -> None:
    rngs = gather_rng_states(d)
    final = output_dir / f"checkpoint-{step:06d}"
    tmp = output_dir / f".tmp-checkpoint-{step:06d}"
    if d.sharded:  # every process writes its shards into tmp/shards; state.pt (below) completes it
        if d.main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        dist.barrier()
        fsdp.save_shards(tmp / "shards", model, optimizer)
        dist.barrier()
        weights = {"world": d.world}
    else:
        weights = {
            "trainable": {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad},
            "optimizer": optimizer.state_dict(),
        }
    if d.main:
        state = {
            "step": step,
            **weights,
            "running": running.state_dict(),
            "rng": rngs,
            "config": cfg.to_dict(),
            **extra,
        }
        with stopping.deferred():  # SIGTERM or Ctrl-C now: this checkpoint is finished first
            if not d.sharded:
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
            torch.save(state, tmp / "state.pt")
            (tmp / "config.json").write_text(config_mod.to_json(cfg))
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)  # a checkpoint exists whole or not at all
            for old in sorted(output_dir.glob("checkpoint-*"))[: -cfg.save_total_limit]:
                shutil.rmtree(old, ignore_errors=True)
    if d.world > 1:
        dist.barrier()


def load_checkpoint(path: Path, model, optimizer, running: RunningMean, cfg: MPOConfig, d: Dist) -> dict:
    state = read_state(path)
    if d.sharded != ("trainable" not in state):
        kind = "sharded (fsdp)" if "trainable" not in state else "unsharded (ddp)"
        raise ValueError(f"{path} is a {kind} checkpoint: resume it with the strategy that saved it")
    if d.sharded:
        if state["world"] != d.world:
            raise ValueError(
                f"{path} was saved by {state['world']} process(es); resume it with as many (each "
                f"process's slice of the data depends on their number), not {d.world}"
            )
        fsdp.load_shards(path / "shards", model, optimizer)
    else:
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in state["trainable"].items():
                params[name].copy_(value)
        optimizer.load_state_dict(state["optimizer"])
    running.load_state_dict(state["running"])
    rng = state["rng"][d.rank] if d.rank < len(state["rng"]) else state["rng"][0]
    torch.set_rng_state(rng["cpu"])
    if rng["cuda"] is not None and d.device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"])
    return state


def resume(ckpt: Path | None, model, optimizer, cfg: MPOConfig, d: Dist) -> State:
    """The state to start from: checkpoint `ckpt`'s (weights and optimizer restored too), or a fresh one."""
    state = State()
    if ckpt is not None:
        saved = load_checkpoint(ckpt, model, optimizer, state.running, cfg, d)
        state.step, state.dropped = saved["step"], saved.get("dropped", 0)
        log.info("resumed from %s at step %d", ckpt, state.step)
    return state


def make_output_dir(out: Path, cfg: MPOConfig, d: Dist) -> None:
    """output_dir with the run's config.json (a resumed run compares its own against the checkpoint's)."""
    if d.main:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise config_mod.ConfigError(
                cfg.file, "output_dir", f"cannot create {out}: {e.strerror}"
            ) from None
        (out / "config.json").write_text(config_mod.to_json(cfg))
