"""What the preview reads from a run folder, without ever holding a shard: a seeded sample of pair
positions per source (from the shards' row-group sizes), those rows alone, the samples behind them
and each source's all-right / all-wrong questions (one streaming pass over the unit files), and a
few rejects per reason."""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from mmpr_pipeline.errors import PreviewError
from mmpr_pipeline.run_status import finished_unit_files
from mmpr_pipeline.scoring.modes import JUDGE_ERROR
from mmpr_pipeline.shards import SHARD_RE
from mmpr_pipeline.storage import parquet_source

BATCH_ROWS = 256  # rows per Parquet batch when reading shards
SAMPLE_COLUMNS = [
    "qid",
    "task",
    "question",
    "answer",
    "answers",
    "answer_type",
    "options",
    "error",
    "prompt_template",
    "responses",
    "finish_reasons",
    "extracted",
    "correct",
    "reason",
    "prefix_words",
    "continuations",
    "decided_by",
    "judge_replies",
]


def pair_shards(run_dir: Path) -> list[Path]:
    return sorted(p for p in (run_dir / "data").glob("*.parquet") if SHARD_RE.match(p.name))


def _batches(
    path: Path, columns: list[str] | None = None, batch_size: int = BATCH_ROWS, row_groups=None
) -> Iterator:
    try:
        # pre_buffer (pyarrow's default) reads every row group it is given into memory up front: for a
        # whole shard, all of its images
        f = pq.ParquetFile(parquet_source(path), pre_buffer=False)
        if columns is not None:
            columns = [c for c in columns if c in f.schema_arrow.names]
        yield from f.iter_batches(batch_size=batch_size, row_groups=row_groups, columns=columns)
    except (OSError, ValueError) as e:  # pyarrow raises ArrowInvalid (a ValueError) on a broken file
        raise PreviewError(f"{path}: cannot be read as Parquet: {e}") from None


def _row_group_sizes(path: Path) -> list[int]:
    try:
        meta = pq.read_metadata(parquet_source(path))
    except (OSError, ValueError) as e:
        raise PreviewError(f"{path}: cannot be read as Parquet: {e}") from None
    return [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]


def sample_pair_positions(shards: list[Path], per_source: int, seed: int) -> tuple[dict[str, list], Counter]:
    """Per source, up to `per_source` (shard index, row index) picked uniformly at random from all of
    its pairs (reservoir sampling: one pass over the `source` column, memory O(per_source))."""
    rng = random.Random(seed)
    picked: dict[str, list[tuple[int, int]]] = {}
    seen: Counter = Counter()
    for si, path in enumerate(shards):
        row = 0
        for batch in _batches(path, ["source"], batch_size=65536):
            for src in batch.column(0).to_pylist():
                k = seen[src]
                seen[src] += 1
                chosen = picked.setdefault(src, [])
                if k < per_source:
                    chosen.append((si, row))
                else:
                    j = rng.randrange(k + 1)
                    if j < per_source:
                        chosen[j] = (si, row)
                row += 1
    return {s: sorted(p) for s, p in picked.items()}, seen


def read_rows_at(shards: list[Path], positions: list[tuple[int, int]]) -> dict[tuple[int, int], dict]:
    """The pair rows at `positions`: only the row groups that hold one are read (a shard's row group is
    a unit's pairs), one at a time, so memory is that of a unit whatever the size of the shard."""
    wanted: dict[int, set[int]] = {}
    for si, row in positions:
        wanted.setdefault(si, set()).add(row)
    out = {}
    for si, rows in sorted(wanted.items()):
        start = 0
        for group, size in enumerate(_row_group_sizes(shards[si])):
            hits = [r - start for r in sorted(rows) if start <= r < start + size]
            if hits:
                batch = pa.Table.from_batches(list(_batches(shards[si], row_groups=[group])))
                for r, rec in zip(hits, batch.take(hits).to_pylist()):
                    out[(si, start + r)] = rec
            start += size
    return out


def _judged(reasons: list[str]) -> list[int]:
    return [i for i, r in enumerate(reasons) if not (r or "").startswith(JUDGE_ERROR)]


def scan_samples(
    run_dir: Path, source: str, want_qids: set[str], extremes: int, seed: int
) -> tuple[dict, dict]:
    """(sample rows of `want_qids` by qid, {"all right": rows, "all wrong": rows}): one pass over small
    columns to find the units and to pick `extremes` all-right and all-wrong questions at random,
    then only those units are read."""
    rng = random.Random(f"{seed}:{source}")
    units = finished_unit_files(run_dir, "samples", source)
    picked: dict[str, list[tuple[int, str]]] = {"all right": [], "all wrong": []}
    seen: Counter = Counter()
    need: dict[int, set[str]] = {}
    for ui, path in enumerate(units):
        for batch in _batches(path, ["qid", "pipeline", "error", "correct", "reason"], batch_size=4096):
            d = batch.to_pydict()
            for qid, pipeline, error, correct, reason in zip(
                d["qid"], d["pipeline"], d["error"], d["correct"], d["reason"]
            ):
                if qid in want_qids:
                    need.setdefault(ui, set()).add(qid)
                judged = _judged(reason or [])
                if pipeline != "correctness" or error or not judged:
                    continue
                kind = (
                    "all right"
                    if all(correct[i] for i in judged)
                    else "all wrong"
                    if not any(correct[i] for i in judged)
                    else None
                )
                if kind is None:
                    continue
                k = seen[kind]
                seen[kind] += 1
                if k < extremes:
                    picked[kind].append((ui, qid))
                elif (j := rng.randrange(k + 1)) < extremes:
                    picked[kind][j] = (ui, qid)
    extreme_qids = {q for rows in picked.values() for _, q in rows}
    for rows in picked.values():
        for ui, qid in rows:
            need.setdefault(ui, set()).add(qid)
    by_qid: dict[str, dict] = {}
    for ui, qids in sorted(need.items()):
        columns = SAMPLE_COLUMNS + (["images"] if qids & extreme_qids else [])
        for batch in _batches(units[ui], columns):
            for rec in batch.to_pylist():
                if rec["qid"] in qids:
                    by_qid[rec["qid"]] = rec
    extremes_rows = {
        kind: [by_qid[q] for _, q in sorted(rows, key=lambda x: x[1]) if q in by_qid]
        for kind, rows in picked.items()
    }
    extremes_rows["counts"] = dict(seen)
    return by_qid, extremes_rows


def read_rejects(run_dir: Path, source: str, example_chars: int = 400) -> list[dict]:
    """[{reason, count, row_index, row}] for rejects/<source>.parquet, one example row per reason."""
    path = run_dir / "rejects" / f"{source}.parquet"
    if not path.exists():
        return []
    counts: Counter = Counter()
    examples: dict[str, dict] = {}
    from mmpr_pipeline.decontam import reason_group

    for batch in _batches(path, ["reason", "row_index", "row"], batch_size=4096):
        for rec in batch.to_pylist():
            group = reason_group(rec["reason"])  # leaks per benchmark, near-duplicates per source
            counts[group] += 1
            if group not in examples:
                examples[group] = dict(
                    row_index=rec["row_index"], row=(rec["row"] or "")[:example_chars], detail=rec["reason"]
                )
    return [dict(reason=r, count=c, **examples[r]) for r, c in counts.most_common()]


def read_json(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PreviewError(f"{path}: not valid JSON: {e}") from None
