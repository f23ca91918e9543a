"""Sequence-classification losses, one table for the model's `forward(labels=...)` and the training task.

Keyed by transformers' `problem_type`; each returns (summed loss, examples counted) so that training can
weight an optimizer step by its labelled examples (training/tasks/base.py) and the model's mean loss is
the same function divided by the count (transformers' numbers: tests/parity). Computed in fp32.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def _single_label(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Cross-entropy summed over rows whose label is not -100."""
    labels = labels.view(-1).long()
    loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), labels, ignore_index=IGNORE_INDEX, reduction="sum")
    return loss, int((labels != IGNORE_INDEX).sum())


def _multi_label(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """BCE averaged over the labels of a row, summed over rows (one batch: transformers' element mean)."""
    per_row = F.binary_cross_entropy_with_logits(logits, labels.float(), reduction="none").mean(-1)
    return per_row.sum(), int(labels.shape[0])


def _regression(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Squared error summed over rows (num_labels == 1) or over rows of per-row means."""
    target = labels.float().view(logits.shape[0], -1)
    per_row = F.mse_loss(logits.view(logits.shape[0], -1), target, reduction="none").mean(-1)
    return per_row.sum(), int(labels.shape[0])


# problem_type -> loss; the keys are the valid problem types
CLASSIFICATION_LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, int]]] = {
    "single_label_classification": _single_label,
    "multi_label_classification": _multi_label,
    "regression": _regression,
}
PROBLEM_TYPES = tuple(CLASSIFICATION_LOSSES)


def infer_problem_type(num_labels: int, labels: torch.Tensor | None = None) -> str:
    """transformers' rule when `problem_type` is unset: one label -> regression, integer labels -> single
    label, otherwise multi-label."""
    if num_labels == 1:
        return "regression"
    if labels is None or labels.dtype in (torch.long, torch.int):
        return "single_label_classification"
    return "multi_label_classification"


def classification_loss_sum(logits: torch.Tensor, labels: torch.Tensor, problem_type: str) -> tuple[torch.Tensor, int]:
    """(summed loss, number of counted examples) for pooled `logits` (B, num_labels)."""
    if problem_type not in CLASSIFICATION_LOSSES:
        raise ValueError(f"problem_type: {problem_type!r} is not one of {list(PROBLEM_TYPES)}")
    return CLASSIFICATION_LOSSES[problem_type](logits.float(), labels.to(logits.device))
