"""No silent bad model (issue 17, item 3): `mmpr train` refuses non-finite settings, stops on a
non-finite loss with rc != 0 and saves nothing non-finite, refuses to continue an output_dir saved
with another config unless asked, and says so in one line when output_dir is a file.

Before: `--set learning_rate=.inf` ran 53 steps, rc 0, and saved a model NaN in 57 of 70 tensors;
re-running the same output_dir with another learning rate only warned and "resumed" the NaN run.
"""

import json
import math
from pathlib import Path

import pytest
import torch
from _run_fixture import make_run
from safetensors.torch import load_file

from mmpr_pipeline import cli

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "data_cards" / "train_mpo.yaml"
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("run") / "run", n_shapes=8, n_scenes=4, n_shards=1)


def mmpr_train(tiny_model, run_dir, out, *sets, capsys=None):
    argv = [
        "train",
        str(TRAIN),
        "--set",
        f"model={tiny_model}",
        "--set",
        f"data={run_dir}",
        "--set",
        f"output_dir={out}",
        "--set",
        "batch_size=2",
        "--set",
        "grad_accum_steps=1",
        "--set",
        "max_steps=2",
        "--set",
        "eval_fraction=0.2",
        "--set",
        "progress_bar=false",
        "--set",
        "warmup_ratio=0",
    ]
    for s in sets:
        argv += ["--set", s]
    rc = cli.main(argv)
    return rc, (capsys.readouterr().err if capsys else "")


def one_line_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize(
    "setting",
    [
        "learning_rate=.inf",
        "learning_rate=.nan",
        "beta=.inf",
        "weights=[0.8, .inf, 1.0]",
        "max_grad_norm=.nan",
        "weight_decay=-.inf",
    ],
)
def test_non_finite_settings_are_refused(setting, tiny_model, run_dir, tmp_path, capsys):
    rc, err = mmpr_train(tiny_model, run_dir, tmp_path / "out", setting, capsys=capsys)
    key = setting.split("=")[0]
    assert rc == 2
    assert f": {key}: must be a finite number" in one_line_error(err)
    assert not (tmp_path / "out").exists()


def test_a_non_finite_loss_stops_training_and_nothing_non_finite_is_saved(
    tiny_model, run_dir, tmp_path, capsys
):
    """A finite but absurd learning rate: step 1's update is finite (1e30-sized weights, saved as
    checkpoint 1), step 2's loss overflows. Training stops there with rc 1; no final model, no
    summary, no checkpoint of step 2, and every tensor that was saved is finite."""
    out = tmp_path / "out"
    rc, err = mmpr_train(
        tiny_model, run_dir, out, "learning_rate=1e30", "save_every=1", "max_steps=4", capsys=capsys
    )
    assert rc == 1
    line = one_line_error(err)
    assert "step 2: non-finite" in line and "stopped without saving" in line
    assert not (out / "final").exists() and not (out / "summary.json").exists()
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-000001"]
    state = torch.load(out / "checkpoint-000001" / "state.pt", weights_only=True)  # data only, as resumed
    assert state["trainable"] and all(torch.isfinite(t).all() for t in state["trainable"].values())
    rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1] and math.isfinite(rows[0]["loss"])


def test_an_update_that_overflows_the_weights_is_never_saved(tiny_model, run_dir, tmp_path, capsys):
    """float16 weights and a step of 1e5 (over float16's 65504): step 1's loss and gradients are
    finite, its update is not. Training stops before step 1's checkpoint is written."""
    out = tmp_path / "out"
    rc, err = mmpr_train(
        tiny_model, run_dir, out, "dtype=float16", "learning_rate=1e5", "save_every=1", capsys=capsys
    )
    assert rc == 1 and "step 1: the update made weights non-finite" in one_line_error(err)
    assert not list(out.glob("checkpoint-*")) and not (out / "final").exists()


def test_non_finite_weights_from_the_start_stop_at_step_1(tiny_model, run_dir, tmp_path, capsys):
    """A model folder with a NaN in one weight: the first loss is NaN, nothing is saved."""
    import shutil

    from safetensors.torch import save_file

    bad = tmp_path / "nan-model"
    shutil.copytree(tiny_model, bad)
    weights = load_file(bad / "model.safetensors")
    name = next(k for k in weights if "embed_tokens" in k)
    weights[name][:, :] = float("nan")
    save_file(weights, bad / "model.safetensors", metadata={"format": "pt"})
    rc, err = mmpr_train(str(bad), run_dir, tmp_path / "out", "save_every=1", capsys=capsys)
    assert rc == 1 and "step 1: non-finite loss (loss nan" in one_line_error(err)
    assert not list((tmp_path / "out").glob("checkpoint-*")) and not (tmp_path / "out" / "final").exists()


def test_resuming_under_another_config_is_refused_unless_asked(tiny_model, run_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert mmpr_train(tiny_model, run_dir, out, "learning_rate=1e-3", capsys=capsys)[0] == 0
    saved_config = (out / "config.json").read_text()
    final = load_file(out / "final" / "model.safetensors")

    # the same config: resumes the finished run (nothing to do), rc 0
    assert mmpr_train(tiny_model, run_dir, out, "learning_rate=1e-3", capsys=capsys)[0] == 0

    # another learning rate: refused, and the folder is left as it was
    rc, err = mmpr_train(tiny_model, run_dir, out, "learning_rate=1e-5", capsys=capsys)
    assert rc == 2
    line = one_line_error(err)
    assert ": output_dir: " in line and "checkpoint-000002 was saved with another config" in line
    assert "learning_rate: 0.001 -> 1e-05" in line and "resume_with_changes=true" in line
    assert (out / "config.json").read_text() == saved_config
    assert all(torch.equal(final[k], v) for k, v in load_file(out / "final" / "model.safetensors").items())

    # keys that do not change the result (logging, saving) may change
    assert mmpr_train(tiny_model, run_dir, out, "learning_rate=1e-3", "log_every=2", capsys=capsys)[0] == 0

    # asked for: continue it anyway (a longer run), or start over in the same folder
    assert (
        mmpr_train(
            tiny_model,
            run_dir,
            out,
            "learning_rate=1e-3",
            "max_steps=3",
            "resume_with_changes=true",
            capsys=capsys,
        )[0]
        == 0
    )
    rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["split"] == "train"] == [1, 2, 3]
    assert mmpr_train(tiny_model, run_dir, out, "learning_rate=1e-5", "resume=false", capsys=capsys)[0] == 0
    assert json.loads((out / "config.json").read_text())["learning_rate"] == 1e-5
    rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["split"] == "train"] == [1, 2]


def test_output_dir_that_is_a_file(tiny_model, run_dir, tmp_path, capsys):
    (tmp_path / "a-file").write_text("mine\n")
    rc, err = mmpr_train(tiny_model, run_dir, tmp_path / "a-file", capsys=capsys)
    assert rc == 2 and f"output_dir: {tmp_path / 'a-file'} is a file, not a folder" in one_line_error(err)
    assert (tmp_path / "a-file").read_text() == "mine\n"
    rc, err = mmpr_train(tiny_model, run_dir, tmp_path / "a-file" / "out", capsys=capsys)
    assert rc == 2 and f"output_dir: cannot create {tmp_path / 'a-file' / 'out'}" in one_line_error(err)


def test_training_without_data_leaves_no_output_folder(tiny_model, tmp_path, capsys):
    """Regression: `make train` before `make build-mmpr` wrote runs/demo/mpo/config.json before
    finding no pairs, and that folder then made `make build-mmpr` refuse runs/demo as "not empty and
    not a run folder". A run that fails on its data now writes nothing."""
    run = tmp_path / "runs" / "demo"
    rc, err = mmpr_train(tiny_model, run, run / "mpo", capsys=capsys)
    assert rc == 2 and "no such file or folder" in one_line_error(err)
    assert not run.exists()
