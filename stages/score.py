"""Score: judge every response of a correctness question against its ground truth.

A plain function over a batch (a Ray Data task stage): the verdict columns are lists aligned with
`responses`. The judge itself lives in `mmpr_pipeline.scoring`.
"""
from __future__ import annotations

import time

import pyarrow as pa

from mmpr_pipeline.records import SAMPLE_SCHEMA


def score_row(row: dict) -> dict:
    from mmpr_pipeline.scoring import judge

    if row["pipeline"] != "correctness":
        return row
    t0 = time.perf_counter()
    answer = row["answers"] if len(row["answers"]) > 1 else row["answer"]
    verdicts = [judge(text, answer, row["answer_type"], options=row["options"] or None)
                for text in row["responses"]]
    row.update(extracted=[v.extracted for v in verdicts], correct=[bool(v.correct) for v in verdicts],
               score=[float(v.score) for v in verdicts], reason=[v.reason for v in verdicts],
               score_seconds=time.perf_counter() - t0)
    return row


def score_batch(batch: pa.Table) -> pa.Table:
    return pa.Table.from_pylist([score_row(r) for r in batch.to_pylist()], schema=SAMPLE_SCHEMA)
