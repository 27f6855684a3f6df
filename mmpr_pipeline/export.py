"""Write a run's pairs in the formats other trainers read: `mmpr export RUN_DIR --format trl|internvl --out DIR`.

- `trl`: Parquet shards `DIR/data/train-*.parquet` in TRL's conversational vision preference format,
  which `DPOTrainer` takes as is (`load_dataset("parquet", data_dir="DIR/data")`):
  `prompt` = [{"role": "user", "content": [{"type": "image"}, ..., {"type": "text", "text": ...}]}],
  `chosen` / `rejected` = [{"role": "assistant", "content": [{"type": "text", "text": ...}]}],
  `images` = the question's images; plus `id`, `qid`, `source`, `pair_type` to trace rows back.
- `internvl`: the layout InternVL's MPO training (`internvl_chat_mpo.py --meta_path`) reads:
  `DIR/images/<source>/<qid>.<ext>` (original bytes, one file per question), one JSON Lines file per
  source `DIR/annotations/<source>.jsonl` with `image`, `question` ("<image>\\n" + prompt),
  `chosen`, `rejected`, and `DIR/meta.json` {source: {root, annotation, data_augment, repeat_time,
  length}}. InternVL joins `root` with `image` relative to where it is launched, so `root` and
  `annotation` are absolute paths.

The prompt a trainer sees is the one the responses were sampled with: a pair's `question` is already
the user turn (its source question inside its prompt template, see stages/pair.py), used as is.

An export is written to a temporary folder next to DIR and renamed into place when complete; an
existing DIR is replaced only if an earlier export wrote it (it holds `mmpr_export.json`).
"""
from __future__ import annotations

import io
import json
import shutil
import sys
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from mmpr_pipeline import card as card_mod

MARKER = "mmpr_export.json"
BATCH_ROWS = 256
TRL_COLUMNS = ("id", "qid", "source", "pair_type")


class ExportError(ValueError):
    """A run folder that cannot be exported, or an output folder that must not be touched."""


# --- TRL ---------------------------------------------------------------------------------------

def trl_features():
    """`datasets.Features` of the TRL export (conversational prompt/chosen/rejected, images)."""
    from datasets import Features, Image, List, Value

    message = List({"role": Value("string"), "content": List({"type": Value("string"), "text": Value("string")})})
    return Features({"prompt": message, "chosen": message, "rejected": message, "images": List(Image()),
                     **{c: Value("string") for c in TRL_COLUMNS}})


def trl_row(pair: dict) -> dict:
    """One pair row (PAIR_SCHEMA, as Python) in TRL's conversational vision format."""
    images = pair["images"] or []
    # `text` is set on every part (None for images) so every part has one Arrow type.
    user = [{"type": "image", "text": None} for _ in images]
    user.append({"type": "text", "text": pair["question"]})
    return {
        "prompt": [{"role": "user", "content": user}],
        "chosen": [{"role": "assistant", "content": [{"type": "text", "text": pair["chosen"]}]}],
        "rejected": [{"role": "assistant", "content": [{"type": "text", "text": pair["rejected"]}]}],
        "images": [{"bytes": im["bytes"], "path": None} for im in images],
        **{c: pair[c] for c in TRL_COLUMNS},
    }


def _write_trl(run: dict, out: Path) -> dict:
    schema = trl_features().arrow_schema  # carries the `huggingface` metadata: images decode to PIL
    (out / "data").mkdir(parents=True)
    rows = 0
    for shard in run["shards"]:
        with pq.ParquetWriter(out / "data" / shard.name, schema) as writer:
            for batch in pq.ParquetFile(shard).iter_batches(batch_size=BATCH_ROWS):
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
    if len(image_paths) == 1:
        question = "<image>\n" + pair["question"]
    else:  # InternVL numbers the images of a multi-image question in the text
        question = "".join(f"Image-{i + 1}: <image>\n" for i in range(len(image_paths))) + pair["question"]
    row = {"image": image_paths[0] if len(image_paths) == 1 else image_paths, "question": question,
           "chosen": pair["chosen"], "rejected": pair["rejected"], "id": pair["id"], "pair_type": pair["pair_type"]}
    if not image_paths:
        del row["image"]  # InternVL treats a row without `image` as text-only
    return row


def _write_internvl(run: dict, out: Path, final: Path) -> dict:
    files, lengths, written = {}, {}, set()
    try:
        for shard in run["shards"]:
            for batch in pq.ParquetFile(shard).iter_batches(batch_size=BATCH_ROWS):
                for pair in batch.to_pylist():
                    source = pair["source"]
                    if source not in files:
                        (out / "images" / source).mkdir(parents=True)
                        (out / "annotations").mkdir(exist_ok=True)
                        files[source] = open(out / "annotations" / f"{source}.jsonl", "w", encoding="utf-8")
                        lengths[source] = 0
                    paths = []
                    for k, im in enumerate(pair["images"] or []):
                        name = pair["qid"] if len(pair["images"]) == 1 else f"{pair['qid']}-{k}"
                        rel = f"{name}.{_image_extension(im['bytes'], pair['id'])}"
                        if (source, rel) not in written:  # a question's image is shared by its pairs
                            (out / "images" / source / rel).write_bytes(im["bytes"])
                            written.add((source, rel))
                        paths.append(rel)
                    files[source].write(json.dumps(internvl_row(pair, paths), ensure_ascii=False) + "\n")
                    lengths[source] += 1
    finally:
        for f in files.values():
            f.close()
    meta = {source: {"root": str(final / "images" / source),
                     "annotation": str(final / "annotations" / f"{source}.jsonl"),
                     "data_augment": False, "repeat_time": 1, "length": n}
            for source, n in lengths.items()}
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return {"rows": sum(lengths.values()), "sources": lengths, "images": len(written)}


# --- entry points ------------------------------------------------------------------------------

FORMATS = {"trl", "internvl"}


def export(run_dir: str | Path, fmt: str, out: str | Path) -> dict:
    """Export a run's pairs to `out` in format `fmt`; return a summary ({'rows': ..., ...})."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r} (expected one of: {', '.join(sorted(FORMATS))})")
    try:
        run = card_mod.read_run(run_dir)
    except card_mod.CardError as e:
        raise ExportError(str(e)) from None
    out = Path(out).resolve()
    if out.exists() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise ExportError(f"{out} exists and holds files this tool did not write: choose an empty or new folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        summary = _write_trl(run, tmp) if fmt == "trl" else _write_internvl(run, tmp, out)
        summary = {"format": fmt, "run_dir": str(Path(run_dir).resolve()),
                   "fingerprint": run["stats"].get("fingerprint"), **summary}
        (tmp / MARKER).write_text(json.dumps(summary, indent=2) + "\n")
        if out.exists():  # an earlier export: swap, then drop the old one
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return summary


def cli_export(args) -> int:
    """`mmpr export RUN_DIR --format {trl,internvl} --out DIR`."""
    try:
        summary = export(args.run_dir, args.format, args.out)
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    print(f"Exported {summary['rows']} pairs to {out} ({args.format}).")
    if args.format == "trl":
        print(f'Load with: load_dataset("parquet", data_dir="{out / "data"}", split="train")')
    else:
        print(f"Point InternVL's --meta_path at {out / 'meta.json'}")
    return 0
