"""The order a run sees its pairs in: each process's slice of every epoch's permutation, seeded so
that a resumed run sees exactly the batches the uninterrupted one would have."""

from __future__ import annotations

import math
from functools import partial

import torch
from torch.utils.data import DataLoader

from mmpr_pipeline.train.config import MPOConfig
from mmpr_pipeline.train.data import PairDataset, collate
from mmpr_pipeline.train.distributed import Dist


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


def to_device(batch: dict, device: torch.device) -> dict:
    return {
        k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()
    }


def run_length(n_pairs: int, cfg: MPOConfig, d: Dist) -> tuple[int, int]:
    """Micro-batches per epoch of one process's slice, and optimizer steps in the run."""
    per_epoch = math.ceil(n_pairs // d.world / cfg.batch_size)
    if cfg.max_steps > 0:
        return per_epoch, cfg.max_steps
    return per_epoch, max(1, math.ceil(cfg.epochs * per_epoch / cfg.grad_accum_steps))


def micro_batches(dataset: PairDataset, start: int, cfg: MPOConfig, d: Dist, pad_id: int):
    """The run's micro-batches from number `start` on: epoch e is a permutation seeded by seed + e."""
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
