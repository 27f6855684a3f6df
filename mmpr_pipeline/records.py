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
    # a ground-truth worked solution (`fields.rationale`), a chosen candidate; "" when none
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
    # who decided each response (scoring/model_judge.py): "rules", "model", or "" (undecided); what the
    # rules said (correct | wrong | undecided | format); the judge model's verdict ("" where it was not
    # asked), its two replies as given (as written | swapped), and whether they came from the cache
    ("decided_by", pa.list_(pa.string())),
    ("rules_verdict", pa.list_(pa.string())),
    ("judge_verdict", pa.list_(pa.string())),
    ("judge_replies", pa.list_(pa.string())),
    ("judge_cached", pa.list_(pa.bool_())),
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
        # JSON of the pair options that shaped this pair, "{}" when none: {"chosen": "reference"}
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
    hang or never end), at most MAX_IMAGE_BYTES; an s3:// URL is read from object storage."""
    from mmpr_pipeline import storage

    if storage.is_url(path):
        data = storage.read_bytes(path, MAX_IMAGE_BYTES + 1)
        if len(data) > MAX_IMAGE_BYTES:
            raise ValueError(f"{path} is larger than {MAX_IMAGE_BYTES // 2**20} MiB")
        return data
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


WHITE = (255, 255, 255)  # what transparency is composited over, as vLLM does (recipe: image_background)
_TRANSPARENT_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_PLAIN_MODES = ("RGB", "L", "1", "P", "CMYK", "YCbCr")  # a plain convert("RGB") renders these right


def _open(data: bytes):
    from PIL import Image

    img = Image.open(io.BytesIO(data))
    img.seek(0)  # the first frame of an animated image (GIF, APNG, WebP, multi-page TIFF)
    img.load()
    return img


def _orientation(img) -> int:
    try:
        return int(img.getexif().get(0x0112, 1) or 1)  # 0x0112: EXIF Orientation
    except Exception:  # noqa: BLE001 - a broken EXIF block is no orientation
        return 1


def _has_transparency(img) -> bool:
    return img.mode in _TRANSPARENT_MODES or "transparency" in img.info


def _integer_to_l(img):
    """A 16- or 32-bit integer (or float) grey image as 8-bit grey, scaled by its range, never clipped:
    16-bit (I;16*) from 0-65535, as viewers show such scans; 32-bit values that fit 8 or 16 bits
    from that range (Pillow reads some 16-bit files as "I"), wider ones stretched over their own
    min..max; a float image in 0-1 from that range."""
    import numpy as np
    from PIL import Image

    values = np.asarray(img).astype(np.float64)
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if img.mode.startswith("I;16"):
        top = 65535.0
    elif img.mode == "F" and low >= 0 and high <= 1:
        top = 1.0
    elif low >= 0 and high <= 255:
        top = 255.0
    elif low >= 0 and high <= 65535:
        top = 65535.0
    else:  # no standard range: stretch what is there
        values, top = values - low, max(high - low, 1.0)
    return Image.fromarray(np.clip(np.rint(values * (255.0 / top)), 0, 255).astype(np.uint8), "L")


def decode_image(data: bytes, background: tuple[int, int, int] = WHITE):
    """The model's pixels of stored image bytes: the one function that sampling, DropoutNTP
    continuations, the trainer, `mmpr eval`, the preview and the exports read images with. An RGB PIL
    image of the file as a person sees it (and as vLLM renders a file it loads itself,
    vllm/multimodal/image.py):
    - the first frame of an animated image;
    - its EXIF orientation applied, and no EXIF (or other metadata) left on it, so that nothing
      downstream rotates it again (vLLM applies the orientation a PIL image still carries);
    - transparency (RGBA, LA, palette or a transparent colour) composited over `background`
      (white, as vLLM; a plain convert("RGB") makes a black-on-transparent chart all black);
    - 16- and 32-bit integer grey scaled to 8 bits by its range (_integer_to_l), not clipped;
    - palette, bilevel ("1"), CMYK and YCbCr through their own colour models (Pillow's conversions).
    """
    from PIL import Image, ImageOps

    img = _open(data)
    if _orientation(img) != 1:
        img = ImageOps.exif_transpose(img)
    if img.mode.startswith(("I", "F")):
        img = _integer_to_l(img)
    if _has_transparency(img):
        rgba = img.convert("RGBA")
        flat = Image.new("RGBA", rgba.size, (*background, 255))
        img = Image.alpha_composite(flat, rgba)
    rgb = img.convert("RGB")
    clean = Image.new("RGB", rgb.size)  # a new image: no EXIF, ICC or other info carried over
    clean.paste(rgb)
    return clean


def is_blank(image) -> bool:
    """One flat colour (a decoded image, `decode_image`): almost always a broken file or a lost alpha
    channel, never a picture a question can be about."""
    return all(low == high for low, high in image.getextrema())


def background_of(provenance: str | None) -> tuple[int, int, int]:
    """The colour a pair's images are composited over: its provenance's `image_background` (a source
    that sets one, stages/pair.py), else white."""
    try:
        colour = json.loads(provenance or "{}").get("image_background")
    except (ValueError, AttributeError):
        colour = None
    return tuple(colour) if isinstance(colour, list) and len(colour) == 3 else WHITE


def plain_pixels(data: bytes) -> bool:
    """Whether a plain `Image.open(...).convert("RGB")`, as other trainers read image files (InternVL,
    transformers' processors), gives `decode_image`'s pixels: one frame, no transparency, no EXIF
    rotation, a mode Pillow converts by its colour model."""
    img = _open(data)
    frames = getattr(img, "n_frames", 1)
    return img.mode in _PLAIN_MODES and not _has_transparency(img) and _orientation(img) == 1 and frames == 1


def image_for_readers(data: bytes, background: tuple[int, int, int] = WHITE) -> tuple[bytes, bool]:
    """(bytes, re-encoded) of an image as the exports write it: the original bytes when any reader
    gets the model's pixels from them (`plain_pixels`), else `decode_image`'s pixels as PNG (lossless:
    the pixels the model was sampled with, upright and on the build's background)."""
    if background == WHITE and plain_pixels(data):
        return data, False
    buf = io.BytesIO()
    decode_image(data, background).save(buf, format="PNG")
    return buf.getvalue(), True


def downscale_image(data: bytes, max_pixels: int, background: tuple[int, int, int] = WHITE) -> bytes:
    """`data` unchanged when the image has at most `max_pixels` pixels, else the image scaled down
    (same aspect, width x height <= max_pixels) as PNG bytes: lossless, so whoever decodes them
    (the engine now, the trainer later) gets the same pixels."""
    from PIL import Image

    w, h = Image.open(io.BytesIO(data)).size  # reads the header only
    if w * h <= max_pixels:
        return data
    img = decode_image(data, background)
    scale = (max_pixels / (w * h)) ** 0.5
    size = (max(1, int(w * scale)), max(1, int(h * scale)))
    buf = io.BytesIO()
    img.resize(size, Image.Resampling.BICUBIC).save(buf, format="PNG")
    return buf.getvalue()
