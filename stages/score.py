"""Score: judge every response of a correctness question against its ground truth.

A plain function over a batch (a Ray Data task stage): the verdict columns are lists aligned with
`responses`. The judge itself lives in `mmpr_pipeline.scoring`; each response is judged by the format
rule of the prompt template it was asked with (the `format:` key in prompts/*.yaml), so a response
that breaks it gets no extracted answer (reason "wrong format") and pairing makes it the rejected
side of a format pair.
"""

from __future__ import annotations

import time

import pyarrow as pa

from mmpr_pipeline.records import SAMPLE_SCHEMA
from mmpr_pipeline.scoring.model_judge import fill_rules_columns
from mmpr_pipeline.scoring.modes import JUDGE_ERROR


def score_row(row: dict) -> dict:
    from mmpr_pipeline.prompts import format_rule
    from mmpr_pipeline.scoring import judge

    if row["pipeline"] != "correctness":
        return row
    t0 = time.perf_counter()
    answer = row["answers"] if len(row["answers"]) > 1 else row["answer"]
    rule = format_rule(row["prompt_template"]) if row.get("prompt_template") else None
    verdicts = [_judge_one(judge, text, answer, row, rule) for text in row["responses"]]
    row.update(
        extracted=[v[0] for v in verdicts],
        correct=[v[1] for v in verdicts],
        score=[v[2] for v in verdicts],
        reason=[v[3] for v in verdicts],
        score_seconds=time.perf_counter() - t0,
    )
    return fill_rules_columns(row)


def is_scored(row: dict) -> bool:
    """Has the row its verdicts already (scored before the judge model's stage)?"""
    return row["pipeline"] != "correctness" or len(row["reason"]) == len(row["responses"])


def _judge_one(judge, text: str, answer, row: dict, rule: str | None) -> tuple[str | None, bool, float, str]:
    """One verdict; a judge that fails on one response marks it wrong with the reason, and the
    batch (and the run) goes on."""
    from mmpr_pipeline.scoring.modes import labelled_by_question

    try:
        # options numbered in the question ("1. cat") are judged by their numbers, others lettered
        options = labelled_by_question(row.get("question") or "", row["options"] or [])
        v = judge(text, answer, row["answer_type"], options=options or None, format_rule=rule)
    except Exception as e:  # noqa: BLE001 - untrusted text must never stop the run
        return "", False, 0.0, f"{JUDGE_ERROR}: {type(e).__name__}: {e}"[:200]
    return v.extracted, bool(v.correct), float(v.score), v.reason


def score_batch(batch: pa.Table) -> pa.Table:
    return pa.Table.from_pylist([score_row(r) for r in batch.to_pylist()], schema=SAMPLE_SCHEMA)
