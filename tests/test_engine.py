"""The engine as the pipeline drives it (vLLM's async engine on CPU, the trained demo model): what the
model actually receives, checked on the rendered prompts and the prompt token ids vLLM reports."""
import asyncio

import pytest

from mmpr_pipeline import tasks
from stages.sample import conversation

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
    assert text.endswith(prefix)                      # no end-of-turn after the prefix
    assert text.count("<|im_start|>assistant") == 1   # no new assistant header
    assert "<|image_pad|>" not in text and "<|vision_start|>" not in text
    comp = loop.run_until_complete(e.chat(conv, _params(e), continue_final=True))
    assert not comp.error and e.image_tokens(comp) == 0
    assert comp.prompt_token_ids == list(rendered["prompt_token_ids"])


def test_a_refused_request_fails_alone(engine):
    e, loop = engine
    row = _row()
    row["question"] = "word " * 1500

    async def both():
        return await asyncio.gather(e.chat(conversation(row), _params(e)), e.chat(conversation(_row()), _params(e)))

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
    offline = EngineArgs(**engine_kwargs(trained_model, {"max_model_len": 1024}, 0)).create_engine_config(
        UsageContext.LLM_CLASS).scheduler_config
    ours = e.llm.vllm_config.scheduler_config
    assert (ours.max_num_seqs, ours.max_num_batched_tokens) == (offline.max_num_seqs,
                                                                offline.max_num_batched_tokens)
    assert ours.max_num_seqs > 128
