"""Load: one work unit of a recipe source -> its Question rows, with bad rows set aside with their
reason (never dropped silently).

Runs on Ray workers, one work unit at a time. The driver only plans (mmpr_pipeline/units.py, from
`sources.scan_input`'s pass over each input on a worker); `read_unit` then reads one unit's rows
through mmpr_pipeline/sources.py, which checks each one.
"""

from __future__ import annotations

from mmpr_pipeline.decontam import near_duplicate_reason
from mmpr_pipeline.recipe import Source
from mmpr_pipeline.sources import BadRow, excerpt, input_rows, scan_input, source_inputs, to_question


def read_unit(source: Source, unit) -> tuple[list[dict], list[dict]]:
    """(questions, rejects) of one work unit (units.WorkUnit), read and checked on a worker."""
    questions, rejects = [], []
    near = {row: (src, first) for row, src, first in unit.near_duplicates}
    rows = input_rows(source, unit.path, unit.start, unit.byte_offset)
    for local, raw in zip(range(unit.start, unit.stop), rows):
        i = unit.first_row + (local - unit.start)  # the row's index in the whole source
        try:
            if i in unit.duplicates:
                raise BadRow("duplicate of an earlier row")
            if i in near:
                raise BadRow(near_duplicate_reason(*near[i]))
            q = to_question(raw, source, i)
        except BadRow as e:
            rejects.append(dict(source=source.name, row_index=i, reason=str(e), row=excerpt(raw)))
            continue
        q.update(unit=unit.unit, unit_plan=unit.to_item()["unit_plan"])
        questions.append(q)
    return questions, rejects


def load_source(source: Source, unit_size: int) -> tuple[list[dict], list[dict], int]:
    """(questions, rejects, rows read) of a whole source, in this process: the same scan, plan and
    unit reads as a build, for tests and benchmarks (a build runs them on Ray workers)."""
    from mmpr_pipeline.units import plan_source

    scans = [scan_input(source, path, source.limit, unit_size) for path in source_inputs(source)]
    questions, rejects = [], []
    for unit in plan_source(source, scans, unit_size):
        qs, rs = read_unit(source, unit)
        questions += qs
        rejects += rs
    return questions, rejects, len(questions) + len(rejects)
