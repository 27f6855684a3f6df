"""A shortened demo loop end to end: every artefact is produced and readable.

The full loop (`make demo-loop`) is a benchmark-style command; this runs it with tiny counts.
"""
import json

import pytest
from PIL import Image

from mmpr_pipeline.demo_loop import LoopSettings, run_loop

pytestmark = pytest.mark.slow


def test_short_loop_produces_every_artefact(tmp_path, ray_local, trained_model):
    settings = LoopSettings(build_limit=16, eval_limit=6, sampling_n=6, eval_modes=("greedy",),
                            train_overrides={"max_steps": 2, "batch_size": 2, "grad_accum_steps": 1,
                                             "eval_every": 0, "save_every": -1, "progress_bar": False})
    report = run_loop(tmp_path, settings)
    assert set(report["accuracy"]) == {"base", "mpo", "sft"}
    for name in ("base", "mpo", "sft"):
        acc = report["accuracy"][name]["greedy"]
        assert acc["questions"] == 6 and 0.0 <= acc["accuracy"] <= 1.0
        assert acc["ci95"][0] <= acc["accuracy"] <= acc["ci95"][1]
        assert json.loads((tmp_path / "eval" / name / "eval.json").read_text())["modes"]["greedy"]
    for name in ("mpo", "sft"):
        assert (tmp_path / name / "final" / "config.json").exists()
        assert json.loads((tmp_path / f"{name}_summary.json").read_text())
    assert json.loads((tmp_path / "report.json").read_text())["pairs"] == report["pairs"]
    md = (tmp_path / "report.md").read_text()
    assert "| mpo |" in md and "| sft |" in md and "accuracy.png" in md
    assert Image.open(tmp_path / "accuracy.png").size[0] > 100
    assert set(report["timings_s"]) >= {"build pairs", "train mpo", "train sft", "eval base", "eval mpo", "eval sft"}
