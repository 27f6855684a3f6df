"""Held-out evaluation: the loss parts over the held-out pairs, and the reward accuracy per pair type
(a mean over all pairs hides which kind is learnt). BCO's shift is read, never moved."""

from __future__ import annotations

import torch

from mmpr_pipeline.train import fsdp
from mmpr_pipeline.train.batches import loader, rank_batches, to_device
from mmpr_pipeline.train.config import MPOConfig
from mmpr_pipeline.train.data import PairDataset
from mmpr_pipeline.train.distributed import Dist, all_reduce_sum
from mmpr_pipeline.train.loss import RunningMean
from mmpr_pipeline.train.reference import Reference
from mmpr_pipeline.train.step import LossSums, batch_loss, idle_forward, loss_keys


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


@torch.no_grad()
def evaluate(
    model,
    eval_set: PairDataset,
    *,
    ref: Reference,
    running: RunningMean,
    cfg: MPOConfig,
    d: Dist,
    autocast,
    pad_id: int,
) -> dict:
    """metrics.jsonl's eval row, without its split and step: eval_<loss part> over the held-out
    pairs, and eval_reward_accuracy_<type> with eval_pairs_<type> per pair type."""
    types = pair_types_of(eval_set.table) if cfg.needs_reference else []
    model.eval()
    batches = rank_batches(len(eval_set), cfg.eval_batch_size, d)
    sums = LossSums.zeros(loss_keys(cfg), d.device)
    by_type = torch.zeros(len(types), 2, device=d.device)  # [correct, pairs] per pair type
    for batch in loader(eval_set, batches, pad_id, cfg.num_workers):
        if not batch["n_pairs"]:
            if d.lockstep:
                idle_forward(model, ref, cfg)
            continue
        batch = to_device(batch, d.device)
        with autocast():
            _, parts = batch_loss(model, batch, "eval", ref, running, cfg, d)
        sums.add(parts, batch["n_pairs"])
        if types:
            by_type += tally_by_type(parts["margins"], batch["index"], eval_set.table, types)
    sums = sums.all_reduced(d)
    by_type = all_reduce_sum(by_type, d).tolist()
    fsdp.reshard(model)
    model.train()
    row = {"eval_pairs": int(sums.pairs.item()), **sums.means(prefix="eval_")}
    for t, (correct, pairs) in zip(types, by_type):
        row[f"eval_reward_accuracy_{t}"] = correct / pairs if pairs else float("nan")
        row[f"eval_pairs_{t}"] = int(pairs)
    return row
