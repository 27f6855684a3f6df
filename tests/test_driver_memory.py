"""The build's driver holds no rows: what it reads at commit stays the size of one unit's pairs
whatever the size of the run, and the phase hook that benchmarks/bench_scale.py reads logs each
phase's own peak (VmHWM). Memory is measured in a fresh process, as the kernel counts it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from mmpr_pipeline import peak_memory

REPO = Path(__file__).resolve().parent.parent
MIB = 2**20


def _phases(log: Path) -> dict[str, dict]:
    return {d["phase"]: d for d in map(json.loads, log.read_text().splitlines())}


def test_phase_end_logs_each_phase_peak_and_is_off_by_default(tmp_path, monkeypatch):
    log = tmp_path / "peaks.jsonl"
    monkeypatch.delenv(peak_memory.ENV, raising=False)
    peak_memory.phase_end("off")
    assert not log.exists()

    monkeypatch.setenv(peak_memory.ENV, str(log))
    peak_memory.phase_end("before")
    block = bytearray(96 * MIB)  # zero-filled: resident
    del block
    peak_memory.phase_end("allocated")
    peak_memory.phase_end("after")
    p = _phases(log)
    assert list(p) == ["before", "allocated", "after"]
    assert p["allocated"]["peak_mib"] >= p["before"]["rss_mib"] + 90
    assert p["allocated"]["rss_mib"] < p["allocated"]["peak_mib"] - 80
    # the high-water mark was reset at the end of "allocated": "after" has its own, lower peak
    assert p["after"]["reset"] is True
    assert p["after"]["peak_mib"] < p["allocated"]["peak_mib"] - 80


def _shard(path: Path, row_groups: int, rows: int = 10, image_bytes: int = 100_000) -> None:
    """A pair shard's shape: one row group per unit, each row with an incompressible image (the same
    row group written again and again: Parquet shares nothing between row groups)."""
    from mmpr_pipeline.pipeline import pair_schema

    schema = pair_schema()
    table = pa.Table.from_pylist(
        [
            dict(
                id=f"pair-{i}",
                source="photos",
                pair_type="correctness",
                images=[dict(bytes=os.urandom(image_bytes), path=None)],
                chosen="right",
                rejected="wrong",
            )
            for i in range(rows)
        ],
        schema=schema,
    )
    with pq.ParquetWriter(path, schema, compression="none") as writer:
        for g in range(row_groups):
            writer.write_table(table.set_column(0, "id", pa.array([f"{g}-{i}" for i in range(rows)])))


# Reads the pair rows at the start and the end of a shard, first of a small shard (to load the
# libraries and start pyarrow's threads), then, its own phase, of a large one.
READ_ROWS = """
import sys
from pathlib import Path
from mmpr_pipeline import peak_memory
from mmpr_pipeline.preview import read_rows_at

small, large = Path(sys.argv[1]), Path(sys.argv[2])
assert len(read_rows_at([small], [(0, 3), (0, 45)])) == 2
peak_memory.phase_end("warm")
rows = read_rows_at([large], [(0, 3), (0, 395)])
assert sorted(rows) == [(0, 3), (0, 395)] and rows[(0, 395)]["id"] == "39-5", sorted(rows)
peak_memory.phase_end("read")
"""


def test_preview_reads_only_the_row_groups_it_shows(tmp_path):
    """Two pairs of a 40 MB shard: the preview reads their two row groups (2 MB), not the shard."""
    small, large, log = tmp_path / "small.parquet", tmp_path / "large.parquet", tmp_path / "peaks.jsonl"
    _shard(small, 5)
    _shard(large, 40)
    env = dict(os.environ, **{peak_memory.ENV: str(log)})
    r = subprocess.run(
        [sys.executable, "-c", READ_ROWS, str(small), str(large)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    p = _phases(log)
    grew = p["read"]["peak_mib"] - p["warm"]["rss_mib"]
    assert grew < 20, f"reading 2 rows of a 40 MB shard raised the peak by {grew:.0f} MiB"
