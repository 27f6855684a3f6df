"""strategy: fsdp on CPU: `torchrun --nproc_per_node 2` on gloo (tests/_fsdp_runs.py) takes the same
steps as one unsharded process, for a live reference, LoRA (adapters off as the reference, gradient
checkpointing) and a precomputed reference (the vision encoder trained too), and with cpu_offload; a
run whose processes are SIGKILLed in step 4 resumes (a second launch) from its step-3 sharded
checkpoint to the uninterrupted run's end; the consolidated final model loads in transformers and
equals the sharded checkpoint."""

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
    # its last run's processes SIGKILL themselves in step 4: torchrun reports them and fails
    killed = subprocess.run(launch + script, env=env, cwd=ROOT, timeout=600, capture_output=True, text=True)
    assert killed.returncode == 1 and "Signal 9 (SIGKILL)" in killed.stderr, killed.stderr[-3000:]
    step3 = two / "resumed" / "checkpoint-000003" / "state.pt"
    left = dict(
        rows=train_rows(two / "resumed"),
        checkpoints=sorted(p.name for p in (two / "resumed").glob("*checkpoint-*")),
        step3_written=step3.stat().st_mtime_ns,
    )
    subprocess.run(launch + script + ["resume"], check=True, env=env, cwd=ROOT, timeout=600)
    return one, two, left


@pytest.mark.parametrize("name", list(CASES))
def test_two_sharded_processes_take_one_process_steps(runs, name):
    one, two = (r / name for r in runs[:2])
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


def test_a_sharded_run_killed_in_step_4_resumes_to_the_uninterrupted_end(runs):
    """SIGKILL to torchrun and both processes during step 4: the step-3 checkpoint is whole, step 4
    is lost and redone, and every step's figures (the ones before the kill and the resumed ones)
    equal the uninterrupted run's."""
    _, two, left = runs
    assert [r["step"] for r in left["rows"]] == [1, 2, 3]  # what the kill left: nothing of step 4
    assert left["checkpoints"] == ["checkpoint-000003"]
    # resumed from it, not started over (which would rewrite it, and end with the same figures)
    assert (two / "resumed" / "checkpoint-000003" / "state.pt").stat().st_mtime_ns == left["step3_written"]
    whole, resumed = train_rows(two / "full"), train_rows(two / "resumed")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5]
    for key in ("loss", "preference", "bco", "sft", "delta"):
        assert [r[key] for r in resumed] == [r[key] for r in whole], key
    wa, wb = final_weights(two / "full"), final_weights(two / "resumed")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_cpu_offload_takes_the_same_steps(runs):
    one, two, _ = runs
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
