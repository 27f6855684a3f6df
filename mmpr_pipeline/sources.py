"""Reading a recipe source: its inputs, its rows, and each row checked into a Question row (image
decodes and has sane dimensions, question is non-empty text, answer is text or a number); a bad
row raises BadRow with its reason, which the load stage (stages/load.py) sets aside.

Sources and the images they name may be local paths or s3:// URLs (mmpr_pipeline/storage.py): both
are read through the same functions here. `scan_input` is the plan's one pass over an input file,
run on a Ray worker; the benchmark index (stages/decontaminate.py) and the preflight check read rows
through the same functions, so every reader sees the same rows.
"""

from __future__ import annotations

import functools
import glob
import io
import json
import logging
import math
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

from mmpr_pipeline import prompts, storage, tasks
from mmpr_pipeline.recipe import ANSWER_TYPES, Source
from mmpr_pipeline.records import decode_image, encode_image, is_blank, question_id

log = logging.getLogger(__name__)

MAX_IMAGE_SIDE = 16384
MAX_ASPECT_RATIO = 200  # Qwen2-VL's processor refuses more; anything past it is a broken image
MAX_QUESTION_CHARS = 20000


class SourceError(RuntimeError):
    """A source that cannot be opened at all; the run stops before it starts."""


class BadRow(ValueError):
    """A row that is set aside, with the reason as its message."""


def _files(pattern: str) -> list[str]:
    if storage.is_url(pattern):
        return storage.expand(pattern)
    paths = sorted(glob.glob(pattern)) if any(c in pattern for c in "*?[") else [pattern]
    if Path(pattern).is_dir():
        paths = sorted(str(p) for p in Path(pattern).rglob("*") if p.is_file())
    return paths


def source_inputs(source: Source) -> list[str]:
    """The inputs of a source, in order: its files (parquet, jsonl), or one input ("") for a
    generated source or a `datasets` dataset. Work units never span two inputs."""
    if source.loader in ("parquet", "jsonl"):
        try:
            found = _files(source.path)
        except storage.StorageError as e:
            raise SourceError(f"source {source.name!r}: {e}") from None
    if source.loader == "parquet":
        files = [f for f in found if f.endswith(".parquet")]
        if not files:
            raise SourceError(f"source {source.name!r}: no Parquet files at {source.path!r}")
        return files
    if source.loader == "jsonl":
        files = [f for f in found if f.endswith((".jsonl", ".json"))]
        if not files:
            raise SourceError(f"source {source.name!r}: no JSON Lines files at {source.path!r}")
        return files
    return [""]


def input_rows(source: Source, path: str, start: int = 0, byte_offset: int = 0) -> Iterator[dict[str, Any]]:
    """Raw rows of one input from row `start` on, in a deterministic order. For JSON Lines,
    `byte_offset` is where row `start` begins (from the scan), so a unit seeks instead of re-reading."""
    if source.loader == "generated":
        opts = dict(source.generator)
        n = opts.pop("n", source.limit or 100)
        opts["offset"] = opts.get("offset", 0) + start
        yield from tasks.generate(max(0, n - start), **opts)
    elif source.loader == "parquet":
        import pyarrow.parquet as pq

        fs, inner = storage.filesystem(path)
        pf = pq.ParquetFile(inner, filesystem=fs)
        first = 0
        for g in range(pf.metadata.num_row_groups):
            n = pf.metadata.row_group(g).num_rows
            if first + n > start:
                rows = _float32_as_written(pf.read_row_group(g), _number_fields(source)).to_pylist()
                yield from rows[max(0, start - first) :]
            first += n
    elif source.loader == "jsonl":
        base = storage.parent(path)
        with storage.open_input(path) as fh:
            fh.seek(byte_offset)
            skip = 0 if byte_offset else start
            line_no = 0
            for line in fh:
                line_no += 1
                if not line.strip():
                    continue
                if skip:
                    skip -= 1
                    continue
                yield _json_row(line, source, base, f"{path.rsplit('/', 1)[-1]}:+{line_no}")
    else:
        ds = _dataset(
            source.loader,
            source.path,
            source.dataset,
            source.config,
            source.split,
            source.fields.image,
            _number_fields(source),
        )
        yield from ds.select(range(start, len(ds)))


def jsonl_offsets(path: str, every: int) -> list[int]:
    """Byte offset of every `every`-th non-blank line of a JSON Lines file (row 0, every, 2*every...)."""
    offsets, row, pos = [], 0, 0
    with storage.open_input(path) as fh:
        for line in fh:
            if line.strip():
                if row % every == 0:
                    offsets.append(pos)
                row += 1
            pos += len(line)
    return offsets


def _number_fields(source: Source) -> tuple[str, ...]:
    """The columns whose numbers become text: the answer and the options."""
    return (source.fields.answer, source.fields.options or "options")


def _float32_as_written(table, names: tuple[str, ...]):
    """Float32 columns among `names` (or lists of float32) as the doubles of their shortest text: Arrow
    writes a float32 0.3 as "0.3", the double of which is 0.3, where a plain widening gives
    0.30000001192092896."""
    import pyarrow as pa
    import pyarrow.compute as pc

    for name in names:
        if name not in table.column_names:
            continue
        kind = table.schema.field(name).type
        listed = pa.types.is_list(kind) or pa.types.is_large_list(kind)
        if pa.types.is_float32(kind.value_type if listed else kind):
            text, double = (
                (pa.list_(pa.string()), pa.list_(pa.float64())) if listed else (pa.string(), pa.float64())
            )
            i = table.schema.get_field_index(name)
            table = table.set_column(i, name, pc.cast(pc.cast(table[name], text), double))
    return table


@functools.lru_cache(maxsize=4)
def _dataset(
    loader: str,
    path: str | None,
    dataset: str | None,
    config: str | None,
    split: str,
    image: str,
    numbers: tuple[str, ...] = (),
):
    """A `datasets` source, memory-mapped; loaded once per worker process. The float32 columns among
    `numbers` read as written (see _float32_as_written)."""
    import datasets

    if loader == "hf_disk":  # a folder on S3 is copied to this worker first: datasets memory-maps it
        ds = datasets.load_from_disk(storage.local_copy(path) if storage.is_url(path) else path)
        if isinstance(ds, datasets.DatasetDict):
            ds = ds[split]
    else:
        ds = datasets.load_dataset(dataset, config, split=split)
    if image in ds.column_names:  # keep the encoded bytes, for one image or a list of them
        listed = isinstance(ds.features[image], (list, datasets.Sequence, datasets.List))
        ds = ds.cast_column(
            image, datasets.List(datasets.Image(decode=False)) if listed else datasets.Image(decode=False)
        )
    for name in numbers:
        feature = ds.features.get(name)
        inner = getattr(feature, "feature", feature)  # a List / Sequence of Values holds its Value
        if getattr(inner, "dtype", None) == "float32":
            for step in ("string", "float64"):  # through the shortest text, as _float32_as_written
                value = datasets.Value(step)
                ds = ds.cast_column(name, datasets.List(value) if inner is not feature else value)
    return ds


def read_rows(source: Source) -> Iterator[dict[str, Any]]:
    """All raw rows of a source, in a deterministic order. For the driver (its preflight reads the
    first few): an `hf_disk` folder on object storage is streamed, not copied as the workers do."""
    if source.loader == "hf_disk" and storage.is_url(source.path):
        yield from _stream_hf_disk(source)
        return
    for path in source_inputs(source):
        yield from input_rows(source, path)


def _stream_hf_disk(source: Source) -> Iterator[dict[str, Any]]:
    """Rows of a `save_to_disk` folder on object storage, in order, batch by batch from its Arrow
    stream files (state.json lists them; a DatasetDict has a folder per split). Images come as the
    {'bytes', 'path'} dicts the workers' reader gives too."""
    import pyarrow as pa

    folder = source.path.rstrip("/")

    def read_json(name: str) -> dict:
        with storage.open_input(f"{folder}/{name}") as f:
            return json.load(f)

    try:
        splits = read_json("dataset_dict.json")["splits"]
    except storage.StorageError:
        splits = None
    if splits is not None:
        if source.split not in splits:
            raise SourceError(f"source {source.name!r}: {source.path} has no split {source.split!r}")
        folder = f"{folder}/{source.split}"
    for data_file in read_json("state.json")["_data_files"]:
        with storage.open_input(f"{folder}/{data_file['filename']}") as f:
            for batch in pa.ipc.open_stream(f):
                table = pa.Table.from_batches([batch])
                yield from _float32_as_written(table, _number_fields(source)).to_pylist()


def _relative_to(base: str, value: Any) -> Any:
    """An image path of a JSON Lines row, read from the file's folder or prefix (a URL stays itself)."""
    return storage.join(base, value) if isinstance(value, str) else value


def _json_row(line: bytes, source: Source, base: str, where: str) -> dict[str, Any]:
    """One JSON Lines row; a line that is not a JSON object becomes a `__bad__` row (set aside)."""
    try:
        row = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        return {"__bad__": f"unreadable JSON at {where} ({e.__class__.__name__})"}
    if not isinstance(row, dict):
        return {"__bad__": f"JSON line at {where} is not an object ({type(row).__name__})"}
    img = row.get(source.fields.image)
    if isinstance(img, (str, list)):  # image paths are relative to the file
        row[source.fields.image] = (
            [_relative_to(base, i) for i in img] if isinstance(img, list) else _relative_to(base, img)
        )
    return row


def as_text(value: Any, what: str) -> str:
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


def check_image(data: bytes, background: tuple[int, int, int] = (255, 255, 255)) -> None:
    """A row's image decodes (records.decode_image, as the model will see it), has sane dimensions
    and is not one flat colour (a broken file or a lost alpha channel: its pairs would teach nothing)."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise BadRow("empty image (zero bytes)")
    try:
        with Image.open(io.BytesIO(data)) as img:
            w, h = img.size
            if w < 1 or h < 1 or max(w, h) > MAX_IMAGE_SIDE or max(w, h) / min(w, h) > MAX_ASPECT_RATIO:
                raise BadRow(f"absurd image dimensions {w}x{h}")
        if is_blank(decode_image(data, background)):  # decoding also catches truncated files
            raise BadRow("blank image")
    except BadRow:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise BadRow(f"corrupt image ({type(e).__name__})") from None


FLOAT_DIGITS = 15  # DBL_DIG: every decimal of up to 15 significant digits survives a trip through a double


def number_text(value: int | float | Decimal) -> str:
    """A number read from a typed column (Parquet, `datasets`, JSON) as a person writes it: an int as it
    is; a float as the shortest decimal of at most 15 significant digits that reads back as it (so a
    0.3 stays "0.3", and a 0.1 + 0.2 computed upstream reads "0.3" too, not "0.30000000000000004");
    integral values without ".0" (3.0 -> "3": pandas stores an int column with a missing value as
    floats, so a 3.0 there was written 3); a Decimal without trailing zeros ("0.300" -> "0.3").
    Positional notation, but for magnitudes past 1e16 or below 1e-7."""
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        raise BadRow("answer is not a finite number")
    exact = value if isinstance(value, Decimal) else Decimal(format(value, f".{FLOAT_DIGITS}g"))
    if not exact.is_finite():
        raise BadRow("answer is not a finite number")
    exact = exact.normalize()
    if exact.is_zero():
        return "0"
    return format(exact, "f") if -7 <= exact.adjusted() < 16 else format(exact, "g")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, Decimal)) and not isinstance(value, bool)


def _answers(value: Any) -> list[str]:
    if isinstance(value, bool) or value is None:
        raise BadRow(f"answer is not text ({type(value).__name__})")
    if _is_number(value):
        return [number_text(value)]
    if isinstance(value, (list, tuple)):
        out = [number_text(v) if _is_number(v) else as_text(v, "answer") for v in value]
        if not out or not all(a.strip() for a in out):
            raise BadRow("empty answer")
        return out
    text = as_text(value, "answer").strip()
    if not text:
        raise BadRow("empty answer")
    return [text]


MAX_IMAGES = 32  # per question: more is a misread field, not a real multi-image question


def question_images(raw: dict[str, Any], source: Source, question: str, check: bool) -> list[bytes]:
    """A row's images: one value or a list (paths, bytes, PIL or `datasets` images), in order. With
    `<image>` placeholders in the question there must be one per image."""
    value = None if source.images == "none" else raw.get(source.fields.image)
    if value is None or (isinstance(value, (list, tuple)) and not value):
        if source.images == "required":
            raise BadRow(f"missing image (field {source.fields.image!r})")
        values = []
    else:
        values = list(value) if isinstance(value, (list, tuple)) else [value]
    if len(values) > MAX_IMAGES:
        raise BadRow(f"{len(values)} images (at most {MAX_IMAGES})")
    images = []
    for v in values:
        try:
            images.append(encode_image(v))
        except (OSError, ValueError) as e:
            raise BadRow(f"unreadable image ({e})") from None
        if check:
            check_image(images[-1], tuple(source.image_background))
    n_placeholders = prompts.placeholders(question)
    if n_placeholders and n_placeholders != len(images):
        raise BadRow(f"{n_placeholders} <image> placeholders for {len(images)} images")
    return images


def to_question(raw: dict[str, Any], source: Source, row_index: int, check: bool = True) -> dict[str, Any]:
    """One raw row -> a Question dict (records.QUESTION_SCHEMA, without the unit columns). Raises
    BadRow. `check=False` skips decoding the image (the scan only needs the qid)."""
    if not isinstance(raw, dict):
        raise BadRow(f"row is not a mapping ({type(raw).__name__})")
    if "__bad__" in raw:
        raise BadRow(raw["__bad__"])
    f = source.fields
    if f.question not in raw or raw[f.question] is None:
        raise BadRow(f"missing question (field {f.question!r})")
    question = as_text(raw[f.question], "question").strip()
    if not question:
        raise BadRow("empty question")
    if len(question) > MAX_QUESTION_CHARS:
        raise BadRow(f"question longer than {MAX_QUESTION_CHARS} characters")
    images = question_images(raw, source, question, check)
    answers: list[str] = []
    if source.pipeline == "correctness":
        if raw.get(f.answer) is None:
            raise BadRow(f"missing answer (field {f.answer!r})")
        answers = _answers(raw[f.answer])
    answer_type = (
        source.answer_type or (raw.get(f.answer_type) if f.answer_type else raw.get("answer_type")) or "text"
    )
    if source.pipeline == "correctness" and answer_type not in ANSWER_TYPES:
        raise BadRow(f"unknown answer_type {answer_type!r}")
    options = raw.get(f.options) if f.options else raw.get("options")
    options = (
        [number_text(o) if _is_number(o) else str(o) for o in options]
        if isinstance(options, (list, tuple))
        else []
    )
    given = raw.get(f.response) if f.response else None
    given = as_text(given, "response").strip() if given is not None else ""
    task = str(raw.get(f.task) or "") if f.task else str(raw.get("task") or "")
    # a reference worked solution (fields.rationale): a chosen candidate; a row without one has none
    rationale = raw.get(f.rationale) if f.rationale else None
    rationale = (
        as_text(rationale, f"rationale (field {f.rationale!r})").strip() if rationale is not None else ""
    )
    answer = answers[0] if answers else ""
    return dict(
        qid=question_id(source.name, images, question, answer),
        source=source.name,
        row_index=row_index,
        pipeline=source.pipeline,
        task=task,
        images=images,
        question=question,
        answer=answer,
        answers=answers,
        answer_type=answer_type,
        options=options,
        given_response=given,
        rationale=rationale,
    )


def excerpt(raw: Any) -> str:
    try:
        items = raw.items() if isinstance(raw, dict) else []
        shown = {
            k: (
                f"<{len(v)} bytes>"
                if isinstance(v, (bytes, bytearray))
                else v
                if not isinstance(v, dict)
                else "<dict>"
            )
            for k, v in items
        }
        return json.dumps(shown, default=str, ensure_ascii=True)[:300]
    except Exception:  # noqa: BLE001 - the excerpt is for humans only
        return "<unprintable row>"


def _row_key(q: dict[str, Any]) -> bytes | None:
    """decontam.row_key of a question (its images' perceptual hashes and its normalised question),
    or None when an image does not decode (the row is set aside when its unit is loaded)."""
    from mmpr_pipeline.decontam import image_hash, row_key

    try:
        return row_key([image_hash(data) for data in q["images"]], q["question"])
    except Exception:  # noqa: BLE001 - whatever PIL raises for a broken image
        return None


def scan_input(
    source: Source, path: str, max_rows: int | None, unit_size: int, near_duplicates: str = "off"
) -> dict[str, Any]:
    """One pass over an input (on a worker): each row's qid (None for a bad row) for de-duplication,
    the most images a row has (the engine's per-prompt limit), and for JSON Lines the byte offset
    where every `unit_size`-th row starts. Stops after `max_rows`. Unless `near_duplicates` is "off",
    also each row's key for near-duplicate rows (decontam.row_key; None for a bad row): this decodes
    every image once more."""
    qids: list[str | None] = []
    keys: list[bytes | None] = []
    max_images = 0
    try:
        for i, raw in enumerate(input_rows(source, path)):
            if max_rows is not None and i >= max_rows:
                break
            try:
                q = to_question(raw, source, i, check=False)
            except BadRow:
                qids.append(None)
                keys.append(None)
                continue
            qids.append(q["qid"])
            keys.append(_row_key(q) if near_duplicates != "off" else None)
            max_images = max(max_images, len(q["images"]))
    except SourceError:
        raise
    except Exception as e:  # noqa: BLE001 - anything that stops reading a source names the source
        where = f"{source.loader}: {path or source.path or source.dataset}"
        if not qids:
            raise SourceError(
                f"source {source.name!r} ({where}) cannot be opened: {type(e).__name__}: {e}"
            ) from e
        raise SourceError(f"source {source.name!r} ({where}): reading stopped at row {len(qids)}: {e}") from e
    offsets = jsonl_offsets(path, unit_size) if source.loader == "jsonl" else []
    return dict(path=path, qids=qids, offsets=offsets, max_images=max_images, keys=keys)
