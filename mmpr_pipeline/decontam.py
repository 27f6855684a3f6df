"""Near-duplicate tests for images and questions: benchmark decontamination and duplicate rows.

Images: a 64-bit pHash and a 64-bit dHash (`imagehash`) of the pixels that `records.decode_image`
gives (the pixels the model sees), compared by their summed Hamming distance (0..128). Re-encoding,
resizing, format changes and colour jitter move both hashes by a few bits; a crop moves them more,
so a benchmark image is indexed with crops of itself (`CROPS`) and a copy is matched against the
nearest of them. Distinct photos are 30+ bits apart (benchmarks/bench_decontam.py).

Questions: normalised (NFKC, case-folded, punctuation and spacing removed) and cut into word
n-grams; a question leaks when it shares a span of `ngram` words with a benchmark question. The
n-grams are indexed by a 64-bit hash, and every hit is confirmed on the words themselves.
"""

from __future__ import annotations

import hashlib
import itertools
import re
import unicodedata
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from mmpr_pipeline.records import decode_image, stable_hash

IMAGE_DISTANCE = 22  # summed pHash + dHash bits; copies measure <= 16, distinct photos >= 30
NGRAM = 10  # words in a shared span that counts as a leaked question
# Crops of a benchmark image that are indexed beside it: (fraction cut per axis, where the cut
# falls: 0 = all at the start, 1 = all at the end). A copy cropped by up to ~10% lies near one.
CROPS = tuple((c, fx, fy) for c in (0.04, 0.08) for fx, fy in itertools.product((0.0, 0.5, 1.0), repeat=2))
HASH_SIDE = 256  # images are shrunk to this side before hashing: the hashes read 32x32 and 9x8 pixels
COLOUR_GRID = 3
# (absolute, relative to the distance from grey): copies measure within (0, 0.35) + 17, the demo's
# same-shape-other-colour images 95 past it
COLOUR_TOLERANCE = (24, 0.35)
HUE_BINS = 12
HUE_MIN_SATURATED = 5  # per mille of the pixels
HUE_TOLERANCE = 0.6  # L1 distance of the saturated pixels' hue distributions (0..2)
COLOUR_BYTES = 2 * COLOUR_GRID**2 + 1 + HUE_BINS  # grid (Cb, Cr), saturated per mille, hue shares


# Reasons of rows set aside as leaks or near-duplicates: fixed forms that reason_group folds into one
# count per benchmark (or source) for stats.json, the card and the preview.
LEAK = re.compile(r"^benchmark leak \((?P<benchmark>[\w-]+) row \d+\): (?P<kind>image|question)")
NEAR_DUPLICATE = re.compile(r"^near-duplicate of (?P<source>[\w-]+) row \d+ \((?P<how>[^)]*)\)")


def leak_reason(benchmark: str, row: int, kind: str, detail: str) -> str:
    return f"benchmark leak ({benchmark} row {row}): {kind} {detail}"


def near_duplicate_reason(source: str, row: int) -> str:
    return f"near-duplicate of {source} row {row} (same normalised question, near-identical image)"


def reason_group(reason: str) -> str:
    """The reason without its row: what stats.json, the card and the preview count."""
    if m := LEAK.match(reason):
        return f"benchmark leak ({m['benchmark']}): {m['kind']}"
    if m := NEAR_DUPLICATE.match(reason):
        return f"near-duplicate of an earlier {m['source']} row ({m['how']})"
    return reason


def leak_benchmark(reason: str) -> str | None:
    m = LEAK.match(reason)
    return m["benchmark"] if m else None


def normalise_question(text: str) -> str:
    """Case, accents' composed forms, punctuation and spacing removed: 'What  is X?' == 'what is x'."""
    text = unicodedata.normalize("NFKC", text).casefold()
    return " ".join(re.findall(r"\w+", text))


def question_words(text: str) -> list[str]:
    return normalise_question(text).split()


def _word_hash(words: list[str] | tuple[str, ...]) -> int:
    return int.from_bytes(hashlib.blake2b(" ".join(words).encode(), digest_size=8).digest(), "little")


def ngram_hashes(words: list[str], n: int) -> list[int]:
    return [_word_hash(words[i : i + n]) for i in range(len(words) - n + 1)]


class ImageHash(NamedTuple):
    phash: int  # 64 bits, of the grey pixels
    dhash: int  # 64 bits, of the grey pixels
    colour: bytes  # mean (Cb, Cr) of a 3x3 grid: the grey hashes cannot tell a red shape from a green one


def _decoded(data: bytes):
    from PIL import Image

    img = decode_image(data)
    if max(img.size) > HASH_SIDE:
        scale = HASH_SIDE / max(img.size)
        img = img.resize(
            (max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.Resampling.BOX
        )
    return img


def _hash_pair(grey) -> tuple[int, int]:
    import imagehash

    return int(str(imagehash.phash(grey)), 16), int(str(imagehash.dhash(grey)), 16)


def _colour_grid(img) -> bytes:
    ycc = np.asarray(img.convert("YCbCr"))
    h, w = ycc.shape[:2]
    means = []
    for i in range(COLOUR_GRID):
        for j in range(COLOUR_GRID):
            cell = ycc[
                i * h // COLOUR_GRID : max(i * h // COLOUR_GRID + 1, (i + 1) * h // COLOUR_GRID),
                j * w // COLOUR_GRID : max(j * w // COLOUR_GRID + 1, (j + 1) * w // COLOUR_GRID),
                1:,
            ]
            # integer sums (a cell of a HASH_SIDE image sums to < 2**24, so a float32 mean's sums are
            # exact too): the float32 means as before, without converting the image to floats
            total = cell.sum((0, 1), dtype=np.int64).astype(np.float32)
            means.append(total / np.float32(cell.shape[0] * cell.shape[1]))
    grid = np.clip(np.rint(np.concatenate(means)), 0, 255).astype(np.uint8).tobytes()
    # hues of the saturated pixels: small shapes of another colour hardly move the grid's means
    hsv = np.asarray(img.convert("HSV")).reshape(-1, 3)
    hue = hsv[(hsv[:, 1] > 64) & (hsv[:, 2] > 40), 0]
    # soft bins around the hue circle: a small hue shift (JPEG's red at 250 instead of 0) moves little mass;
    # counted per hue value (the weights are multiples of 1/256: the sums are exact in any order)
    counts = np.bincount(hue, minlength=256).astype(np.float64)
    scaled = np.arange(256) * HUE_BINS
    low, frac = scaled // 256, (scaled % 256) / 256
    hist = np.bincount(low % HUE_BINS, counts * (1 - frac), HUE_BINS) + np.bincount(
        (low + 1) % HUE_BINS, counts * frac, HUE_BINS
    )
    share = np.rint(255 * hist / max(1, len(hue))).astype(np.uint8).tobytes()
    return grid + bytes([min(255, round(1000 * len(hue) / len(hsv)))]) + share


def colours_agree(a: bytes, b: bytes) -> bool:
    """Two colour grids within COLOUR_TOLERANCE: an absolute part plus a part relative to how far
    from grey the cell is (brightness, contrast and saturation jitter scale that distance)."""
    x, y = np.frombuffer(a, np.uint8).astype(np.int16), np.frombuffer(b, np.uint8).astype(np.int16)
    n = 2 * COLOUR_GRID**2
    dev = np.maximum(np.abs(x[:n] - 128), np.abs(y[:n] - 128))
    if not np.all(np.abs(x[:n] - y[:n]) <= COLOUR_TOLERANCE[0] + COLOUR_TOLERANCE[1] * dev):
        return False
    if min(x[n], y[n]) < HUE_MIN_SATURATED:  # too few saturated pixels (per mille) for their hues to say much
        return True
    return bool(np.abs(x[n + 1 :] - y[n + 1 :]).sum() <= HUE_TOLERANCE * 255)


def image_hash(data: bytes) -> ImageHash:
    """The perceptual hashes and colour grid of an encoded image's pixels (records.decode_image)."""
    img = _decoded(data)
    return ImageHash(*_hash_pair(img.convert("L")), _colour_grid(img))


def image_hash_with_crops(data: bytes) -> list[ImageHash]:
    """ImageHash of the image and of each of its CROPS (with the whole image's colours), image first."""
    img = _decoded(data)
    grey, colour = img.convert("L"), _colour_grid(img)
    out = [ImageHash(*_hash_pair(grey), colour)]
    w, h = grey.size
    for c, fx, fy in CROPS:
        left, top = int(c * fx * w), int(c * fy * h)
        box = (left, top, max(left + 1, int(w - c * (1 - fx) * w)), max(top + 1, int(h - c * (1 - fy) * h)))
        out.append(ImageHash(*_hash_pair(grey.crop(box)), colour))
    return out


def hash_distance(a, b) -> int:
    """Summed Hamming distance of two ImageHash's pHash and dHash (0..128)."""
    return (a[0] ^ b[0]).bit_count() + (a[1] ^ b[1]).bit_count()


def same_image(a, b, distance: int = IMAGE_DISTANCE) -> bool:
    return hash_distance(a, b) <= distance and colours_agree(a[2], b[2])


def question_key(question: str) -> str:
    return stable_hash("question", normalise_question(question))


# -- the benchmark index -------------------------------------------------------------------------


def benchmark_entry(name: str, row: int, question: str, images: list[bytes], ngram: int) -> dict[str, Any]:
    """What the index keeps of one benchmark row: its image hashes (with crops) and question n-grams."""
    words = question_words(question)
    return dict(
        benchmark=name,
        row=row,
        hashes=[h for data in images for h in image_hash_with_crops(data)],
        words=words,
        ngrams=ngram_hashes(words, ngram),
    )


@dataclass
class Benchmarks:
    """Every benchmark row's image hashes and question n-grams, as flat arrays (one Ray object)."""

    names: list[str]  # benchmark names, in recipe order
    image_distance: dict[str, int]  # per benchmark
    ngram: dict[str, int]  # per benchmark
    phash: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))
    dhash: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))
    image_owner: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # index into `rows`
    image_limit: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint8))  # its benchmark's distance
    colour: list[bytes] = field(default_factory=list)  # per image hash: the whole image's colour grid
    ngram_hash: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))  # sorted
    ngram_owner: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    rows: list[tuple[int, int]] = field(default_factory=list)  # (benchmark number, row index)
    words: list[list[str]] = field(default_factory=list)  # per entry of `rows`
    identity: str = ""  # changes whenever what the index would match changes
    summary: dict[str, dict[str, int]] = field(default_factory=dict)  # benchmark -> {rows, unreadable}

    @classmethod
    def build(cls, names: list[str], settings: dict[str, tuple[int, int]], entries: list[dict]) -> Benchmarks:
        """`settings`: benchmark -> (image_distance, ngram); `entries`: benchmark_entry dicts."""
        number = {n: i for i, n in enumerate(names)}
        entries = sorted(entries, key=lambda e: (number[e["benchmark"]], e["row"]))
        idx = cls(
            names=list(names),
            image_distance={n: settings[n][0] for n in names},
            ngram={n: settings[n][1] for n in names},
        )
        p, d, owner, limit, ng, ng_owner = [], [], [], [], [], []
        for k, e in enumerate(entries):
            idx.rows.append((number[e["benchmark"]], e["row"]))
            idx.words.append(e["words"])
            for ph, dh, colour in e["hashes"]:
                p.append(ph)
                d.append(dh)
                idx.colour.append(colour)
                owner.append(k)
                limit.append(settings[e["benchmark"]][0])
            ng += e["ngrams"]
            ng_owner += [k] * len(e["ngrams"])
        idx.phash, idx.dhash = np.array(p, np.uint64), np.array(d, np.uint64)
        idx.image_owner = np.array(owner, np.int64)
        idx.image_limit = np.array(limit, np.uint8)
        order = np.argsort(np.array(ng, np.uint64), kind="stable")
        idx.ngram_hash = np.array(ng, np.uint64)[order]
        idx.ngram_owner = np.array(ng_owner, np.int64)[order]
        idx.identity = stable_hash(
            "benchmarks",
            names,
            [settings[n] for n in names],
            list(idx.rows),
            idx.phash.tobytes(),
            idx.dhash.tobytes(),
            b"".join(idx.colour),
            idx.ngram_hash.tobytes(),
        )
        return idx

    def __len__(self) -> int:
        return len(self.rows)

    def match_image(self, h: ImageHash) -> tuple[int, int] | None:
        """(entry, distance) of the nearest benchmark image (or crop of one) within its benchmark's
        distance whose colours agree, or None."""
        if not len(self.phash):
            return None
        dist = np.bitwise_count(self.phash ^ np.uint64(h[0])) + np.bitwise_count(self.dhash ^ np.uint64(h[1]))
        hits = np.flatnonzero(dist <= self.image_limit)
        for k in hits[np.argsort(dist[hits], kind="stable")]:  # nearest first; ties: the earliest row
            if colours_agree(self.colour[k], h[2]):
                return int(self.image_owner[k]), int(dist[k])
        return None

    def match_question(self, question: str) -> tuple[int, int] | None:
        """(entry, span) of the first benchmark question sharing a span of at least its benchmark's
        `ngram` words with `question` (span: the longest such run, in words), or None."""
        words = question_words(question)
        found: dict[int, int] = {}
        for n in sorted(set(self.ngram.values())):
            for i, h in enumerate(ngram_hashes(words, n)):
                lo = np.searchsorted(self.ngram_hash, np.uint64(h), side="left")
                hi = np.searchsorted(self.ngram_hash, np.uint64(h), side="right")
                for owner in self.ngram_owner[lo:hi]:
                    owner = int(owner)
                    if self.ngram[self.names[self.rows[owner][0]]] != n or owner in found:
                        continue
                    if _contains(self.words[owner], words[i : i + n]):  # confirm: not a hash collision
                        found[owner] = _longest_common_span(words, self.words[owner])
        if not found:
            return None
        owner = min(found)
        return owner, found[owner]

    def describe(self, entry: int) -> tuple[str, int]:
        b, row = self.rows[entry]
        return self.names[b], row


def _contains(words: list[str], span: list[str]) -> bool:
    n = len(span)
    return any(words[i : i + n] == span for i in range(len(words) - n + 1))


def _longest_common_span(a: list[str], b: list[str]) -> int:
    from difflib import SequenceMatcher

    m = SequenceMatcher(None, a, b, autojunk=False).find_longest_match(0, len(a), 0, len(b))
    return m.size


# -- near-duplicate rows -------------------------------------------------------------------------


def _pack(h: ImageHash) -> bytes:
    return h[0].to_bytes(8, "big") + h[1].to_bytes(8, "big") + h[2]


def _unpack(data: bytes) -> list[ImageHash]:
    size = 16 + COLOUR_BYTES
    return [
        ImageHash(
            int.from_bytes(data[i : i + 8], "big"),
            int.from_bytes(data[i + 8 : i + 16], "big"),
            data[i + 16 : i + size],
        )
        for i in range(0, len(data), size)
    ]


def row_key(image_hashes: list[ImageHash], question: str) -> bytes:
    """What the plan compares rows by, packed in one bytes object (the driver holds one per row):
    the question key (8 bytes), then pHash, dHash and colour grid of each image."""
    return bytes.fromhex(question_key(question)) + b"".join(_pack(h) for h in image_hashes)


class EarlierRows:
    """Rows of every source seen so far, in plan order (sources in recipe order, rows in source
    order). A later row with the same normalised question whose images have the same pHash and dHash
    (`exact`), or hashes within IMAGE_DISTANCE bits (`fuzzy`), and agreeing colours, is a
    near-duplicate of the first."""

    def __init__(self, mode: str):
        self.mode = mode
        self.rows: dict[bytes, list[tuple[bytes, tuple[str, int]]]] = {}

    def first(self, key: bytes, source: str, row: int) -> tuple[str, int] | None:
        """(source, row) of the earlier row that `key` repeats, or None (then `key` is remembered)."""
        hashes = _unpack(key[8:])
        # exact: only rows with the very same hashes are compared; fuzzy: every row of the question
        group = key[:8] + (b"".join(_pack(h)[:16] for h in hashes) if self.mode == "exact" else b"")
        earlier = self.rows.setdefault(group, [])
        for other, where in earlier:
            others = _unpack(other[8:])
            if len(others) == len(hashes) and all(same_image(a, b) for a, b in zip(others, hashes)):
                return where
        earlier.append((key, (source, row)))
        return None
