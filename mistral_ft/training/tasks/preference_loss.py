"""Preference losses on answer log-probabilities: DPO (sigmoid, cDPO), IPO, robust DPO, the RPO NLL term,
and the Bradley-Terry reward-model loss. Pure tensor functions, no model, no Lightning.

Notation: for a pair (x, y_w, y_l) of a prompt, a chosen and a rejected answer, log pi(y|x) is the SUM of
the per-token log-probabilities of the answer tokens (its EOS included); pi is the policy, pi_ref the
reference, and

    h = [log pi(y_w|x) - log pi_ref(y_w|x)] - [log pi(y_l|x) - log pi_ref(y_l|x)]      (the log-ratio margin)

Losses per pair (the training loss is their mean over pairs):

* sigmoid, DPO (Rafailov et al. 2023, "Direct Preference Optimization", eq. 7):
      -log sigmoid(beta * h)
  with label smoothing eps (conservative DPO, Mitchell 2023, "A note on DPO with noisy preferences"):
      -(1 - eps) * log sigmoid(beta * h) - eps * log sigmoid(-beta * h)
  (TRL 1.16's "sigmoid" has no smoothing term; its "aot_unpaired" computes this formula on sorted log-ratios,
  which for one pair is the same thing: that is what our parity test compares with.)
* robust (Chowdhury et al. 2024, "Provably Robust DPO", eq. 7; TRL's "robust"):
      [-(1 - eps) * log sigmoid(beta * h) + eps * log sigmoid(-beta * h)] / (1 - 2 eps)
* ipo (Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human Preferences",
  eq. 17, beta = tau):  (h_avg - 1 / (2 beta))^2  where h_avg uses log-probs AVERAGED per answer token:
      h_avg = [log pi(y_w|x) - log pi_ref(y_w|x)] / |y_w| - [log pi(y_l|x) - log pi_ref(y_l|x)] / |y_l|
  as TRL 1.16 does (its code says the IPO authors confirmed the length normalisation).
* RPO NLL term (Pang et al. 2024, "Iterative Reasoning Preference Optimization"), weight alpha:
      + alpha * (-log pi(y_w|x) / |y_w|)
  the chosen answer's NLL per token, per pair. TRL 1.16 (`loss_type=["sigmoid", "sft"]`, weights [1, alpha])
  averages the NLL over all chosen tokens of its micro-batch instead; the two agree when a micro-batch's chosen
  answers have equal lengths (or it holds one pair). Ours keeps the loss a plain mean over pairs, so gradient
  accumulation and DDP weigh it exactly (one normaliser, the pair count, see training/tasks/base.py), which a token mean
  with a second normaliser could not.

Implicit rewards (logged, as TRL logs them): r_w = beta * (log pi(y_w|x) - log pi_ref(y_w|x)), r_l likewise
(summed log-probs for every loss type); reward accuracy = mean of [r_w > r_l]; margin = r_w - r_l.

Reward model (Bradley-Terry; Ouyang et al. 2022, eq. 1): -log sigmoid(r(x, y_w) - r(x, y_l)) per pair, r the
scalar score of a sequence classifier with one label.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
LOSS_TYPES = ("sigmoid", "ipo", "robust")


class AnswerLogps(NamedTuple):
    """Per sequence: summed log-prob of the answer tokens, their count, and the per-token values (B, T-1)."""

    sum: torch.Tensor  # (B,) fp32
    count: torch.Tensor  # (B,) fp32
    per_token: torch.Tensor  # (B, T-1) fp32, 0 where not a target


def answer_logps(logits: torch.Tensor, labels: torch.Tensor) -> AnswerLogps:
    """Log-probabilities of the target tokens: position t predicts labels[t + 1] (unshifted labels, -100 ignored).

    Computed in fp32 as logit[target] - logsumexp(logits), which is log_softmax without a second (B, T, V) tensor.
    """
    logits = logits[:, :-1].float()
    targets = labels[:, 1:].to(logits.device)
    mask = targets != IGNORE_INDEX
    picked = logits.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    per_token = (picked - torch.logsumexp(logits, dim=-1)) * mask
    return AnswerLogps(per_token.sum(-1), mask.sum(-1).float(), per_token)


def preference_loss(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    *,
    chosen_count: torch.Tensor,
    rejected_count: torch.Tensor,
    loss_type: str = "sigmoid",
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    rpo_alpha: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-pair losses (P,) and per-pair statistics for the formulas in the module docstring.

    `chosen` .. `ref_rejected` are summed answer log-probs (P,); `*_count` the answer token counts (P,).
    Statistics (all detached, (P,)): reward_chosen, reward_rejected, margin, accuracy, logps_chosen,
    logps_rejected, and nll_chosen (per token) when rpo_alpha > 0.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"preference.loss_type: {loss_type!r} is not one of {list(LOSS_TYPES)}")
    chosen_ratio = chosen - ref_chosen
    rejected_ratio = rejected - ref_rejected
    if loss_type == "ipo":
        h = chosen_ratio / chosen_count.clamp(min=1) - rejected_ratio / rejected_count.clamp(min=1)
        losses = (h - 1.0 / (2.0 * beta)) ** 2
    else:
        z = beta * (chosen_ratio - rejected_ratio)
        eps = float(label_smoothing)
        if loss_type == "sigmoid":
            losses = -(1.0 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)
        else:  # robust
            losses = (-(1.0 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1.0 - 2.0 * eps)
    stats: dict[str, torch.Tensor] = {}
    if rpo_alpha:
        nll = -chosen / chosen_count.clamp(min=1)
        losses = losses + rpo_alpha * nll
        stats["nll_chosen"] = nll.detach()
    reward_chosen = beta * chosen_ratio.detach()
    reward_rejected = beta * rejected_ratio.detach()
    stats.update(
        reward_chosen=reward_chosen,
        reward_rejected=reward_rejected,
        margin=reward_chosen - reward_rejected,
        accuracy=(reward_chosen > reward_rejected).float(),
        logps_chosen=chosen.detach(),
        logps_rejected=rejected.detach(),
    )
    return losses, stats


def bradley_terry_loss(score_chosen: torch.Tensor, score_rejected: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-pair reward-model losses -log sigmoid(r_w - r_l) (P,), and accuracy / margin / scores per pair."""
    score_chosen, score_rejected = score_chosen.float().view(-1), score_rejected.float().view(-1)
    margin = score_chosen - score_rejected
    losses = -F.logsigmoid(margin)
    stats = {
        "accuracy": (margin > 0).float().detach(),
        "margin": margin.detach(),
        "score_chosen": score_chosen.detach(),
        "score_rejected": score_rejected.detach(),
    }
    return losses, stats


DPO_DEFAULTS: dict[str, Any] = {
    "loss_type": "sigmoid",  # sigmoid (DPO) | ipo | robust
    "beta": 0.1,
    "label_smoothing": 0.0,  # sigmoid: cDPO's eps; robust: the label flip rate (< 0.5)
    "rpo_alpha": 0.0,  # > 0: add alpha * NLL per chosen token (RPO)
    "disable_dropout": True,
}


def preference_settings(config: Mapping[str, Any]) -> dict[str, Any]:
    """The `preference:` config node with defaults, checked (ValueError naming the key)."""
    given = dict(config.get("preference") or {})
    unknown = sorted(set(given) - set(DPO_DEFAULTS))
    if unknown:
        raise ValueError(f"preference: unknown key(s) {unknown}; valid keys are {sorted(DPO_DEFAULTS)}")
    s = {**DPO_DEFAULTS, **given}
    if s["loss_type"] not in LOSS_TYPES:
        raise ValueError(f"preference.loss_type: {s['loss_type']!r} is not one of {list(LOSS_TYPES)}")
    if not float(s["beta"]) > 0:
        raise ValueError(f"preference.beta: must be > 0, got {s['beta']!r}")
    eps = float(s["label_smoothing"])
    if not 0.0 <= eps < 0.5:
        raise ValueError(f"preference.label_smoothing: must be in [0, 0.5), got {eps!r}")
    if eps and s["loss_type"] == "ipo":
        raise ValueError("preference.label_smoothing: IPO has no label smoothing; use loss_type sigmoid or robust")
    if float(s["rpo_alpha"]) < 0:
        raise ValueError(f"preference.rpo_alpha: must be >= 0, got {s['rpo_alpha']!r}")
    return s
