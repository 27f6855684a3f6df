"""strategy: fsdp on CPU: `torchrun --nproc_per_node 2` on gloo (one launch, tests/_fsdp_runs.py) takes
the same steps as one unsharded process, for a live reference, LoRA (adapters off as the reference,
gradient checkpointing) and a precomputed reference (the vision encoder trained too), and with
cpu_offload; a run resumed from its step-3 sharded checkpoint ends as the uninterrupted one; the
consolidated final model loads in transformers and equals the sharded checkpoint."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _fsdp_runs import CASES, config
from safetensors.torch import load_file
from test_train_loop import write_pairs

from mmpr_pipeline.train import train

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]


def train_rows(out: Path, split: str = "train") -> list[dict]:
    rows = map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
    return [r for r in rows if r["split"] == split]


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "final" / "model.safetensors")


@pytest.fixture(scope="module")
def runs(tiny_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fsdp")
    data = write_pairs(tmp / "run", 30)
    one, two = tmp / "one", tmp / "two"
    for name in CASES:
        train(config(name, tiny_model, str(data), one, 1))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    script = [str(ROOT / "tests" / "_fsdp_runs.py"), tiny_model, str(data), str(two)]
    subprocess.run(launch + script, check=True, env=env, cwd=ROOT, timeout=600)
    return one, two


@pytest.mark.parametrize("name", list(CASES))
def test_two_sharded_processes_take_one_process_steps(runs, name):
    one, two = (r / name for r in runs)
    a, b = train_rows(one), train_rows(two)
    assert [r["pairs"] for r in b] == [r["pairs"] for r in a] == [4] * 5
    for key in ("loss", "preference", "bco", "sft", "delta", "reward_margin"):
        assert [r[key] for r in b] == pytest.approx([r[key] for r in a], abs=1e-5), key
    assert a[-1]["reward_margin"] != 0 and a[-1]["delta"] != 0  # the reference is not the policy
    # held-out: the same pairs (their loss is per micro-batch, and the micro-batches differ)
    assert train_rows(two, "eval")[-1]["eval_pairs"] == train_rows(one, "eval")[-1]["eval_pairs"] > 0
    wa, wb = final_weights(one), final_weights(two)
    assert sorted(wa) == sorted(wb)
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-4
    # the weights moved (vision too where it is trained): the comparison is not of two untrained models
    base = load_file(Path(json.loads((one / "config.json").read_text())["model"]) / "model.safetensors")
    moved = {k for k in wa if not torch.equal(wa[k], base[k])}
    assert any("visual.blocks." in k for k in moved) == (name == "precomputed")
    assert any("layers." in k and "visual" not in k for k in moved)


def test_resumed_sharded_run_ends_as_the_uninterrupted_one(runs):
    _, two = runs
    whole, resumed = train_rows(two / "full"), train_rows(two / "resumed")
    assert [r["step"] for r in resumed] == [4, 5]
    for key in ("loss", "preference", "bco", "sft", "delta"):
        assert [r[key] for r in resumed] == [r[key] for r in whole][3:], key
    wa, wb = final_weights(two / "full"), final_weights(two / "resumed")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_cpu_offload_takes_the_same_steps(runs):
    one, two = runs
    a, b = train_rows(one / "full"), train_rows(two / "offload")
    for key in ("loss", "preference", "bco", "sft", "delta", "reward_margin"):
        assert [r[key] for r in b] == pytest.approx([r[key] for r in a], abs=1e-5), key
    wa, wb = final_weights(one / "full"), final_weights(two / "offload")
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-4


def test_consolidated_model_loads_and_equals_the_shards(runs, tmp_path):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    from transformers import AutoModelForImageTextToText

    full = runs[1] / "full"
    ckpt = full / "checkpoint-000005"
    assert sorted(p.name for p in ckpt.iterdir()) == ["config.json", "shards", "state.pt"]
    assert len(list((ckpt / "shards").glob("*.distcp"))) == 2  # one file per process
    dcp_to_torch_save(ckpt / "shards", tmp_path / "whole.pt")
    saved = torch.load(tmp_path / "whole.pt", weights_only=True)
    shards = {k.removeprefix("model."): v for k, v in saved["model"].items()}
    model = AutoModelForImageTextToText.from_pretrained(full / "final")
    weights = dict(model.named_parameters())
    assert shards and all(torch.equal(weights[k], v) for k, v in shards.items())
    assert set(saved["optimizer"]["state"])  # AdamW's moments are in the checkpoint too
