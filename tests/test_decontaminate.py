"""Decontamination against evaluation sets, and near-duplicate rows within and across sources.

The rules are checked on their own (perceptual hashes of edited copies, question spans, the plan's
first-by-source-order); one real build (real Ray, real vLLM on the tiny model, JSON Lines sources and
a JSON Lines benchmark) checks that exactly the leaked and repeated rows are set aside, with their
reasons, and that a benchmark whose rows change redoes the units.
"""

import json
import random

import pyarrow.parquet as pq
import pytest
import yaml
from _photos import copy_of, crop, encode, photo

from mmpr_pipeline import decontam
from mmpr_pipeline import recipe as recipe_mod
from mmpr_pipeline.decontam import leak_benchmark, reason_group
from mmpr_pipeline.recipe import RecipeError
from mmpr_pipeline.units import WorkUnit, plan_source

LONG_Q = (
    "In the figure, AB is parallel to CD and the angle ABE measures 40 degrees; "
    "find the measure of the angle CDE in degrees."
)


@pytest.fixture(scope="module")
def photos():
    return [photo(seed) for seed in range(12)]


def test_edited_copies_match_their_original_and_distinct_photos_do_not(photos):
    index = decontam.Benchmarks.build(
        ["bench"],
        {"bench": (decontam.IMAGE_DISTANCE, decontam.NGRAM)},
        [
            decontam.benchmark_entry("bench", i, f"q{i}", [encode(p)], decontam.NGRAM)
            for i, p in enumerate(photos[:6])
        ],
    )
    r = random.Random(3)
    for i, p in enumerate(photos[:6]):
        for copy in (
            encode(p, "JPEG", 60),  # PNG -> JPEG at the lowest quality asked for
            encode(crop(p, 0.10, r)),  # a 10% crop, the largest asked for
            copy_of(p, r),  # crop, resize, jitter and re-encode at once
        ):
            hit = index.match_image(decontam.image_hash(copy))
            assert hit is not None and index.describe(hit[0]) == ("bench", i)
    for p in photos[6:]:
        assert index.match_image(decontam.image_hash(encode(p, "JPEG", 75))) is None


def test_the_same_drawing_in_another_colour_is_another_image():
    """Grey hashes cannot tell a red triangle from a green one (the demo has such pairs): the colour
    check does, while a re-encoded copy still matches."""
    from PIL import Image, ImageDraw

    def drawing(colour):
        img = Image.new("RGB", (112, 112), "white")
        ImageDraw.Draw(img).polygon([(56, 20), (95, 90), (17, 90)], fill=colour)
        return img

    red, green = (
        decontam.image_hash(encode(drawing((220, 40, 40)))),
        decontam.image_hash(encode(drawing((40, 170, 60)))),
    )
    assert decontam.hash_distance(red, green) <= 4  # same drawing to the grey hashes
    assert not decontam.same_image(red, green)
    assert decontam.same_image(red, decontam.image_hash(encode(drawing((220, 40, 40)), "JPEG", 80)))
    earlier = decontam.EarlierRows("exact")
    assert earlier.first(decontam.row_key([red], "Describe this image."), "a", 0) is None
    assert earlier.first(decontam.row_key([green], "Describe this image."), "a", 1) is None


def test_the_colour_grid_is_the_float_computation_it_replaced(photos):
    """_colour_grid sums cells as integers and bins hues per value, for speed (the plan hashes every
    image): the bytes must stay those of the float32 means and per-pixel soft bins, or resumed runs
    and indexes built before would plan near-duplicates differently."""
    import numpy as np
    from PIL import Image

    def reference(img) -> bytes:
        ycc = np.asarray(img.convert("YCbCr"), dtype=np.float32)
        h, w = ycc.shape[:2]
        g = decontam.COLOUR_GRID
        cells = [
            ycc[
                i * h // g : max(i * h // g + 1, (i + 1) * h // g),
                j * w // g : max(j * w // g + 1, (j + 1) * w // g),
                1:,
            ]
            .reshape(-1, 2)
            .mean(0)
            for i in range(g)
            for j in range(g)
        ]
        grid = np.clip(np.rint(np.concatenate(cells)), 0, 255).astype(np.uint8).tobytes()
        hsv = np.asarray(img.convert("HSV")).reshape(-1, 3)
        hue = hsv[(hsv[:, 1] > 64) & (hsv[:, 2] > 40), 0]
        pos = hue.astype(np.float64) * decontam.HUE_BINS / 256
        low, frac = np.floor(pos).astype(np.int64), pos - np.floor(pos)
        bins = decontam.HUE_BINS
        hist = np.bincount(low % bins, 1 - frac, bins) + np.bincount((low + 1) % bins, frac, bins)
        share = np.rint(255 * hist / max(1, len(hue))).astype(np.uint8).tobytes()
        return grid + bytes([min(255, round(1000 * len(hue) / len(hsv)))]) + share

    rng = np.random.default_rng(0)
    odd = [
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        for h, w in ((1, 1), (7, 300), (257, 5))
    ]
    flat = [Image.new("RGB", (90, 60), colour) for colour in ((255, 0, 0), (128, 128, 128), (10, 200, 250))]
    images = [decontam._decoded(encode(p)) for p in photos] + odd + flat
    assert [decontam._colour_grid(img) for img in images] == [reference(img) for img in images]


def test_a_question_leaks_by_a_long_shared_span_after_normalising():
    words = LONG_Q.split()
    index = decontam.Benchmarks.build(
        ["mv", "short"],
        {"mv": (22, 10), "short": (22, 5)},
        [
            decontam.benchmark_entry("mv", 7, LONG_Q, [], 10),
            decontam.benchmark_entry("short", 0, "How many red cubes are there in the image?", [], 5),
        ],
    )
    reworded = "Hint: answer with a number.\nQuestion: " + LONG_Q.upper().replace(";", " ,  ")
    hit = index.match_question(reworded)
    assert hit is not None and index.describe(hit[0]) == ("mv", 7) and hit[1] == len(words)
    # nine shared words are under mv's span of 10; each benchmark keeps its own span length
    assert index.match_question(" ".join(words[:9]) + " and something else entirely") is None
    assert index.describe(index.match_question("so how many red cubes are there, roughly?")[0]) == (
        "short",
        0,
    )
    assert index.match_question("How many red spheres are there?") is None


def _scan(path, rows):
    return dict(path=path, qids=[f"{path}{i}" for i in range(len(rows))], offsets=[], max_images=1, keys=rows)


def test_near_duplicates_keep_the_first_by_source_order_across_sources(photos):
    a, b = decontam.image_hash(encode(photos[0])), decontam.image_hash(encode(photos[1]))
    jpeg = decontam.image_hash(encode(photos[0], "JPEG", 70))
    key = decontam.row_key
    src_a = recipe_mod.Source(name="a", loader="generated")
    src_b = recipe_mod.Source(name="b", loader="generated")
    scans_a = [
        _scan("a", [key([a], "What is shown?"), key([b], "What is shown?"), key([a], " what IS shown ")])
    ]
    scans_b = [_scan("b", [key([b], "What is shown?"), key([jpeg], "what is shown"), key([a], "Other?")])]
    earlier = decontam.EarlierRows("exact")
    units_a = plan_source(src_a, scans_a, 2, earlier)
    units_b = plan_source(src_b, scans_b, 2, earlier)
    assert [u.near_duplicates for u in units_a] == [(), ((2, "a", 0),)]
    assert [u.near_duplicates for u in units_b][0][0] == (0, "a", 1)  # the first (a's row 1) is kept
    fuzzy = decontam.EarlierRows("fuzzy")
    plan_source(src_a, scans_a, 2, fuzzy)
    units_b = plan_source(src_b, scans_b, 2, fuzzy)
    assert decontam.hash_distance(a, jpeg) <= decontam.IMAGE_DISTANCE
    assert [n for u in units_b for n in u.near_duplicates] == [(0, "a", 1), (1, "a", 0)]
    # the plan is in the unit's key (resume redoes a unit whose set-aside rows change)
    assert units_a[1].key != WorkUnit(**{**units_a[1].__dict__, "near_duplicates": ()}).key
    assert WorkUnit.from_item(units_a[1].to_item()) == units_a[1]


def test_reasons_are_counted_per_benchmark_and_per_source():
    assert reason_group(
        "benchmark leak (math-vista row 12): image near-duplicate (3 of 128 hash bits differ)"
    ) == ("benchmark leak (math-vista): image")
    assert (
        leak_benchmark("benchmark leak (math-vista row 12): question shares a 14-word span") == "math-vista"
    )
    assert reason_group(
        "near-duplicate of shapes row 3 (same normalised question, near-identical image)"
    ) == ("near-duplicate of an earlier shapes row (same normalised question, near-identical image)")
    assert reason_group("corrupt image (OSError)") == "corrupt image (OSError)"


def _recipe(**keys) -> dict:
    return dict(name="r", sources=[dict(name="a", loader="generated", limit=2)], **keys)


def test_decontamination_entries_are_checked_and_absent_ones_keep_the_fingerprint():
    plain = recipe_mod.from_dict(_recipe())
    assert "decontamination" not in plain.to_dict() and "near_duplicates" not in plain.to_dict()
    bench = dict(name="mv", loader="jsonl", path="x.jsonl")
    assert recipe_mod.from_dict(_recipe(decontamination=[bench])).fingerprint() != plain.fingerprint()
    assert recipe_mod.from_dict(_recipe(near_duplicates="off")).fingerprint() != plain.fingerprint()
    for keys, message in [
        (
            dict(decontamination=[dict(name="mv", loader="jsonl")]),
            r"decontamination\[0\]\.path: .*needs a path",
        ),
        (dict(decontamination=[bench, bench]), r"decontamination\[1\]\.name: duplicate benchmark name 'mv'"),
        (dict(decontamination=[dict(bench, ngram=2)]), r"decontamination\[0\]\.ngram: must be >= 3"),
        (dict(near_duplicates="some"), r"near_duplicates: unknown value 'some'"),
    ]:
        with pytest.raises(RecipeError, match=message):
            recipe_mod.from_dict(_recipe(**keys))


def test_near_duplicates_off_unquoted_in_yaml_and_set_means_off(tmp_path):
    """Regression: YAML reads a bare `off` (the README's spelling) as false, and the recipe was refused
    with "expected a string, got False"; `--set near_duplicates=off` likewise."""
    path = tmp_path / "r.yaml"
    path.write_text("name: r\nnear_duplicates: off\nsources: [{name: a, loader: generated, limit: 2}]\n")
    assert recipe_mod.load(path).near_duplicates == "off"
    path.write_text("name: r\nsources: [{name: a, loader: generated, limit: 2}]\n")
    assert recipe_mod.load(path, {"near_duplicates": False}).near_duplicates == "off"
    with pytest.raises(RecipeError, match="near_duplicates: expected a string, got True"):
        recipe_mod.load(path, {"near_duplicates": True})


# -- one real build ----------------------------------------------------------------------------------


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _write_sources(d, photos):
    """evalset: 3 benchmark rows. a: one clean row, one leaked image (re-encoded and resized), one
    leaked question (re-worded), one clean row and its repeat. b: a repeat of a's clean row, a clean row."""
    imgs = d / "img"
    imgs.mkdir()

    def save(name, data):
        (imgs / name).write_bytes(data)
        return f"img/{name}"

    bench_q = ["How many cars are in the picture?", "What colour is the largest shape?", LONG_Q]
    _jsonl(
        d / "evalset.jsonl",
        [dict(image=save(f"bench{i}.png", encode(photos[i])), question=q) for i, q in enumerate(bench_q)],
    )
    resized = photos[1].resize((300, 230))
    a = [
        dict(image=save("a0.png", encode(photos[3])), question="What is in the top left corner?", answer="A"),
        dict(image=save("a1.jpg", encode(resized, "JPEG", 70)), question="Name the shape.", answer="B"),
        dict(image=save("a2.png", encode(photos[4])), question="Q: " + LONG_Q.lower(), answer="C"),
        dict(image=save("a3.png", encode(photos[5])), question="Which colour dominates?", answer="D"),
        dict(
            image=save("a4.jpg", encode(photos[5], "JPEG", 95)),
            question="which  colour DOMINATES",
            answer="D",
        ),
    ]
    b = [
        dict(image=save("b0.png", encode(photos[5])), question="Which colour dominates ?", answer="E"),
        dict(image=save("b1.png", encode(photos[6])), question="Which colour dominates?", answer="F"),
    ]
    _jsonl(d / "a.jsonl", a)
    _jsonl(d / "b.jsonl", b)


@pytest.fixture(scope="module")
def built(tmp_path_factory, ray_local, tiny_model, photos):
    from mmpr_pipeline import pipeline

    d = tmp_path_factory.mktemp("decontam")
    _write_sources(d, photos)
    source = dict(loader="jsonl", answer_type="text", pipeline="correctness")
    recipe = dict(
        name="decontam",
        model=tiny_model,
        engine={"max_model_len": 512},
        unit_size=8,
        sampling=dict(n=2, max_tokens=4),
        sources=[
            dict(name="a", path=str(d / "a.jsonl"), **source),
            dict(name="b", path=str(d / "b.jsonl"), **source),
        ],
        decontamination=[dict(name="evalset", loader="jsonl", path=str(d / "evalset.jsonl"))],
    )
    (d / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    run = d / "run"
    stats = pipeline.build(recipe_mod.load(d / "recipe.yaml"), run)
    return d, run, stats


def _rejects(run, source):
    return {
        r["row_index"]: r["reason"] for r in pq.read_table(run / "rejects" / f"{source}.parquet").to_pylist()
    }


@pytest.mark.slow
def test_a_build_sets_aside_exactly_the_leaked_and_repeated_rows(built):
    _, run, stats = built
    a, b = _rejects(run, "a"), _rejects(run, "b")
    assert sorted(a) == [1, 2, 4] and sorted(b) == [0]
    assert a[1].startswith("benchmark leak (evalset row 1): image near-duplicate")
    assert a[2].startswith("benchmark leak (evalset row 2): question shares a 24-word span")
    assert a[4] == "near-duplicate of a row 3 (same normalised question, near-identical image)"
    assert b[0] == "near-duplicate of a row 3 (same normalised question, near-identical image)"
    sampled = sorted(
        (r["source"], r["row_index"])
        for p in sorted((run / "samples").glob("*/unit-*.parquet"))
        for r in pq.read_table(p, columns=["source", "row_index"]).to_pylist()
    )
    assert sampled == [("a", 0), ("a", 3), ("b", 1)]  # b's row 1: same question, another image
    assert stats["sources"]["a"]["leaks"] == {"evalset": 2} and stats["sources"]["b"]["leaks"] == {}
    assert stats["sources"]["a"]["reject_reasons"] == {
        "benchmark leak (evalset): image": 1,
        "benchmark leak (evalset): question": 1,
        "near-duplicate of an earlier a row (same normalised question, near-identical image)": 1,
    }
    assert stats["decontamination"] == {"evalset": dict(rows=3, unreadable=0, set_aside=2)}
    assert stats["totals"]["near_duplicates"] == 2
    card = (run / "README.md").read_text()
    assert "| `evalset` | 3 | 2 |" in card
    assert "benchmark leak (evalset): image" in (run / "preview.html").read_text()


@pytest.mark.slow
def test_a_changed_benchmark_redoes_the_units_and_an_unchanged_one_resumes(built):
    from mmpr_pipeline import pipeline

    d, run, _ = built
    again = pipeline.build(recipe_mod.load(d / "recipe.yaml"), run)
    assert again["resume"]["units_done_before"] == again["resume"]["units"] == 2
    with open(d / "evalset.jsonl", "a") as f:  # the benchmark gains a row: every unit is checked again
        f.write(json.dumps(dict(question="Which colour dominates?")) + "\n")
    redone = pipeline.build(recipe_mod.load(d / "recipe.yaml"), run)
    assert redone["resume"]["units_done_before"] == 0 and redone["decontamination"]["evalset"]["rows"] == 4
