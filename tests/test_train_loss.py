"""The MPO loss against values computed by hand, and BCO's running-mean shift."""

import math

import pytest
import torch

from mmpr_pipeline.train import RunningMean, mpo_loss
from mmpr_pipeline.train.loss import bco_term, preference_term

# Two pairs, beta = 0.1. Log-ratios log pi - log pi_ref:
#   chosen   [-10 - -11, -20 - -20] = [1, 0]   -> rewards [0.1, 0.0]
#   rejected [-12 - -11, -18 - -19] = [-1, 1]  -> rewards [-0.1, 0.1]
# reward margins [0.2, -0.1]
POLICY_CHOSEN = torch.tensor([-10.0, -20.0])
POLICY_REJECTED = torch.tensor([-12.0, -18.0])
REF_CHOSEN = torch.tensor([-11.0, -20.0])
REF_REJECTED = torch.tensor([-11.0, -19.0])
NLL = torch.tensor(0.5)


def softplus(x: float) -> float:  # -log sigmoid(-x) = log(1 + e^x)
    return math.log1p(math.exp(x))


def loss(**kw):
    return mpo_loss(POLICY_CHOSEN, POLICY_REJECTED, REF_CHOSEN, REF_REJECTED, NLL, beta=0.1, **kw)


def test_dpo_term_by_hand():
    # -log sigmoid(0.2) = log(1 + e^-0.2) = 0.598139; -log sigmoid(-0.1) = log(1 + e^0.1) = 0.744397
    _, parts = loss()
    assert parts["preference"].item() == pytest.approx((0.598139 + 0.744397) / 2, abs=1e-6)
    assert parts["preference"].item() == pytest.approx((softplus(-0.2) + softplus(0.1)) / 2, rel=1e-6)


def test_bco_term_by_hand_without_and_with_shift():
    # delta = 0: -log sig(0.1) - log sig(0.1)  and  -log sig(0.0) - log sig(-0.1)
    _, parts = loss()
    by_hand = ((0.644397 + 0.644397) + (0.693147 + 0.744397)) / 2
    assert parts["bco"].item() == pytest.approx(by_hand, abs=1e-6)
    # delta = 0.05: -log sig(r_c - 0.05) - log sig(-(r_r - 0.05))
    _, parts = loss(delta=0.05)
    by_hand = ((softplus(-0.05) + softplus(-0.15)) + (softplus(0.05) + softplus(0.05))) / 2
    assert parts["bco"].item() == pytest.approx(by_hand, rel=1e-6)
    # a tensor delta works the same
    assert loss(delta=torch.tensor(0.05))[1]["bco"].item() == pytest.approx(by_hand, rel=1e-6)


def test_sft_term_rewards_and_weighted_total():
    total, parts = loss(weights=(0.8, 0.2, 1.0), delta=0.05)
    assert parts["sft"].item() == 0.5
    assert parts["chosen_reward"].item() == pytest.approx(0.05)
    assert parts["rejected_reward"].item() == pytest.approx(0.0)
    assert parts["reward_margin"].item() == pytest.approx(0.05)
    assert parts["reward_accuracy"].item() == 0.5  # one of the two margins is positive
    expected = 0.8 * parts["preference"] + 0.2 * parts["bco"] + 1.0 * 0.5
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)
    only_sft, _ = loss(weights=(0.0, 0.0, 1.0))
    assert only_sft.item() == pytest.approx(0.5)


def test_alternative_preference_terms_by_hand():
    # IPO: (h - 1/(2 beta))^2 with h = logratio_c - logratio_r = [2, -1]: (2 - 5)^2 = 9, (-1 - 5)^2 = 36
    _, parts = loss(preference="ipo")
    assert parts["preference"].item() == pytest.approx((9 + 36) / 2)
    # hinge: relu(1 - beta h) = [0.8, 1.1]
    _, parts = loss(preference="hinge")
    assert parts["preference"].item() == pytest.approx((0.8 + 1.1) / 2)
    with pytest.raises(ValueError, match="unknown preference loss"):
        loss(preference="kto")


def test_gradients_follow_the_terms():
    pc = POLICY_CHOSEN.clone().requires_grad_()
    nll = NLL.clone().requires_grad_()
    total, _ = mpo_loss(pc, POLICY_REJECTED, REF_CHOSEN, REF_REJECTED, nll, beta=0.1, weights=(1.0, 0.0, 2.0))
    total.backward()
    assert nll.grad.item() == pytest.approx(2.0)
    # d/d pc_i of mean_i -log sig(beta h_i) = -beta * sig(-beta h_i) / 2
    expected = [-0.1 * (1 / (1 + math.exp(m))) / 2 for m in (0.2, -0.1)]
    assert pc.grad.tolist() == pytest.approx(expected, rel=1e-5)


def test_terms_are_per_pair():
    h_c, h_r = torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 1.0])
    assert preference_term(h_c, h_r, 0.1).shape == (2,)
    assert bco_term(0.1 * h_c, 0.1 * h_r, 0.0).shape == (2,)


def test_running_mean_update_rule_over_steps():
    running = RunningMean()
    seen = []
    for step_mean in [1.0, 3.0, -1.0, 5.0]:
        seen.append(running.update(step_mean))
    # delta_t = (m_1 + ... + m_t) / t, each step weighted equally
    assert seen == pytest.approx([1.0, 2.0, 1.0, 2.0])
    # one mean per process under data parallelism: each counts as one
    assert running.update(2.0, 4.0) == pytest.approx((1 + 3 - 1 + 5 + 2 + 4) / 6)
    restored = RunningMean()
    restored.load_state_dict(running.state_dict())
    assert (restored.mean, restored.count) == (pytest.approx(running.mean), 6)
    # tensors stay tensors (no device sync in the loop)
    t = RunningMean().update(torch.tensor(0.5))
    assert isinstance(t, torch.Tensor) and t.item() == 0.5


def test_paper_delta_matches_reference_code_rule():
    """delta is the mean of each batch's mean reward over chosen and rejected, updated before use."""
    running = RunningMean()
    batches = [
        (torch.tensor([0.1, 0.3]), torch.tensor([-0.2, 0.0])),
        (torch.tensor([0.5, 0.1]), torch.tensor([0.1, 0.1])),
    ]
    deltas = [running.update(torch.cat([c, r]).mean()).item() for c, r in batches]
    assert deltas == pytest.approx([0.05, (0.05 + 0.2) / 2])
