"""The MPO training loop: one function, `train(config)`, to read top to bottom (at the end of this
file), as nanoGPT's train.py reads. The helpers above it take what they need as arguments; `State`
holds what changes from step to step, `Reference` where log pi_ref comes from.

    policy log-probs of chosen and rejected responses (one forward over both)
    reference log-probs (a frozen copy, the policy with its LoRA adapters off, or a precomputed table)
    -> mpo_loss -> backward (x grad_accum_steps) -> all-reduce grads -> clip -> AdamW -> cosine lr

Runs on one device as it is, and data-parallel with the same command under a launcher:
`torchrun --nproc_per_node N -m mmpr_pipeline.cli train CONFIG` or `accelerate launch --multi_gpu
--num_processes N -m mmpr_pipeline.cli train CONFIG`. Each process reads its own slice of every
epoch's permutation (a batch is `batch_size` pairs per process). Gradients are averaged with one
all-reduce per optimizer step rather than by a DistributedDataParallel wrapper, because a process's
micro-batch can be empty (all its pairs too long), and DDP would wait forever for it.

Writes to `output_dir`: `metrics.jsonl` (one row per step and per evaluation), `checkpoint-NNNNNN/`
(trainable weights, optimizer, BCO shift, RNG: a resumed run ends where an uninterrupted one
does), `reference_logps.pt` (with `reference: precomputed`), `final/` (the trained model, LoRA
merged, loadable by transformers and vLLM) and `summary.json`.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from mmpr_pipeline import stopping
from mmpr_pipeline.records import stable_hash
from mmpr_pipeline.train import config as config_mod
from mmpr_pipeline.train import fsdp
from mmpr_pipeline.train.config import MPOConfig
from mmpr_pipeline.train.data import (
    PairDataset,
    PairEncoder,
    PairError,
    collate,
    load_pairs,
    select,
    set_aside_bad_pairs,
    split_pairs,
)
from mmpr_pipeline.train.loss import RunningMean, mpo_loss
from mmpr_pipeline.train.model import (
    add_lora,
    freeze_vision,
    load_model,
    load_processor,
    policy_of,
    response_logps,
    unwrap,
)

log = logging.getLogger("mmpr.train")

PREF_KEYS = (
    "loss",
    "preference",
    "bco",
    "sft",
    "chosen_reward",
    "rejected_reward",
    "reward_margin",
    "reward_accuracy",
    "delta",
)
SFT_KEYS = ("loss", "sft")
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


class NonFiniteLossError(RuntimeError):
    """Training produced a non-finite loss, gradient or weight: it stops before saving anything from
    that step (a model of NaNs must never look like a finished run)."""


# --- processes and devices -------------------------------------------------------------------------


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    sharded: bool = False  # strategy: fsdp

    @property
    def lockstep(self) -> bool:
        """Every process must run every forward (FSDP's gathers are collective), even with no pair."""
        return self.sharded and self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(sharded: bool = False) -> Dist:
    """One process per device; `torchrun` and `accelerate launch` set WORLD_SIZE, RANK, LOCAL_RANK.
    FSDP needs a process group even for one process (a single-GPU check of the sharded path)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local}") if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
    backend = "nccl" if device.type == "cuda" else "gloo"
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend)
    elif sharded and not dist.is_initialized():
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return Dist(rank=dist.get_rank() if world > 1 else 0, world=world, device=device, sharded=sharded)


def all_reduce_sum(t: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.world > 1:
        dist.all_reduce(t)
    return t


def loader(dataset: PairDataset, batches: list[list[int]], pad_id: int, num_workers: int, seed: int = 0):
    """Batches of `dataset` in the given order. The loader gets its own generator: one that drew
    from the global RNG would shift LoRA dropout and initialisation whenever a loader is created
    (an evaluation, a precompute pass, a resumption), and a resumed run would drift."""
    return DataLoader(
        dataset,
        batch_sampler=batches,
        collate_fn=partial(collate, pad_token_id=pad_id),
        num_workers=num_workers,
        generator=torch.Generator().manual_seed(seed),
    )


def rank_batches(n: int, batch_size: int, d: Dist) -> list[list[int]]:
    """This process's batches of items rank, rank + world, ... of `n` (evaluation, precompute). In
    lockstep every process gets as many batches as the first, the missing ones empty."""
    mine = list(range(d.rank, n, d.world))
    batches = [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]
    if d.lockstep:
        most = math.ceil(math.ceil(n / d.world) / batch_size)
        batches += [[] for _ in range(most - len(batches))]
    return batches


def idle_forward(model, ref: Reference, cfg: MPOConfig) -> torch.Tensor:
    """What a process with no pair in a micro-batch runs in lockstep: the policy's (and a live
    reference's) forward on the stand-in pair; returns zero, joined to the graph, to backpropagate."""
    logps, _ = response_logps(model, model.standin)
    if cfg.needs_reference and not ref.tables:
        reference_logps(ref, model, model.standin, "train", logps.device)
    return 0 * logps.sum()


def to_device(batch: dict, device: torch.device) -> dict:
    return {
        k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()
    }


# --- schedule --------------------------------------------------------------------------------------


def learning_rate(step: int, total: int, cfg: MPOConfig) -> float:
    """Linear warm-up to the peak, then a cosine down to `min_lr_ratio` of it."""
    warmup = int(cfg.warmup_ratio * total)
    if step < warmup:
        return cfg.learning_rate * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    ratio = cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return cfg.learning_rate * ratio


# --- the reference ---------------------------------------------------------------------------------


@torch.no_grad()
def precompute_reference(
    model, dataset: PairDataset, cfg: MPOConfig, d: Dist, autocast, pad_id: int, cache: Path
) -> torch.Tensor:
    """log pi_ref of every pair's chosen and rejected response, shape [pairs, 2] (NaN for dropped
    pairs), computed once before training so that training holds a single model. Cached in
    `cache`, keyed by model, data and encoding settings."""
    key = stable_hash(
        "reference", cfg.model, cfg.dtype, cfg.bf16, cfg.max_length, cfg.max_pixels, dataset.ids()
    )
    if cache.exists():
        try:  # data only: a cache that would run code is computed again, never run
            saved = torch.load(cache, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unreadable cache is a stale cache
            log.warning("%s cannot be read as data (%s): computing it again", cache, type(e).__name__)
            saved = {}
        if isinstance(saved, dict) and saved.get("key") == key:
            return saved["logps"]
    was_training = model.training
    model.eval()
    logps = torch.zeros(len(dataset), 2)
    filled = torch.zeros(len(dataset))
    batches = rank_batches(len(dataset), cfg.eval_batch_size, d)
    for batch in tqdm(
        loader(dataset, batches, pad_id, cfg.num_workers),
        desc="reference log-probs",
        disable=not (d.main and cfg.progress_bar),
    ):
        if not batch["n_pairs"]:
            if d.lockstep:
                response_logps(model, model.standin)
            continue
        n, index = batch["n_pairs"], batch["index"]
        with autocast():
            seq, _ = response_logps(model, to_device(batch, d.device))
        logps[index, 0], logps[index, 1] = seq[:n].float().cpu(), seq[n:].float().cpu()
        filled[index] = 1
    sums = all_reduce_sum(torch.cat([logps.flatten(), filled]).to(d.device), d).cpu()
    logps, filled = sums[: -len(dataset)].view(-1, 2), sums[-len(dataset) :]
    logps[filled == 0] = float("nan")
    if d.main:
        tmp = cache.with_suffix(".tmp")
        torch.save({"key": key, "logps": logps}, tmp)
        tmp.replace(cache)
    model.train(was_training)
    return logps


# --- evaluation ------------------------------------------------------------------------------------


def pair_types_of(table) -> list[str]:
    """The pair types present in `table` (sorted), or [] without a pair_type column (a foreign dataset)."""
    if "pair_type" not in table.column_names:
        return []
    return sorted(t for t in set(table["pair_type"].to_pylist()) if t is not None)


def tally_by_type(margins: torch.Tensor, index: torch.Tensor, table, types: list[str]) -> torch.Tensor:
    """[correct, pairs] per pair type for one batch: a pair is correct when its reward margin is > 0."""
    counts = torch.zeros(len(types), 2, device=margins.device)
    kinds = table["pair_type"].take(index.cpu().numpy()).to_pylist()
    for kind, margin in zip(kinds, (margins > 0).tolist()):
        if kind in types:
            counts[types.index(kind)] += torch.tensor([float(margin), 1.0], device=margins.device)
    return counts


# --- checkpoints -----------------------------------------------------------------------------------


def latest_checkpoint(output_dir: Path) -> Path | None:
    done = sorted(p for p in output_dir.glob("checkpoint-*") if (p / "state.pt").exists())
    return done[-1] if done else None


def save_checkpoint(
    output_dir: Path, step: int, model, optimizer, running: RunningMean, cfg: MPOConfig, d: Dist, extra: dict
) -> None:
    rng = {
        "cpu": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if d.device.type == "cuda" else None,
    }
    rngs = [None] * d.world
    if d.world > 1:
        dist.all_gather_object(rngs, rng)
    else:
        rngs = [rng]
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


# --- the run's parts -------------------------------------------------------------------------------


@dataclass
class Reference:
    """Where log pi_ref comes from: per-split tables computed before training (`reference:
    precomputed`), a frozen model, or, with neither, the policy with its LoRA adapters off."""

    tables: dict[str, torch.Tensor] = field(default_factory=dict)
    model: Any = None
    precompute_s: float = 0.0  # the precompute pass: part of the run's cost, reported in the summary


@dataclass
class State:
    """What changes as the run goes: the optimizer steps done, BCO's shift, the pairs dropped as too
    long (and how many were warned about), and the latest train and eval rows."""

    step: int = 0
    running: RunningMean = field(default_factory=RunningMean)
    dropped: int = 0
    warned: int = 0
    last_train: dict = field(default_factory=dict)
    last_eval: dict = field(default_factory=dict)


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


def refuse_unfinished_run(source: str | None) -> None:
    """A run folder (or its data/) that a build has not finished: its shards are missing, from an
    earlier build, or half replaced, and a model trained on them would pass for one of the whole run."""
    from mmpr_pipeline import run_status

    run = run_status.run_folder_of(source) if source else None
    st = run_status.status(run) if run is not None else None
    if st is not None and not st.finished:
        raise ValueError(run_status.not_finished_error(run, st, "training on part of it"))


def usable_pairs(source: str, cfg: MPOConfig, rejects: list[dict]):
    """The pairs of `source` (of `cfg.pair_types`) that training can use; the others are added to
    `rejects`, named by source. None usable: a ValueError naming the reasons (nothing is written)."""
    pairs = select(load_pairs(source), cfg.pair_types)
    kept, bad = set_aside_bad_pairs(pairs, with_rejected=cfg.needs_reference)
    rejects += [dict(data=source, **r) for r in bad]
    if pairs.num_rows and not kept.num_rows:
        raise ValueError(
            f"{source}: none of its {pairs.num_rows} pairs can be trained on ({reject_counts_text(bad)})"
        )
    return kept


def reject_counts(rejects: list[dict]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in rejects:
        counts[r["reason"]] = counts.get(r["reason"], 0) + 1
    return counts


def reject_counts_text(rejects: list[dict]) -> str:
    return ", ".join(f"{reason}: {n}" for reason, n in sorted(reject_counts(rejects).items()))


def load_splits(cfg: MPOConfig, d: Dist, rejects: list[dict] | None = None):
    """The training and held-out pairs (held out by question unless `eval_data` names its own), without
    the pairs training cannot use (added to `rejects`)."""
    rejects = [] if rejects is None else rejects
    for source in (cfg.data, cfg.eval_data):
        refuse_unfinished_run(source)
    pairs = usable_pairs(cfg.data, cfg, rejects)
    if cfg.eval_data:
        train_table, eval_table = pairs, usable_pairs(cfg.eval_data, cfg, rejects)
    else:
        train_table, eval_table = split_pairs(pairs, cfg.eval_fraction, cfg.seed)
    train_table = select(train_table, limit=cfg.limit)
    if train_table.num_rows < d.world:
        raise ValueError(f"{cfg.data}: {train_table.num_rows} training pairs for {d.world} process(es)")
    return train_table, eval_table


def write_rejects(out: Path, rejects: list[dict], d: Dist) -> None:
    """output_dir/rejects.jsonl: one line per pair set aside before training (none: no file)."""
    path = out / "rejects.jsonl"
    if not d.main:
        return
    if not rejects:
        path.unlink(missing_ok=True)
        return
    path.write_text("".join(json.dumps(r) + "\n" for r in rejects))
    log.warning(
        "set aside %d pair(s) that cannot be trained on (%s); listed in %s",
        len(rejects),
        reject_counts_text(rejects),
        path,
    )


def check_model(cfg: MPOConfig) -> None:
    """Before output_dir is made: a Hub id that cannot be found says so in seconds, and a model folder
    that would run its own code is refused unless `trust_remote_code` says so."""
    from mmpr_pipeline import preflight

    if preflight.HUB_ID.match(cfg.model) and not Path(cfg.model).exists() and cfg.model.count("/") == 1:
        preflight.check_model(cfg.model, f"{cfg.file}: model")
    preflight.check_remote_code(
        cfg.model,
        cfg.trust_remote_code,
        f"{cfg.file}: model",
        f"`trust_remote_code: true` in {cfg.file} (or --set trust_remote_code=true)",
    )


def make_output_dir(out: Path, cfg: MPOConfig, d: Dist) -> None:
    if d.main:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise config_mod.ConfigError(
                cfg.file, "output_dir", f"cannot create {out}: {e.strerror}"
            ) from None
        (out / "config.json").write_text(config_mod.to_json(cfg))


def load_policy(model, cfg: MPOConfig, d: Dist):
    """The policy on its device, in float32 (with bf16 autocast) or the dtype asked for, its vision
    encoder frozen if asked; `model` if one is given, else loaded from `cfg.model`."""
    if model is None:
        model = load_model(cfg.model, cfg.dtype, cfg.attn_implementation, cfg.trust_remote_code)
    if not d.sharded:  # fully_shard moves each block's shards to the device itself
        model.to(d.device)
    if cfg.freeze_vision:
        freeze_vision(model)
    return model


def uses_bf16(cfg: MPOConfig, d: Dist) -> bool:
    if cfg.bf16 == "auto":
        return d.device.type == "cuda" and torch.cuda.is_bf16_supported()
    return bool(cfg.bf16)


def make_reference(
    model,
    ref_model,
    cfg: MPOConfig,
    d: Dist,
    datasets: dict[str, PairDataset],
    autocast,
    pad_id: int,
    out: Path,
) -> Reference:
    """The reference: precomputed (one model in memory), a frozen copy, or (LoRA) the policy without
    adapters. Called before LoRA is added, so the copy and the tables are of the base model."""
    if not cfg.needs_reference:
        return Reference()
    if ref_model is not None:
        ref_model.to(d.device).eval().requires_grad_(False)
    if cfg.reference == "precomputed":
        t0 = time.perf_counter()
        scorer = ref_model if ref_model is not None else model
        tables = {
            "train": precompute_reference(
                scorer, datasets["train"], cfg, d, autocast, pad_id, out / "reference_logps.pt"
            )
        }
        if len(datasets["eval"]):
            tables["eval"] = precompute_reference(
                scorer, datasets["eval"], cfg, d, autocast, pad_id, out / "reference_logps_eval.pt"
            )
        return Reference(tables=tables, precompute_s=time.perf_counter() - t0)
    if ref_model is None and not cfg.lora:
        ref_model = copy.deepcopy(model).eval().requires_grad_(False)
    return Reference(model=ref_model)


def make_sharded(
    model,
    ref_model,
    cfg: MPOConfig,
    d: Dist,
    datasets: dict,
    autocast,
    pad_id: int,
    out: Path,
    use_bf16: bool,
    loaded: bool,
) -> tuple[Any, Reference]:
    """strategy: fsdp. LoRA and gradient checkpointing go in first (FSDP shards the modules that are
    there), then the policy and a live reference are sharded alike; a precomputed reference comes
    from the sharded policy with its adapters off (they start at zero: the base model).

    Two whole models never coexist: the policy is sharded (its whole weights freed) before a live
    reference is loaded from `cfg.model` and sharded in turn. Only a policy given as an object
    (`loaded` False) is copied before sharding, having no file to load the reference from."""
    live = cfg.needs_reference and cfg.reference == "live" and not cfg.lora
    frozen = ref_model
    if frozen is None and live and not loaded:
        frozen = copy.deepcopy(model)
    model = make_trainable(model, cfg)
    standin = fsdp.standin_batch(datasets["train"], pad_id, d.device) if d.lockstep else None
    shard = partial(
        fsdp.shard, device=d.device, use_bf16=use_bf16, cpu_offload=cfg.cpu_offload, standin=standin
    )
    root = shard(model)
    fsdp.release_freed()
    if frozen is None and live:
        frozen = load_model(cfg.model, cfg.dtype, cfg.attn_implementation, cfg.trust_remote_code)
    ref = Reference()
    if cfg.needs_reference and frozen is not None:
        ref.model = shard(frozen.eval().requires_grad_(False))
        fsdp.release_freed()
    if cfg.needs_reference and cfg.reference == "precomputed":
        t0, scorer, ref.model = time.perf_counter(), (root if ref.model is None else ref.model), None
        off = policy_of(scorer).disable_adapter() if cfg.lora and scorer is root else contextlib.nullcontext()
        with off:
            for split, name in (("train", "reference_logps.pt"), ("eval", "reference_logps_eval.pt")):
                if len(datasets[split]):
                    ref.tables[split] = precompute_reference(
                        scorer, datasets[split], cfg, d, autocast, pad_id, out / name
                    )
        ref.precompute_s = time.perf_counter() - t0
    fsdp.reshard(root)  # before the optimizer collects the parameters: the sharded ones
    return root.train(), ref


def make_trainable(model, cfg: MPOConfig):
    """LoRA adapters and gradient checkpointing, if asked; the model in training mode."""
    if cfg.lora:
        model = add_lora(
            model,
            cfg.lora_r,
            cfg.lora_alpha,
            cfg.lora_dropout,
            cfg.lora_target_modules,
            freeze_vision=cfg.freeze_vision,
        )
    if cfg.gradient_checkpointing:
        unwrap(model).gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train()


def make_optimizer(model, cfg: MPOConfig, d: Dist) -> tuple[list[torch.nn.Parameter], torch.optim.Optimizer]:
    """The trainable parameters (rank 0's in every process, as DistributedDataParallel starts) and
    AdamW over them, with no weight decay on biases and norms."""
    params = [p for p in model.parameters() if p.requires_grad]
    if d.world > 1 and not d.sharded:  # sharded: every process loaded the same weights, seeded alike
        for p in params:
            dist.broadcast(p.data, 0)
    torch.manual_seed(cfg.seed + d.rank)  # but different dropout in each process
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(
        groups, lr=cfg.learning_rate, betas=tuple(cfg.adam_betas), fused=d.device.type == "cuda"
    )
    return params, optimizer


def run_length(n_pairs: int, cfg: MPOConfig, d: Dist) -> tuple[int, int]:
    """Micro-batches per epoch of one process's slice, and optimizer steps in the run."""
    per_epoch = math.ceil(n_pairs // d.world / cfg.batch_size)
    if cfg.max_steps > 0:
        return per_epoch, cfg.max_steps
    return per_epoch, max(1, math.ceil(cfg.epochs * per_epoch / cfg.grad_accum_steps))


def micro_batches(dataset: PairDataset, start: int, cfg: MPOConfig, d: Dist, pad_id: int):
    """The run's micro-batches from number `start` on: epoch e is a permutation seeded by seed + e,
    so a resumed run sees exactly the batches the uninterrupted one would have."""
    per_rank = len(dataset) // d.world
    per_epoch = math.ceil(per_rank / cfg.batch_size)
    m = start
    while True:
        epoch, pos = divmod(m, per_epoch)
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(cfg.seed + epoch))
        mine = order[: per_rank * d.world].tolist()[d.rank :: d.world]
        batches = [mine[i : i + cfg.batch_size] for i in range(0, len(mine), cfg.batch_size)]
        for batch in loader(dataset, batches[pos:], pad_id, cfg.num_workers, cfg.seed + epoch):
            yield batch
            m += 1


# --- the loss of a batch ---------------------------------------------------------------------------


def reference_logps(ref: Reference, model, batch: dict, split: str, device: torch.device) -> torch.Tensor:
    """log pi_ref of the batch's sequences, [chosen..., rejected...]."""
    if ref.tables:
        t = ref.tables[split][batch["index"].cpu()]
        return torch.cat([t[:, 0], t[:, 1]]).to(device)
    with torch.no_grad():
        if ref.model is not None:
            logps = response_logps(ref.model, batch)[0]
            fsdp.reshard(ref.model)  # no backward follows to free its root's gathered weights
            return logps
        with policy_of(model).disable_adapter():  # LoRA: the base model is the reference
            return response_logps(model, batch)[0]


def update_shift(running: RunningMean, mean_reward: torch.Tensor | None, d: Dist) -> torch.Tensor:
    """Feed this micro-batch's mean reward (one per process; None for an empty micro-batch) into
    the running mean delta. Every process calls it, so that all of them gather together."""
    if d.world == 1:
        return running.update(mean_reward)
    mine = torch.stack(
        [
            mean_reward if mean_reward is not None else torch.zeros((), device=d.device),
            torch.tensor(float(mean_reward is not None), device=d.device),
        ]
    )
    everyone = [torch.empty_like(mine) for _ in range(d.world)]
    dist.all_gather(everyone, mine)
    return running.update(*[m for m, present in everyone if present])


def sft_tokens(batch: dict, cfg: MPOConfig, d: Dist) -> torch.Tensor | None:
    """The SFT term's denominator under data parallelism: the micro-batch's chosen-response tokens
    over all processes, divided by the number of processes. Each process then contributes its own
    token sum over that, and the averaged gradient is the per-token mean over the whole
    micro-batch, as one process with all its pairs computes it (a mean of each process's own
    per-token mean would weight a process's tokens by how few it has). Every process calls it,
    an empty micro-batch included. None on one process: the local count is the whole count."""
    if d.world == 1 or not cfg.weights[2]:
        return None
    n = batch["n_pairs"]
    count = batch["response_mask"][:n, 1:].sum().float() if n else torch.zeros(())
    return all_reduce_sum(count.to(d.device), d) / d.world


def batch_loss(
    model,
    batch: dict,
    split: str,
    ref: Reference,
    running: RunningMean,
    cfg: MPOConfig,
    d: Dist,
    sft_denominator: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict]:
    """The MPO loss of one micro-batch and its parts (loss.mpo_loss); the SFT term alone when no
    reference is needed."""
    n = batch["n_pairs"]
    logps, n_tokens = response_logps(model, batch)  # [chosen..., rejected...]
    # L_g (MPO Eq. 8): the negative log-likelihood per token over the batch's chosen responses, as
    # TRL's `sft` loss type computes it (pooled over tokens, not averaged per sequence).
    denominator = sft_denominator if sft_denominator is not None else n_tokens[:n].sum().clamp(min=1)
    chosen_nll = -logps[:n].sum() / denominator
    if not cfg.needs_reference:  # SFT only
        loss = cfg.weights[2] * chosen_nll
        return loss, {"loss": loss.detach(), "sft": chosen_nll.detach()}
    ref_logps = reference_logps(ref, model, batch, split, d.device)
    delta = torch.zeros((), device=d.device)
    if cfg.bco_shift == "running_mean":
        # Updated with this batch before it is used, as in the paper's reference code; held-out
        # evaluation reads it without moving it.
        mean_reward = cfg.beta * (logps.detach() - ref_logps).mean()
        delta = (
            update_shift(running, mean_reward, d)
            if split == "train"
            else torch.as_tensor(running.mean, device=d.device)
        )
    loss, parts = mpo_loss(
        logps[:n],
        logps[n:],
        ref_logps[:n],
        ref_logps[n:],
        chosen_nll,
        beta=cfg.beta,
        weights=tuple(cfg.weights),
        delta=delta,
        preference=cfg.preference_loss,
    )
    return loss, {"loss": loss.detach(), **parts, "delta": torch.as_tensor(delta, device=d.device).float()}


def loss_keys(cfg: MPOConfig) -> tuple[str, ...]:
    return PREF_KEYS if cfg.needs_reference else SFT_KEYS


@torch.no_grad()
def evaluate(
    model,
    eval_set: PairDataset,
    ref: Reference,
    running: RunningMean,
    cfg: MPOConfig,
    d: Dist,
    autocast,
    pad_id: int,
) -> dict:
    """The loss parts over the held-out pairs, and the reward accuracy per pair type too: a mean over
    all pairs hides which kind is learnt."""
    keys = loss_keys(cfg)
    types = pair_types_of(eval_set.table) if cfg.needs_reference else []
    model.eval()
    batches = rank_batches(len(eval_set), cfg.eval_batch_size, d)
    sums = torch.zeros(len(keys) + 1, device=d.device)
    by_type = torch.zeros(len(types), 2, device=d.device)  # [correct, pairs] per pair type
    for batch in loader(eval_set, batches, pad_id, cfg.num_workers):
        if not batch["n_pairs"]:
            if d.lockstep:
                idle_forward(model, ref, cfg)
            continue
        batch = to_device(batch, d.device)
        with autocast():
            _, parts = batch_loss(model, batch, "eval", ref, running, cfg, d)
        sums += (
            torch.stack([parts[k].float() for k in keys] + [torch.ones((), device=d.device)])
            * batch["n_pairs"]
        )
        if types:
            by_type += tally_by_type(parts["margins"], batch["index"], eval_set.table, types)
    sums = all_reduce_sum(sums, d).tolist()
    by_type = all_reduce_sum(by_type, d).tolist()
    fsdp.reshard(model)
    model.train()
    n = sums[-1]
    row = {"eval_pairs": int(n), **{f"eval_{k}": (s / n if n else float("nan")) for k, s in zip(keys, sums)}}
    for t, (correct, pairs) in zip(types, by_type):
        row[f"eval_reward_accuracy_{t}"] = correct / pairs if pairs else float("nan")
        row[f"eval_pairs_{t}"] = int(pairs)
    return row


# --- one optimizer step ----------------------------------------------------------------------------


def accumulate_gradients(
    model, stream, ref: Reference, state: State, cfg: MPOConfig, d: Dist, autocast
) -> torch.Tensor:
    """Forward and backward over `grad_accum_steps` micro-batches of `stream`; returns this process's
    sums [loss parts weighted by pairs..., pairs, tokens, dropped]."""
    keys = loss_keys(cfg)
    sums = torch.zeros(len(keys) + 3, device=d.device)
    for _ in range(cfg.grad_accum_steps):
        batch = next(stream)
        for x in batch["dropped"]:
            if state.warned < 3:
                log.warning(
                    "pair %s is %d tokens long, over max_length=%d: dropped, not cut (counted as "
                    "`dropped` in metrics.jsonl)",
                    x.pair_id,
                    x.length,
                    cfg.max_length,
                )
            state.warned += 1
        sums[-1] += len(batch["dropped"])
        sft_denominator = sft_tokens(batch, cfg, d)
        if not batch["n_pairs"]:
            if d.world > 1 and cfg.needs_reference and cfg.bco_shift == "running_mean":
                update_shift(
                    state.running, None, d
                )  # the other processes wait for this one's (absent) reward
            if d.lockstep:
                with autocast():
                    idle_forward(model, ref, cfg).backward()
            continue
        batch = to_device(batch, d.device)
        with autocast():
            loss, parts = batch_loss(model, batch, "train", ref, state.running, cfg, d, sft_denominator)
        (loss / cfg.grad_accum_steps).backward()  # a micro-batch counts 1/grad_accum_steps, however full
        n = batch["n_pairs"]
        sums[: len(keys)] += torch.stack([parts[k].float() for k in keys]) * n
        sums[len(keys)] += n
        sums[len(keys) + 1] += batch["attention_mask"].sum()
    return sums


def average_gradients(params: list[torch.nn.Parameter], d: Dist) -> None:
    """Average gradients over processes: one all-reduce per step (no DDP wrapper, see the top)."""
    if d.world == 1:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    handles = [dist.all_reduce(p.grad, async_op=True) for p in params]
    for h in handles:
        h.wait()
    for p in params:
        p.grad /= d.world


def apply_update(params, optimizer, sums: torch.Tensor, step: int, cfg: MPOConfig, d: Dist) -> torch.Tensor:
    """Clip and step, or refuse a non-finite loss, gradient or update (NonFiniteLossError, before
    anything of this step is saved). `sums` are summed over processes, so every process sees a
    non-finite value and stops together. Returns the gradient norm."""
    keys = loss_keys(cfg)
    n_pairs = sums[len(keys)].item()
    if n_pairs == 0:
        optimizer.zero_grad(set_to_none=True)
        log.warning("step %d: every pair of the step was dropped; no update", step + 1)
        return torch.zeros(())
    if not torch.isfinite(sums[: len(keys)]).all():
        terms = ", ".join(f"{k} {v / n_pairs:.4g}" for k, v in zip(keys, sums.tolist()))
        raise NonFiniteLossError(
            f"step {step + 1}: non-finite loss ({terms}); stopped without saving "
            f"this step; lower learning_rate ({cfg.learning_rate}) or check the data"
        )
    grad_norm = fsdp.full(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm))
    if not torch.isfinite(grad_norm):
        raise NonFiniteLossError(
            f"step {step + 1}: non-finite gradient norm ({float(grad_norm)}); stopped "
            "without saving this step; lower learning_rate or check the data"
        )
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    finite = torch.stack([torch.isfinite(fsdp.local(p)).all() for p in params]).all().float()
    if d.sharded:  # each process sees only its shards: every process must stop together
        finite = all_reduce_sum(finite, d) / d.world
    if finite.item() < 1:  # one device sync
        raise NonFiniteLossError(
            f"step {step + 1}: the update made weights non-finite; stopped without "
            f"saving this step; lower learning_rate ({cfg.learning_rate})"
        )
    return grad_norm


# --- metrics and progress --------------------------------------------------------------------------


def resume(ckpt: Path | None, model, optimizer, cfg: MPOConfig, d: Dist) -> State:
    """The state to start from: checkpoint `ckpt`'s (weights and optimizer restored too), or a fresh one."""
    state = State()
    if ckpt is not None:
        saved = load_checkpoint(ckpt, model, optimizer, state.running, cfg, d)
        state.step, state.dropped = saved["step"], saved.get("dropped", 0)
        log.info("resumed from %s at step %d", ckpt, state.step)
    return state


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


def train_row(
    sums: torch.Tensor,
    grad_norm,
    lr: float,
    state: State,
    cfg: MPOConfig,
    per_epoch: int,
    step_s: float,
    elapsed_s: float,
) -> dict:
    """metrics.jsonl's row for the step just taken (`state.step`), from the summed `sums`."""
    keys, values = loss_keys(cfg), sums.tolist()
    n_pairs, tokens = values[len(keys)], values[len(keys) + 1]
    return {
        "split": "train",
        "step": state.step,
        "epoch": round(state.step * cfg.grad_accum_steps / per_epoch, 4),
        "lr": lr,
        **{k: (v / n_pairs if n_pairs else float("nan")) for k, v in zip(keys, values)},
        "grad_norm": float(grad_norm),
        "pairs": int(n_pairs),
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


def save_final(model, processor, out: Path, state: State, cfg: MPOConfig, d: Dist) -> Path | None:
    """The trained model (LoRA merged), loadable by transformers and vLLM, with its processor."""
    if state.dropped and d.main:
        log.warning(
            "%d pair(s) longer than max_length=%d were dropped over the run (not cut)",
            state.dropped,
            cfg.max_length,
        )
    if not cfg.save_model:
        return None
    if d.sharded:  # every process sends its shards; the first writes the whole model
        weights = fsdp.full_state_dict(model)
        if not d.main:
            return None
        if cfg.lora:  # merged on a fresh CPU copy of the base model
            model = add_lora(
                load_model(cfg.model, cfg.dtype, cfg.attn_implementation, cfg.trust_remote_code),
                cfg.lora_r,
                cfg.lora_alpha,
                cfg.lora_dropout,
                cfg.lora_target_modules,
                freeze_vision=cfg.freeze_vision,
            )
            model.load_state_dict(weights)
            model.merge_and_unload().save_pretrained(out / "final")
        else:
            unwrap(model).save_pretrained(out / "final", state_dict=weights)
    elif not d.main:
        return None
    else:
        final = model.merge_and_unload() if cfg.lora else model
        final.save_pretrained(out / "final")
    processor.save_pretrained(out / "final")
    return out / "final"


# --- the loop --------------------------------------------------------------------------------------


def train(config: MPOConfig, *, model=None, processor=None, ref_model=None) -> dict:
    """Train with MPO as `config` says; returns the run's summary (also written to summary.json).

    `model`, `processor` and `ref_model` may be given as objects (e.g. a model built from a config
    in a benchmark); by default they are loaded from `config.model`. SFT on chosen responses only
    is `weights: [0, 0, 1]`: then no reference and no rejected responses are computed at all.
    """
    cfg, run_started = config, time.perf_counter()
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

    state = resume(ckpt, model, optimizer, cfg, d)
    metrics = out / "metrics.jsonl"
    keep_metrics_until(metrics, state.step, d)
    n_params = sum(p.numel() for p in params)
    announce(cfg, d, n_params, len(train_set), len(eval_set), total_steps, use_bf16)
    bar = progress_bar(total_steps, state.step, cfg, d)
    stream = micro_batches(train_set, state.step * cfg.grad_accum_steps, cfg, d, pad_id)
    started = time.perf_counter()
    while state.step < total_steps:
        lr = learning_rate(state.step, total_steps, cfg)
        sums, grad_norm, step_s = optimizer_step(
            model, params, optimizer, stream, ref, state, lr, cfg, d, autocast
        )
        state.step += 1
        state.dropped += int(sums[-1].item())
        state.last_train = train_row(
            sums, grad_norm, lr, state, cfg, per_epoch, step_s, time.perf_counter() - started
        )
        done = state.step == total_steps
        if state.step % cfg.log_every == 0 or done:
            write_row(metrics, state.last_train, d)
            show_step(bar, state.last_train, total_steps, cfg, d)
        bar.update(1)
        if len(eval_set) and (done or (cfg.eval_every and state.step % cfg.eval_every == 0)):
            scores = evaluate(model, eval_set, ref, state.running, cfg, d, autocast, pad_id)
            state.last_eval = {"split": "eval", "step": state.step, **scores}
            write_row(metrics, state.last_eval, d)
            show_eval(bar, state.last_eval, cfg, d)
        if cfg.save_every >= 0 and (done or (cfg.save_every and state.step % cfg.save_every == 0)):
            save_checkpoint(
                out, state.step, model, optimizer, state.running, cfg, d, {"dropped": state.dropped}
            )
    bar.close()
    steps_s = time.perf_counter() - started  # the steps, with their evaluations and checkpoints

    model_dir = save_final(model, processor, out, state, cfg, d)
    summary = {
        "output_dir": str(out),
        "model_dir": str(model_dir) if model_dir else None,
        "steps": total_steps,
        "train_pairs": len(train_set),
        "eval_pairs": len(eval_set),
        "trainable_parameters": n_params,
        **state_summary(state),
        "set_aside": reject_counts(rejects),  # pairs left out before training, by reason (rejects.jsonl)
        "reference_s": ref.precompute_s,
        "setup_s": started - run_started,
        "steps_s": steps_s,
        "run_s": time.perf_counter() - run_started,
    }
    write_summary(out, summary, d)
    return summary


def progress_bar(total_steps: int, step: int, cfg: MPOConfig, d) -> tqdm:
    return tqdm(
        total=total_steps,
        initial=step,
        desc="mpo",
        dynamic_ncols=True,
        disable=not (d.main and cfg.progress_bar),
        file=sys.stderr,
    )


def optimizer_step(model, params, optimizer, stream, ref, state, lr, cfg, d, autocast) -> tuple:
    """One optimiser step at learning rate `lr`: its micro-batches' gradients, averaged over
    processes, then the update. Returns (the summed loss terms, the gradient norm, seconds)."""
    t0 = time.perf_counter()
    for g in optimizer.param_groups:
        g["lr"] = lr
    sums = accumulate_gradients(model, stream, ref, state, cfg, d, autocast)
    if not d.sharded:  # FSDP reduce-scatters each micro-batch's gradients itself
        average_gradients(params, d)
    sums = all_reduce_sum(sums, d)
    grad_norm = apply_update(params, optimizer, sums, state.step, cfg, d)
    if d.device.type == "cuda":
        torch.cuda.synchronize()
    return sums, grad_norm, time.perf_counter() - t0


def state_summary(state) -> dict:
    """What the run ended with, for summary.json."""
    return {
        "dropped": state.dropped,
        "last_train": state.last_train,
        "last_eval": state.last_eval,
        "delta": float(state.running.mean),
    }


def write_summary(out: Path, summary: dict, d) -> None:
    if d.main:
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
    if d.world > 1:
        dist.barrier()


def cli_train(args) -> int:
    """`mmpr train CONFIG [--set KEY=VALUE ...]`: rc 0 on success, 2 for a bad config or data, 1 when
    training stops on a non-finite loss (nothing non-finite is saved)."""
    from mmpr_pipeline.recipe import parse_overrides

    try:
        cfg = config_mod.load(args.config, parse_overrides(args.set))
        args.resume_hint = (
            f"the last checkpoint in {cfg.output_dir} is kept: run the same command again to resume"
        )
        summary = train(cfg)
    except NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (config_mod.ConfigError, FileNotFoundError, NotADirectoryError, FileExistsError, ValueError) as e:
        print(f"error: {e}{kept_checkpoint(cfg) if isinstance(e, PairError) else ''}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
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
        print(
            learning_report(losses, summary["last_eval"]), file=sys.stderr
        )  # stdout stays one JSON document
    return 0


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
