"""The build's stream as stage descriptors (mmpr_pipeline/stream.py): each stage reads only columns
an earlier stage produced, checked before anything runs."""

from pathlib import Path

import pytest

from mmpr_pipeline import pipeline
from mmpr_pipeline import recipe as recipe_mod
from mmpr_pipeline.stream import UNIT_COLUMNS, StageOrderError, StreamStage, check_chain

REPO = Path(__file__).resolve().parent.parent


def _stages(monkeypatch, tmp_path):
    monkeypatch.setattr(pipeline, "cluster_gpus", lambda: [])  # a CPU machine: one engine replica
    rec = recipe_mod.load(REPO / "data_cards" / "demo.yaml")
    return pipeline.stream_stages(
        rec, tmp_path, rec.model, n_units=3, max_images=1, benchmarks=None, counter=None
    )


def test_the_build_stream_is_in_an_order_whose_reads_are_all_produced(monkeypatch, tmp_path):
    stages = _stages(monkeypatch, tmp_path)
    assert [s.name for s in stages] == ["load", "sample", "pair+write"]
    columns = check_chain(stages)
    assert {"unit_plan", "qid", "responses", "correct", "pairs"} <= set(columns)
    sample = stages[1]
    settings = sample.map_args["fn_constructor_kwargs"]["sources"]  # resolved once, by the recipe
    assert settings["shapes"].sampling.n == 8 and settings["shapes"].dropout is None
    assert settings["describe"].sampling.n == settings["describe"].dropout.n == 1  # DropoutNTP asks dropout.n


def test_a_stage_before_what_it_reads_is_refused_by_name(monkeypatch, tmp_path):
    load, sample, finish = _stages(monkeypatch, tmp_path)
    with pytest.raises(StageOrderError, match=r"stage 'sample' reads qid, source, pipeline"):
        check_chain([sample, load, finish])
    with pytest.raises(StageOrderError, match=r"stage 'pair\+write' reads .*responses"):
        check_chain([load, finish])
    late = StreamStage("late", print, ("judge_verdict",), ())
    with pytest.raises(StageOrderError, match="judge_verdict"):
        check_chain([load, late], UNIT_COLUMNS)
