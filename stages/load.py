"""Load: a recipe source -> Question rows, with bad rows set aside (never dropped silently).

Runs on the driver, before any engine starts, so a source that cannot be opened stops the run at
once with a message naming it. Each row is checked here (image decodes and has sane dimensions,
question is non-empty text, answer is text or a number); a bad row becomes a reject with its
reason and the run goes on.
"""
from __future__ import annotations

import glob
import io
import json
import logging
import math
from pathlib import Path
from typing import Any, Iterable, Iterator

from mmpr_pipeline import tasks
from mmpr_pipeline.recipe import ANSWER_TYPES, Source
from mmpr_pipeline.records import encode_image, question_id

log = logging.getLogger(__name__)

MAX_IMAGE_SIDE = 16384
MAX_ASPECT_RATIO = 200      # Qwen2-VL's processor refuses more; anything past it is a broken image
MAX_QUESTION_CHARS = 20000


class SourceError(RuntimeError):
    """A source that cannot be opened at all; the run stops before it starts."""


class BadRow(ValueError):
    """A row that is set aside, with the reason as its message."""


def _files(pattern: str) -> list[str]:
    paths = sorted(glob.glob(pattern)) if any(c in pattern for c in "*?[") else [pattern]
    if Path(pattern).is_dir():
        paths = sorted(str(p) for p in Path(pattern).rglob("*") if p.is_file())
    return paths


def read_rows(source: Source) -> Iterator[dict[str, Any]]:
    """Raw rows of a source, in a deterministic order."""
    if source.loader == "generated":
        opts = dict(source.generator)
        n = opts.pop("n", source.limit or 100)
        yield from tasks.generate(n, **opts)
        return
    if source.loader == "parquet":
        import pyarrow.parquet as pq

        files = [f for f in _files(source.path) if f.endswith(".parquet")]
        if not files:
            raise SourceError(f"source {source.name!r}: no Parquet files at {source.path!r}")
        for f in files:
            yield from _rows_of(pq.ParquetFile(f))
        return
    if source.loader == "jsonl":
        files = [f for f in _files(source.path) if f.endswith((".jsonl", ".json"))]
        if not files:
            raise SourceError(f"source {source.name!r}: no JSON Lines files at {source.path!r}")
        for f in files:
            base = Path(f).parent
            with open(f, "rb") as fh:
                for line_no, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except (json.JSONDecodeError, UnicodeDecodeError) as e:
                        yield {"__bad__": f"unreadable JSON at {Path(f).name}:{line_no} ({e.__class__.__name__})"}
                        continue
                    img = row.get(source.fields.image)
                    if isinstance(img, str) and not Path(img).is_absolute():
                        row[source.fields.image] = str(base / img)  # image paths are relative to the file
                    yield row
        return
    import datasets

    if source.loader == "hf_disk":
        ds = datasets.load_from_disk(source.path)
        if isinstance(ds, datasets.DatasetDict):
            ds = ds[source.split]
    else:
        ds = datasets.load_dataset(source.dataset, source.config, split=source.split)
    if source.fields.image in ds.column_names:
        ds = ds.cast_column(source.fields.image, datasets.Image(decode=False))  # keep the bytes
    yield from ds


def _rows_of(pf) -> Iterator[dict[str, Any]]:
    for batch in pf.iter_batches(batch_size=256):
        yield from batch.to_pylist()


def _text(value: Any, what: str) -> str:
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            raise BadRow(f"broken text encoding in {what}") from None
    if not isinstance(value, str):
        raise BadRow(f"{what} is not text ({type(value).__name__})")
    if "\ufffd" in value or any(0xD800 <= ord(c) <= 0xDFFF for c in value):
        raise BadRow(f"broken text encoding in {what}")
    return value


def check_image(data: bytes) -> None:
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise BadRow("empty image (zero bytes)")
    try:
        with Image.open(io.BytesIO(data)) as img:
            w, h = img.size
            if w < 1 or h < 1 or max(w, h) > MAX_IMAGE_SIDE or max(w, h) / min(w, h) > MAX_ASPECT_RATIO:
                raise BadRow(f"absurd image dimensions {w}x{h}")
            img.load()  # catches truncated files that the header alone does not reveal
    except BadRow:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise BadRow(f"corrupt image ({type(e).__name__})") from None


def _answers(value: Any) -> list[str]:
    if isinstance(value, bool) or value is None:
        raise BadRow(f"answer is not text ({type(value).__name__})")
    if isinstance(value, (int, float)):
        if isinstance(value, float) and not math.isfinite(value):
            raise BadRow("answer is not a finite number")
        return [str(value)]
    if isinstance(value, (list, tuple)):
        out = [_text(v, "answer") if not isinstance(v, (int, float)) or isinstance(v, bool) else str(v) for v in value]
        if not out or not all(a.strip() for a in out):
            raise BadRow("empty answer")
        return out
    text = _text(value, "answer").strip()
    if not text:
        raise BadRow("empty answer")
    return [text]


def to_question(raw: dict[str, Any], source: Source, row_index: int) -> dict[str, Any]:
    """One raw row -> a Question dict (records.QUESTION_SCHEMA, without `unit`). Raises BadRow."""
    if "__bad__" in raw:
        raise BadRow(raw["__bad__"])
    f = source.fields
    if f.question not in raw or raw[f.question] is None:
        raise BadRow(f"missing question (field {f.question!r})")
    question = _text(raw[f.question], "question").strip()
    if not question:
        raise BadRow("empty question")
    if len(question) > MAX_QUESTION_CHARS:
        raise BadRow(f"question longer than {MAX_QUESTION_CHARS} characters")
    if raw.get(f.image) is None:
        raise BadRow(f"missing image (field {f.image!r})")
    try:
        image = encode_image(raw[f.image])
    except (OSError, ValueError) as e:
        raise BadRow(f"unreadable image ({e})") from None
    check_image(image)
    answers: list[str] = []
    if source.pipeline == "correctness":
        if raw.get(f.answer) is None:
            raise BadRow(f"missing answer (field {f.answer!r})")
        answers = _answers(raw[f.answer])
    answer_type = source.answer_type or (raw.get(f.answer_type) if f.answer_type else raw.get("answer_type")) or "text"
    if source.pipeline == "correctness" and answer_type not in ANSWER_TYPES:
        raise BadRow(f"unknown answer_type {answer_type!r}")
    options = raw.get(f.options) if f.options else raw.get("options")
    options = [str(o) for o in options] if isinstance(options, (list, tuple)) else []
    given = raw.get(f.response) if f.response else None
    given = _text(given, "response").strip() if given is not None else ""
    task = str(raw.get(f.task) or "") if f.task else str(raw.get("task") or "")
    answer = answers[0] if answers else ""
    return dict(qid=question_id(source.name, image, question, answer), source=source.name,
                row_index=row_index, pipeline=source.pipeline, task=task, image=image,
                question=question, answer=answer, answers=answers, answer_type=answer_type,
                options=options, given_response=given)


def _excerpt(raw: Any) -> str:
    try:
        items = raw.items() if isinstance(raw, dict) else []
        shown = {k: (f"<{len(v)} bytes>" if isinstance(v, (bytes, bytearray)) else
                     v if not isinstance(v, dict) else "<dict>") for k, v in items}
        return json.dumps(shown, default=str, ensure_ascii=True)[:300]
    except Exception:  # noqa: BLE001 - the excerpt is for humans only
        return "<unprintable row>"


def load_source(source: Source, unit_size: int) -> tuple[list[dict], list[dict], int]:
    """(questions with their `unit`, rejects, rows read) for one source, at most `source.limit` rows."""
    questions, rejects = [], []
    rows: Iterable[dict] = read_rows(source)
    n_rows = 0
    seen_qids: set[str] = set()
    try:
        for i, raw in enumerate(rows):
            if source.limit is not None and i >= source.limit:
                break
            n_rows += 1
            try:
                q = to_question(raw, source, i)
                if q["qid"] in seen_qids:
                    raise BadRow("duplicate of an earlier row")
            except BadRow as e:
                rejects.append(dict(source=source.name, row_index=i, reason=str(e), row=_excerpt(raw)))
                continue
            seen_qids.add(q["qid"])
            q["unit"] = len(questions) // unit_size
            questions.append(q)
    except SourceError:
        raise
    except Exception as e:  # noqa: BLE001 - anything that stops reading a source names the source
        if n_rows == 0:
            raise SourceError(f"source {source.name!r} ({source.loader}: {source.path or source.dataset}) "
                              f"cannot be opened: {type(e).__name__}: {e}") from e
        raise SourceError(f"source {source.name!r}: reading stopped at row {n_rows}: {e}") from e
    return questions, rejects, n_rows
