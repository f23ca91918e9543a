"""Exact match of greedy generations over whole conversations, for the demo report and tests.

The definitions and the decoding live once in :mod:`mistral_ft.training.evaluation` (what training runs at each
validation); this is the same computation over a list of ``{"messages": [...]}`` rows, returning the per-sample
table with the scored prompt's last user turn as ``prompt``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch

from mistral_ft.training.evaluation import (Reference, evaluate_generation, metrics_from_sums, normalise,  # noqa: F401
                                            score, split_conversation)


@dataclass
class ExactMatchResult:
    """Scores and the per-sample table (prompt, reference, generated)."""

    exact_match: float
    normalised_match: float
    mean_generated_tokens: float
    samples: list[dict] = field(default_factory=list)


@torch.no_grad()
def exact_match(model: torch.nn.Module, tokenizer: Any, conversations: Sequence[Mapping[str, Any]],
                max_new_tokens: int = 64, batch_size: int = 16) -> ExactMatchResult:
    """Greedy-generate an answer for each conversation (``{"messages": [...]}`` or a message list) and score it."""
    refs = []
    for i, conv in enumerate(conversations):
        messages = conv["messages"] if isinstance(conv, Mapping) else conv
        prompt, ref = split_conversation(messages, where=f"conversation {i}")
        refs.append(Reference(f"conversation {i}", prompt, ref))
    rows = evaluate_generation(model, tokenizer, refs, max_new_tokens, batch_size)
    m = metrics_from_sums(score(rows))
    samples = [{**r, "prompt": r["prompt"][-1]["content"]} for r in rows]
    return ExactMatchResult(m["exact_match"], m["normalised_match"], m["mean_generated_tokens"], samples)
