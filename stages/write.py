"""Write: one finished work unit -> its files, on the Ray worker that holds it.

For a unit, in this order, each file replaced atomically (shards.write_table):
  rejects/<source>/unit-XXXXX.parquet   rows set aside, with their reasons (stages/load.py)
  samples/<source>/unit-XXXXX.parquet   every question with all its scored samples
  pairs/<source>/unit-XXXXX.parquet     the pairs the rules give on those samples (stages/pair.py)
  samples/<source>/unit-XXXXX.json      the unit's counts: written last, it marks the unit done
A restart skips units whose counts file names the same plan. The pair shards are cut from the
units' pair files at the end (pipeline.write_shards), so nothing a kill interrupts is ever half-visible.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import pyarrow as pa

from mmpr_pipeline import shards
from mmpr_pipeline.records import REJECT_SCHEMA, SAMPLE_SCHEMA
from mmpr_pipeline.units import SourceStats, WorkUnit, counts_file, unit_file
from stages.decontaminate import leak_benchmark, reason_group


def write_rejects(run_dir: Path, unit: WorkUnit, rejects: list[dict]) -> None:
    path = unit_file(run_dir, "rejects", unit.source, unit.unit)
    if rejects:
        shards.write_table(pa.Table.from_pylist(rejects, schema=REJECT_SCHEMA), path)
    elif path.exists():
        path.unlink()


def write_unit(
    run_dir: Path,
    unit: WorkUnit,
    rows: list[dict],
    rejects: list[dict],
    source_cfg,
    *,
    seed: int,
    model: str,
    sampling: dict,
    pair_schema: pa.Schema,
) -> dict[str, Any]:
    """Pair the unit's scored rows, write its samples, pairs and counts; returns the counts."""
    from stages.pair import pair_rows

    t0 = time.perf_counter()
    stats = SourceStats(rows=unit.stop - unit.start, rejects=len(rejects))
    for r in rejects:  # benchmark leaks and near-duplicates counted per benchmark / source, not per row
        group = reason_group(r["reason"])
        stats.reject_reasons[group] = stats.reject_reasons.get(group, 0) + 1
        if benchmark := leak_benchmark(r["reason"]):
            stats.leaks[benchmark] = stats.leaks.get(benchmark, 0) + 1
        stats.near_duplicates += group.startswith("near-duplicate of")
    rows = sorted(rows, key=lambda r: r["row_index"])
    pairs, all_wrong_qids = [], []
    for row in rows:
        found, counts = pair_rows(row, source_cfg, seed=seed, model=model, sampling=sampling)
        stats.add_row(row, counts)
        if counts["all_wrong"] and not row["error"]:
            all_wrong_qids.append(row["qid"])
        pairs += found
    t_pair = time.perf_counter() - t0
    shards.write_table(
        pa.Table.from_pylist(rows, schema=SAMPLE_SCHEMA),
        unit_file(run_dir, "samples", unit.source, unit.unit),
    )
    shards.kill_point("unit_wrote_samples", whole_run=True)
    pair_path = shards.write_table(
        pa.Table.from_pylist(pairs, schema=pair_schema), unit_file(run_dir, "pairs", unit.source, unit.unit)
    )
    shards.kill_point("unit_wrote_pairs", whole_run=True)
    counts = dict(
        key=unit.key,
        source=unit.source,
        unit=unit.unit,
        plan=dataclasses.asdict(unit),
        stats=stats.to_dict(),
        all_wrong_qids=all_wrong_qids,
        pair_rows=len(pairs),
        pair_bytes=pair_path.stat().st_size,
        pair_seconds=round(t_pair, 4),
        write_seconds=round(time.perf_counter() - t0 - t_pair, 4),
    )
    shards.write_json(counts_file(run_dir, unit), counts)
    return counts


def summary_row(counts: dict[str, Any]) -> dict[str, Any]:
    """What travels back to the driver for a finished unit: a few numbers, never rows."""
    return dict(
        source=counts["source"],
        unit=counts["unit"],
        rows=counts["stats"]["rows"],
        questions=counts["stats"]["questions"],
        pairs=counts["pair_rows"],
    )


def read_counts(run_dir: Path, unit: WorkUnit) -> dict[str, Any]:
    return json.loads(counts_file(run_dir, unit).read_text())
