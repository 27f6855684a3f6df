"""The MPO training loop: one function, `train(config)`, to read top to bottom.

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

import copy
import json
import logging
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from mmpr_pipeline.records import stable_hash
from mmpr_pipeline.train import config as config_mod
from mmpr_pipeline.train.config import MPOConfig
from mmpr_pipeline.train.data import PairDataset, PairEncoder, collate, load_pairs, select, split_pairs
from mmpr_pipeline.train.loss import RunningMean, mpo_loss
from mmpr_pipeline.train.model import (add_lora, freeze_vision, load_model, load_processor, response_logps,
                                       unwrap)

log = logging.getLogger("mmpr.train")

PREF_KEYS = ("loss", "preference", "bco", "sft", "chosen_reward", "rejected_reward", "reward_margin",
             "reward_accuracy", "delta")
SFT_KEYS = ("loss", "sft")
# Keys that may change between an interrupted run and its resumption without changing the result.
RESUMABLE_KEYS = {"resume", "resume_with_changes", "progress_bar", "log_every", "eval_every", "save_every",
                  "save_total_limit", "num_workers", "eval_batch_size", "save_model", "output_dir"}


class NonFiniteLossError(RuntimeError):
    """Training produced a non-finite loss, gradient or weight: it stops before saving anything from
    that step (a model of NaNs must never look like a finished run)."""


# --- processes and devices -------------------------------------------------------------------------

@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed() -> Dist:
    """One process per device; `torchrun` and `accelerate launch` set WORLD_SIZE, RANK, LOCAL_RANK."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local}") if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(rank=dist.get_rank() if world > 1 else 0, world=world, device=device)


def all_reduce_sum(t: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.world > 1:
        dist.all_reduce(t)
    return t


def loader(dataset: PairDataset, batches: list[list[int]], pad_id: int, num_workers: int, seed: int = 0):
    """Batches of `dataset` in the given order. The loader gets its own generator: one that drew
    from the global RNG would shift LoRA dropout and initialisation whenever a loader is created
    (an evaluation, a precompute pass, a resumption), and a resumed run would drift."""
    return DataLoader(dataset, batch_sampler=batches, collate_fn=partial(collate, pad_token_id=pad_id),
                      num_workers=num_workers, generator=torch.Generator().manual_seed(seed))


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


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
def precompute_reference(model, dataset: PairDataset, cfg: MPOConfig, d: Dist, autocast, pad_id: int,
                         cache: Path) -> torch.Tensor:
    """log pi_ref of every pair's chosen and rejected response, shape [pairs, 2] (NaN for dropped
    pairs), computed once before training so that training holds a single model. Cached in
    `cache`, keyed by model, data and encoding settings."""
    key = stable_hash("reference", cfg.model, cfg.dtype, cfg.bf16, cfg.max_length, cfg.max_pixels, dataset.ids())
    if cache.exists():
        saved = torch.load(cache, map_location="cpu")
        if saved.get("key") == key:
            return saved["logps"]
    was_training = model.training
    model.eval()
    logps = torch.zeros(len(dataset), 2)
    filled = torch.zeros(len(dataset))
    mine = list(range(d.rank, len(dataset), d.world))
    batches = [mine[i:i + cfg.eval_batch_size] for i in range(0, len(mine), cfg.eval_batch_size)]
    for batch in tqdm(loader(dataset, batches, pad_id, cfg.num_workers), desc="reference log-probs", disable=not (d.main and cfg.progress_bar)):
        if not batch["n_pairs"]:
            continue
        n, index = batch["n_pairs"], batch["index"]
        with autocast():
            seq, _ = response_logps(model, to_device(batch, d.device))
        logps[index, 0], logps[index, 1] = seq[:n].float().cpu(), seq[n:].float().cpu()
        filled[index] = 1
    sums = all_reduce_sum(torch.cat([logps.flatten(), filled]).to(d.device), d).cpu()
    logps, filled = sums[:-len(dataset)].view(-1, 2), sums[-len(dataset):]
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


def save_checkpoint(output_dir: Path, step: int, model, optimizer, running: RunningMean, cfg: MPOConfig,
                    d: Dist, extra: dict) -> None:
    rng = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if d.device.type == "cuda" else None}
    rngs = [None] * d.world
    if d.world > 1:
        dist.all_gather_object(rngs, rng)
    else:
        rngs = [rng]
    if d.main:
        state = {
            "step": step,
            "trainable": {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad},
            "optimizer": optimizer.state_dict(),
            "running": running.state_dict(),
            "rng": rngs,
            "config": cfg.to_dict(),
            **extra,
        }
        final = output_dir / f"checkpoint-{step:06d}"
        tmp = output_dir / f".tmp-checkpoint-{step:06d}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        torch.save(state, tmp / "state.pt")
        (tmp / "config.json").write_text(config_mod.to_json(cfg))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)  # a checkpoint exists whole or not at all
        for old in sorted(output_dir.glob("checkpoint-*"))[:-cfg.save_total_limit]:
            shutil.rmtree(old, ignore_errors=True)
    if d.world > 1:
        dist.barrier()


def config_changes(path: Path, cfg: MPOConfig) -> dict:
    """{key: (saved, now)} for the keys that change the result, between checkpoint `path`'s config and `cfg`."""
    saved_file = path / "config.json"
    saved = (json.loads(saved_file.read_text()) if saved_file.exists()
             else torch.load(path / "state.pt", map_location="cpu", weights_only=False)["config"])
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
            cfg.file, "output_dir", f"{path} was saved with another config ({diff}); use a new output_dir, "
            "--set resume=false to start over in it, or --set resume_with_changes=true to continue it anyway")
    log.warning("resuming %s with a config that differs from the one it was saved with: %s", path, diff)


def load_checkpoint(path: Path, model, optimizer, running: RunningMean, cfg: MPOConfig, d: Dist) -> dict:
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=False)
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


# --- the loop --------------------------------------------------------------------------------------

def train(config: MPOConfig, *, model=None, processor=None, ref_model=None) -> dict:
    """Train with MPO as `config` says; returns the run's summary (also written to summary.json).

    `model`, `processor` and `ref_model` may be given as objects (e.g. a model built from a config
    in a benchmark); by default they are loaded from `config.model`. SFT on chosen responses only
    is `weights: [0, 0, 1]`: then no reference and no rejected responses are computed at all.
    """
    cfg = config
    run_started = time.perf_counter()
    d = setup_distributed()
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise config_mod.ConfigError(cfg.file, "output_dir", f"{out} is a file, not a folder")
    ckpt = latest_checkpoint(out) if cfg.resume and out.is_dir() else None
    if ckpt is not None:  # before anything is written: a refused resume leaves the folder as it was
        check_resumable(ckpt, cfg)

    # Data: pairs and the held-out split, read before output_dir is made: a run without data must
    # leave no folder behind (runs/demo/mpo would make `make build-mmpr` refuse runs/demo).
    pairs = select(load_pairs(cfg.data), cfg.pair_types)
    if cfg.eval_data:
        train_table, eval_table = pairs, select(load_pairs(cfg.eval_data), cfg.pair_types)
    else:
        train_table, eval_table = split_pairs(pairs, cfg.eval_fraction, cfg.seed)
    train_table = select(train_table, limit=cfg.limit)
    if train_table.num_rows < d.world:
        raise ValueError(f"{cfg.data}: {train_table.num_rows} training pairs for {d.world} process(es)")
    if d.main:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise config_mod.ConfigError(cfg.file, "output_dir", f"cannot create {out}: {e.strerror}") from None
        (out / "config.json").write_text(config_mod.to_json(cfg))
    torch.manual_seed(cfg.seed)  # the same initial weights (e.g. LoRA's) in every process

    # The encoder renders pairs with the model's own template.
    processor = processor or load_processor(cfg.model, cfg.max_pixels)
    pad_id = getattr(processor, "tokenizer", processor).pad_token_id
    encoder = PairEncoder(processor, cfg.max_length, with_rejected=cfg.needs_reference)
    train_set, eval_set = PairDataset(train_table, encoder), PairDataset(eval_table, encoder)

    # The policy, in float32 with bf16 autocast (or in the dtype asked for).
    model = model if model is not None else load_model(cfg.model, cfg.dtype, cfg.attn_implementation)
    model.to(d.device)
    if cfg.freeze_vision:
        freeze_vision(model)
    use_bf16 = (d.device.type == "cuda" and torch.cuda.is_bf16_supported()) if cfg.bf16 == "auto" else cfg.bf16
    autocast = partial(torch.autocast, d.device.type, dtype=torch.bfloat16, enabled=bool(use_bf16))

    # The reference: precomputed (one model in memory), a frozen copy, or the policy without adapters.
    ref_tables: dict[str, torch.Tensor] = {}
    reference_s = 0.0  # the precompute pass: part of the run's cost, reported in the summary
    if cfg.needs_reference:
        if ref_model is not None:
            ref_model.to(d.device).eval().requires_grad_(False)
        if cfg.reference == "precomputed":
            t0 = time.perf_counter()
            scorer = ref_model if ref_model is not None else model
            ref_tables["train"] = precompute_reference(scorer, train_set, cfg, d, autocast, pad_id,
                                                       out / "reference_logps.pt")
            if len(eval_set):
                ref_tables["eval"] = precompute_reference(scorer, eval_set, cfg, d, autocast, pad_id,
                                                          out / "reference_logps_eval.pt")
            reference_s = time.perf_counter() - t0
            ref_model = None
        elif ref_model is None and not cfg.lora:
            ref_model = copy.deepcopy(model).eval().requires_grad_(False)
    else:
        ref_model = None
    if cfg.lora:
        model = add_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_target_modules,
                         freeze_vision=cfg.freeze_vision)
    if cfg.gradient_checkpointing:
        unwrap(model).gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()

    params = [p for p in model.parameters() if p.requires_grad]
    if d.world > 1:  # start every process from rank 0's weights, as DistributedDataParallel does
        for p in params:
            dist.broadcast(p.data, 0)
    torch.manual_seed(cfg.seed + d.rank)  # but different dropout in each
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]  # biases, norms
    optimizer = torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=tuple(cfg.adam_betas),
                                  fused=d.device.type == "cuda")
    running = RunningMean()

    def reference_logps(batch: dict, split: str) -> torch.Tensor:
        if ref_tables:
            t = ref_tables[split][batch["index"].cpu()]
            return torch.cat([t[:, 0], t[:, 1]]).to(d.device)
        with torch.no_grad():
            if ref_model is not None:
                return response_logps(ref_model, batch)[0]
            with model.disable_adapter():  # LoRA: the base model is the reference
                return response_logps(model, batch)[0]

    def update_shift(mean_reward: torch.Tensor | None) -> torch.Tensor:
        """Feed this micro-batch's mean reward (one per process) into the running mean delta."""
        if d.world == 1:
            return running.update(mean_reward)
        mine = torch.stack([mean_reward if mean_reward is not None else torch.zeros((), device=d.device),
                            torch.tensor(float(mean_reward is not None), device=d.device)])
        everyone = [torch.empty_like(mine) for _ in range(d.world)]
        dist.all_gather(everyone, mine)
        return running.update(*[m for m, present in everyone if present])

    def sft_tokens(batch: dict) -> torch.Tensor | None:
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

    def batch_loss(batch: dict, split: str, sft_denominator: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
        n = batch["n_pairs"]
        logps, n_tokens = response_logps(model, batch)  # [chosen..., rejected...]
        # L_g (MPO Eq. 8): the negative log-likelihood per token over the batch's chosen responses, as
        # TRL's `sft` loss type computes it (pooled over tokens, not averaged per sequence).
        denominator = sft_denominator if sft_denominator is not None else n_tokens[:n].sum().clamp(min=1)
        chosen_nll = -logps[:n].sum() / denominator
        if not cfg.needs_reference:  # SFT only
            loss = cfg.weights[2] * chosen_nll
            return loss, {"loss": loss.detach(), "sft": chosen_nll.detach()}
        ref = reference_logps(batch, split)
        delta = torch.zeros((), device=d.device)
        if cfg.bco_shift == "running_mean":
            # Updated with this batch before it is used, as in the paper's reference code; held-out
            # evaluation reads it without moving it.
            mean_reward = cfg.beta * (logps.detach() - ref).mean()
            delta = update_shift(mean_reward) if split == "train" else torch.as_tensor(running.mean, device=d.device)
        loss, parts = mpo_loss(logps[:n], logps[n:], ref[:n], ref[n:], chosen_nll, beta=cfg.beta,
                               weights=tuple(cfg.weights), delta=delta, preference=cfg.preference_loss)
        return loss, {"loss": loss.detach(), **parts, "delta": torch.as_tensor(delta, device=d.device).float()}

    keys = PREF_KEYS if cfg.needs_reference else SFT_KEYS

    # Held-out reward accuracy per pair type too: a mean over all pairs hides which kind is learnt.
    eval_types = pair_types_of(eval_set.table) if cfg.needs_reference else []

    @torch.no_grad()
    def evaluate() -> dict:
        model.eval()
        mine = list(range(d.rank, len(eval_set), d.world))
        batches = [mine[i:i + cfg.eval_batch_size] for i in range(0, len(mine), cfg.eval_batch_size)]
        sums = torch.zeros(len(keys) + 1, device=d.device)
        by_type = torch.zeros(len(eval_types), 2, device=d.device)  # [correct, pairs] per pair type
        for batch in loader(eval_set, batches, pad_id, cfg.num_workers):
            if not batch["n_pairs"]:
                continue
            batch = to_device(batch, d.device)
            with autocast():
                _, parts = batch_loss(batch, "eval")
            sums += torch.stack([parts[k].float() for k in keys] + [torch.ones((), device=d.device)]) * batch["n_pairs"]
            if eval_types:
                by_type += tally_by_type(parts["margins"], batch["index"], eval_set.table, eval_types)
        sums = all_reduce_sum(sums, d).tolist()
        by_type = all_reduce_sum(by_type, d).tolist()
        model.train()
        n = sums[-1]
        row = {"eval_pairs": int(n), **{f"eval_{k}": (s / n if n else float("nan")) for k, s in zip(keys, sums)}}
        for t, (correct, pairs) in zip(eval_types, by_type):
            row[f"eval_reward_accuracy_{t}"] = correct / pairs if pairs else float("nan")
            row[f"eval_pairs_{t}"] = int(pairs)
        return row

    # How long: micro-batches per epoch of this process's slice, optimizer steps in the run.
    per_rank = len(train_set) // d.world
    per_epoch = math.ceil(per_rank / cfg.batch_size)
    total_steps = cfg.max_steps if cfg.max_steps > 0 else max(1, math.ceil(cfg.epochs * per_epoch / cfg.grad_accum_steps))

    def micro_batches(start: int):
        """The run's micro-batches from number `start` on: epoch e is a permutation seeded by seed + e,
        so a resumed run sees exactly the batches the uninterrupted one would have."""
        m = start
        while True:
            epoch, pos = divmod(m, per_epoch)
            order = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(cfg.seed + epoch))
            mine = order[:per_rank * d.world].tolist()[d.rank::d.world]
            batches = [mine[i:i + cfg.batch_size] for i in range(0, len(mine), cfg.batch_size)]
            for batch in loader(train_set, batches[pos:], pad_id, cfg.num_workers, cfg.seed + epoch):
                yield batch
                m += 1

    # Resume.
    start_step, dropped_total = 0, 0
    if ckpt is not None:
        state = load_checkpoint(ckpt, model, optimizer, running, cfg, d)
        start_step, dropped_total = state["step"], state.get("dropped", 0)
        log.info("resumed from %s at step %d", ckpt, start_step)
    metrics_path = out / "metrics.jsonl"
    if d.main:  # rows written after the checkpoint belong to the abandoned continuation
        old = metrics_path.read_text().splitlines() if metrics_path.exists() else []
        kept = [r for r in old if r.strip() and json.loads(r)["step"] <= start_step]
        metrics_path.write_text("".join(r + "\n" for r in kept))

    def write(row: dict) -> None:
        if d.main:
            with metrics_path.open("a") as f:
                f.write(json.dumps(row) + "\n")

    bar = tqdm(total=total_steps, initial=start_step, desc="mpo", dynamic_ncols=True,
               disable=not (d.main and cfg.progress_bar), file=sys.stderr)
    n_params = sum(p.numel() for p in params)
    if d.main:
        log.info("training %s (%.2fM trainable parameters) on %d pairs (%d held out), %d steps, %s%s",
                 cfg.model, n_params / 1e6, len(train_set), len(eval_set), total_steps, d.device,
                 ", bf16 autocast" if use_bf16 else "")
    stream = micro_batches(start_step * cfg.grad_accum_steps)
    started = time.perf_counter()
    warned = 0
    last_train, last_eval = {}, {}
    for step in range(start_step, total_steps):
        t0 = time.perf_counter()
        lr = learning_rate(step, total_steps, cfg)
        for g in optimizer.param_groups:
            g["lr"] = lr
        sums = torch.zeros(len(keys) + 3, device=d.device)  # keys..., pairs, tokens, dropped
        for _ in range(cfg.grad_accum_steps):
            batch = next(stream)
            for x in batch["dropped"]:
                if warned < 3:
                    log.warning("pair %s is %d tokens long, over max_length=%d: dropped, not cut (counted as "
                                "`dropped` in metrics.jsonl)", x.pair_id, x.length, cfg.max_length)
                warned += 1
            sums[-1] += len(batch["dropped"])
            sft_denominator = sft_tokens(batch)
            if not batch["n_pairs"]:
                if d.world > 1 and cfg.needs_reference and cfg.bco_shift == "running_mean":
                    update_shift(None)  # the other processes wait for this one's (absent) reward
                continue
            batch = to_device(batch, d.device)
            with autocast():
                loss, parts = batch_loss(batch, "train", sft_denominator)
            (loss / cfg.grad_accum_steps).backward()  # a micro-batch counts 1/grad_accum_steps, however full
            n = batch["n_pairs"]
            sums[:len(keys)] += torch.stack([parts[k].float() for k in keys]) * n
            sums[len(keys)] += n
            sums[len(keys) + 1] += batch["attention_mask"].sum()
        if d.world > 1:  # average gradients over processes: one all-reduce per step
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            handles = [dist.all_reduce(p.grad, async_op=True) for p in params]
            for h in handles:
                h.wait()
            for p in params:
                p.grad /= d.world
        sums = all_reduce_sum(sums, d)
        n_pairs = sums[len(keys)].item()
        if n_pairs == 0:
            optimizer.zero_grad(set_to_none=True)
            log.warning("step %d: every pair of the step was dropped; no update", step + 1)
            grad_norm = torch.zeros(())
        else:
            # Summed over processes, so every process sees a non-finite value and stops together.
            if not torch.isfinite(sums[:len(keys)]).all():
                terms = ", ".join(f"{k} {v / n_pairs:.4g}" for k, v in zip(keys, sums.tolist()))
                raise NonFiniteLossError(f"step {step + 1}: non-finite loss ({terms}); stopped without saving "
                                         f"this step; lower learning_rate ({cfg.learning_rate}) or check the data")
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            if not torch.isfinite(grad_norm):
                raise NonFiniteLossError(f"step {step + 1}: non-finite gradient norm ({float(grad_norm)}); stopped "
                                         "without saving this step; lower learning_rate or check the data")
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if not torch.stack([torch.isfinite(p).all() for p in params]).all():  # one device sync
                raise NonFiniteLossError(f"step {step + 1}: the update made weights non-finite; stopped without "
                                         f"saving this step; lower learning_rate ({cfg.learning_rate})")
        if d.device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        dropped_total += int(sums[-1].item())
        values = sums.tolist()
        row = {"split": "train", "step": step + 1,
               "epoch": round((step + 1) * cfg.grad_accum_steps / per_epoch, 4), "lr": lr,
               **{k: (v / n_pairs if n_pairs else float("nan")) for k, v in zip(keys, values)},
               "grad_norm": float(grad_norm), "pairs": int(n_pairs), "tokens": int(values[len(keys) + 1]),
               "tokens_per_s": values[len(keys) + 1] / dt, "step_s": dt,
               "elapsed_s": time.perf_counter() - started, "dropped": dropped_total}
        last_train = row
        if (step + 1) % cfg.log_every == 0 or step + 1 == total_steps:
            write(row)
            postfix = {"loss": f"{row['loss']:.4f}"}
            if cfg.needs_reference:
                postfix.update(margin=f"{row['reward_margin']:.4f}", acc=f"{row['reward_accuracy']:.2f}",
                               delta=f"{row['delta']:.4f}")
            bar.set_postfix(postfix, refresh=False)
            if not cfg.progress_bar and d.main:
                log.info("step %d/%d %s", step + 1, total_steps, " ".join(f"{k}={v}" for k, v in postfix.items()))
        bar.update(1)
        done = step + 1 == total_steps
        if len(eval_set) and (done or (cfg.eval_every and (step + 1) % cfg.eval_every == 0)):
            last_eval = {"split": "eval", "step": step + 1, **evaluate()}
            write(last_eval)
            if d.main:
                line = " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                                for k, v in last_eval.items() if k != "split")
                if cfg.progress_bar:
                    bar.write(line, file=sys.stderr)
                else:
                    log.info(line)
        if cfg.save_every >= 0 and (done or (cfg.save_every and (step + 1) % cfg.save_every == 0)):
            save_checkpoint(out, step + 1, model, optimizer, running, cfg, d, {"dropped": dropped_total})
    bar.close()
    steps_s = time.perf_counter() - started  # the steps, with their evaluations and checkpoints

    if dropped_total and d.main:
        log.warning("%d pair(s) longer than max_length=%d were dropped over the run (not cut)",
                    dropped_total, cfg.max_length)
    model_dir = None
    if cfg.save_model and d.main:
        model_dir = out / "final"
        final = model.merge_and_unload() if cfg.lora else model
        final.save_pretrained(model_dir)
        processor.save_pretrained(model_dir)
    summary = {"output_dir": str(out), "model_dir": str(model_dir) if model_dir else None, "steps": total_steps,
               "train_pairs": len(train_set), "eval_pairs": len(eval_set), "dropped": dropped_total,
               "trainable_parameters": n_params, "last_train": last_train, "last_eval": last_eval,
               "delta": float(running.mean), "reference_s": reference_s,
               "setup_s": started - run_started, "steps_s": steps_s,
               "run_s": time.perf_counter() - run_started}
    if d.main:
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
    if d.world > 1:
        dist.barrier()
    return summary


def cli_train(args) -> int:
    """`mmpr train CONFIG [--set KEY=VALUE ...]`: rc 0 on success, 2 for a bad config or data, 1 when
    training stops on a non-finite loss (nothing non-finite is saved)."""
    from mmpr_pipeline.recipe import parse_overrides

    try:
        cfg = config_mod.load(args.config, parse_overrides(args.set))
        summary = train(cfg)
    except NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (config_mod.ConfigError, FileNotFoundError, NotADirectoryError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        rows = (Path(summary["output_dir"]) / "metrics.jsonl").read_text().splitlines()
        losses = [r["loss"] for r in map(json.loads, rows) if r["split"] == "train"]
        q = max(1, len(losses) // 4)
        print(json.dumps({k: summary[k] for k in ("output_dir", "model_dir", "steps", "dropped")}
                         | {"train_loss": {"first_quarter": round(sum(losses[:q]) / q, 4),
                                           "last_quarter": round(sum(losses[-q:]) / q, 4)},
                            "last_eval": summary["last_eval"]}, indent=2))
        print(learning_report(losses, summary["last_eval"]), file=sys.stderr)  # stdout stays one JSON document
    return 0


def learning_report(losses: list[float], last_eval: dict) -> str:
    """What a user should see at the end of a run: whether the training loss fell (the mean of the
    first vs the last quarter of the logged steps; single steps are noisy) and the held-out reward
    accuracy, overall and per pair type (chance is 0.5)."""
    q = max(1, len(losses) // 4)
    first, last = sum(losses[:q]) / q, sum(losses[-q:]) / q
    lines = [f"train loss: {first:.4f} (first quarter of {len(losses)} steps) -> {last:.4f} (last quarter), "
             + ("falling" if last < first else "NOT falling")]
    if "eval_reward_accuracy" in last_eval:
        kinds = sorted(k[len("eval_pairs_"):] for k in last_eval if k.startswith("eval_pairs_"))
        per_type = ", ".join(f"{t} {last_eval[f'eval_reward_accuracy_{t}']:.3f} ({last_eval[f'eval_pairs_{t}']} pairs)"
                             for t in kinds)
        lines.append(f"held-out reward accuracy: {last_eval['eval_reward_accuracy']:.3f} on "
                     f"{last_eval['eval_pairs']} pairs (chance 0.5)" + (f"; by pair type: {per_type}" if kinds else ""))
    elif "eval_loss" in last_eval:
        lines.append(f"held-out loss: {last_eval['eval_loss']:.4f} on {last_eval['eval_pairs']} pairs")
    return "\n".join(lines)
