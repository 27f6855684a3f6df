"""A shortened demo loop end to end: every artefact is produced, and the report says what the
samples and models underneath it say.

The full loop (`make demo-loop`) is a benchmark-style command; this runs it with tiny counts.
"""

import json

import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from mmpr_pipeline import demo_model, shards
from mmpr_pipeline.demo_loop import LoopSettings, gain, run_loop
from mmpr_pipeline.evaluate import wilson

pytestmark = pytest.mark.slow


def test_short_loop_produces_every_artefact(tmp_path, ray_local):
    settings = LoopSettings(
        build_limit=16,
        eval_limit=6,
        sampling_n=6,
        eval_modes=("greedy",),
        train_overrides={
            "max_steps": 2,
            "batch_size": 2,
            "grad_accum_steps": 1,
            "eval_every": 0,
            "save_every": -1,
            "progress_bar": False,
        },
    )
    report = run_loop(tmp_path, settings)
    assert set(report["accuracy"]) == {"base", "mpo", "sft"}
    for name in ("base", "mpo", "sft"):
        acc = report["accuracy"][name]["greedy"]
        # the accuracy is the share of the 6 held-out questions whose one greedy answer the judge accepted
        verdicts = [
            c
            for f in shards.unit_files(tmp_path / "eval" / name / "greedy")
            for c in pq.read_table(f, columns=["correct"])["correct"].to_pylist()
        ]
        assert [len(v) for v in verdicts] == [1] * 6
        right = sum(v[0] for v in verdicts)
        assert acc["questions"] == 6 and acc["accuracy"] == round(right / 6, 4)
        assert acc["ci95"] == [round(x, 4) for x in wilson(right, 6)]
        assert (
            json.loads((tmp_path / "eval" / name / "eval.json").read_text())["modes"]["greedy"]["accuracy"][
                "heldout/*"
            ]
            == acc
        )
    # both runs trained from the base: their weights moved, and differently (MPO's loss is not SFT's)
    base = load_file(str(demo_model.ensure_loop_base() / "model.safetensors"))
    trained = {n: load_file(str(tmp_path / n / "final" / "model.safetensors")) for n in ("mpo", "sft")}
    for n in ("mpo", "sft"):
        assert any(not torch.equal(base[k], trained[n][k]) for k in base), f"{n} did not change the model"
        assert json.loads((tmp_path / f"{n}_summary.json").read_text())["steps"] == 2
    assert any(not torch.equal(trained["mpo"][k], trained["sft"][k]) for k in base)
    # pairs: the report counts the rows of the build's shards
    n_rows = sum(pq.read_metadata(p).num_rows for p in (tmp_path / "build" / "data").glob("*.parquet"))
    assert sum(report["pairs"].values()) == n_rows > 0
    assert json.loads((tmp_path / "report.json").read_text())["pairs"] == report["pairs"]
    assert report["comparisons"]["mpo vs base"]["greedy"] == gain(
        report["accuracy"]["mpo"]["greedy"], report["accuracy"]["base"]["greedy"]
    )
    md = (tmp_path / "report.md").read_text()
    assert "| mpo |" in md and "| sft |" in md and "accuracy.png" in md and "- mpo vs base: greedy" in md
    assert Image.open(tmp_path / "accuracy.png").size[0] > 100
    assert set(report["timings_s"]) >= {
        "build pairs",
        "train mpo",
        "train sft",
        "eval base",
        "eval mpo",
        "eval sft",
    }


def test_gain_is_points_and_whether_the_intervals_are_disjoint():
    a = dict(accuracy=0.80, ci95=[0.76, 0.84])
    assert gain(a, dict(accuracy=0.70, ci95=[0.65, 0.75])) == dict(points=10.0, intervals_disjoint=True)
    assert gain(a, dict(accuracy=0.72, ci95=[0.67, 0.76])) == dict(points=8.0, intervals_disjoint=False)
    assert gain(dict(accuracy=0.5, ci95=[0.4, 0.6]), a) == dict(points=-30.0, intervals_disjoint=True)


def test_each_training_runs_on_one_torch_thread_whatever_the_cores(tmp_path, monkeypatch):
    """The loop's report must be the same on any core count: a thread count sums floats in its own
    order, so both trainings run on one torch thread, and the caller's count comes back after."""
    import contextlib

    from mmpr_pipeline import demo_loop, train

    seen = []
    monkeypatch.setattr(train, "train", lambda cfg: seen.append(torch.get_num_threads()) or {})
    (tmp_path / "build").mkdir()
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        models = demo_loop._train_runs(
            tmp_path, "base", LoopSettings(), lambda name: contextlib.nullcontext()
        )
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    assert seen == [1, 1] and set(models) == {"mpo", "sft"}
