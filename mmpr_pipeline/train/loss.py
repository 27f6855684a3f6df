"""The MPO loss and the BCO reward shift.

Equation numbers are those of the MPO paper (Wang et al. 2024, arXiv 2411.10442, Sec. 4.1):

    L = w_p * L_p + w_q * L_q + w_g * L_g                                   (Eq. 3)

- L_p, the preference loss: DPO's sigmoid loss (Eq. 4; Rafailov et al. 2023, arXiv 2305.18290,
  Eq. 7). For ablations: IPO (Azar et al. 2023, arXiv 2310.12036, Eq. 17) on the summed
  log-ratios as the paper writes it (TRL's `ipo` averages them over tokens first), and the hinge
  loss of SLiC/RSO (Liu et al. 2023, arXiv 2309.06657, Sec. 4), as TRL's `hinge`.
- L_q, the quality loss: BCO (Eqs. 5-7; Jung et al. 2024, arXiv 2404.04656), each response
  classified on its own as good or bad, around the reward shift delta.
- L_g, the generation loss: SFT's negative log-likelihood per token of the chosen response (Eq. 8).

All in terms of the implicit reward r = beta * (log pi(y|x) - log pi_ref(y|x)), with log-probabilities
summed over the response tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

PREFERENCE_LOSSES = ("sigmoid", "ipo", "hinge")


def preference_term(
    chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor, beta: float, kind: str = "sigmoid"
) -> torch.Tensor:
    """Per-pair preference loss L_p from the policy-to-reference log-ratios of each response."""
    h = chosen_logratios - rejected_logratios
    if kind == "sigmoid":  # MPO Eq. 4 = DPO (Rafailov et al. 2023, Eq. 7)
        return -F.logsigmoid(beta * h)
    if kind == "ipo":  # IPO (Azar et al. 2023, Eq. 17), beta in the role of tau: regress h onto 1/(2 tau)
        return (h - 1 / (2 * beta)) ** 2
    if kind == "hinge":  # SLiC/RSO hinge (Liu et al. 2023, Sec. 4): margin 1 on the scaled log-ratio
        return torch.relu(1 - beta * h)
    raise ValueError(f"unknown preference loss {kind!r} (expected one of: {', '.join(PREFERENCE_LOSSES)})")


def bco_term(
    chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, delta: float | torch.Tensor = 0.0
) -> torch.Tensor:
    """Per-pair quality loss L_q: chosen classified as good, rejected as bad, around the shift delta.

    MPO Eqs. 5-7: L_q = L_q+ + L_q-, from BCO (Jung et al. 2024).
    """
    return -F.logsigmoid(chosen_rewards - delta) - F.logsigmoid(-(rejected_rewards - delta))


def mpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    chosen_nll: torch.Tensor,
    *,
    beta: float = 0.1,
    weights: tuple[float, float, float] = (0.8, 0.2, 1.0),
    delta: float | torch.Tensor = 0.0,
    preference: str = "sigmoid",
) -> tuple[torch.Tensor, dict]:
    """The MPO loss of a batch and its parts.

    The four log-prob arguments are per-sequence sums over the response tokens, shape [batch];
    `chosen_nll` is the mean negative log-likelihood per response token over the batch's chosen
    responses (a scalar). `weights` are (w_p, w_q, w_g); `delta` is BCO's reward shift.

    Returns `(loss, parts)`: `parts` holds the unweighted batch means of each term ("preference",
    "bco", "sft") and of the rewards ("chosen_reward", "rejected_reward", "reward_margin",
    "reward_accuracy"), detached, and each pair's own reward margin ("margins", shape [batch]).
    """
    w_p, w_q, w_g = weights
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    chosen_rewards = beta * chosen_logratios
    rejected_rewards = beta * rejected_logratios

    pref = preference_term(chosen_logratios, rejected_logratios, beta, preference).mean()
    bco = bco_term(chosen_rewards, rejected_rewards, delta).mean()
    loss = w_p * pref + w_q * bco + w_g * chosen_nll  # Eq. 3; chosen_nll is L_g, Eq. 8

    margin = (chosen_rewards - rejected_rewards).detach()
    parts = {
        "preference": pref.detach(),
        "bco": bco.detach(),
        "sft": chosen_nll.detach(),
        "chosen_reward": chosen_rewards.detach().mean(),
        "rejected_reward": rejected_rewards.detach().mean(),
        "reward_margin": margin.mean(),
        "reward_accuracy": (margin > 0).float().mean(),
        "margins": margin,
    }
    return loss, parts


class RunningMean:
    """BCO's reward shift delta, kept the way the paper's reference code keeps it.

    The reference code (TRL 0.9's `bco_pair` with `RunningMoments`) feeds each batch's mean reward
    over chosen and rejected responses, a single number, into a running mean before using it:
    delta_t = (m_1 + ... + m_t) / t, every step weighted equally whatever its batch size. Under data
    parallelism each process's batch mean is one of the numbers. TRL dropped the shift in 0.29;
    `bco_shift: none` in the config does the same here.
    """

    def __init__(self) -> None:
        self.mean = 0.0
        self.count = 0

    def update(self, *batch_means):
        """Add one or more batch means (one per process; floats or 0-dim tensors, which stay on their
        device) and return the new mean."""
        for m in batch_means:
            self.count += 1
            self.mean = self.mean + (m - self.mean) / self.count
        return self.mean

    def state_dict(self) -> dict:
        return {"mean": float(self.mean), "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.mean, self.count = float(state["mean"]), int(state["count"])
