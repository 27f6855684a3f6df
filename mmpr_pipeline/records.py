"""Arrow schemas of the rows that flow through the pipeline, their ids, and image encoding.

A question's journey (see README): Question -> Sample row (the question plus list columns of its
`n` responses and verdicts) -> Pair rows. One type per column, always: Ray Data merges blocks
by schema, and a column that is a string in one block and a list in another fails to merge.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import stat

import pyarrow as pa

PIPELINES = ("correctness", "dropout_ntp")
PAIR_TYPES = ("correctness", "format", "dropout_ntp")

# The way `datasets` stores its `Image` feature: a struct of encoded bytes and an optional path.
# A list of these is `Sequence(Image())` / `List(Image())`, which `load_dataset` decodes to PIL.
IMAGE_STRUCT = pa.struct([("bytes", pa.binary()), ("path", pa.string())])

QUESTION_FIELDS = [
    ("qid", pa.string()),  # stable: hash of source + row content
    ("source", pa.string()),
    ("row_index", pa.int64()),  # position in the source, for audit and rejects
    ("unit", pa.int64()),  # work-unit index within the source (resume granularity)
    ("unit_plan", pa.string()),  # the unit's plan (units.WorkUnit as JSON): where its rows come from
    ("pipeline", pa.string()),  # correctness | dropout_ntp
    ("task", pa.string()),  # task family when the source has one, else ""
    ("images", pa.list_(pa.binary())),  # encoded image bytes, never re-encoded; [] for a text-only question
    #                                   (but downscaled to the source's image_max_pixels when set)
    ("question", pa.string()),
    ("answer", pa.string()),  # "" when the source has none (dropout_ntp)
    ("answers", pa.list_(pa.string())),  # every acceptable answer (VQA has several); [answer] usually
    ("answer_type", pa.string()),
    ("options", pa.list_(pa.string())),
    ("given_response", pa.string()),  # dropout_ntp: a response the source already has, else ""
    # issue 13: a ground-truth worked solution (`fields.rationale`), a chosen candidate; "" when none
    ("rationale", pa.string()),
]
QUESTION_SCHEMA = pa.schema(QUESTION_FIELDS)

# After sampling (and, for dropout_ntp, cutting and continuing) and scoring: one row per question.
SAMPLE_FIELDS = QUESTION_FIELDS + [
    ("prompt_template", pa.string()),
    ("responses", pa.list_(pa.string())),
    ("n_tokens", pa.list_(pa.int64())),
    ("finish_reasons", pa.list_(pa.string())),
    ("error", pa.string()),  # engine error for this question, "" when none
    ("image_tokens", pa.int64()),  # image tokens in the sampling prompt the engine received
    # correctness verdicts, one per response (empty lists for dropout_ntp)
    ("extracted", pa.list_(pa.string())),  # null where nothing parsable was found
    ("correct", pa.list_(pa.bool_())),
    ("score", pa.list_(pa.float64())),
    ("reason", pa.list_(pa.string())),
    # dropout_ntp, one per response (empty lists for correctness)
    ("prefix_words", pa.list_(pa.int64())),  # -1 where the response was too short to cut
    ("continuations", pa.list_(pa.string())),
    ("continuation_tokens", pa.list_(pa.int64())),
    ("continuation_image_tokens", pa.list_(pa.int64())),  # image tokens in the prompt actually sent: 0
    ("sample_seconds", pa.float64()),  # this question's share of its batch's engine time
    ("continue_seconds", pa.float64()),
    ("score_seconds", pa.float64()),
    # JSON of the sampling settings this question's source used (the recipe's, with the source's
    # `sampling` overrides): the same text as its pairs' `sampling`
    ("sampling", pa.string()),
]
SAMPLE_SCHEMA = pa.schema(SAMPLE_FIELDS)

PAIR_SCHEMA = pa.schema(
    [
        ("id", pa.string()),  # hash of qid + pair_type + chosen + rejected
        ("qid", pa.string()),
        ("source", pa.string()),
        ("task", pa.string()),
        ("images", pa.list_(IMAGE_STRUCT)),
        ("question", pa.string()),
        ("answer", pa.string()),
        ("chosen", pa.string()),
        ("rejected", pa.string()),
        ("pair_type", pa.string()),  # correctness | format | dropout_ntp
        ("model", pa.string()),
        ("prompt_template", pa.string()),
        ("sampling", pa.string()),  # JSON of the sampling parameters used
        ("chosen_index", pa.int64()),  # sample index within the question's responses
        ("rejected_index", pa.int64()),
        ("cut_ratio", pa.float64()),  # dropout_ntp only, else null
        ("prefix_words", pa.int64()),  # dropout_ntp only, else null
        # issue 13: JSON of the pair options that shaped this pair, "{}" when none: {"chosen": "reference"}
        # (chosen_index -1: the source's `fields.rationale`), {"answer_fix": true} (the chosen's final-answer
        # line rewritten to the reference answer), {"with_image": true} (DropoutNTP continued with the image)
        ("provenance", pa.string()),
    ]
)

REJECT_SCHEMA = pa.schema(
    [
        ("source", pa.string()),
        ("row_index", pa.int64()),
        ("reason", pa.string()),
        ("row", pa.string()),  # a short, printable excerpt of the row for audit
    ]
)


def stable_hash(*parts: object, length: int = 16) -> str:
    """Hex digest of the parts; stable across processes and machines (unlike `hash`)."""
    h = hashlib.sha256()
    for part in parts:
        data = part if isinstance(part, bytes) else json.dumps(part, sort_keys=True, default=str).encode()
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()[:length]


def question_id(source: str, images: bytes | list[bytes], question: str, answer: str) -> str:
    """A question's stable id. One image hashes as its bytes (the ids of single-image questions never
    change); several as the digest of all of them, in order; a text-only question as b""."""
    if isinstance(images, (list, tuple)):
        images = (
            images[0] if len(images) == 1 else (stable_hash(*images, length=64).encode() if images else b"")
        )
    return stable_hash("q", source, images, question, answer)


def pair_id(qid: str, pair_type: str, chosen: str, rejected: str) -> str:
    return stable_hash("p", qid, pair_type, chosen, rejected)


def encode_image(image, fmt: str = "PNG") -> bytes:
    """Bytes of an image given as bytes, a path, a PIL image or a `datasets` {'bytes','path'} dict."""
    if image is None:
        raise ValueError("no image")
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image)
    if isinstance(image, dict):
        if image.get("bytes"):
            return bytes(image["bytes"])
        if image.get("path"):
            return encode_image(image["path"], fmt)
        raise ValueError("image dict has neither bytes nor path")
    if isinstance(image, str):
        return read_image_file(image)
    if hasattr(image, "save"):  # PIL.Image.Image
        buf = io.BytesIO()
        image.save(buf, format=image.format or fmt)
        return buf.getvalue()
    raise ValueError(f"unsupported image value of type {type(image).__name__}")


MAX_IMAGE_BYTES = 64 * 2**20  # no real image file is larger; a bigger one is a wrong path or a device


def read_image_file(path: str) -> bytes:
    """The bytes of an image file: regular files only (a FIFO or a device such as /dev/zero would
    hang or never end), at most MAX_IMAGE_BYTES."""
    info = os.stat(path)
    if not stat.S_ISREG(info.st_mode):
        raise ValueError(f"{path} is not a regular file")
    if info.st_size > MAX_IMAGE_BYTES:
        raise ValueError(f"{path} is larger than {MAX_IMAGE_BYTES // 2**20} MiB")
    with open(path, "rb") as f:
        data = f.read(MAX_IMAGE_BYTES + 1)
    if len(data) > MAX_IMAGE_BYTES:
        raise ValueError(f"{path} is larger than {MAX_IMAGE_BYTES // 2**20} MiB")
    return data


def decode_image(data: bytes):
    """PIL image (RGB) from encoded bytes; decoding happens only where the engine needs pixels."""
    from PIL import Image

    img = Image.open(io.BytesIO(data))
    img.load()
    return img.convert("RGB")


def downscale_image(data: bytes, max_pixels: int) -> bytes:
    """`data` unchanged when the image has at most `max_pixels` pixels, else the image scaled down
    (same aspect, width x height <= max_pixels) as PNG bytes: lossless, so whoever decodes them
    (the engine now, the trainer later) gets the same pixels."""
    from PIL import Image

    w, h = Image.open(io.BytesIO(data)).size  # reads the header only
    if w * h <= max_pixels:
        return data
    img = decode_image(data)
    scale = (max_pixels / (w * h)) ** 0.5
    size = (max(1, int(w * scale)), max(1, int(h * scale)))
    buf = io.BytesIO()
    img.resize(size, Image.Resampling.BICUBIC).save(buf, format="PNG")
    return buf.getvalue()
