"""Sample: Question rows -> the same rows with their `n` responses (a Ray Data actor stage).

Each replica owns one `Engine` (vLLM's async engine, built once in `__init__`). `__call__` is a
coroutine: every question of the batch is its own request (all `n` samples of a question in one
request), and Ray Data runs several batches per replica at once (`max_concurrent_batches`), so new
requests keep flowing while a batch waits on its longest response. The engine's sequence window
admits them in arrival order and decodes a question's images only on admission. DropoutNTP rows are
then cut and continued without the image (or with it, `dropout.with_image`) by the same engine
(stages/dropout_ntp.py).

A source may override the sampling settings (`sources[i].sampling`, see `Recipe.sampling_for`) and
cap its images' size (`sources[i].image_max_pixels`): its images are downscaled here, before the
engine, and the row keeps the downscaled bytes, so its pairs (and the trainer) carry the image the
engine saw.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import pyarrow as pa

from mmpr_pipeline.engine import request_seed
from mmpr_pipeline.records import SAMPLE_SCHEMA, WHITE, decode_image, downscale_image
from mmpr_pipeline.scoring.model_judge import JUDGE_COLUMNS

log = logging.getLogger(__name__)


def empty_sample_columns(row: dict[str, Any], template: str, sampling: str = "") -> dict[str, Any]:
    """The sample columns of a row before anything is generated (`sampling`: its settings as JSON)."""
    row.update(
        prompt_template=template,
        sampling=sampling,
        responses=[],
        n_tokens=[],
        finish_reasons=[],
        error="",
        extracted=[],
        correct=[],
        score=[],
        reason=[],
        prefix_words=[],
        continuations=[],
        continuation_tokens=[],
        continuation_image_tokens=[],
        image_tokens=0,
        sample_seconds=0.0,
        continue_seconds=0.0,
        score_seconds=0.0,
        **{c: [] for c in JUDGE_COLUMNS},
    )
    return row


def conversation(row: dict[str, Any], with_image: bool = True, background=WHITE) -> list[dict]:
    """The user turn the model sees: the rendered prompt template, with the images unless dropped
    (decoded by records.decode_image, transparency over the source's `image_background`)."""
    from mmpr_pipeline.engine import user_message
    from mmpr_pipeline.prompts import render

    images = [decode_image(b, background) for b in row["images"]] if with_image else []
    return [user_message(render(row["prompt_template"], row["question"]), images)]


def sampling_json(sampling) -> str:
    """Sampling settings as the `sampling` column of sample and pair rows record them."""
    return json.dumps(dataclasses.asdict(sampling), sort_keys=True)


class SampleStage:
    # No per-source overrides unless given: every source samples with `sampling`, images as they are.
    source_sampling: dict = {}
    image_max_pixels: dict = {}
    image_background: dict = {}

    def __init__(
        self,
        model: str,
        engine_options: dict,
        seed: int,
        sampling,
        templates: dict[str, str],
        dropout: dict,
        sampling_extra: dict | None = None,
        source_sampling: dict | None = None,
        image_max_pixels: dict | None = None,
        image_background: dict | None = None,
        progress=None,
    ):
        from mmpr_pipeline.engine import Engine
        from mmpr_pipeline.progress import CounterClient

        self.engine = Engine(model, engine_options, seed)
        self.seed = seed
        self.sampling = sampling
        self.templates = templates  # source -> prompt template id
        self.dropout = dropout  # source -> Dropout settings (dropout_ntp sources only)
        self.sampling_extra = sampling_extra or {}  # more SamplingParams (benchmarks: ignore_eos)
        self.source_sampling = (
            source_sampling or {}
        )  # source -> its Sampling, where it overrides the recipe's
        self.image_max_pixels = image_max_pixels or {}  # source -> pixel cap of its images, where it has one
        self.image_background = image_background or {}  # source -> (r, g, b) under transparent pixels
        # the build's progress counter (progress.SampleCounter), told as each question finishes
        self.progress = CounterClient(progress) if progress is not None else None

    def sampling_for(self, source: str):
        return self.source_sampling.get(source, self.sampling)

    async def __call__(self, batch: pa.Table) -> AsyncIterator[pa.Table]:
        rows = [
            empty_sample_columns(
                r, self.templates[r["source"]], sampling_json(self.sampling_for(r["source"]))
            )
            for r in batch.to_pylist()
        ]
        await asyncio.gather(*(self.sample_and_count(r) for r in rows))
        if self.progress:
            self.progress.flush()
        yield pa.Table.from_pylist(rows, schema=SAMPLE_SCHEMA)

    async def sample_and_count(self, row: dict[str, Any]) -> None:
        await self.sample_row(row)
        if self.progress:
            self.progress.add(1, sum(row["n_tokens"]) + sum(row["continuation_tokens"]))

    def params_for(self, row: dict[str, Any], n: int):
        """The sampling parameters of one question's request, with its source's settings (seeded by
        its qid: the same samples however questions are batched, spread over replicas, or resumed)."""
        s = self.sampling_for(row["source"])
        return self.engine.params(
            n=n,
            temperature=s.temperature,
            top_k=s.top_k,
            top_p=s.top_p,
            max_tokens=s.max_tokens,
            **self.sampling_extra,
            seed=request_seed(self.seed, row["qid"]) if s.reproducible else None,
        )

    async def sample_row(self, row: dict[str, Any]) -> None:
        """Fill one question's responses (and, for DropoutNTP, its image-free continuations)."""
        s = self.sampling_for(row["source"])
        max_pixels = self.image_max_pixels.get(row["source"])
        background = self.image_background.get(row["source"], WHITE)
        if max_pixels:  # before the engine: the row (so its pairs) keeps the image the engine sees;
            # only bytes are kept, so images are still decoded for the engine on admission alone
            row["images"] = [downscale_image(b, max_pixels, background) for b in row["images"]]
        dropout = row["pipeline"] == "dropout_ntp"
        if dropout and row["given_response"]:
            row.update(responses=[row["given_response"]], n_tokens=[0], finish_reasons=["given"])
        else:
            n = self.dropout[row["source"]].n if dropout else s.n
            t0 = time.perf_counter()
            comp = await self.engine.chat(
                lambda: conversation(row, True, background), self.params_for(row, n)
            )
            row.update(
                responses=comp.texts,
                n_tokens=comp.n_tokens,
                finish_reasons=comp.finish_reasons,
                error=comp.error,
                image_tokens=self.engine.image_tokens(comp),
                sample_seconds=time.perf_counter() - t0,
            )
        if dropout and not row["error"]:
            from stages.dropout_ntp import continue_prefixes

            await continue_prefixes(
                row, self.engine, s, self.dropout[row["source"]], self.sampling_extra, self.seed, background
            )
