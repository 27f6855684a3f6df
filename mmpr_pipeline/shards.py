"""Files of a run folder, always replaced atomically: a reader never sees a half-written file.

Everything is written to a temporary name in the same folder, then `os.replace`d into place.
Work units (`samples/<source>/unit-00000.parquet`) are the resume granularity; pair shards use the
Hugging Face Hub's naming, `data/train-00000-of-00003.parquet`.
"""
from __future__ import annotations

import json
import os
import re
import uuid
from pathlib import Path
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.parquet as pq

KILL_ENV = "MMPR_KILL_AT"


def kill_point(name: str, count: int | None = None) -> None:
    """Test seam for the kill-and-resume tests: with MMPR_KILL_AT=name (or name:count) set, this
    process SIGKILLs itself here, as a crash or an OOM kill would, with no chance to clean up."""
    want = os.environ.get(KILL_ENV)
    if not want:
        return
    wname, _, wcount = want.partition(":")
    if wname == name and (not wcount or count == int(wcount)):
        import signal
        os.kill(os.getpid(), signal.SIGKILL)


SHARD_RE = re.compile(r"^(?P<split>[a-z]+)-(?P<i>\d{5})-of-(?P<n>\d{5})\.parquet$")


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")


def write_table(table: pa.Table, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp(path)
    pq.write_table(table, tmp, compression="zstd")
    os.replace(tmp, path)
    return path


def write_text(path: str | Path, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp(path)
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def write_json(path: str | Path, data: Any) -> Path:
    return write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def unit_path(run_dir: str | Path, source: str, unit: int) -> Path:
    return Path(run_dir) / "samples" / source / f"unit-{unit:05d}.parquet"


def unit_files(run_dir: str | Path) -> list[Path]:
    """Finished units, sorted by source then unit (temporary files excluded)."""
    return sorted(p for p in (Path(run_dir) / "samples").glob("*/unit-*.parquet"))


def shard_name(index: int, total: int, split: str = "train") -> str:
    return f"{split}-{index:05d}-of-{total:05d}.parquet"


class ShardWriter:
    """Streams rows into shards of at most `rows_per_shard`; names are final only at `close()`,
    when the shard count is known. Old shards that the new set does not replace are removed
    last, so a folder always holds one complete set (the old or the new one)."""

    def __init__(self, data_dir: str | Path, schema: pa.Schema, rows_per_shard: int, split: str = "train"):
        self.dir = Path(data_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.schema, self.rows_per_shard, self.split = schema, rows_per_shard, split
        self.parts: list[Path] = []
        self.buffer: list[dict] = []

    def write(self, rows: Iterable[dict]) -> None:
        for row in rows:
            self.buffer.append(row)
            if len(self.buffer) >= self.rows_per_shard:
                self._flush()

    def _flush(self) -> None:
        if not self.buffer:
            return
        part = self.dir / f".part-{len(self.parts):05d}.{uuid.uuid4().hex[:8]}.tmp"
        pq.write_table(pa.Table.from_pylist(self.buffer, schema=self.schema), part, compression="zstd")
        self.parts.append(part)
        self.buffer = []

    def close(self) -> list[Path]:
        self._flush()
        if not self.parts:  # an empty dataset still gets one (empty) shard with the schema
            part = self.dir / f".part-00000.{uuid.uuid4().hex[:8]}.tmp"
            pq.write_table(self.schema.empty_table(), part, compression="zstd")
            self.parts.append(part)
        final = [self.dir / shard_name(i, len(self.parts), self.split) for i in range(len(self.parts))]
        for i, (part, dest) in enumerate(zip(self.parts, final)):
            kill_point("mid_write", i)
            os.replace(part, dest)
        for old in self.dir.glob(f"{self.split}-*-of-*.parquet"):
            if old not in final:
                old.unlink()
        for stale in self.dir.glob(".part-*.tmp"):  # left by an interrupted earlier run
            stale.unlink()
        return final
