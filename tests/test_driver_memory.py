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
from mmpr_pipeline.preview_data import read_rows_at

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


def _measure(tmp_path: Path, script: str, *args: str) -> dict[str, dict]:
    """Run `script` in a fresh process with the phase log on; its phases."""
    log = tmp_path / "peaks.jsonl"
    log.unlink(missing_ok=True)
    r = subprocess.run(
        [sys.executable, "-c", script, *args],
        cwd=REPO,
        env=dict(os.environ, **{peak_memory.ENV: str(log)}),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    return _phases(log)


def _reject_units(run: Path, units: int, rows: int = 3000) -> None:
    """`units` unit rejects files of ~0.9 MB of excerpts each (hex: zstd cannot shrink it to nothing)."""
    from mmpr_pipeline.records import REJECT_SCHEMA

    folder = run / "rejects" / "photos"
    folder.mkdir(parents=True)
    for u in range(units):
        table = pa.Table.from_pydict(
            dict(
                source=["photos"] * rows,
                row_index=list(range(u * rows, (u + 1) * rows)),
                reason=["unreadable image"] * rows,
                row=[os.urandom(150).hex() for _ in range(rows)],
            ),
            schema=REJECT_SCHEMA,
        )
        pq.write_table(table, folder / f"unit-{u:05d}.parquet", compression="zstd")


WRITE_REJECTS = """
import sys
from pathlib import Path
import pyarrow.parquet as pq
from mmpr_pipeline import peak_memory
from mmpr_pipeline.pipeline import write_rejects_file

run = Path(sys.argv[1])
peak_memory.phase_end("import")
write_rejects_file(run, "photos")
peak_memory.phase_end("write")
assert pq.read_metadata(run / "rejects" / "photos.parquet").num_rows == 40 * 3000
"""


def test_rejects_file_costs_one_unit_and_no_reader_threads(tmp_path):
    """A source's rejects file from 40 units (0.9 MB of excerpts each), in a fresh process: +56 MiB
    over the imports (pyarrow's Parquet writer and reader warming up, then one unit at a time), the
    same for 10 or 80 units. Read through Arrow's scanner (`pq.read_table`), whose threads kept memory
    outside Arrow's pool, it was +100 to +130 MiB, varying from run to run (Arrow's pool peaked at 6 MiB
    either way)."""
    run = tmp_path / "run"
    _reject_units(run, 40)
    p = _measure(tmp_path, WRITE_REJECTS, str(run))
    grew = p["write"]["peak_mib"] - p["import"]["rss_mib"]
    assert grew < 80, f"writing 40 units' rejects raised the peak by {grew:.0f} MiB"


def _jpeg(seed: int, side: int = 200) -> bytes:
    import io

    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=90)  # noise: ~37 KB that no codec shrinks
    return buf.getvalue()


def _photo_shard(path: Path, row_groups: int, rows: int = 10) -> None:
    """A pair shard of `row_groups` units, each pair with its own real JPEG (the InternVL export
    reads the image's format)."""
    from mmpr_pipeline.pipeline import pair_schema

    schema = pair_schema()
    images = [_jpeg(i) for i in range(rows)]
    with pq.ParquetWriter(path, schema, compression="none") as writer:
        for g in range(row_groups):
            pairs = [
                dict(
                    id=f"{g}-{i}",
                    qid=f"q{g}-{i}",
                    source="photos",
                    pair_type="correctness",
                    question="How many circles are there?",
                    images=[dict(bytes=images[i], path=None)],
                    chosen="right",
                    rejected="wrong",
                )
                for i in range(rows)
            ]
            writer.write_table(pa.Table.from_pylist(pairs, schema=schema))


EXPORT = """
import sys
from pathlib import Path
from mmpr_pipeline import export, peak_memory

small, large, out = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
for name in ("warm-trl", "warm-internvl"):
    (out / name).mkdir(parents=True)
export._write_trl({"shards": [small]}, out / "warm-trl")
export._write_internvl({"shards": [small]}, out / "warm-internvl", out / "warm-internvl")
peak_memory.phase_end("warm")
for name in ("trl", "internvl"):
    (out / name).mkdir()
assert export._write_trl({"shards": [large]}, out / "trl")["rows"] == 400
peak_memory.phase_end("trl")
assert export._write_internvl({"shards": [large]}, out / "internvl", out / "internvl")["rows"] == 400
peak_memory.phase_end("internvl")
"""


def test_export_streams_a_shard_one_row_group_at_a_time(tmp_path):
    """Both exports of a 15 MB shard of 40 units: one unit's pairs in memory at a time, not the shard
    (pyarrow's pre-buffering read it whole: +50 MiB)."""
    small, large = tmp_path / "small.parquet", tmp_path / "large.parquet"
    _photo_shard(small, 2)
    _photo_shard(large, 40)
    p = _measure(tmp_path, EXPORT, str(small), str(large), str(tmp_path / "out"))
    for fmt, start in (("trl", "warm"), ("internvl", "trl")):
        grew = p[fmt]["peak_mib"] - p[start]["rss_mib"]
        assert grew < 12, f"the {fmt} export of a 15 MB shard raised the peak by {grew:.0f} MiB"


def test_row_groups_are_read_in_order_and_batches_never_span_two(tmp_path):
    from mmpr_pipeline.shards import iter_row_groups

    path = tmp_path / "groups.parquet"
    with pq.ParquetWriter(path, pa.schema([("i", pa.int64())])) as writer:
        for start, size in ((0, 5), (5, 3), (8, 7)):
            writer.write_table(pa.table({"i": list(range(start, start + size))}))
    batches = [b.column("i").to_pylist() for b in iter_row_groups(path, batch_size=4)]
    assert batches == [[0, 1, 2, 3], [4], [5, 6, 7], [8, 9, 10, 11], [12, 13, 14]]
