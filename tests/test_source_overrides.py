"""Per-source overrides (issue 13, item 7): a source's own sampling settings (`sources[i].sampling`,
merged over the recipe's) and image size cap (`sources[i].image_max_pixels`), built with real vLLM on
the demo model (a Qwen2-VL: its image tokens follow the pixel count), paired and trained on: this
file's sources of the session's shared build (tests/_shared_build.py).
"""

import io
import json
import shutil

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from _shared_build import SOURCES, shared_build
from _shared_build import pairs as pairs_of
from _shared_build import recipe as shared_recipe
from _shared_build import samples as samples_of

from mmpr_pipeline import errors, pipeline
from mmpr_pipeline import recipe as recipe_mod
from mmpr_pipeline.recipe import RecipeError
from mmpr_pipeline.records import downscale_image

FULL_TOKENS = 16  # a 112x112 generated image on the demo model
SMALL_TOKENS = 4  # the same image capped at 56x56 pixels


def _png(w: int, h: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (w, h), (200, 30, 60)).save(buf, format="PNG")
    return buf.getvalue()


def _size(data: bytes) -> tuple[int, int]:
    from PIL import Image

    return Image.open(io.BytesIO(data)).size


def test_downscale_keeps_aspect_and_leaves_small_images_untouched():
    small = _png(40, 30)
    assert downscale_image(small, 40 * 30) is small  # at the cap: the very same bytes
    w, h = _size(downscale_image(_png(400, 100), 100 * 25))
    assert (w, h) == (100, 25)
    w, h = _size(downscale_image(_png(333, 97), 5000))
    assert w * h <= 5000 and abs(w / h - 333 / 97) < 0.1


def _recipe(**source_keys) -> dict:
    return dict(
        name="r",
        sampling=dict(n=4, max_tokens=40),
        sources=[dict(name="a", loader="generated", limit=2, **source_keys)],
    )


def test_source_sampling_is_merged_over_the_recipe_and_validated():
    rec = recipe_mod.from_dict(_recipe(sampling=dict(n=2, temperature=0.5)))
    s = rec.sampling_for(rec.sources[0])
    assert (s.n, s.temperature, s.max_tokens) == (2, 0.5, 40)  # max_tokens from the recipe
    for keys, message in [
        (dict(sampling=dict(n=0)), r"<recipe>: sources\[0\]\.sampling\.n: must be >= 1, got 0"),
        (dict(sampling=dict(max_tokens="many")), r"sources\[0\]\.sampling\.max_tokens: expected an integer"),
        (dict(sampling=dict(top_p=2)), r"sources\[0\]\.sampling\.top_p: must be in \(0, 1\]"),
        (
            dict(sampling=dict(nn=2)),
            r"sources\[0\]\.sampling\.nn: unknown key \(expected one of: max_tokens, n",
        ),
        (dict(sampling=[4]), r"sources\[0\]\.sampling: expected a mapping"),
        (dict(image_max_pixels=100), r"sources\[0\]\.image_max_pixels: must be >= 1024"),
        (dict(image_max_pixels="big"), r"sources\[0\]\.image_max_pixels: expected an integer"),
        (
            dict(pipeline="dropout_ntp", sampling=dict(n=2)),
            r"sources\[0\]\.sampling\.n: .*set dropout\.n instead",
        ),
    ]:
        with pytest.raises(RecipeError, match=message):
            recipe_mod.from_dict(_recipe(**keys))


def test_unset_overrides_keep_the_fingerprint_and_set_ones_change_it():
    plain = recipe_mod.from_dict(_recipe())
    assert not {"sampling", "image_max_pixels"} & set(plain.to_dict()["sources"][0])  # recipes as before
    assert recipe_mod.from_dict(_recipe(sampling={})).fingerprint() == plain.fingerprint()
    assert recipe_mod.from_dict(_recipe(sampling=dict(n=2))).fingerprint() != plain.fingerprint()
    assert recipe_mod.from_dict(_recipe(image_max_pixels=3136)).fingerprint() != plain.fingerprint()


def test_greedy_eval_keeps_a_sources_max_tokens_but_not_its_n_or_temperature(monkeypatch, tmp_path):
    """`mmpr eval` greedy mode is n=1 at temperature 0 for every source, overrides or not. (The
    build is replaced by a recorder: what is checked is which settings each mode hands it.)"""
    from mmpr_pipeline import evaluate
    from mmpr_pipeline import pipeline as pipeline_mod

    seen = {}
    monkeypatch.setattr(pipeline_mod, "prepare_run_dir", lambda run, r, overwrite: None)
    monkeypatch.setattr(
        pipeline_mod,
        "collect_samples",
        lambda r, run, stats, address: seen.setdefault(run.name, r.sampling_for(r.sources[0])),
    )
    monkeypatch.setattr(evaluate, "accuracy_table", lambda run: {})
    rec = recipe_mod.from_dict(_recipe(sampling=dict(n=2, temperature=0.7, max_tokens=12)))
    evaluate.evaluate(rec, tmp_path)
    assert (seen["greedy"].n, seen["greedy"].temperature, seen["greedy"].max_tokens) == (1, 0.0, 12)
    assert (seen["sampled"].n, seen["sampled"].temperature, seen["sampled"].max_tokens) == (2, 0.7, 12)


MINE = SOURCES["source_overrides"]


@pytest.fixture(scope="module")
def built(request, trained_model):
    """This file's sources of the session's shared build (tests/_shared_build.py), 4 questions each:
    plain (the recipe's n=4 and 48 tokens), capped (n=2, 6 tokens), small (n=6, images capped at
    56x56 pixels) and describe_capped (DropoutNTP, 12 tokens). (run, their stats, samples, pairs)."""
    run, stats = shared_build(request, trained_model)
    return run, {name: stats["sources"][name] for name in MINE}, samples_of(run, MINE), pairs_of(run, MINE)


# source: (n, max_tokens); a dropout_ntp source samples dropout.n (1) responses, and records that n
EXPECTED = {"plain": (4, 48), "capped": (2, 6), "small": (6, 48), "describe_capped": (1, 12)}


@pytest.mark.slow
def test_each_source_samples_with_its_own_n_max_tokens_and_image_size(built):
    _, stats, samples, pairs = built
    assert sum(st["rejects"] for st in stats.values()) == 0
    assert sorted(s["source"] for s in samples) == sorted(list(EXPECTED) * 4)
    for s in samples:
        n, max_tokens = EXPECTED[s["source"]]
        assert s["error"] == "" and len(s["responses"]) == n
        assert max(s["n_tokens"]) <= max_tokens
        recorded = json.loads(s["sampling"])  # the row records what its source used
        assert (recorded["max_tokens"], recorded["temperature"]) == (max_tokens, 1.0)
        assert recorded["n"] == n  # regression: a dropout_ntp row recorded the recipe's n (4), not its 1
        # the engine received fewer image tokens where the source caps the pixels
        assert s["image_tokens"] == (SMALL_TOKENS if s["source"] == "small" else FULL_TOKENS)
        assert [_size(b) for b in s["images"]] == [(56, 56) if s["source"] == "small" else (112, 112)]
    capped = [t for s in samples if s["source"] == "capped" for t in s["n_tokens"]]
    assert 6 in capped  # the cap bites: the demo model's answers run longer than 6 tokens
    assert max(t for s in samples if s["source"] in ("plain", "small") for t in s["n_tokens"]) > 12
    continued = [
        t
        for s in samples
        if s["source"] == "describe_capped"
        for t, k in zip(s["continuation_tokens"], s["prefix_words"])
        if k >= 0
    ]
    assert continued and max(continued) == 12  # continuations too: capped at the source's 12 tokens
    by_qid = {s["qid"]: s for s in samples}
    assert {p["source"] for p in pairs} >= {"plain", "small"}
    for p in pairs:  # pairs record their source's sampling and carry the image the engine saw
        assert p["sampling"] == by_qid[p["qid"]]["sampling"]
        assert [im["bytes"] for im in p["images"]] == by_qid[p["qid"]]["images"]
        assert json.loads(p["sampling"])["max_tokens"] == EXPECTED[p["source"]][1]


@pytest.mark.slow
def test_a_recipe_with_overrides_resumes_its_own_run(built, ray_local, tmp_path, monkeypatch):
    """recipe.json round-trips the overrides: the same recipe finds its finished run (a copy of the
    shared one) and redoes nothing, without starting an engine; a changed override is refused."""
    run, _, samples, _ = built
    copy = tmp_path / "run"
    shutil.copytree(run, copy)

    def sample(*args, **kwargs):
        raise AssertionError("a resume with every unit done started the sampling stage")

    monkeypatch.setattr(pipeline, "run_units", sample)
    # no preview and no card: what they show is test_build_e2e's; neither is in the fingerprint
    resumed = pipeline.build(shared_recipe(run, preview=False), copy, write_card=False)["resume"]
    assert resumed["units_done_before"] == resumed["units"] and resumed["rows_sampled"] == 0
    again = samples_of(copy, MINE)
    assert [r["responses"] for r in again] == [r["responses"] for r in samples]
    capped = [s.name for s in shared_recipe(run).sources].index("capped")
    with pytest.raises(errors.RunFolderError, match=r"different recipe \(changed: sources\)"):
        pipeline.build(shared_recipe(run, **{f"sources[{capped}].sampling.max_tokens": 7}), copy)


@pytest.mark.slow
@pytest.mark.usefixtures("one_torch_thread")
def test_trainer_sees_the_downscaled_image_the_sampler_saw(built, tmp_path):
    from _run_fixture import train_two_steps, trainer_image_tokens

    run, _, _, pairs = built
    expected = [SMALL_TOKENS if p["source"] == "small" else FULL_TOKENS for p in pairs]
    assert trainer_image_tokens(run, pairs) == expected
    # trained on this file's pairs alone: a run folder holding only them
    mine = tmp_path / "mine"
    (mine / "data").mkdir(parents=True)
    shutil.copy(run / "recipe.json", mine)
    table = pa.concat_tables(pq.read_table(p) for p in sorted((run / "data").glob("train-*.parquet")))
    table = table.filter(pc.is_in(table["source"], pa.array(MINE)))
    pq.write_table(table, mine / "data" / "train-00000-of-00001.parquet")
    assert train_two_steps(mine, tmp_path / "mpo")["steps"] == 2


# The published image processor settings of each family's checkpoint (README, "Model families"), and
# how many image tokens its processor's output stands for.
FAMILY_PROCESSORS = {
    "qwen2_vl": (
        "Qwen2VLImageProcessor",
        dict(min_pixels=56 * 56, max_pixels=28 * 28 * 1280),
        lambda out: int(out["image_grid_thw"][0].prod()) // 4,
    ),  # 2x2 patches merge to one token
    "internvl": (
        "GotOcr2ImageProcessor",
        dict(crop_to_patches=True, min_patches=1, max_patches=12, size={"height": 448, "width": 448}),
        lambda out: int(out["num_patches"][0]) * 256,
    ),  # 256 tokens per 448 px tile
    "idefics3": (
        "Idefics3ImageProcessor",
        dict(do_image_splitting=True, size={"longest_edge": 1536}, max_image_size={"longest_edge": 384}),
        lambda out: out["pixel_values"].shape[1] * 81,
    ),  # SmolVLM: 81 tokens per tile
    "llava": (
        "CLIPImageProcessor",
        dict(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}),
        lambda out: (out["pixel_values"].shape[-1] // 14) ** 2,
    ),  # one 336 px crop, 14 px patches
    "gemma3": (
        "Gemma3ImageProcessor",
        dict(size={"height": 896, "width": 896}),
        lambda out: out["pixel_values"].shape[0] * 256,
    ),  # 256 tokens per 896 px image
}


@pytest.mark.parametrize("family", FAMILY_PROCESSORS)
def test_which_families_spend_fewer_image_tokens_under_image_max_pixels(family):
    """What README's "Model families" says of image_max_pixels: only the pixel-budget family (Qwen2-VL,
    and Qwen2.5-VL, same processor) spends fewer tokens; the others size the image themselves."""
    import numpy as np
    import transformers
    from PIL import Image

    name, settings, tokens = FAMILY_PROCESSORS[family]
    processor = getattr(transformers, name)(**settings)
    x, y = np.meshgrid(np.linspace(0, 255, 1344), np.linspace(0, 255, 1008))
    buf = io.BytesIO()
    Image.fromarray(np.stack([x, y, x[::-1]], -1).astype(np.uint8)).save(buf, format="PNG")
    full, capped = buf.getvalue(), downscale_image(buf.getvalue(), 448 * 448)
    assert _size(capped) == (517, 387)
    counts = [
        tokens(processor(images=[Image.open(io.BytesIO(b)).convert("RGB")], return_tensors="np"))
        for b in (full, capped)
    ]
    expected = {
        "qwen2_vl": [1230, 252],
        "internvl": [13 * 256] * 2,
        "idefics3": [13 * 81] * 2,
        "llava": [576, 576],
        "gemma3": [256, 256],
    }[family]
    assert counts == expected
