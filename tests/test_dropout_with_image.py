"""`dropout.with_image` (issue 13, item 5): DropoutNTP's continuation made WITH the question's images
(InternVL's `sr0.5_with_image` release files) or without them (the paper's, the default)."""

import json
from pathlib import Path

import pytest
import yaml

from mmpr_pipeline import recipe as recipe_mod
from mmpr_pipeline.recipe import RecipeError

REPO = Path(__file__).resolve().parent.parent


def _demo(**dropout) -> dict:
    data = yaml.safe_load((REPO / "data_cards" / "demo.yaml").read_text())
    data["sources"][1]["dropout"].update(dropout)
    return data


def test_off_by_default_and_out_of_the_fingerprint_while_off():
    default = recipe_mod.from_dict(_demo())
    assert default.sources[1].dropout.with_image is False
    assert "with_image" not in default.to_dict()["sources"][1]["dropout"]  # runs built before it resume
    assert recipe_mod.from_dict(_demo(with_image=False)).fingerprint() == default.fingerprint()
    on = recipe_mod.from_dict(_demo(with_image=True))
    assert on.sources[1].dropout.with_image is True and on.fingerprint() != default.fingerprint()
    assert on.to_dict()["sources"][1]["dropout"]["with_image"] is True


def test_a_non_boolean_is_refused_naming_the_key():
    with pytest.raises(RecipeError, match=r"sources\[1\]\.dropout\.with_image: expected true or false"):
        recipe_mod.from_dict(_demo(with_image="yes"))


class _ConversationRecorder:
    """Stands in for the engine to keep each continuation's conversation (the real engine's image
    tokens are checked below)."""

    def __init__(self):
        self.conversations = []

    params = staticmethod(lambda **kw: kw)

    async def chat(self, conversation, params, continue_final=False):
        from mmpr_pipeline.engine import Completion

        self.conversations.append(conversation())
        return Completion(texts=["and so on."], n_tokens=[3], finish_reasons=["stop"])

    def image_tokens(self, completion):
        return 0


@pytest.mark.parametrize("with_image", [False, True])
def test_the_continuation_request_holds_the_images_only_with_the_option(with_image):
    import asyncio

    from mmpr_pipeline import tasks
    from mmpr_pipeline.recipe import Dropout, Sampling
    from stages.dropout_ntp import continue_prefixes

    q = next(tasks.generate(1))
    row = dict(
        qid="q0",
        images=[q["image"]],
        question=q["question"],
        prompt_template="raw",
        responses=["one two three four five six seven eight nine ten"] * 2,
        error="",
    )
    engine = _ConversationRecorder()
    asyncio.run(continue_prefixes(row, engine, Sampling(n=2), Dropout(with_image=with_image)))
    assert len(engine.conversations) == 2 and row["prefix_words"] == [5, 5]
    for conv in engine.conversations:
        assert [m["role"] for m in conv] == ["user", "assistant"] and conv[1][
            "content"
        ] == "one two three four five"
        images = [part for part in conv[0]["content"] if part["type"] == "image_pil"]
        assert len(images) == (1 if with_image else 0)


@pytest.mark.slow
def test_continuation_sees_the_images_only_with_the_option(request, trained_model):
    """Two DropoutNTP sources of the session's shared build (tests/_shared_build.py), 3 describe
    questions each, one with `with_image`: the engine really received the images for that one's
    continuations (as many image tokens as the sampling prompt), none for the other's; each pair's
    provenance says which. (Their questions differ: the same ones in both would be near-duplicates,
    set aside in the second.)"""
    from _shared_build import SOURCES, pairs, samples, shared_build

    mine = SOURCES["dropout_with_image"]
    run, _ = shared_build(request, trained_model)

    for name, expect_images in (("with_image", True), ("without_image", False)):
        rows = samples(run, [name])
        assert len(rows) == 3 and all(r["image_tokens"] > 0 for r in rows)
        continued = [
            (t, r["image_tokens"])
            for r in rows
            for t, k in zip(r["continuation_image_tokens"], r["prefix_words"])
            if k >= 0
        ]
        assert continued, name
        if expect_images:
            assert all(t == sampled > 0 for t, sampled in continued)
        else:
            assert all(t == 0 for t, _ in continued)

    by_source = {name: [json.loads(p["provenance"]) for p in pairs(run, [name])] for name in mine}
    assert by_source["with_image"] and all(p == {"with_image": True} for p in by_source["with_image"])
    assert by_source["without_image"] and all(p == {} for p in by_source["without_image"])
    recorded = {s["name"]: s for s in json.loads((run / "recipe.json").read_text())["sources"]}
    assert recorded["with_image"]["dropout"]["with_image"] is True
    assert "with_image" not in recorded["without_image"]["dropout"]
