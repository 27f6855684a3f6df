"""One optimizer step: the MPO loss of each micro-batch, its backward, the gradients averaged over
processes, then a clipped AdamW update at the step's learning rate.

    policy log-probs of chosen and rejected responses (one forward over both)
    reference log-probs (reference.py)
    -> mpo_loss -> backward (x grad_accum_steps) -> all-reduce grads -> clip -> AdamW
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from mmpr_pipeline.errors import NonFiniteLossError
from mmpr_pipeline.train import fsdp
from mmpr_pipeline.train.batches import to_device
from mmpr_pipeline.train.config import MPOConfig
from mmpr_pipeline.train.distributed import Dist, all_reduce_sum, average_gradients
from mmpr_pipeline.train.loss import RunningMean, mpo_loss
from mmpr_pipeline.train.model import response_logps
from mmpr_pipeline.train.reference import Reference, reference_logps

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


def loss_keys(cfg: MPOConfig) -> tuple[str, ...]:
    return PREF_KEYS if cfg.needs_reference else SFT_KEYS


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


@dataclass
class LossSums:
    """Sums over micro-batches (a step's, or an evaluation's): each loss term named in `keys` times
    the pairs it is the mean of, the pairs, their tokens, and the pairs dropped as too long."""

    keys: tuple[str, ...]
    terms: torch.Tensor  # one per key
    pairs: torch.Tensor
    tokens: torch.Tensor
    dropped: torch.Tensor

    @classmethod
    def zeros(cls, keys: tuple[str, ...], device: torch.device) -> LossSums:
        return cls(keys, *(torch.zeros(shape, device=device) for shape in (len(keys), (), (), ())))

    def add(self, parts: dict, n_pairs: int) -> None:
        self.terms += torch.stack([parts[k].float() for k in self.keys]) * n_pairs
        self.pairs += n_pairs

    def all_reduced(self, d: Dist) -> LossSums:
        """Summed over processes, in one all-reduce."""
        flat = torch.cat([self.terms, self.pairs[None], self.tokens[None], self.dropped[None]])
        flat = all_reduce_sum(flat, d)
        n = len(self.keys)
        return LossSums(self.keys, flat[:n], flat[n], flat[n + 1], flat[n + 2])

    def means(self, prefix: str = "") -> dict[str, float]:
        """Each loss term's mean over the pairs (NaN with no pair), by key."""
        n_pairs = self.pairs.item()
        return {
            f"{prefix}{k}": (v / n_pairs if n_pairs else float("nan"))
            for k, v in zip(self.keys, self.terms.tolist())
        }


def learning_rate(step: int, total: int, cfg: MPOConfig) -> float:
    """Linear warm-up to the peak, then a cosine down to `min_lr_ratio` of it."""
    warmup = int(cfg.warmup_ratio * total)
    if step < warmup:
        return cfg.learning_rate * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    ratio = cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return cfg.learning_rate * ratio


# --- the loss of a micro-batch ---------------------------------------------------------------------


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


def idle_forward(model, ref: Reference, cfg: MPOConfig) -> torch.Tensor:
    """What a process with no pair in a micro-batch runs in lockstep: the policy's (and a live
    reference's) forward on the stand-in pair; returns zero, joined to the graph, to backpropagate."""
    logps, _ = response_logps(model, model.standin)
    if cfg.needs_reference and not ref.tables:
        reference_logps(ref, model, model.standin, "train", logps.device)
    return 0 * logps.sum()


# --- one optimizer step ----------------------------------------------------------------------------


def warn_dropped(batch: dict, state: State, cfg: MPOConfig) -> None:
    """The first three pairs dropped as too long are named in the log; all are counted."""
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


def accumulate_gradients(
    model, stream, state: State, *, ref: Reference, cfg: MPOConfig, d: Dist, autocast
) -> LossSums:
    """Forward and backward over `grad_accum_steps` micro-batches of `stream`; returns this
    process's sums."""
    sums = LossSums.zeros(loss_keys(cfg), d.device)
    for _ in range(cfg.grad_accum_steps):
        batch = next(stream)
        warn_dropped(batch, state, cfg)
        sums.dropped += len(batch["dropped"])
        sft_denominator = sft_tokens(batch, cfg, d)
        if not batch["n_pairs"]:
            if d.world > 1 and cfg.needs_reference and cfg.bco_shift == "running_mean":
                # the other processes wait for this one's (absent) reward
                update_shift(state.running, None, d)
            if d.lockstep:
                with autocast():
                    idle_forward(model, ref, cfg).backward()
            continue
        batch = to_device(batch, d.device)
        with autocast():
            loss, parts = batch_loss(model, batch, "train", ref, state.running, cfg, d, sft_denominator)
        (loss / cfg.grad_accum_steps).backward()  # a micro-batch counts 1/grad_accum_steps, however full
        sums.add(parts, batch["n_pairs"])
        sums.tokens += batch["attention_mask"].sum()
    return sums


def apply_update(params, optimizer, sums: LossSums, step: int, cfg: MPOConfig, d: Dist) -> torch.Tensor:
    """Clip and step, or refuse a non-finite loss, gradient or update (NonFiniteLossError, before
    anything of this step is saved). `sums` are summed over processes, so every process sees a
    non-finite value and stops together. Returns the gradient norm."""
    n_pairs = sums.pairs.item()
    if n_pairs == 0:
        optimizer.zero_grad(set_to_none=True)
        log.warning("step %d: every pair of the step was dropped; no update", step + 1)
        return torch.zeros(())
    if not torch.isfinite(sums.terms).all():
        terms = ", ".join(f"{k} {v / n_pairs:.4g}" for k, v in zip(sums.keys, sums.terms.tolist()))
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


def optimizer_step(
    model,
    optimizer,
    stream,
    state: State,
    *,
    params,
    ref: Reference,
    lr: float,
    cfg: MPOConfig,
    d: Dist,
    autocast,
) -> tuple[LossSums, torch.Tensor, float]:
    """One optimiser step at learning rate `lr`: its micro-batches' gradients, averaged over
    processes, then the update. Returns (the loss sums over all processes, the gradient norm, seconds)."""
    t0 = time.perf_counter()
    for g in optimizer.param_groups:
        g["lr"] = lr
    sums = accumulate_gradients(model, stream, state, ref=ref, cfg=cfg, d=d, autocast=autocast)
    if not d.sharded:  # FSDP reduce-scatters each micro-batch's gradients itself
        average_gradients(params, d)
    sums = sums.all_reduced(d)
    grad_norm = apply_update(params, optimizer, sums, state.step, cfg, d)
    if d.device.type == "cuda":
        torch.cuda.synchronize()
    return sums, grad_norm, time.perf_counter() - t0
