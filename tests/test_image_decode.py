"""One image path with correct pixels: `records.decode_image` against independent numpy renderings of
every kind of file real sources hold (made here, not shipped): transparency over white, EXIF rotation,
palette, LA, bilevel, CMYK, 16- and 32-bit integer grey, the first frame of an animation. Mean absolute
error <= 2 of 255, the same size and orientation, never blank; and a flat image is a "blank image"."""

import io

import numpy as np
import pytest
from PIL import Image

from mmpr_pipeline import records
from mmpr_pipeline.records import decode_image, image_for_readers, is_blank, plain_pixels

H, W = 48, 64  # not square: a rotation shows in the size


def _chart() -> np.ndarray:
    """A black-on-nothing chart: 1 where ink is (axes, three bars of different heights, a diagonal)."""
    ink = np.zeros((H, W), np.uint8)
    ink[H - 4, 4:] = ink[4 : H - 3, 4] = 1  # axes
    for k, height in enumerate((10, 30, 20)):
        ink[H - 4 - height : H - 4, 10 + 16 * k : 18 + 16 * k] = 1
    ink[np.arange(H), np.arange(H) * W // H // 2] = 1
    return ink


def _photo() -> np.ndarray:
    """An RGB picture with a top and a left that differ (orientation shows), smooth enough for JPEG."""
    y, x = np.mgrid[0:H, 0:W]
    img = np.stack([x * 255 // W, y * 255 // H, np.full((H, W), 90)], -1).astype(np.uint8)
    img[:12, :20] = (230, 30, 30)
    return img


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _over_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    a = alpha.astype(np.float64)[..., None] / 255
    return rgb.astype(np.float64) * a + 255 * (1 - a)


INK = _chart()
CHART_RGBA = np.zeros((H, W, 4), np.uint8)  # transparent pixels store black, as most chart tools write
CHART_RGBA[..., 3] = INK * 255
CHART_ON_WHITE = _over_white(CHART_RGBA[..., :3], CHART_RGBA[..., 3])
ORIENTATION_ROTATIONS = {3: 2, 6: -1, 8: 1}  # EXIF orientation -> numpy rot90 turns (upright view)


def _palette_with_transparency() -> bytes:
    img = Image.fromarray(INK, "P")
    img.putpalette([0, 0, 0, 0, 0, 0] + [0] * 762)  # index 0 and 1 both black: only tRNS tells them apart
    return _encode(img, "PNG", transparency=0)


def _exif_jpeg(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return _encode(Image.fromarray(_photo()), "JPEG", quality=98, subsampling=0, exif=exif)


def _animated_gif() -> bytes:
    first = Image.fromarray(np.where(INK[..., None] == 1, 0, 255).repeat(3, -1).astype(np.uint8))
    second = Image.new("RGB", (W, H), (0, 0, 255))
    return _encode(first, "GIF", save_all=True, append_images=[second], duration=100, loop=0)


def _sixteen_bit(fmt: str) -> tuple[bytes, np.ndarray]:
    levels = (np.linspace(0, 65535, W)[None, :] * np.ones((H, 1))).astype(np.uint16)
    levels[INK == 1] = 3000
    return _encode(Image.fromarray(levels), fmt), levels / 257.0


def _thirty_two_bit() -> tuple[bytes, np.ndarray]:
    values = (np.linspace(-50_000, 2_000_000, W)[None, :] * np.ones((H, 1))).astype(np.int32)
    return _encode(Image.fromarray(values), "TIFF"), (values - values.min()) * 255.0 / np.ptp(values)


def _cmyk() -> tuple[bytes, np.ndarray]:
    rng = np.random.default_rng(0)
    cmyk = rng.integers(0, 256, (H, W, 4), dtype=np.uint8)
    c, m, y, k = (cmyk[..., i].astype(np.float64) / 255 for i in range(4))
    rgb = 255 * np.stack([(1 - c) * (1 - k), (1 - m) * (1 - k), (1 - y) * (1 - k)], -1)
    return _encode(Image.fromarray(cmyk, "CMYK"), "TIFF"), rgb


def _cases():
    la = np.stack([np.zeros((H, W), np.uint8), CHART_RGBA[..., 3]], -1)
    grey = np.where(INK == 1, 0, 200).astype(np.uint8)
    sixteen_png, sixteen_ref = _sixteen_bit("PNG")
    sixteen_tiff, _ = _sixteen_bit("TIFF")
    thirty_two, thirty_two_ref = _thirty_two_bit()
    cmyk, cmyk_ref = _cmyk()
    rgba = Image.fromarray(CHART_RGBA, "RGBA")
    return {
        "RGBA PNG": (_encode(rgba, "PNG"), CHART_ON_WHITE),
        "RGBA WebP": (_encode(rgba, "WEBP", lossless=True), CHART_ON_WHITE),
        "RGBA TIFF": (_encode(rgba, "TIFF"), CHART_ON_WHITE),
        "LA PNG": (_encode(Image.fromarray(la, "LA"), "PNG"), CHART_ON_WHITE),
        "palette PNG with transparency": (_palette_with_transparency(), CHART_ON_WHITE),
        "bilevel PNG": (_encode(Image.fromarray(INK == 0), "PNG"), (INK == 0) * 255.0),
        "grey PNG": (_encode(Image.fromarray(grey), "PNG"), grey.astype(np.float64)),
        "CMYK TIFF": (cmyk, cmyk_ref),
        "16-bit PNG": (sixteen_png, sixteen_ref),
        "16-bit TIFF": (sixteen_tiff, sixteen_ref),
        "32-bit TIFF": (thirty_two, thirty_two_ref),
        "JPEG, EXIF orientation 3": (_exif_jpeg(3), np.rot90(_photo(), 2)),
        "JPEG, EXIF orientation 6": (_exif_jpeg(6), np.rot90(_photo(), -1)),
        "JPEG, EXIF orientation 8": (_exif_jpeg(8), np.rot90(_photo(), 1)),
        "animated GIF: first frame": (_animated_gif(), CHART_ON_WHITE),
    }


CASES = _cases()


@pytest.mark.parametrize("kind", list(CASES))
def test_decode_matches_an_independent_rendering(kind):
    data, reference = CASES[kind]
    reference = np.asarray(reference, np.float64)
    if reference.ndim == 2:
        reference = np.repeat(reference[..., None], 3, -1)
    img = decode_image(data)
    got = np.asarray(img, np.float64)
    assert img.mode == "RGB" and got.shape == reference.shape  # same size and orientation
    assert np.abs(got - reference).mean() <= 2.0, kind
    assert not is_blank(img) and got.std() > 10  # the content is there
    # nothing downstream can rotate it again: no EXIF, no metadata at all
    assert img.info == {} and dict(img.getexif()) == {}


def test_a_plain_convert_gets_these_wrong_and_the_exports_carry_the_right_pixels():
    """What the project did before (and other trainers do with a file): these kinds come out wrong;
    the exports therefore carry them as PNG of the model's pixels, and everything else as it was."""
    wrong = []
    for kind, (data, reference) in CASES.items():
        reference = np.asarray(reference, np.float64)
        reference = np.repeat(reference[..., None], 3, -1) if reference.ndim == 2 else reference
        plain = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), np.float64)
        if plain.shape != reference.shape or np.abs(plain - reference).mean() > 2:
            wrong.append(kind)
        readable, reencoded = image_for_readers(data)
        assert reencoded == (not plain_pixels(data)), kind
        again = np.asarray(Image.open(io.BytesIO(readable)).convert("RGB"), np.float64)  # as a reader does
        assert np.array_equal(again, np.asarray(decode_image(data), np.float64)), kind
        # right already: the original bytes (an animation is written as its first frame)
        assert readable == data or kind in wrong or kind.startswith("animated"), kind
    assert set(wrong) >= {"RGBA PNG", "LA PNG", "palette PNG with transparency", "16-bit PNG"}
    assert {k for k in wrong if k.startswith("JPEG")} == {f"JPEG, EXIF orientation {o}" for o in (3, 6, 8)}


def test_transparency_goes_over_the_sources_background():
    black = decode_image(CASES["RGBA PNG"][0], background=(0, 0, 0))
    assert is_blank(black)  # black ink on black: nothing left (the recipe's choice, not the default)
    white_ink = CHART_RGBA.copy()
    white_ink[..., :3] = 255
    on_black = np.asarray(decode_image(_encode(Image.fromarray(white_ink, "RGBA"), "PNG"), (0, 0, 0)))
    assert np.array_equal(on_black[..., 0] == 255, INK == 1)
    assert records.background_of('{"image_background": [0, 0, 0]}') == (0, 0, 0)
    assert records.background_of("{}") == records.WHITE == records.background_of(None)


def test_opaque_generated_images_decode_exactly_as_before():
    """The demo's images are opaque RGB PNGs: their pixels (so its prompts and pairs) are unchanged."""
    from mmpr_pipeline import tasks

    for q in tasks.generate(8, seed=1):
        before = np.asarray(Image.open(io.BytesIO(q["image"])).convert("RGB"))
        assert np.array_equal(np.asarray(decode_image(q["image"])), before)
        assert plain_pixels(q["image"]) and image_for_readers(q["image"]) == (q["image"], False)


def test_a_flat_image_is_set_aside_as_blank(tmp_path):
    import json

    from mmpr_pipeline.recipe import Source
    from stages.load import load_source

    transparent = np.zeros((H, W, 4), np.uint8)  # a chart whose ink was lost: all transparent
    files = {
        "chart.png": CASES["RGBA PNG"][0],
        "lost.png": _encode(Image.fromarray(transparent, "RGBA"), "PNG"),
        "grey.jpg": _encode(Image.new("RGB", (W, H), (128, 128, 128)), "JPEG"),
    }
    with open(tmp_path / "rows.jsonl", "w") as f:
        for name, data in files.items():
            (tmp_path / name).write_bytes(data)
            f.write(json.dumps(dict(image=name, question=f"What does {name} show?", answer="1")) + "\n")
    src = Source(name="s", loader="jsonl", path=str(tmp_path / "rows.jsonl"), answer_type="number")
    questions, rejects, _ = load_source(src, unit_size=8)
    assert [q["row_index"] for q in questions] == [0]
    assert [(r["row_index"], r["reason"]) for r in rejects] == [(1, "blank image"), (2, "blank image")]
    assert questions[0]["images"] == [files["chart.png"]]  # the row keeps the original bytes


def test_a_sources_background_reaches_its_pairs_and_the_trainer():
    """A source's image_background is recorded in its pairs' provenance (the pairs keep the original
    bytes), and the trainer composites their images over it, as the sampler did."""
    import json

    from mmpr_pipeline import recipe as recipe_mod
    from mmpr_pipeline.train.data import _image_list
    from stages.pair import pair_rows

    white_ink = CHART_RGBA.copy()
    white_ink[..., :3] = 255
    data = _encode(Image.fromarray(white_ink, "RGBA"), "PNG")
    rec = recipe_mod.from_dict(
        dict(name="r", sources=[dict(name="s", loader="generated", image_background=[0, 0, 0])])
    )
    assert (
        rec.fingerprint()
        != recipe_mod.from_dict(dict(name="r", sources=[dict(name="s", loader="generated")])).fingerprint()
    )
    right, wrong = "It is 3.\nFinal answer: 3", "It is 4.\nFinal answer: 4"
    row = dict(
        qid="q", source="s", task="", images=[data], question="How many?", answer="3",
        prompt_template="raw", sampling="{}", pipeline="correctness", error="", responses=[right, wrong],
        correct=[True, False], extracted=["3", "4"], reason=["correct", "wrong answer"], rationale="",
    )  # fmt: skip
    pairs, _ = pair_rows(row, rec.sources[0], seed=0, model="m")
    assert len(pairs) == 1 and pairs[0]["images"][0]["bytes"] == data  # the original bytes
    assert json.loads(pairs[0]["provenance"])["image_background"] == [0, 0, 0]
    (trained,) = _image_list(pairs[0]["images"], records.background_of(pairs[0]["provenance"]))
    assert np.array_equal(np.asarray(trained)[..., 0] == 255, INK == 1)  # white ink on black
