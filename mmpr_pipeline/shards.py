"""Files of a run folder, always replaced atomically: a reader never sees a half-written file.

In a local folder everything is written to a temporary name in the same folder, then `os.replace`d into
place. On object storage (a run folder `s3://...`, storage.ObjectPath), which has no rename, each object
is written at its final key: it becomes visible whole when its upload completes.
Work units (`samples/<source>/unit-00000.parquet`) are the resume granularity; pair shards use the
Hugging Face Hub's naming, `data/train-00000-of-00003.parquet`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from mmpr_pipeline.storage import ObjectPath, as_path, output_stream, parquet_source

KILL_ENV = "MMPR_KILL_AT"


def kill_point(name: str, count: int | None = None, *, whole_run: bool = False) -> None:
    """Test seam for the kill-and-resume tests: with MMPR_KILL_AT=name (or name:count) set, this
    process SIGKILLs itself here, as a crash or an OOM kill would, with no chance to clean up.
    `whole_run` (a point inside a Ray worker): the build's driver dies with it, as in a crash of the
    machine; the tests start each build as its own session, whose leader is the driver."""
    want = os.environ.get(KILL_ENV)
    if not want:
        return
    wname, _, wcount = want.partition(":")
    if wname == name and (not wcount or count == int(wcount)):
        import signal

        if whole_run:
            os.kill(os.getsid(0), signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)


SHARD_RE = re.compile(r"^(?P<split>[a-z]+)-(?P<i>\d{5})-of-(?P<n>\d{5})\.parquet$")


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")


def write_table(table: pa.Table, path: str | Path) -> Path:
    path = as_path(path)
    if isinstance(path, ObjectPath):
        with output_stream(path) as sink:
            pq.write_table(table, sink, compression="zstd")
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp(path)
    pq.write_table(table, tmp, compression="zstd")
    os.replace(tmp, path)
    return path


def write_tables(tables: Iterable[pa.Table], schema: pa.Schema, path: str | Path) -> Path:
    """`tables` one after another into one Parquet file, replaced atomically; one table in memory at a
    time, however many there are."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp(path)
    with pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
        for table in tables:
            writer.write_table(table)
    os.replace(tmp, path)
    return path


def read_file(path: str | Path) -> pa.Table:
    """A whole Parquet file (one unit's rows), read on this thread without pre-buffering.

    `pq.read_table` reads through Arrow's dataset scanner on its thread pools, whose threads keep memory
    outside Arrow's pool: the driver writing a source's rejects file from 40 units peaked 100-130 MiB
    over its imports, varying from run to run (Arrow's own pool peaked at 6 MiB); read this way, 56 MiB,
    the same for 10 or 80 units (tests/test_driver_memory.py)."""
    with pq.ParquetFile(parquet_source(as_path(path)), pre_buffer=False) as f:
        return f.read(use_threads=False)


def iter_row_groups(
    path: str | Path, batch_size: int, columns: list[str] | None = None
) -> Iterator[pa.RecordBatch]:
    """A Parquet file's rows, one row group at a time (a pair shard has one per unit), in batches of at
    most `batch_size` rows that never span two row groups. pyarrow's default (`pre_buffer=True`) reads
    every row group it is asked for into memory at once: for a whole shard, all of its images."""
    with pq.ParquetFile(parquet_source(as_path(path)), pre_buffer=False) as f:
        for group in range(f.num_row_groups):
            yield from f.iter_batches(
                batch_size=batch_size, row_groups=[group], columns=columns, use_threads=False
            )


def write_text(path: str | Path, text: str) -> Path:
    path = as_path(path)
    if isinstance(path, ObjectPath):
        path.write_text(text)
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp(path)
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def write_json(path: str | Path, data: Any) -> Path:
    return write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


@contextlib.contextmanager
def staging_folder(out: Path, error: Callable[[str], Exception]) -> Iterator[Path]:
    """A new folder beside the output folder `out`, for the caller to write the whole output in and
    rename into place (the same file system: the rename is atomic, no one sees half an output).
    Removed with its contents if the block raises; `error(message)` when it cannot be made."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    except OSError as e:
        raise error(f"--out {out}: cannot write in {out.parent} ({e.strerror})") from None
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def unit_files(run_dir: str | Path, kind: str = "samples") -> list[Path]:
    """Finished unit files of `kind` (samples, pairs), sorted by source then unit (no temporary files)."""
    return sorted(p for p in (as_path(run_dir) / kind).glob("*/unit-*.parquet"))


def shard_name(index: int, total: int, split: str = "train") -> str:
    return f"{split}-{index:05d}-of-{total:05d}.parquet"


MAX_SHARD_BYTES = 500 * 2**20  # the Hub's advice for Parquet shards


def plan_shards(
    units: list[tuple[str, int, int]], rows_per_shard: int, max_bytes: int = MAX_SHARD_BYTES
) -> list[list[tuple[str, int, int]]]:
    """Cut units' pair files into shards, in order. `units`: (file, rows, bytes) each. A shard is a
    list of (file, first row, stop row) slices holding at most `rows_per_shard` rows and about
    `max_bytes` (estimated from each file's mean row size). At least one shard, maybe empty."""
    plan: list[list[tuple[str, int, int]]] = [[]]
    rows_in, bytes_in = 0, 0.0
    for path, rows, size in units:
        per_row = size / rows if rows else 0.0
        start = 0
        while start < rows:
            if rows_in >= rows_per_shard or (rows_in and bytes_in + per_row > max_bytes):
                plan.append([])
                rows_in, bytes_in = 0, 0.0
            room = rows_per_shard - rows_in
            if per_row:
                room = min(room, max(1, int((max_bytes - bytes_in) // per_row)))
            stop = min(rows, start + room)
            plan[-1].append((path, start, stop))
            rows_in += stop - start
            bytes_in += (stop - start) * per_row
            start = stop
    return plan


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """`table` in `schema`: a column the schema gained after the table was written (a unit file of a
    run resumed across that change, e.g. `provenance`) is added as nulls, so the run still finishes."""
    for field in schema:
        if field.name not in table.column_names:
            table = table.append_column(field, pa.nulls(len(table), field.type))
    return table.select(schema.names).cast(schema)


def write_shard(slices: list[tuple[str, int, int]], dest: str | Path, schema: pa.Schema) -> str:
    """Concatenate slices of pair files into one Parquet file at a temporary name beside `dest`;
    one slice in memory at a time. Returns the temporary path (the caller renames it). On object
    storage the shard is written at `dest` itself (its name comes from the shard plan, fixed before
    any shard is written), and `dest` is returned."""
    if isinstance(as_path(dest), ObjectPath):
        return _write_shard_object(slices, as_path(dest), schema)
    tmp = _tmp(Path(dest))
    with pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
        for path, start, stop in slices:
            writer.write_table(conform(read_file(path).slice(start, stop - start), schema))
        if not slices:
            writer.write_table(schema.empty_table())
    return str(tmp)


def _write_shard_object(slices: list[tuple[str, int, int]], dest: ObjectPath, schema: pa.Schema) -> str:
    """write_shard on object storage: the upload completes (and the shard appears) only when the last
    slice is in; a kill before that leaves no object at `dest`, an error removes it."""
    with output_stream(dest) as sink, pq.ParquetWriter(sink, schema, compression="zstd") as writer:
        for path, start, stop in slices:
            writer.write_table(conform(read_file(path).slice(start, stop - start), schema))
            kill_point("mid_shard", whole_run=True)
        if not slices:
            writer.write_table(schema.empty_table())
    return str(dest)


def commit_shards(data_dir: str | Path, written: list[str], split: str = "train") -> list[Path]:
    """Rename written shards to their Hub names, then remove old shards the new set does not
    replace: the folder always holds one complete set (the old or the new one). On object storage the
    shards were written at their names: only the old shards are removed (until stats.json is written
    again, which lists the set, the run reads as unfinished)."""
    data_dir = as_path(data_dir)
    final = [data_dir / shard_name(i, len(written), split) for i in range(len(written))]
    local = not isinstance(data_dir, ObjectPath)
    if local:  # on object storage each shard was written at its name
        for i, (tmp, dest) in enumerate(zip(written, final)):
            kill_point("mid_write", i)
            os.replace(tmp, dest)
    for old in data_dir.glob(f"{split}-*-of-*.parquet"):
        if old not in final:
            old.unlink(missing_ok=not local)
    if local:
        for stale in data_dir.glob(".*.tmp"):  # left by an interrupted earlier run
            stale.unlink()
    return final
