"""Stage descriptors: what each step of a build's Ray Data stream reads and adds, and how it runs.

In the manner of Ray Data LLM's stages (a UDF plus the columns it needs and its `map_batches`
arguments): `pipeline.run_units` lists its steps as `StreamStage`s and `chain` wires them, refusing a
stage that reads a column no earlier stage produced, before anything runs. A unit stays one block
(one batch) from load to write, so no stage regroups rows.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from mmpr_pipeline.records import QUESTION_SCHEMA, SAMPLE_SCHEMA
from mmpr_pipeline.scoring.model_judge import JUDGE_COLUMNS

UNIT_COLUMNS = ("unit_plan",)  # units.WorkUnit.to_item: the stream's input, one row per unit
QUESTION_COLUMNS = tuple(QUESTION_SCHEMA.names)
SAMPLE_COLUMNS = tuple(n for n in SAMPLE_SCHEMA.names if n not in QUESTION_COLUMNS)
VERDICT_COLUMNS = ("extracted", "correct", "score", "reason", "score_seconds", *JUDGE_COLUMNS)
SUMMARY_COLUMNS = ("source", "unit", "rows", "questions", "pairs")  # stages/write.summary_row


@dataclass(frozen=True)
class StreamStage:
    """One step: `udf` (a function, or a class Ray Data runs as an actor pool) reading `reads`,
    adding or rewriting `produces`, run with `map_args` (Ray Data's map_batches arguments)."""

    name: str
    udf: Callable
    reads: tuple[str, ...]
    produces: tuple[str, ...]
    map_args: dict = field(default_factory=dict)


class StageOrderError(ValueError):
    """A stage reads a column that no stage before it produces."""


def check_chain(stages: list[StreamStage], columns: tuple[str, ...] = UNIT_COLUMNS) -> tuple[str, ...]:
    """The columns after `stages`, starting from `columns`; raises StageOrderError naming the first
    stage that reads a column nothing before it produced."""
    have = set(columns)
    for stage in stages:
        missing = [c for c in stage.reads if c not in have]
        if missing:
            raise StageOrderError(
                f"stage {stage.name!r} reads {', '.join(missing)}, which no stage before it produces"
            )
        have |= set(stage.produces)
    return tuple(sorted(have))


def chain(ds, stages: list[StreamStage], columns: tuple[str, ...] = UNIT_COLUMNS):
    """`ds` through `stages` in order, once the order is checked (check_chain)."""
    check_chain(stages, columns)
    for stage in stages:
        ds = ds.map_batches(stage.udf, **stage.map_args)
    return ds
