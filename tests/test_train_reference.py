"""The trainer's reference, BCO shift and schedule as rules, in seconds (no model is trained here).

test_train_loop.py checks the same on real training runs (live LoRA reference against a precomputed
one, the logged learning rate of every step, delta against the logged rewards); these small checks
let `make mutation` catch each bug without paying for a training run.
"""

import contextlib
import math

import pytest
import torch

from mmpr_pipeline.train import MPOConfig, step
from mmpr_pipeline.train import reference as reference_mod
from mmpr_pipeline.train.distributed import Dist
from mmpr_pipeline.train.loss import RunningMean


def _cfg(**kw) -> MPOConfig:
    return MPOConfig(**{"model": "m", "data": "d", "output_dir": "o", **kw})


def test_learning_rate_is_a_linear_warmup_then_a_cosine_to_the_floor():
    cfg = _cfg(learning_rate=1e-3, warmup_ratio=0.25, min_lr_ratio=0.1)
    total, warmup = 8, 2  # int(0.25 * 8)
    expected = [1e-3 * (s + 1) / warmup for s in range(warmup)] + [
        1e-3 * (0.1 + 0.9 * (1 + math.cos(math.pi * (s - warmup) / (total - warmup))) / 2)
        for s in range(warmup, total)
    ]
    got = [step.learning_rate(s, total, cfg) for s in range(total)]
    assert got == pytest.approx(expected, rel=1e-12)
    assert got[:3] == pytest.approx([5e-4, 1e-3, 1e-3]) and got[-1] > 1e-4  # ramp, peak, above the floor
    assert step.learning_rate(0, 8, _cfg(learning_rate=1e-3, warmup_ratio=0.0)) == 1e-3  # no warm-up


def test_the_live_reference_is_a_frozen_copy_of_the_policy():
    policy = torch.nn.Linear(3, 2)
    ref = reference_mod.make_reference(policy, None, _cfg(), Dist(), {}, None, 0, None)
    assert ref.model is not policy and not ref.tables
    assert all(torch.equal(a, b) for a, b in zip(policy.parameters(), ref.model.parameters()))
    assert not any(p.requires_grad for p in ref.model.parameters())
    assert all(p.requires_grad for p in policy.parameters())  # the policy still trains
    with torch.no_grad():
        policy.weight.add_(1.0)
    assert not torch.equal(policy.weight, ref.model.weight)  # training the policy leaves it be
    # under LoRA there is no copy: the reference is the policy with its adapters off
    assert (
        reference_mod.make_reference(policy, None, _cfg(lora=True), Dist(), {}, None, 0, None).model is None
    )


class _Adapted:
    """A policy with LoRA adapters: `disable_adapter()` switches them off for its block."""

    adapters_on = True

    @contextlib.contextmanager
    def disable_adapter(self):
        self.adapters_on = False
        try:
            yield
        finally:
            self.adapters_on = True


def _logps_by_adapter_state(model, batch):
    # stands in for the forward pass: 2.0 per sequence with the adapters on, 1.0 without (the base)
    value = 2.0 if model.adapters_on else 1.0
    return torch.full((2 * batch["n_pairs"],), value), torch.ones(2 * batch["n_pairs"])


def test_the_lora_reference_is_scored_with_the_adapters_off(monkeypatch):
    monkeypatch.setattr(reference_mod, "response_logps", _logps_by_adapter_state)
    model = _Adapted()
    ref = reference_mod.reference_logps(
        reference_mod.Reference(), model, {"n_pairs": 2}, "train", torch.device("cpu")
    )
    assert ref.tolist() == [1.0] * 4 and model.adapters_on


def test_the_running_mean_is_fed_the_policys_reward_over_the_reference(monkeypatch):
    """delta_1 = beta * mean(log pi - log pi_ref) over the batch's chosen and rejected responses."""
    policy = torch.tensor([-1.0, -2.0, -4.0, -3.0])  # chosen 0, chosen 1, rejected 0, rejected 1
    reference = torch.tensor([[-2.0, -3.0], [-2.5, -4.5]])  # per pair: chosen, rejected
    monkeypatch.setattr(step, "response_logps", lambda model, batch: (policy.clone(), torch.ones(4)))
    cfg = _cfg(beta=0.1, bco_shift="running_mean")
    ref = reference_mod.Reference(tables={"train": reference})
    running = RunningMean()
    batch = {"n_pairs": 2, "index": torch.tensor([0, 1])}
    _, parts = step.batch_loss(None, batch, "train", ref, running, cfg, Dist())
    rewards = policy - torch.tensor([-2.0, -2.5, -3.0, -4.5])  # 1.0, 0.5, -1.0, 1.5
    assert float(parts["delta"]) == pytest.approx(0.1 * float(rewards.mean())) == pytest.approx(0.05)
    assert running.mean == pytest.approx(0.05) and running.count == 1
