"""DropoutNTP (paper, Sec. 3.2): pairs for questions without a checkable answer.

Keep the first half of a response written while seeing the image, let the same model continue it
*without* the image; the original is chosen, the image-free continuation rejected. The continuation
is the assistant's own unfinished turn (`continue_final_message`), not a new turn.

`dropout.with_image: true` continues the prefix *with* the question's images instead (InternVL's
`sr0.5_with_image` release files, beside the paper's `sr0.5_wo_image`): the rejected side is then a
second, independently sampled ending written while seeing the image. The sample row's
`continuation_image_tokens` records what the engine received; the pair's provenance records the option.
"""

from __future__ import annotations

import time
from typing import Any

from mmpr_pipeline.engine import conversation, request_seed
from mmpr_pipeline.pairing import truncate


def cut_responses(row: dict[str, Any], cfg) -> list[tuple[int, str]]:
    """(response index, kept prefix) of every response long enough to cut (pairing.truncate); sets the
    row's prefix_words (-1: too short) and empty continuation columns."""
    n = len(row["responses"])
    row.update(
        prefix_words=[-1] * n,
        continuations=[""] * n,
        continuation_tokens=[0] * n,
        continuation_image_tokens=[0] * n,
    )
    jobs = []  # (response index, the kept prefix: the unfinished assistant turn)
    for i, text in enumerate(row["responses"]):
        cut = truncate(text, cfg.ratio, cfg.min_words)
        if cut is None:
            continue
        prefix, kept = cut
        row["prefix_words"][i] = kept
        jobs.append((i, prefix))
    return jobs


async def continue_prefixes(
    row: dict[str, Any],
    engine,
    sampling,
    cfg,
    sampling_extra: dict | None = None,
    seed: int = 0,
    background=(255, 255, 255),
) -> None:
    """Cut every response of one dropout_ntp row and continue each prefix, all at once: without the
    question's images, or with them under `cfg.with_image`. Fills prefix_words (-1: too short),
    continuations, continuation_tokens, continuation_image_tokens."""
    import asyncio

    jobs = cut_responses(row, cfg)

    def continued(prefix: str):  # built on admission (Engine.chat): images are decoded only then
        return lambda: (
            conversation(row, cfg.with_image, background) + [{"role": "assistant", "content": prefix}]
        )

    if not jobs:
        return
    t0 = time.perf_counter()
    params = [
        engine.params(
            n=1,
            temperature=sampling.temperature,
            top_k=sampling.top_k,
            top_p=sampling.top_p,
            max_tokens=sampling.max_tokens,
            **(sampling_extra or {}),
            seed=request_seed(seed, row["qid"], "continue", i) if sampling.reproducible else None,
        )
        for i, _ in jobs
    ]
    completions = await asyncio.gather(
        *(engine.chat(continued(prefix), p, continue_final=True) for (_, prefix), p in zip(jobs, params))
    )
    row["continue_seconds"] = time.perf_counter() - t0
    for (i, _), comp in zip(jobs, completions):
        if comp.error:
            row["error"] = row["error"] or f"continuation: {comp.error}"
            continue
        row["continuations"][i] = comp.texts[0]
        row["continuation_tokens"][i] = comp.n_tokens[0]
        row["continuation_image_tokens"][i] = engine.image_tokens(comp)
