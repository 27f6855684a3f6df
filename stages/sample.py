"""Sample: Question rows -> the same rows with their `n` responses (a Ray Data actor stage).

Each replica owns one `Engine` (vLLM's async engine, built once in `__init__`). `__call__` is a
coroutine: every question of the batch is its own request (all `n` samples of a question in one
request), and Ray Data runs several batches per replica at once (`max_concurrent_batches`), so new
requests keep flowing while a batch waits on its longest response. The engine's sequence window
admits them in arrival order and decodes a question's images only on admission. DropoutNTP rows are
then cut and continued without the image (or with it, `dropout.with_image`) by the same engine
(stages/dropout_ntp.py).

Each source's settings (template, sampling with its overrides, DropoutNTP, image cap and background)
come resolved once by the recipe (`Recipe.sample_settings`). A source may cap its images' size
(`sources[i].image_max_pixels`): its images are downscaled here, before the engine, and the row keeps
the downscaled bytes, so its pairs (and the trainer) carry the image the engine saw.
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

from mmpr_pipeline.engine import conversation, request_seed
from mmpr_pipeline.records import SAMPLE_SCHEMA, downscale_image
from mmpr_pipeline.scoring.model_judge import JUDGE_COLUMNS
from stages.dropout_ntp import continue_prefixes

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


def sampling_json(sampling) -> str:
    """Sampling settings as the `sampling` column of sample and pair rows record them."""
    return json.dumps(dataclasses.asdict(sampling), sort_keys=True)


class SampleStage:
    def __init__(
        self,
        model: str,
        engine_options: dict,
        seed: int,
        sources: dict,
        sampling_extra: dict | None = None,
        progress=None,
    ):
        from mmpr_pipeline.engine import Engine
        from mmpr_pipeline.progress import CounterClient

        self.engine = Engine(model, engine_options, seed)
        self.seed = seed
        self.sources = sources  # source name -> recipe.SampleSettings, resolved once by the recipe
        self.sampling_extra = sampling_extra or {}  # more SamplingParams (benchmarks: ignore_eos)
        # the build's progress counter (progress.SampleCounter), told as each question finishes
        self.progress = CounterClient(progress) if progress is not None else None

    async def __call__(self, batch: pa.Table) -> AsyncIterator[pa.Table]:
        rows = [
            empty_sample_columns(
                r, self.sources[r["source"]].template, sampling_json(self.sources[r["source"]].sampling)
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
        s = self.sources[row["source"]].sampling
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
        settings = self.sources[row["source"]]
        max_pixels, background = settings.image_max_pixels, settings.image_background
        if max_pixels:  # before the engine: the row (so its pairs) keeps the image the engine sees;
            # only bytes are kept, so images are still decoded for the engine on admission alone
            row["images"] = [downscale_image(b, max_pixels, background) for b in row["images"]]
        dropout = row["pipeline"] == "dropout_ntp"
        if dropout and row["given_response"]:
            row.update(responses=[row["given_response"]], n_tokens=[0], finish_reasons=["given"])
        else:
            t0 = time.perf_counter()
            comp = await self.engine.chat(
                lambda: conversation(row, True, background), self.params_for(row, settings.sampling.n)
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
            await continue_prefixes(
                row,
                self.engine,
                settings.sampling,
                settings.dropout,
                self.sampling_extra,
                self.seed,
                background,
            )
