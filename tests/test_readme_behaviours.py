"""README behaviours that are pure logic, pinned to exact values (issue 18, item 3)."""

import asyncio

import pyarrow as pa

from mmpr_pipeline import tasks
from mmpr_pipeline.evaluate import wilson
from mmpr_pipeline.records import QUESTION_SCHEMA
from mmpr_pipeline.units import WorkUnit, plan_source, unit_file


def test_wilson_interval_matches_the_textbook_values():
    # 8 of 10: the Wilson 95% interval is (0.490, 0.943) (Wilson 1927; Newcombe 1998, method 3)
    lo, hi = wilson(8, 10)
    assert (round(lo, 3), round(hi, 3)) == (0.490, 0.943)
    assert wilson(0, 10)[0] == 0.0 and round(wilson(0, 10)[1], 3) == 0.278
    assert wilson(10, 10)[1] == 1.0 and round(wilson(10, 10)[0], 3) == 0.722
    assert wilson(0, 0) == (0.0, 0.0)


class _Source:
    name, limit = "src", None


def _scans(*sizes):
    return [dict(path=f"f{i}", qids=[f"{i}-{k}" for k in range(n)], offsets=[]) for i, n in enumerate(sizes)]


def test_units_are_row_ranges_of_one_input_and_duplicates_are_found_across_inputs():
    src = _Source()
    scans = _scans(5, 3)
    scans[1]["qids"][1] = "0-2"  # row 6 repeats row 2 of the first file
    scans[0]["qids"][4] = None  # a bad row: no qid, never a duplicate
    units = plan_source(src, scans, unit_size=2)
    assert [(u.path, u.start, u.stop, u.first_row) for u in units] == [
        ("f0", 0, 2, 0),
        ("f0", 2, 4, 2),
        ("f0", 4, 5, 4),
        ("f1", 0, 2, 5),
        ("f1", 2, 3, 7),
    ]
    assert [u.unit for u in units] == [0, 1, 2, 3, 4]
    assert units[3].duplicates == (6,) and not any(u.duplicates for u in units[:3])
    src.limit = 6  # a smaller limit: fewer units, and the last one shorter
    smaller = plan_source(src, scans, unit_size=2)
    assert [(u.path, u.start, u.stop) for u in smaller] == [
        ("f0", 0, 2),
        ("f0", 2, 4),
        ("f0", 4, 5),
        ("f1", 0, 1),
    ]
    assert (
        smaller[3].key != units[3].key and smaller[0].key == units[0].key
    )  # only the changed unit is redone


def test_units_dropped_by_a_smaller_limit_are_removed(tmp_path):
    from mmpr_pipeline.pipeline import remove_stale_units

    for kind in ("samples", "pairs", "rejects"):
        for unit in range(3):
            path = unit_file(tmp_path, kind, "src", unit)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"x")
    unit_file(tmp_path, "samples", "src", 2, "json").write_text("{}")
    keep = [WorkUnit("src", u, "f", 0, 1, u) for u in range(2)]
    remove_stale_units(tmp_path, {"src": keep})
    left = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("unit-*"))
    assert left == [f"{k}/src/unit-0000{u}.parquet" for k in ("pairs", "rejects", "samples") for u in (0, 1)]


class _RecordingEngine:
    """Stands in for the engine to count requests (the real engine is tested in test_engine.py)."""

    def __init__(self):
        self.requests = []

    params = staticmethod(lambda **kw: kw)

    async def chat(self, conversation, params, continue_final=False):
        from mmpr_pipeline.engine import Completion

        self.requests.append(params)
        n = params["n"]
        return Completion(texts=[f"s{i}" for i in range(n)], n_tokens=[1] * n, finish_reasons=["stop"] * n)

    def image_tokens(self, completion):
        return 16


def test_all_n_samples_of_a_question_come_from_one_request():
    from mmpr_pipeline.recipe import SampleSettings, Sampling
    from stages.sample import SampleStage

    stage = object.__new__(SampleStage)  # its recording engine instead of the one __init__ starts
    stage.engine, stage.seed, stage.sampling_extra = _RecordingEngine(), 0, {}
    stage.sources = {"s": SampleSettings(template="raw", sampling=Sampling(n=5))}
    stage.progress = None  # no build progress counter outside a build
    rows = []
    for i, q in enumerate(tasks.generate(3)):
        rows.append(
            dict(
                qid=f"q{i}",
                source="s",
                row_index=i,
                unit=0,
                unit_plan="",
                pipeline="correctness",
                task=q["task"],
                images=[q["image"]],
                question=q["question"],
                answer=q["answer"],
                answers=[q["answer"]],
                answer_type=q["answer_type"],
                options=q["options"],
                given_response="",
            )
        )

    async def run():
        return [t async for t in stage(pa.Table.from_pylist(rows, schema=QUESTION_SCHEMA))][0]

    out = asyncio.run(run())
    assert len(stage.engine.requests) == 3 and all(p["n"] == 5 for p in stage.engine.requests)
    assert [len(r) for r in out.column("responses").to_pylist()] == [5, 5, 5]
    seeds = [p["seed"] for p in stage.engine.requests]
    assert len(set(seeds)) == 3  # each question its own seed, from its qid


def test_readme_pipeline_diagram_names_the_code_that_runs_each_stage():
    """Each `module.name` in "How it works" is a function or class that exists under that name."""
    import importlib
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    diagram = readme.split("## How it works", 1)[1].split("```")[1]
    names = re.findall(r"\b((?:stages/)?[a-z_]+)\.([A-Za-z_]+)\b", diagram)
    names = [(m, n) for m, n in names if n not in ("parquet", "html", "md", "json")]
    assert len(names) >= 15
    for module, name in names:
        path = module.replace("/", ".") if module.startswith("stages/") else f"mmpr_pipeline.{module}"
        assert hasattr(importlib.import_module(path), name), (
            f"README names {module}.{name}, which is not there"
        )
