"""Write a run's pairs in the formats other trainers read.

    mmpr export RUN_DIR --format trl|internvl --out DIR

RUN_DIR may be a run folder on object storage (`s3://bucket/prefix`); DIR is a local folder.

- `trl`: Parquet shards `DIR/data/train-*.parquet` in TRL's conversational vision preference format,
  which `DPOTrainer` takes as is (`load_dataset("parquet", data_dir="DIR/data")`):
  `prompt` = [{"role": "user", "content": [{"type": "image"}, ..., {"type": "text", "text": ...}]}],
  `chosen` / `rejected` = [{"role": "assistant", "content": [{"type": "text", "text": ...}]}],
  `images` = the question's images; plus `id`, `qid`, `source`, `pair_type`, `provenance` to trace rows back.
- `internvl`: the layout InternVL's MPO training (`internvl_chat_mpo.py --meta_path`) reads:
  `DIR/images/<source>/<qid>.<ext>` (one file per question), one JSON Lines file per
  source `DIR/annotations/<source>.jsonl` with `image`, `question` ("<image>\\n" + prompt),
  `chosen`, `rejected`, and `DIR/meta.json` {source: {root, annotation, data_augment, repeat_time,
  length}}. InternVL joins `root` with `image` relative to where it is launched, so `root` and
  `annotation` are absolute paths.

The prompt a trainer sees is the one the responses were sampled with: a pair's `question` is already
the user turn (its source question inside its prompt template, see stages/pair.py), used as is. So are
the pixels: both formats carry an image's original bytes where a plain `Image.open(...).convert("RGB")`
(what InternVL and transformers' processors do) reads the pixels the model was sampled with, and a
lossless PNG of those pixels (records.decode_image: upright, transparency on the source's background,
16-bit scaled) where it would not (records.image_for_readers).

An export is written to a temporary folder next to DIR and renamed into place when complete. DIR
must be missing, empty, or an earlier export: it holds `mmpr_export.json`, which lists every file
the export wrote. Only those files are ever removed; if DIR holds anything else (notes, a
checkpoint), the export refuses and names it. One export at a time may write DIR (a lock beside it).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import io
import json
import os
import sys
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from mmpr_pipeline import card as card_mod
from mmpr_pipeline.errors import ExportError
from mmpr_pipeline.preflight import first_file_above
from mmpr_pipeline.prompts import placeholders, user_content
from mmpr_pipeline.records import background_of, image_for_readers
from mmpr_pipeline.run_status import not_finished_error, status
from mmpr_pipeline.shards import iter_row_groups, staging_folder
from mmpr_pipeline.storage import as_path

MARKER = "mmpr_export.json"
BATCH_ROWS = 256
TRL_COLUMNS = ("id", "qid", "source", "pair_type")


# --- TRL ---------------------------------------------------------------------------------------


def trl_features():
    """`datasets.Features` of the TRL export (conversational prompt/chosen/rejected, images)."""
    from datasets import Features, Image, List, Value

    message = List(
        {"role": Value("string"), "content": List({"type": Value("string"), "text": Value("string")})}
    )
    return Features(
        {
            "prompt": message,
            "chosen": message,
            "rejected": message,
            "images": List(Image()),
            **{c: Value("string") for c in TRL_COLUMNS},
            "provenance": Value("string"),
        }
    )


@functools.lru_cache(maxsize=64)  # a question's image is shared by its pairs: decoded once
def _readable(data: bytes, background: tuple[int, int, int]) -> bytes:
    try:
        return image_for_readers(data, background)[0]
    except Exception:  # noqa: BLE001 - not an image: passed on as it is (the InternVL export names it)
        return data


def readable_images(pair: dict) -> list[bytes]:
    """The pair's images as other trainers should read them (see the module docstring)."""
    background = background_of(pair.get("provenance"))
    return [_readable(im["bytes"], background) for im in pair["images"] or []]


def trl_row(pair: dict) -> dict:
    """One pair row (PAIR_SCHEMA, as Python) in TRL's conversational vision format."""
    images = pair["images"] or []
    # `text` is set on every part (None for images) so every part has one Arrow type.
    user = user_content(pair["question"], images, lambda _: {"type": "image", "text": None})
    return {
        "prompt": [{"role": "user", "content": user}],
        "chosen": [{"role": "assistant", "content": [{"type": "text", "text": pair["chosen"]}]}],
        "rejected": [{"role": "assistant", "content": [{"type": "text", "text": pair["rejected"]}]}],
        "images": [{"bytes": data, "path": None} for data in readable_images(pair)],
        **{c: pair[c] for c in TRL_COLUMNS},
        "provenance": pair.get("provenance") or "{}",  # what shaped the pair (records.PAIR_SCHEMA)
    }


def _write_trl(run: dict, out: Path) -> dict:
    schema = trl_features().arrow_schema  # carries the `huggingface` metadata: images decode to PIL
    (out / "data").mkdir(parents=True)
    rows = 0
    for shard in run["shards"]:
        with pq.ParquetWriter(out / "data" / shard.name, schema) as writer:
            for batch in iter_row_groups(shard, BATCH_ROWS):  # one unit's pairs at a time
                converted = [trl_row(p) for p in batch.to_pylist()]
                writer.write_table(pa.Table.from_pylist(converted, schema=schema))
                rows += len(converted)
    return {"rows": rows, "shards": [f"data/{s.name}" for s in run["shards"]]}


# --- InternVL ----------------------------------------------------------------------------------

_EXTENSIONS = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tiff"}


def _image_extension(data: bytes, pair_id: str) -> str:
    from PIL import Image, UnidentifiedImageError

    try:
        fmt = Image.open(io.BytesIO(data)).format  # reads the header only
    except (UnidentifiedImageError, OSError) as e:
        raise ExportError(f"pair {pair_id}: image bytes are not a readable image ({e})") from None
    return _EXTENSIONS.get(fmt or "", (fmt or "img").lower())


def internvl_row(pair: dict, image_paths: list[str]) -> dict:
    """One annotation line: a single image is a string, several a list (InternVL's multi-image form)."""
    if image_paths and placeholders(pair["question"]) == len(image_paths):
        question = pair["question"]  # the source placed its images: InternVL reads the same `<image>`
    elif len(image_paths) == 1:
        question = "<image>\n" + pair["question"]
    else:  # InternVL numbers the images of a multi-image question in the text
        question = "".join(f"Image-{i + 1}: <image>\n" for i in range(len(image_paths))) + pair["question"]
    row = {
        "image": image_paths[0] if len(image_paths) == 1 else image_paths,
        "question": question,
        "chosen": pair["chosen"],
        "rejected": pair["rejected"],
        "id": pair["id"],
        "pair_type": pair["pair_type"],
        "provenance": pair.get("provenance") or "{}",
    }
    if not image_paths:
        del row["image"]  # InternVL treats a row without `image` as text-only
    return row


def _write_internvl(run: dict, out: Path, final: Path) -> dict:
    files, lengths, written = {}, {}, set()
    try:
        for shard in run["shards"]:
            for batch in iter_row_groups(shard, BATCH_ROWS):  # one unit's pairs at a time
                for pair in batch.to_pylist():
                    source = pair["source"]
                    if source not in files:
                        (out / "images" / source).mkdir(parents=True)
                        (out / "annotations").mkdir(exist_ok=True)
                        files[source] = open(out / "annotations" / f"{source}.jsonl", "w", encoding="utf-8")
                        lengths[source] = 0
                    paths = []
                    for k, data in enumerate(readable_images(pair)):
                        name = pair["qid"] if len(pair["images"]) == 1 else f"{pair['qid']}-{k}"
                        rel = f"{name}.{_image_extension(data, pair['id'])}"
                        if (source, rel) not in written:  # a question's image is shared by its pairs
                            (out / "images" / source / rel).write_bytes(data)
                            written.add((source, rel))
                        paths.append(rel)
                    files[source].write(json.dumps(internvl_row(pair, paths), ensure_ascii=False) + "\n")
                    lengths[source] += 1
    finally:
        for f in files.values():
            f.close()
    meta = {
        source: {
            "root": str(final / "images" / source),
            "annotation": str(final / "annotations" / f"{source}.jsonl"),
            "data_augment": False,
            "repeat_time": 1,
            "length": n,
        }
        for source, n in lengths.items()
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return {"rows": sum(lengths.values()), "sources": lengths, "images": len(written)}


# --- entry points ------------------------------------------------------------------------------

FORMATS = {"trl", "internvl"}


def _files_under(folder: Path) -> set[str]:
    """Relative paths of everything under `folder` that is not a directory (symlinks are not followed)."""
    found = set()
    for root, dirs, files in os.walk(folder):
        rel_root = Path(root).relative_to(folder)
        found.update((rel_root / name).as_posix() for name in files)
        found.update((rel_root / name).as_posix() for name in dirs if (Path(root) / name).is_symlink())
    return found


def _check_out(out: Path) -> None:
    """`out` can take an export: missing, empty, or an earlier export holding only files it wrote."""
    if out.is_symlink():  # replacing it would replace the link, not what it points to
        raise ExportError(f"--out {out}: is a symbolic link; give the folder it points to")
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out}: is a file, not a folder")
    blocker = first_file_above(out)
    if blocker is not None:
        raise ExportError(f"--out {out}: {blocker} is a file, so no folder can be made under it")
    if not out.exists() or not any(out.iterdir()):
        return
    marker = out / MARKER
    if not marker.is_file():
        raise ExportError(
            f"--out {out}: exists and holds files this tool did not write: choose an empty or new folder"
        )
    try:
        written = json.loads(marker.read_text(encoding="utf-8"))["files"]
    except (ValueError, KeyError, TypeError, OSError):
        raise ExportError(
            f"{marker}: does not list the files of the earlier export (an older version, or "
            f"edited); move {out} away or choose another --out"
        ) from None
    foreign = sorted(_files_under(out) - set(written) - {MARKER})
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise ExportError(
            f"--out {out}: holds files the earlier export did not write ({shown}); "
            "move them out or choose another --out"
        )


@contextlib.contextmanager
def _lock(out: Path):
    """Hold an exclusive lock on `out` (a file beside it) while exporting; refuse if another process
    has it."""
    lock_path = out.with_name(f".{out.name}.mmpr-export.lock")
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise ExportError(
                f"--out {out}: another mmpr export (pid {holder}) is writing it; wait for it to finish"
            ) from None
        try:  # the holder before us may have removed the file after we opened it: lock the one in place
            if os.fstat(fd).st_ino == os.stat(lock_path).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        with contextlib.suppress(OSError):  # the pid is for the message only; a full disk fails later, named
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.unlink(lock_path)
        os.close(fd)


def _remove_export(folder: Path, written: list[str]) -> list[str]:
    """Remove the files an export wrote, then its empty folders; return what was left (nothing, unless
    someone added files meanwhile: those stay)."""
    for rel in [*written, MARKER]:
        if not isinstance(rel, str) or Path(rel).is_absolute() or ".." in Path(rel).parts:
            continue  # a marker edited to point outside the folder: never follow it
        path = folder / rel
        if path.is_file() or path.is_symlink():
            path.unlink()
    for root, _dirs, _files in sorted(os.walk(folder), key=lambda w: -len(w[0])):
        try:
            os.rmdir(root)
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
    return sorted(_files_under(folder)) if folder.exists() else []


def export(run_dir: str | Path, fmt: str, out: str | Path) -> dict:
    """Export a run's pairs to `out` in format `fmt`; return a summary ({'rows': ..., ...})."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r} (expected one of: {', '.join(sorted(FORMATS))})")
    run_dir = as_path(run_dir)  # a local folder, or a run folder on object storage (s3://)
    run_status = status(run_dir)
    if (run_dir / "samples").is_dir() and not run_status.finished:
        raise ExportError(not_finished_error(run_dir, run_status, "an export of part of it"))
    try:
        run = card_mod.read_run(run_dir)
    except card_mod.CardError as e:
        raise ExportError(str(e)) from None
    out = Path(out).absolute()
    _check_out(out)
    with staging_folder(out, ExportError) as tmp:
        with _lock(out):
            _check_out(out)  # again, now that no other export can change it
            try:
                summary = _write_trl(run, tmp) if fmt == "trl" else _write_internvl(run, tmp, out)
            except OSError as e:  # a full disk: name the export, not a temporary file (pyarrow names none)
                raise OSError(e.errno, e.strerror or str(e), str(out)) from e
            summary = {
                "format": fmt,
                "run_dir": str(run_dir.resolve()),
                "fingerprint": run["stats"].get("fingerprint"),
                **summary,
                "files": sorted(_files_under(tmp)),
            }
            (tmp / MARKER).write_text(json.dumps(summary, indent=2) + "\n")
            if out.exists():  # empty, or an earlier export holding only its own files: swap
                old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
                old.rmdir()
                try:
                    out.rename(old)
                except OSError as e:
                    raise ExportError(
                        f"--out {out}: cannot be replaced ({e.strerror}; a mount point, or in use?)"
                    ) from None
                tmp.rename(out)
                earlier = json.loads((old / MARKER).read_text())["files"] if (old / MARKER).exists() else []
                left = _remove_export(old, earlier)
                if left:
                    print(
                        f"warning: kept {old}: files appeared there during the export "
                        f"({', '.join(left[:5])})",
                        file=sys.stderr,
                    )
            else:
                tmp.rename(out)
    return summary


def cli_export(args) -> int:
    """`mmpr export RUN_DIR --format {trl,internvl} --out DIR`."""
    summary = export(args.run_dir, args.format, args.out)
    out = Path(args.out)
    print(f"Exported {summary['rows']} pairs to {out} ({args.format}).")
    if args.format == "trl":
        print(f'Load with: load_dataset("parquet", data_dir="{out / "data"}", split="train")')
    else:
        print(f"Point InternVL's --meta_path at {out / 'meta.json'}")
    return 0
