"""Write: scored samples -> work-unit files as they complete; then all units -> pair shards.

Runs on the driver, the single writer, so it is correct on a Ray cluster without a shared file
system. A unit file is written only once all its questions are in, atomically; a restart skips
units whose file exists.
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import pyarrow as pa

from mmpr_pipeline import shards
from mmpr_pipeline.records import SAMPLE_SCHEMA


class UnitCollector:
    """Gathers sample rows by (source, unit) and writes each unit when it is complete."""

    def __init__(self, run_dir: str | Path, expected: dict[tuple[str, int], int]):
        self.run_dir = Path(run_dir)
        self.expected = dict(expected)
        self.pending: dict[tuple[str, int], list[dict]] = defaultdict(list)
        self.written: list[Path] = []

    def add(self, rows: list[dict]) -> int:
        """Returns the number of questions added."""
        for row in rows:
            key = (row["source"], row["unit"])
            self.pending[key].append(row)
            if len(self.pending[key]) == self.expected[key]:
                unit_rows = sorted(self.pending.pop(key), key=lambda r: r["row_index"])
                path = shards.unit_path(self.run_dir, *key)
                shards.write_table(pa.Table.from_pylist(unit_rows, schema=SAMPLE_SCHEMA), path)
                self.written.append(path)
                shards.kill_point("after_unit", len(self.written))
        return len(rows)

    def incomplete(self) -> list[tuple[str, int]]:
        return sorted(k for k in self.expected if shards.unit_path(self.run_dir, *k) not in self.written)
