"""The vLLM engine as the pipeline uses it: settings, chat prompts with images, n samples per prompt.

One `Engine` per Ray actor replica. All of a question's samples come out of one request
(`SamplingParams(n=...)`), so they stay together. Requests go through `LLM.chat`, so each model's
own chat template places its image tokens; DropoutNTP's continuation uses the same engine with
text-only messages and `continue_final_message=True`.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

from mmpr_pipeline.recipe import DEMO_MODEL

log = logging.getLogger(__name__)

# Settings that work on a CPU (see README, "vLLM on CPU"); a GPU uses vLLM's own defaults
# unless the recipe's `engine:` says otherwise.
# Chunked prefill is off on CPU because per-request seeds crash with it there.
CPU_DEFAULTS = dict(enforce_eager=True, dtype="bfloat16", max_model_len=2048, enable_chunked_prefill=False)
COMMON_DEFAULTS = dict(limit_mm_per_prompt={"image": 1})


def has_gpu() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except Exception:  # pragma: no cover - torch missing is an install problem reported elsewhere
        return False


def resolve_model(model: str) -> str:
    """`demo` means the bundled model, built and trained locally on first use."""
    if model == DEMO_MODEL:
        from mmpr_pipeline import demo_model
        return str(demo_model.ensure_trained())
    return model


def engine_kwargs(model: str, options: dict[str, Any], seed: int) -> dict[str, Any]:
    kwargs = dict(COMMON_DEFAULTS)
    if not has_gpu():
        kwargs.update(CPU_DEFAULTS)
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    kwargs.update(options)
    kwargs.update(model=model, seed=seed)
    return kwargs


@dataclass
class Completion:
    """All samples of one request."""
    texts: list[str] = field(default_factory=list)
    n_tokens: list[int] = field(default_factory=list)
    finish_reasons: list[str] = field(default_factory=list)
    prompt_token_ids: list[int] = field(default_factory=list)
    error: str = ""


def user_message(text: str, image=None) -> dict[str, Any]:
    """A user turn: the image (PIL) first, then the text, as the MMPR prompts place it."""
    parts: list[dict[str, Any]] = []
    if image is not None:
        parts.append({"type": "image_pil", "image_pil": image})
    parts.append({"type": "text", "text": text})
    return {"role": "user", "content": parts}


class Engine:
    def __init__(self, model: str, options: dict[str, Any] | None = None, seed: int = 0):
        from vllm import LLM

        self.model = model
        self.llm = LLM(**engine_kwargs(model, options or {}, seed))
        tokenizer = self.llm.get_tokenizer()
        self.image_token_ids = {tid for tok, tid in tokenizer.get_vocab().items()
                                if tok in ("<|image_pad|>", "<image>", "<IMG_CONTEXT>")}

    def params(self, n: int, temperature: float, top_k: int, top_p: float, max_tokens: int,
               seed: int | None = None, **extra):
        from vllm import SamplingParams
        return SamplingParams(n=n, temperature=temperature, top_k=top_k, top_p=top_p,
                              max_tokens=max_tokens, seed=seed, **extra)

    def chat(self, conversations: list[list[dict]], params, *, continue_final: bool = False) -> list[Completion]:
        """`params`: one SamplingParams for all, or a list with one per conversation."""
        """One Completion per conversation. A request the engine refuses (say, a prompt longer than
        the context) fails alone: the batch is retried one request at a time, and the refused
        request's error is recorded instead of its samples."""
        kwargs = dict(add_generation_prompt=not continue_final, continue_final_message=continue_final,
                      use_tqdm=False)
        try:
            outputs = self.llm.chat(conversations, params, **kwargs)
        except Exception as batch_error:  # noqa: BLE001 - vLLM raises several types for bad requests
            if len(conversations) == 1:
                return [Completion(error=f"{type(batch_error).__name__}: {batch_error}"[:500])]
            log.warning("engine refused a batch (%s); retrying its %d requests one by one",
                        type(batch_error).__name__, len(conversations))
            per_conv = params if isinstance(params, list) else [params] * len(conversations)
            return [c for conv, p in zip(conversations, per_conv)
                    for c in self.chat([conv], [p], continue_final=continue_final)]
        return [Completion(texts=[o.text for o in out.outputs],
                           n_tokens=[len(o.token_ids) for o in out.outputs],
                           finish_reasons=[str(o.finish_reason) for o in out.outputs],
                           prompt_token_ids=list(out.prompt_token_ids or []))
                for out in outputs]

    def image_tokens(self, completion: Completion) -> int:
        """How many image placeholder tokens the prompt that was actually sent carried."""
        return sum(1 for t in completion.prompt_token_ids if t in self.image_token_ids)


def request_seed(seed: int, *parts: object) -> int:
    """A request's own seed, from the recipe seed and what identifies the request."""
    from mmpr_pipeline.records import stable_hash
    return int(stable_hash(seed, *parts), 16) % (2**31)
