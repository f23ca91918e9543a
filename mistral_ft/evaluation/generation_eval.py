"""Exact match of greedy generations against reference answers (issue 14's definitions).

Why generation and not loss: a fine-tuned model is judged by what it answers. The definitions, written once
here so the demo report, the training loop and ``evaluate`` agree:

* reference = the conversation's last assistant turn; prompt = the turns before it, encoded with the
  tokenizer's generation prompt (``encode_chat(..., add_generation_prompt=True)``);
* generation = greedy ``model.generate`` on left-padded batches, decoded up to the first EOS with special
  tokens skipped;
* exact match compares ``strip()``-ed texts; the normalised match also casefolds, collapses whitespace and
  drops one trailing period.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch


def normalise(text: str) -> str:
    """Casefold, collapse runs of whitespace, strip, and drop one trailing period."""
    text = re.sub(r"\s+", " ", text.casefold()).strip()
    return text[:-1].rstrip() if text.endswith(".") else text


def split_conversation(messages: Sequence[Mapping[str, Any]], where: str = "conversation") -> tuple[list, str]:
    """(prompt messages, reference answer): the reference is the last assistant turn, the prompt what precedes it."""
    if not messages or messages[-1].get("role") != "assistant":
        raise ValueError(f"{where}: generation metrics need a conversation ending with an assistant turn "
                         f"(the reference answer)")
    return [dict(m) for m in messages[:-1]], str(messages[-1]["content"])


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
    if max_new_tokens <= 0:
        raise ValueError(f"exact_match: max_new_tokens must be > 0, got {max_new_tokens}")
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    samples = []
    try:
        for start in range(0, len(conversations), batch_size):
            batch = conversations[start:start + batch_size]
            prompts, refs = [], []
            for i, conv in enumerate(batch):
                messages = conv["messages"] if isinstance(conv, Mapping) else conv
                prompt, ref = split_conversation(messages, where=f"conversation {start + i}")
                ids, _ = tokenizer.encode_chat(prompt, add_generation_prompt=True)
                prompts.append((prompt, ids))
                refs.append(ref)
            width = max(len(ids) for _, ids in prompts)
            input_ids = torch.full((len(prompts), width), pad, dtype=torch.long)
            mask = torch.zeros_like(input_ids)
            for row, (_, ids) in enumerate(prompts):  # left padding
                input_ids[row, width - len(ids):] = torch.tensor(ids)
                mask[row, width - len(ids):] = 1
            out = model.generate(input_ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                                 do_sample=False, eos_token_id=eos, pad_token_id=pad)
            for row, ((prompt, _), ref) in enumerate(zip(prompts, refs)):
                new = out[row, width:].tolist()
                if eos in new:
                    new = new[:new.index(eos)]
                text = tokenizer.decode(new, skip_special_tokens=True)
                samples.append({"prompt": prompt[-1]["content"], "reference": ref, "generated": text,
                                "generated_tokens": len(new),
                                "exact": text.strip() == ref.strip(), "normalised": normalise(text) == normalise(ref)})
    finally:
        model.train(was_training)
    n = max(len(samples), 1)
    return ExactMatchResult(
        exact_match=sum(s["exact"] for s in samples) / n,
        normalised_match=sum(s["normalised"] for s in samples) / n,
        mean_generated_tokens=sum(s["generated_tokens"] for s in samples) / n,
        samples=samples,
    )
