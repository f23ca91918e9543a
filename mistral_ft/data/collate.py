"""Packing (several examples per row) and the batch collator.

Packing worked example (max_length=8; examples A = [1 a1 a2], B = [1 b1 b2 b3], C = [1 c1 c2]):

    row 0:  input_ids     1   a1  a2  1   b1  b2  b3        (C does not fit: 7 + 3 > 8)
            labels      -100  a1  a2 -100 b1  b2  b3
            position_ids  0   1   2   0   1   2   3
            document_ids  0   0   0   1   1   1   1
    row 1:  C alone.

The model shifts labels by one over the whole row, so the target of a2 (A's last token) is the
label at B's first position. That label must be -100, or the model would learn to predict B's BOS
from A: `pack_examples` refuses an example whose first label is a target (BOS never is).
`document_ids` tell the model where the examples are, so no token attends across a boundary.
After collation, padding has document id -1 (its own document), position 0, label -100.

Causal batches also carry what the GPU hot path would otherwise compute on the device with a sync, computed
here on the host once per batch: ``target_index`` (flattened positions whose next token is a target: the
only rows the LM head needs), ``cu_seq_lens`` / ``max_seq_len`` (flash-attn varlen segments: rows, documents,
padding runs; see ``mistral_ft.model.attention.varlen_segments``).
"""

from __future__ import annotations

import bisect

from collections.abc import Callable, Iterable, Sequence
from typing import Any, Optional

import torch

from mistral_ft.data.formats import IGNORE_INDEX
from mistral_ft.model.attention import target_positions, varlen_segments

PAD_DOCUMENT_ID = -1


def pack_examples(
    examples: Sequence[tuple[list[int], list[int]]], max_length: int, strategy: str = "in_order",
    progress: Callable[[Iterable[int]], Iterable[int]] = iter,
) -> list[dict[str, list[int]]]:
    """Fill rows of at most `max_length` tokens with whole examples.

    `strategy="in_order"`: greedily, in the given order (a row closes when the next example does not fit).
    `strategy="best_fit"`: best-fit decreasing, longest examples first, each into the row it fills most
    tightly: fewer, fuller rows (measured on a long-tailed length mix: 81 % of row tokens real in order,
    99.8 % best fit), so less compute per epoch. Within a row, examples keep their input order.

    `progress` wraps the loop that places the examples (a progress bar; see `dataset.progress`).
    Returns rows with `input_ids`, `labels`, `position_ids` (restart at 0 per example) and
    `document_ids` (0, 1, ... per example within the row). Examples are never split: each is
    already truncated to `max_length`.
    """
    for i, (ids, labels) in enumerate(examples):
        if len(ids) > max_length:
            raise ValueError(f"example {i} has {len(ids)} tokens > max_length {max_length}; truncate first")
        if not ids:
            raise ValueError(f"example {i} is empty")
        if labels[0] != IGNORE_INDEX:
            # see the module docstring: the shift would make this token a target of the previous example
            raise ValueError(f"example {i}: first token is a target (label {labels[0]}); it must be -100 (BOS)")
    if strategy == "in_order":
        groups: list[list[int]] = []
        used = max_length + 1
        for i in progress(range(len(examples))):
            ids = examples[i][0]
            if used + len(ids) > max_length:
                groups.append([])
                used = 0
            groups[-1].append(i)
            used += len(ids)
    elif strategy == "best_fit":
        groups = []
        space: list[tuple[int, int]] = []  # (room left, row), sorted: the first with room >= n fits tightest
        for i in progress(sorted(range(len(examples)), key=lambda i: (-len(examples[i][0]), i))):
            n = len(examples[i][0])
            j = bisect.bisect_left(space, (n, -1))
            if j == len(space):
                groups.append([i])
                bisect.insort(space, (max_length - n, len(groups) - 1))
            else:
                room, row = space.pop(j)
                groups[row].append(i)
                bisect.insort(space, (room - n, row))
        groups = [sorted(g) for g in sorted(groups, key=min)]
    else:
        raise ValueError(f"pack strategy must be 'in_order' or 'best_fit', got {strategy!r}")
    rows: list[dict[str, list[int]]] = []
    for group in groups:
        row: dict[str, list[int]] = {"input_ids": [], "labels": [], "position_ids": [], "document_ids": []}
        for doc, i in enumerate(group):
            ids, labels = examples[i]
            row["input_ids"].extend(ids)
            row["labels"].extend(labels)
            row["position_ids"].extend(range(len(ids)))
            row["document_ids"].extend([doc] * len(ids))
        rows.append(row)
    return rows


class Collator:
    """Pads a list of examples to the batch's longest (right padding) and makes tensors.

    Causal examples (`input_ids`, `labels`) -> input_ids, attention_mask, labels (pad -100);
    packed rows also carry position_ids (pad 0) and document_ids (pad -1); causal batches carry the host-side
    ``target_index``, ``cu_seq_lens`` and ``max_seq_len`` (module docstring).
    Classification examples (`input_ids`, `label`) -> input_ids, attention_mask, labels of shape (B,)
    (long ids, or float targets for regression).
    `pad_to_multiple_of` rounds the padded length up (tensor-core friendly shapes).
    """

    def __init__(self, pad_token_id: int = 0, pad_to_multiple_of: Optional[int] = None) -> None:
        if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be >= 1, got {pad_to_multiple_of}")
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("Collator got an empty batch")
        keys = set(features[0])
        for f in features[1:]:
            if set(f) != keys:
                raise ValueError(f"Collator: examples with different fields {sorted(keys)} vs {sorted(f)}")
        length = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            length = (length + m - 1) // m * m
        batch_size = len(features)

        def pad(key: str, value: int) -> torch.Tensor:
            out = torch.full((batch_size, length), value, dtype=torch.long)
            for i, f in enumerate(features):
                seq = f[key]
                out[i, : len(seq)] = torch.as_tensor(seq, dtype=torch.long)
            return out

        batch = {"input_ids": pad("input_ids", self.pad_token_id)}
        mask = torch.zeros((batch_size, length), dtype=torch.long)
        for i, f in enumerate(features):
            mask[i, : len(f["input_ids"])] = 1
        batch["attention_mask"] = mask
        if "labels" in keys:
            batch["labels"] = pad("labels", IGNORE_INDEX)
        elif "label" in keys:
            values = [f["label"] for f in features]
            dtype = torch.float32 if any(isinstance(v, float) for v in values) else torch.long
            batch["labels"] = torch.tensor(values, dtype=dtype)
        if "document_ids" in keys:
            batch["position_ids"] = pad("position_ids", 0)
            batch["document_ids"] = pad("document_ids", PAD_DOCUMENT_ID)
        if "labels" in keys:
            batch["target_index"] = target_positions(batch["labels"])
            batch["cu_seq_lens"], batch["max_seq_len"] = varlen_segments(mask, batch.get("document_ids"))
        return batch
