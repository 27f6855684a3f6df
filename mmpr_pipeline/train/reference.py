"""Where log pi_ref comes from: per-split tables computed once before training (`reference:
precomputed`, so that training holds a single model), a frozen copy of the policy, or, under LoRA,
the policy itself with its adapters off."""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from mmpr_pipeline.records import stable_hash
from mmpr_pipeline.train import fsdp
from mmpr_pipeline.train.batches import loader, rank_batches, to_device
from mmpr_pipeline.train.config import MPOConfig
from mmpr_pipeline.train.data import PairDataset
from mmpr_pipeline.train.distributed import Dist, all_reduce_sum
from mmpr_pipeline.train.model import policy_of, response_logps

log = logging.getLogger("mmpr.train")


@dataclass
class Reference:
    """Per-split tables of log pi_ref, a frozen model, or with neither the policy's adapters off."""

    tables: dict[str, torch.Tensor] = field(default_factory=dict)
    model: Any = None
    precompute_s: float = 0.0  # the precompute pass: part of the run's cost, reported in the summary


@torch.no_grad()
def precompute_reference(
    model, dataset: PairDataset, cfg: MPOConfig, d: Dist, autocast, pad_id: int, cache: Path
) -> torch.Tensor:
    """log pi_ref of every pair's chosen and rejected response, shape [pairs, 2] (NaN for dropped
    pairs). Cached in `cache`, keyed by model, data and encoding settings."""
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
