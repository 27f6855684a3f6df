"""Sample: Question rows -> the same rows with their `n` responses (a Ray Data actor stage).

Each replica owns one `vllm.LLM` (built once in `__init__`); `__call__` takes a batch of questions
and asks for all `n` samples of a question in one request. DropoutNTP rows are then cut and
continued without the image by the same engine (stages/dropout_ntp.py), so one engine per replica
serves both pipelines.
"""
from __future__ import annotations

import logging
import time
from typing import Any

import pyarrow as pa

from mmpr_pipeline.engine import request_seed
from mmpr_pipeline.records import SAMPLE_SCHEMA, decode_image

log = logging.getLogger(__name__)


def empty_sample_columns(row: dict[str, Any], template: str) -> dict[str, Any]:
    """The sample columns of a row before anything is generated."""
    row.update(prompt_template=template, responses=[], n_tokens=[], finish_reasons=[], error="",
               extracted=[], correct=[], score=[], reason=[], prefix_words=[], continuations=[],
               continuation_tokens=[], continuation_image_tokens=[],
               sample_seconds=0.0, continue_seconds=0.0, score_seconds=0.0)
    return row


class SampleStage:
    def __init__(self, model: str, engine_options: dict, seed: int, sampling, templates: dict[str, str],
                 dropout: dict, sampling_extra: dict | None = None):
        from mmpr_pipeline.engine import Engine

        self.engine = Engine(model, engine_options, seed)
        self.seed = seed
        self.sampling = sampling
        self.templates = templates      # source -> prompt template id
        self.dropout = dropout          # source -> Dropout settings (dropout_ntp sources only)
        self.sampling_extra = sampling_extra or {}  # more SamplingParams (benchmarks: ignore_eos)

    def _conversation(self, row: dict[str, Any]) -> list[dict]:
        from mmpr_pipeline.engine import user_message
        from mmpr_pipeline.prompts import render

        return [user_message(render(row["prompt_template"], row["question"]), decode_image(row["image"]))]

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = [empty_sample_columns(r, self.templates[r["source"]]) for r in batch.to_pylist()]
        s = self.sampling
        # Group by the number of samples asked for: correctness sources take `n`, DropoutNTP its own.
        by_n: dict[int, list[dict]] = {}
        for row in rows:
            if row["pipeline"] == "dropout_ntp":
                if row["given_response"]:
                    row.update(responses=[row["given_response"]], n_tokens=[0], finish_reasons=["given"])
                    continue
                by_n.setdefault(self.dropout[row["source"]].n, []).append(row)
            else:
                by_n.setdefault(s.n, []).append(row)
        for n, group in by_n.items():
            t0 = time.perf_counter()
            params = [self.engine.params(n=n, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
                                         max_tokens=s.max_tokens, **self.sampling_extra,
                                         seed=request_seed(self.seed, r["qid"]) if s.reproducible else None)
                      for r in group]
            completions = self.engine.chat([self._conversation(r) for r in group], params)
            per_row = (time.perf_counter() - t0) / len(group)
            for row, comp in zip(group, completions):
                row.update(responses=comp.texts, n_tokens=comp.n_tokens, finish_reasons=comp.finish_reasons,
                           error=comp.error, sample_seconds=per_row)
        dropout_rows = [r for r in rows if r["pipeline"] == "dropout_ntp" and not r["error"]]
        if dropout_rows:
            from stages.dropout_ntp import continue_without_image

            continue_without_image(dropout_rows, self.engine, s, self.dropout, self.sampling_extra, self.seed)
        return pa.Table.from_pylist(rows, schema=SAMPLE_SCHEMA)
