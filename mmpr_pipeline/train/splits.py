"""The pairs a run trains and evaluates on: the pairs training cannot use are set aside (and listed
in output_dir/rejects.jsonl) before anything is trained, and a run folder a build has not finished is
refused."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from mmpr_pipeline.train.config import MPOConfig
from mmpr_pipeline.train.data import load_pairs, select, set_aside_bad_pairs, split_pairs
from mmpr_pipeline.train.distributed import Dist

log = logging.getLogger("mmpr.train")


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
