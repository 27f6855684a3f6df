"""Procedural stand-ins for photos, and the edits a copied image goes through (used by the
decontamination tests and benchmarks/bench_decontam.py; nothing can be downloaded here).

They are not real photos: a colour field with a 1/f^beta spectrum (as natural images have, beta
1.0-1.6), half of them blended with a sky-like vertical gradient, with 2-8 random ellipses and
polygons drawn over it, then blurred and given sensor-like noise. Distinct seeds give unrelated images.
"""

from __future__ import annotations

import io
import random

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter


def _field(rng: np.random.Generator, h: int, w: int, beta: float) -> np.ndarray:
    fy, fx = np.fft.fftfreq(h)[:, None], np.fft.fftfreq(w)[None, :]
    f = np.sqrt(fx**2 + fy**2)
    f[0, 0] = 1
    spec = (rng.normal(size=(h, w)) + 1j * rng.normal(size=(h, w))) / f**beta
    x = np.real(np.fft.ifft2(spec))
    return (x - x.mean()) / (x.std() + 1e-9)


def photo(seed: int, h: int = 320, w: int = 416) -> Image.Image:
    rng = np.random.default_rng(seed)
    base = np.stack([_field(rng, h, w, rng.uniform(1.0, 1.6)) for _ in range(3)], -1)
    img = base @ (rng.normal(size=(3, 3)) * 0.4 + np.eye(3))  # correlated colour channels
    img = 128 + 45 * img + rng.uniform(-40, 40, size=3)
    if seed % 2:
        t = np.linspace(0, 1, h)[:, None, None]
        img = 0.5 * img + 0.5 * (rng.uniform(0, 255, 3) * (1 - t) + rng.uniform(0, 255, 3) * t)
    pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    draw, r = ImageDraw.Draw(pil), random.Random(seed)
    for _ in range(r.randint(2, 8)):
        x0, y0 = r.randint(-50, w), r.randint(-50, h)
        color = tuple(r.randint(0, 255) for _ in range(3))
        if r.random() < 0.5:
            draw.ellipse((x0, y0, x0 + r.randint(20, 200), y0 + r.randint(20, 200)), fill=color)
        else:
            draw.polygon([(r.randint(0, w), r.randint(0, h)) for _ in range(r.randint(3, 6))], fill=color)
    arr = np.asarray(pil.filter(ImageFilter.GaussianBlur(1.0))).astype(float)
    arr += rng.normal(0, 6, arr.shape)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def encode(img: Image.Image, fmt: str = "PNG", quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": quality} if fmt == "JPEG" else {}))
    return buf.getvalue()


def crop(img: Image.Image, fraction: float, r: random.Random) -> Image.Image:
    """Cut `fraction` of each axis, split at random between the two sides."""
    w, h = img.size
    lx, ty = r.uniform(0, fraction), r.uniform(0, fraction)
    return img.crop((int(lx * w), int(ty * h), int(w - (fraction - lx) * w), int(h - (fraction - ty) * h)))


def resize(img: Image.Image, scale: float) -> Image.Image:
    return img.resize(
        (max(8, int(img.width * scale)), max(8, int(img.height * scale))), Image.Resampling.BICUBIC
    )


def jitter(img: Image.Image, r: random.Random, amount: float = 0.1) -> Image.Image:
    """Mild colour jitter: brightness, contrast and saturation each scaled by 1 +- amount."""
    for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        img = enhance(img).enhance(r.uniform(1 - amount, 1 + amount))
    return img


def copy_of(img: Image.Image, r: random.Random) -> bytes:
    """A copy through every edit at once: a crop of up to 10%, a resize by 0.5-1.5x, mild colour jitter,
    then JPEG at quality 60-90 or PNG (so PNG<->JPEG both ways when the original is either)."""
    img = jitter(resize(crop(img, r.uniform(0, 0.10), r), r.uniform(0.5, 1.5)), r)
    return encode(img, "JPEG", r.randint(60, 90)) if r.random() < 0.5 else encode(img, "PNG")
