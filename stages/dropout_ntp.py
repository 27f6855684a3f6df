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

import re
import time
from typing import Any

from mmpr_pipeline.engine import request_seed

_WORD = re.compile(r"\S+")


def prefix_of(text: str, words: int) -> str:
    """The text up to the end of its `words`-th whitespace-separated word, exactly as written."""
    for k, match in enumerate(_WORD.finditer(text), 1):
        if k == words:
            return text[: match.end()]
    return text


def truncate(text: str, ratio: float, min_words: int) -> tuple[str, int] | None:
    """(prefix, words kept): the text up to the end of its first int(N * ratio) whitespace-separated
    words, exactly as written (so prefix is a true prefix of text). None when text has fewer than
    `min_words` words, or the cut would keep nothing or everything."""
    words = list(_WORD.finditer(text))
    keep = int(len(words) * ratio)
    if len(words) < min_words or keep < 1 or keep >= len(words):
        return None
    return prefix_of(text, keep), keep


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

    from stages.sample import conversation

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


def pair_question(row: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Pairs (chosen = original, rejected = prefix + continuation) and counts of what was dropped."""
    counts = dict(too_short=0, continued=0, empty_continuation=0, identical=0)
    pairs = []
    for i, text in enumerate(row["responses"]):
        kept = row["prefix_words"][i]
        if kept < 0:
            counts["too_short"] += 1
            continue
        prefix = prefix_of(text, kept)
        continuation = row["continuations"][i]
        if not continuation.strip():
            counts["empty_continuation"] += 1
            continue
        counts["continued"] += 1
        if continuation.strip() == text[len(prefix) :].strip():
            counts["identical"] += 1
            continue
        pairs.append(
            dict(
                chosen=text,
                rejected=prefix + continuation,
                chosen_index=i,
                rejected_index=i,
                prefix_words=kept,
            )
        )
    return pairs, counts
