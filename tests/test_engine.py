"""The engine as the pipeline drives it (vLLM's async engine on CPU, the trained demo model): what the
model actually receives, checked on the rendered prompts and the prompt token ids vLLM reports."""

import asyncio
import os
from pathlib import Path

import pytest

from mmpr_pipeline import tasks
from mmpr_pipeline.engine import conversation

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def engine(trained_model):
    from mmpr_pipeline.engine import Engine

    loop = asyncio.new_event_loop()
    e = Engine(trained_model, {"max_model_len": 1024}, seed=0)
    yield e, loop
    e.shutdown()
    loop.close()


def _row():
    q = next(tasks.generate(1, seed=3))
    return dict(q, images=[q["image"]], qid="q", prompt_template="raw")


def _params(engine, n=1, max_tokens=12):
    return engine.params(n=n, temperature=1.0, top_k=-1, top_p=1.0, max_tokens=max_tokens, seed=7)


def test_image_prompt_carries_image_tokens_and_all_n_samples_come_from_one_request(engine):
    e, loop = engine
    comp = loop.run_until_complete(e.chat(conversation(_row()), _params(e, n=3)))
    assert not comp.error and len(comp.texts) == 3 and len(comp.n_tokens) == 3
    # the image token id comes from the model's own config, and the 112x112 image is 16 of them
    assert e.image_token_ids == {e.llm.model_config.hf_config.image_token_id}
    assert e.image_tokens(comp) == 16


def test_continuation_continues_the_unfinished_assistant_turn_without_the_image(engine):
    e, loop = engine
    prefix = "There are three red"
    conv = conversation(_row(), with_image=False) + [{"role": "assistant", "content": prefix}]
    rendered = loop.run_until_complete(e._render(conv, continue_final=True))
    text = e.llm.get_tokenizer().decode(rendered["prompt_token_ids"])
    assert text.endswith(prefix)  # no end-of-turn after the prefix
    assert text.count("<|im_start|>assistant") == 1  # no new assistant header
    assert "<|image_pad|>" not in text and "<|vision_start|>" not in text
    comp = loop.run_until_complete(e.chat(conv, _params(e), continue_final=True))
    assert not comp.error and e.image_tokens(comp) == 0
    assert comp.prompt_token_ids == list(rendered["prompt_token_ids"])


def test_a_refused_request_fails_alone(engine):
    e, loop = engine
    row = _row()
    row["question"] = "word " * 1500

    async def both():
        return await asyncio.gather(
            e.chat(conversation(row), _params(e)), e.chat(conversation(_row()), _params(e))
        )

    bad, good = loop.run_until_complete(both())
    assert bad.error and "length" in bad.error and bad.texts == []
    assert not good.error and len(good.texts) == 1


def test_engine_is_sized_for_offline_batches_as_llm_is(engine, trained_model):
    """Regression: AsyncLLM's default usage context sized the scheduler for a server (128 sequences,
    2,048 tokens per step on CPU), half of what `LLM` gets, so the stage ran the engine half full."""
    from vllm import EngineArgs
    from vllm.usage.usage_lib import UsageContext

    from mmpr_pipeline.engine import engine_kwargs

    e, _ = engine
    offline = (
        EngineArgs(**engine_kwargs(trained_model, {"max_model_len": 1024}, 0))
        .create_engine_config(UsageContext.LLM_CLASS)
        .scheduler_config
    )
    ours = e.llm.vllm_config.scheduler_config
    assert (ours.max_num_seqs, ours.max_num_batched_tokens) == (
        offline.max_num_seqs,
        offline.max_num_batched_tokens,
    )
    assert ours.max_num_seqs > 128
    assert e.window.limit == 2 * ours.max_num_seqs  # a full step now and a full queue for the next


def test_requests_beyond_the_sequence_window_wait_their_turn_and_all_finish(engine):
    """The window admits at most `limit` sequences (a request of n takes n; one larger than the
    window takes all of it), builds a request's conversation only on admission, and a conversation
    that cannot be built fails its request alone."""
    from mmpr_pipeline.engine import SequenceWindow

    e, loop = engine
    window, e.window = e.window, SequenceWindow(3)
    admitted, peak = [], [0]

    def build(i):
        def conv():
            admitted.append(i)
            peak[0] = max(peak[0], e.window.used)
            return conversation(_row())

        return conv

    def broken():
        raise OSError("image file is truncated")

    async def many():
        return await asyncio.gather(
            *(e.chat(build(i), _params(e, n=2 if i % 2 else 1)) for i in range(6)),
            e.chat(build(6), _params(e, n=5)),
            e.chat(broken, _params(e)),
        )

    try:
        *done, wide, bad = loop.run_until_complete(many())
    finally:
        e.window = window
    assert 1 <= peak[0] <= 3 and e.window.used == 0  # built once admitted (never before), never over 3
    assert admitted == list(range(7))  # in arrival order
    assert [len(c.texts) for c in done] == [1, 2, 1, 2, 1, 2] and not any(c.error for c in done)
    assert len(wide.texts) == 5  # wider than the window: admitted alone, not stuck
    assert bad.error.startswith("OSError") and bad.texts == []


def test_sequence_window_counts_samples_and_admits_in_order():
    """Pure logic: with room for 4 sequences, requests of 3, 2, 1 samples: the 2 waits for the 3,
    and the 1 queued behind it waits too (first come, first served)."""
    from mmpr_pipeline.engine import SequenceWindow

    window, order = SequenceWindow(4), []

    async def request(name, n, hold):
        async with window.take(n):
            order.append(("in", name, window.used))
            await asyncio.sleep(hold)
        order.append(("out", name))

    async def main():
        first = asyncio.create_task(request("a", 3, 0.05))
        await asyncio.sleep(0)
        await asyncio.gather(first, request("b", 2, 0.01), request("c", 1, 0.01))

    asyncio.run(main())
    assert order[0] == ("in", "a", 3)
    assert order.index(("out", "a")) < order.index(("in", "b", 2)) < order.index(("in", "c", 3))


def test_the_engine_receives_a_transparent_chart_as_its_white_rendering(engine):
    """The pixel values vLLM's renderer hands the engine (Engine._render, what _generate sends) for a
    black-on-transparent chart are exactly those of the same chart drawn on white, and for a phone
    JPEG with EXIF orientation 6 those of the upright picture: records.decode_image's pixels, which
    vLLM does not rotate again. A plain convert("RGB") (the old path) gave it an all-black image."""
    import io

    import numpy as np
    import torch
    from PIL import Image, ImageDraw

    from mmpr_pipeline.engine import user_message
    from mmpr_pipeline.records import decode_image

    e, loop = engine
    chart = Image.new("RGBA", (112, 84), (0, 0, 0, 0))
    ImageDraw.Draw(chart).line((4, 80, 108, 6), fill=(0, 0, 0, 255), width=4)
    ImageDraw.Draw(chart).rectangle((10, 40, 30, 80), fill=(0, 0, 0, 255))
    white = Image.alpha_composite(Image.new("RGBA", chart.size, "white"), chart).convert("RGB")
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 255, (84, 112, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways, shown turned 90 degrees clockwise
    phone = io.BytesIO()
    photo.save(phone, format="JPEG", quality=95, exif=exif)

    def encoded(img: Image.Image, fmt: str = "PNG") -> bytes:
        buf = io.BytesIO()
        img.save(buf, format=fmt)
        return buf.getvalue()

    def received(images=None, pil=None):
        row = dict(_row(), images=images or [])
        conv = conversation(row) if pil is None else [user_message(row["question"], [pil])]
        engine_input = loop.run_until_complete(e._render(conv, continue_final=False))
        return engine_input["mm_kwargs"].get_data()

    sent, drawn_on_white = received([encoded(chart)]), received([encoded(white)])
    assert torch.equal(sent["pixel_values"], drawn_on_white["pixel_values"])
    assert torch.equal(sent["image_grid_thw"], drawn_on_white["image_grid_thw"])
    plain = received(pil=Image.open(io.BytesIO(encoded(chart))).convert("RGB"))  # the old decoding
    assert not torch.equal(plain["pixel_values"], sent["pixel_values"])

    upright = encoded(decode_image(phone.getvalue()))  # lossless, the same pixels
    assert Image.open(io.BytesIO(upright)).size == (84, 112)
    assert torch.equal(received([phone.getvalue()])["pixel_values"], received([upright])["pixel_values"])


def test_the_engine_core_runs_on_the_threads_cpu_threads_names(engine):
    """Its OpenMP threads are what `cpu_threads` decides (in a Ray actor, not Ray's OMP_NUM_THREADS=1,
    which the engine core inherited: a CPU build sampled on one core while the bare engine used all)."""
    import psutil

    from mmpr_pipeline.engine import cpu_threads

    cores = [
        p
        for p in psutil.Process().children(recursive=True)
        if "EngineCore" in " ".join(p.cmdline()) + p.name()
    ]
    assert cores, "no VLLM::EngineCore process under this test"
    # read raw: psutil's environ() stops at the empty entries the process title leaves at its start
    wanted = f"OMP_NUM_THREADS={cpu_threads({})}".encode()
    assert all(wanted in Path(f"/proc/{p.pid}/environ").read_bytes().split(b"\0") for p in cores)


def test_cpu_threads_the_recipe_then_vllms_binding_then_every_allowed_core(monkeypatch):
    from mmpr_pipeline.engine import cpu_threads

    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "auto")
    assert cpu_threads({}) == len(os.sched_getaffinity(0))
    assert cpu_threads({"cpu_threads": 3}) == 3
    for bind, n in (("1", 1), ("0-3", 4), ("0,2-3", 3), ("4-7,9", 5)):
        monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", bind)
        assert cpu_threads({}) == n, bind
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    assert cpu_threads({}) == len(os.sched_getaffinity(0))
