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
from mmpr_pipeline.decontam import leak_benchmark, reason_group
from mmpr_pipeline.records import REJECT_SCHEMA, SAMPLE_SCHEMA
from mmpr_pipeline.units import SourceStats, WorkUnit, counts_file, unit_file


def write_rejects(run_dir: Path, unit: WorkUnit, rejects: list[dict]) -> None:
    path = unit_file(run_dir, "rejects", unit.source, unit.unit)
    if rejects:
        shards.write_table(pa.Table.from_pylist(rejects, schema=REJECT_SCHEMA), path)
    elif path.exists():
        path.unlink()


def unit_stats(unit: WorkUnit, rejects: list[dict]) -> SourceStats:
    """A unit's counts before its questions are paired: its rows and what was set aside, benchmark
    leaks and near-duplicates counted per benchmark / source, not per row."""
    stats = SourceStats(rows=unit.stop - unit.start, rejects=len(rejects))
    for r in rejects:
        group = reason_group(r["reason"])
        stats.reject_reasons[group] = stats.reject_reasons.get(group, 0) + 1
        if benchmark := leak_benchmark(r["reason"]):
            stats.leaks[benchmark] = stats.leaks.get(benchmark, 0) + 1
        stats.near_duplicates += group.startswith("near-duplicate of")
    return stats


def write_unit(
    run_dir: Path,
    unit: WorkUnit,
    rows: list[dict],
    pairs: list[dict],
    stats: SourceStats,
    all_wrong_qids: list[str],
    *,
    pair_seconds: float,
    pair_schema: pa.Schema,
) -> dict[str, Any]:
    """Write a paired unit's samples, pairs and counts (the counts last: they mark it done); returns
    the counts."""
    t0 = time.perf_counter()
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
        pair_seconds=round(pair_seconds, 4),
        write_seconds=round(time.perf_counter() - t0, 4),
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
