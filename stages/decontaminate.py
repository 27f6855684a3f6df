"""Decontaminate: set aside, right after a unit is loaded, every question whose image or question is a
near-duplicate of a benchmark's (the recipe's `decontamination:` evaluation sets).

The benchmark index (mmpr_pipeline/decontam.py's Benchmarks) is built once per build on Ray workers:
one task per benchmark input file hashes its rows (read by the sources' loaders, mmpr_pipeline/sources.py),
and one task merges them into a single Ray object. The driver holds only its reference and a few
numbers (its identity, which goes into every unit's key, and its row counts); the load stage's
workers fetch the object once per process and check their unit's questions against it.

Rows set aside here, and near-duplicate rows (marked by the plan), carry reasons of a fixed form
that `decontam.reason_group` folds into one count per benchmark (or per source) for stats.json, the card and
the preview, while rejects/ keeps the row-level reason.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

from mmpr_pipeline.decontam import Benchmarks, benchmark_entry, leak_reason

log = logging.getLogger(__name__)

# -- the index, built on Ray workers ----------------------------------------------------------------


def hash_benchmark_input(benchmark, path: str) -> dict[str, Any]:
    """One benchmark input file -> its rows' index entries (row numbers within the file), on a worker.
    A row without a readable question is counted and skipped; an image that does not decode is
    counted and its question still indexed."""
    from mmpr_pipeline.sources import BadRow, as_text, input_rows, question_images

    source = benchmark.as_source()
    entries, rows, unreadable = [], 0, 0
    for i, raw in enumerate(input_rows(source, path)):
        if benchmark.limit is not None and i >= benchmark.limit:
            break
        rows += 1
        try:
            question = as_text(raw[source.fields.question], "question")
            images = question_images(raw, source, question, check=False)
        except (BadRow, KeyError, TypeError):
            unreadable += 1
            continue
        try:
            entries.append(benchmark_entry(benchmark.name, i, question, images, benchmark.ngram))
        except Exception:  # noqa: BLE001 - an image PIL cannot read: its question is still checked
            unreadable += 1
            entries.append(benchmark_entry(benchmark.name, i, question, [], benchmark.ngram))
    return dict(benchmark=benchmark.name, rows=rows, unreadable=unreadable, entries=entries)


def merge_index(names: list[str], settings: dict, limits: dict, *parts: dict) -> Benchmarks:
    """The inputs' entries -> one index; rows renumbered across each benchmark's files, in order."""
    entries, offset = [], dict.fromkeys(names, 0)
    for part in parts:
        name = part["benchmark"]
        for e in part["entries"]:
            row = offset[name] + e["row"]
            if limits[name] is None or row < limits[name]:
                entries.append(dict(e, row=row))
        offset[name] += part["rows"]
    index = Benchmarks.build(names, settings, entries)
    index.summary = {
        name: dict(
            rows=min(offset[name], limits[name] or offset[name]),
            unreadable=sum(p["unreadable"] for p in parts if p["benchmark"] == name),
        )
        for name in names
    }
    return index


def index_summary(index: Benchmarks) -> dict[str, Any]:
    return dict(identity=index.identity, benchmarks=index.summary)


def start_index(benchmarks: list) -> tuple[Any, Any]:
    """References to the index object and to its summary ({identity, benchmarks: {name: {rows,
    unreadable}}}), built by Ray tasks: only the summary ever comes to the driver."""
    import ray

    from mmpr_pipeline.sources import source_inputs

    hash_input = ray.remote(num_cpus=0.25, max_retries=2)(hash_benchmark_input)
    parts = [hash_input.remote(b, path) for b in benchmarks for path in source_inputs(b.as_source())]
    names = [b.name for b in benchmarks]
    settings = {b.name: (b.image_distance, b.ngram) for b in benchmarks}
    limits = {b.name: b.limit for b in benchmarks}
    index = ray.remote(num_cpus=0.25)(merge_index).remote(names, settings, limits, *parts)
    return index, ray.remote(num_cpus=0.25)(index_summary).remote(index)


@functools.lru_cache(maxsize=2)
def _fetch(ref) -> Benchmarks:
    import ray

    return ray.get(ref)


# -- the per-unit check ---------------------------------------------------------------------------


def find_leak(index: Benchmarks, question: dict) -> str | None:
    """The reason `question` (a Question row) is a benchmark leak, or None. Images are checked first."""
    from mmpr_pipeline.decontam import image_hash

    for data in question["images"]:
        try:
            h = image_hash(data)
        except Exception:  # noqa: BLE001 - an undecodable image is the load check's to reject
            continue
        if (hit := index.match_image(h)) is not None:
            name, row = index.describe(hit[0])
            return leak_reason(name, row, "image", f"near-duplicate ({hit[1]} of 128 hash bits differ)")
    if (hit := index.match_question(question["question"])) is not None:
        name, row = index.describe(hit[0])
        return leak_reason(name, row, "question", f"shares a {hit[1]}-word span")
    return None


def set_aside_leaks(questions: list[dict], index_ref) -> tuple[list[dict], list[dict]]:
    """(kept questions, rejects) of one unit's questions, on the worker that loaded them."""
    from mmpr_pipeline.sources import excerpt

    if index_ref is None:
        return questions, []
    index = index_ref if isinstance(index_ref, Benchmarks) else _fetch(index_ref)
    kept, rejects = [], []
    for q in questions:
        reason = find_leak(index, q)
        if reason is None:
            kept.append(q)
        else:
            shown = excerpt({"question": q["question"], "images": len(q["images"])})
            rejects.append(dict(source=q["source"], row_index=q["row_index"], reason=reason, row=shown))
    return kept, rejects
