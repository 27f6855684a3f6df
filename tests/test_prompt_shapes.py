"""Prompt shapes beyond one image (issue 13): 2- and 3-image questions (with and without `<image>`
placeholders), text-only questions, and DropoutNTP on a multi-image question, through real vLLM
(the trained demo model, a Qwen2-VL whose chat template places each image), pairing, the trainer and
both exports: this file's sources of the session's shared build (tests/_shared_build.py)."""

import json

import pyarrow.parquet as pq
import pytest
from _shared_build import SOURCES, pairs, samples, shared_build

from mmpr_pipeline.prompts import user_content

MINE = SOURCES["prompt_shapes"]
IMAGE_TOKENS = 16  # a 112x112 demo image


def test_user_content_places_images_at_their_placeholders_else_first():
    part = lambda im: {"type": "image", "id": im}  # noqa: E731
    assert user_content("Compare <image> and <image>.", ["a", "b"], part) == [
        {"type": "text", "text": "Compare "},
        part("a"),
        {"type": "text", "text": " and "},
        part("b"),
        {"type": "text", "text": "."},
    ]
    assert user_content("How many?", ["a", "b"], part) == [
        part("a"),
        part("b"),
        {"type": "text", "text": "How many?"},
    ]
    assert user_content("<image>\nHow many?", [], part) == [{"type": "text", "text": "How many?"}]
    assert user_content("Just text.", [], part) == [{"type": "text", "text": "Just text."}]


@pytest.fixture(scope="module")
def built(request, trained_model):
    """This file's sources of the session's shared build (tests/_shared_build.py): 2- and 3-image
    questions ("multi"), text-only ones with a worked solution ("text"), DropoutNTP on 2 and 3 images
    ("views"), sampled n=6. (run, their stats, samples by qid, pairs)."""
    run, stats = shared_build(request, trained_model)
    return (
        run,
        {name: stats["sources"][name] for name in MINE},
        {r["qid"]: r for r in samples(run, MINE)},
        pairs(run, MINE),
    )


@pytest.mark.slow
def test_every_image_reaches_the_engine_and_the_pairs(built):
    _, stats, samples, pairs = built
    assert sum(st["rejects"] for st in stats.values()) == 0
    assert sum(st["questions"] for st in stats.values()) == 16
    for s in samples.values():
        assert s["error"] == "" and len(s["responses"]) == (6 if s["pipeline"] == "correctness" else 1)
        assert s["image_tokens"] == IMAGE_TOKENS * len(s["images"])  # 2 or 3 images, or none
    assert sorted(len(s["images"]) for s in samples.values()) == [0] * 6 + [2] * 4 + [3] * 6
    # every pair holds its row's image files, byte for byte and in the row's order
    run = built[0]
    files = {
        name: [
            [(run.parent / f).read_bytes() for f in json.loads(line).get("image", [])]
            for line in (run.parent / f"{name}.jsonl").read_text().splitlines()
        ]
        for name in MINE
    }
    for s in samples.values():
        assert s["images"] == files[s["source"]][s["row_index"]]
    for p in pairs:
        s = samples[p["qid"]]
        assert [im["bytes"] for im in p["images"]] == files[s["source"]][s["row_index"]]
    assert stats["views"]["pairs"]["dropout_ntp"] > 0


@pytest.mark.slow
def test_dropout_continues_without_any_of_the_images(built):
    _, _, samples, _ = built
    rows = [s for s in samples.values() if s["source"] == "views"]
    continued = [t for r in rows for t, k in zip(r["continuation_image_tokens"], r["prefix_words"]) if k >= 0]
    assert continued and all(t == 0 for t in continued)
    assert sorted(r["image_tokens"] for r in rows) == [2 * IMAGE_TOKENS] + [3 * IMAGE_TOKENS] * 3


@pytest.mark.slow
def test_trainer_and_exports_take_multi_image_and_text_only_pairs(built, tmp_path):
    from _run_fixture import train_two_steps, trainer_image_tokens

    from mmpr_pipeline import export

    run, _, _, pairs = built
    shapes = {len(p["images"]) for p in pairs}
    assert {0, 2, 3} <= shapes, shapes
    # the trainer's prompt carries every image, as sampling did
    assert trainer_image_tokens(run, pairs) == [IMAGE_TOKENS * len(p["images"]) for p in pairs]
    assert train_two_steps(run, tmp_path / "mpo")["steps"] == 2

    export.export(run, "trl", tmp_path / "trl")
    rows = [
        r for f in sorted((tmp_path / "trl" / "data").glob("*.parquet")) for r in pq.read_table(f).to_pylist()
    ]
    for r in rows:
        parts = r["prompt"][0]["content"]
        assert sum(part["type"] == "image" for part in parts) == len(r["images"])
    export.export(run, "internvl", tmp_path / "internvl")
    lines = [
        json.loads(x)
        for f in (tmp_path / "internvl" / "annotations").glob("*.jsonl")
        for x in f.read_text().splitlines()
    ]
    multi = [x for x in lines if isinstance(x.get("image"), list)]
    assert multi and all(x["question"].count("<image>") == len(x["image"]) for x in multi)
    assert any("image" not in x for x in lines)  # text-only rows
