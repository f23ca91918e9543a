"""Preference pairs (format "preference"): validate, tokenize, keep each pair whole, collate.

Two row shapes, told apart per row by whether the prompt field is present:

    conversations   {"chosen": [messages], "rejected": [messages]}
                    the two share every message but the last, which is an assistant answer in each
                    (the shared prefix is the prompt: optional system, then user/assistant turns, ending with user)
    explicit        {"prompt": str | [messages], "chosen": str | [assistant message], "rejected": same}
                    a string prompt is one user message; a messages prompt ends with a user message

Canonical pair: {"prompt": [messages ending with user], "chosen": str, "rejected": str}.
Rows are checked by `formats.normalize_pair` (with the other row formats) before training: a missing field, an empty answer, a prompt that does not end with a
user turn, or chosen == rejected is a `DataError` naming file, line and field (or a counted skip with
`skip_invalid: true`), through the same reader and messages as the other formats.

Tokens, exactly as SFT masks them: prompt_ids = the tokenizer's generation-prompt encoding of the prompt
(`encode_chat(prompt, add_generation_prompt=True)`, in v1 `[BOS] [INST] ... [/INST]`); answer ids = the
tokens `encode_chat(prompt + [assistant])` adds after it (the answer and its EOS, the SFT targets). We check
that the full encoding starts with the prompt encoding, so chosen and rejected share the prompt tokens.

Truncation (`max_length`, as TRL's default "keep_start"): prompt + answer is cut at the end, so a long answer
loses its tail (and its EOS); such rows are counted in `info.truncated`. A row whose prompt leaves no room
for an answer token (len(prompt_ids) >= max_length), or whose two answers become identical once cut, is an
error (a counted skip with `skip_invalid: true`): there is nothing to compare.

No packing: a pair's chosen and rejected run as two rows of one micro-batch ([chosen_1..P, rejected_1..P],
TRL's layout), each item of the dataset is a whole pair, so the sampler hands a pair to one rank and one
micro-batch by construction.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any, Optional

import datasets
import torch
from torch.utils.data import Dataset

from mistral_ft.data.config import DataConfig
from mistral_ft.data.dataset import DataInfo, choose_splits, progress
from mistral_ft.data.errors import DataError, tolerate
from mistral_ft.data.formats import IGNORE_INDEX, ChatTokenizer

log = logging.getLogger(__name__)


# ---- tokens -------------------------------------------------------------------------------------------
def _context(prompt: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    # earlier assistant turns are context only (weight 0), exactly as SFT would mask them here
    return [{"role": m["role"], "content": m["content"], **({"weight": 0} if m["role"] == "assistant" else {})}
            for m in prompt]


def tokenize_pair(pair: Mapping[str, Any], tokenizer: ChatTokenizer) -> tuple[list[int], list[int], list[int]]:
    """(prompt_ids, chosen_ids, rejected_ids): the generation-prompt encoding and the two answers' target tokens."""
    context = _context(pair["prompt"])
    prompt_ids, _ = tokenizer.encode_chat(context, add_generation_prompt=True)  # type: ignore[call-arg]
    answers = []
    for key in ("chosen", "rejected"):
        ids, mask = tokenizer.encode_chat(context + [{"role": "assistant", "content": pair[key]}])
        n = len(prompt_ids)
        if list(ids[:n]) != list(prompt_ids) or any(mask[:n]) or not all(mask[n:]):
            raise RuntimeError("the tokenizer's chat encoding does not extend the generation prompt with the answer "
                               "tokens; preference pairs need that prefix property")
        answers.append(list(ids[n:]))
    return list(prompt_ids), answers[0], answers[1]


class PairDataset(Dataset):
    """Tokenized pairs; `ds[i]` = {"prompt_ids", "chosen_ids", "rejected_ids"}; `lengths[i]` its longer row."""

    def __init__(self, columns: dict[str, list[list[int]]]) -> None:
        feature = datasets.Sequence(datasets.Value("int32"))
        self.data = datasets.Dataset.from_dict(columns, features=datasets.Features({k: feature for k in columns}))
        self.lengths = [len(p) + max(len(c), len(r)) for p, c, r in
                        zip(columns["prompt_ids"], columns["chosen_ids"], columns["rejected_ids"])]

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, idx: int) -> dict[str, Any]:
        return self.data[int(idx)]


def _tokenize_pairs(locs: Sequence[str], rows: Sequence[Mapping[str, Any]], cfg: DataConfig,
                    tokenizer: ChatTokenizer) -> tuple[dict[str, list[list[int]]], int, int]:
    """Rows -> columns, the truncation policy of the module docstring; returns (columns, truncated, skipped)."""
    cols: dict[str, list[list[int]]] = {"prompt_ids": [], "chosen_ids": [], "rejected_ids": []}
    truncated = skipped = 0
    limit = cfg.max_length
    for loc, row in progress(zip(locs, rows), len(rows), "tokenizing pairs"):
        prompt, chosen, rejected = tokenize_pair(row, tokenizer)
        try:
            if len(prompt) >= limit:
                raise DataError(f"{loc}: field '{cfg.prompt_field}': the prompt is {len(prompt)} tokens, which leaves "
                                f"no room for an answer within max_length={limit} (raise max_length or shorten it)")
            room = limit - len(prompt)
            if len(chosen) > room or len(rejected) > room:
                chosen, rejected = chosen[:room], rejected[:room]
                truncated += 1
                if chosen == rejected:
                    raise DataError(f"{loc}: chosen and rejected are identical once cut to max_length={limit} "
                                    f"({room} answer tokens after the prompt): raise max_length")
        except DataError as err:
            tolerate(err, cfg.skip_invalid)  # raises unless skipping or collecting
            skipped += 1
            continue
        cols["prompt_ids"].append(prompt)
        cols["chosen_ids"].append(chosen)
        cols["rejected_ids"].append(rejected)
    return cols, truncated, skipped


def build_pair_datasets(data_cfg: Any, tokenizer: ChatTokenizer) -> tuple[PairDataset, Optional[PairDataset], Any]:
    """load -> validate -> (validation split) -> tokenize -> PairDataset; returns (train, validation or None, info).

    Shares the loader, validation-split rules and `DataInfo` of `build_datasets`; `*_examples` count pairs,
    `*_tokens` count both rows of every pair, `*_target_tokens` both answers.
    """
    cfg = DataConfig.from_mapping(data_cfg)
    if cfg.pack:
        raise DataError("data config: field 'pack': preference pairs are not packed (chosen and rejected of a pair "
                        "must stay apart and together in one micro-batch); set data.pack=false")
    train_split, train, val, val_source = choose_splits(cfg)
    info = DataInfo(cfg.format, "preference", train_split.source, val_source, max_length=cfg.max_length)

    out: list[Optional[PairDataset]] = []
    for split, rows in (("train", train), ("validation", val)):
        if rows is None:
            out.append(None)
            continue
        cols, trunc, skip = _tokenize_pairs(rows.locs, rows.rows, cfg, tokenizer)
        if not cols["prompt_ids"]:
            raise DataError(f"{train_split.source if split == 'train' else val_source}: no usable {split} pairs "
                            f"({rows.skipped + skip} skipped)")
        n = len(cols["prompt_ids"])
        tokens = sum(2 * len(p) + len(c) + len(r) for p, c, r in zip(*cols.values()))
        targets = sum(len(c) + len(r) for c, r in zip(cols["chosen_ids"], cols["rejected_ids"]))
        info.truncated[split], info.skipped[split] = trunc, rows.skipped + skip
        if split == "train":
            info.train_examples = info.train_rows = n
            info.train_tokens, info.train_target_tokens = tokens, targets
        else:
            info.val_examples = info.val_rows = n
            info.val_tokens, info.val_target_tokens = tokens, targets
        if trunc:
            log.warning("cut the answers of %d %s pairs to max_length=%d", trunc, split, cfg.max_length)
        if info.skipped[split]:
            log.warning("skipped %d invalid %s pairs (skip_invalid=true)", info.skipped[split], split)
        out.append(PairDataset(cols))
    log.info("data: %d train pairs, %d validation pairs", info.train_examples, info.val_examples)
    assert out[0] is not None
    return out[0], out[1], info


# ---- batches ------------------------------------------------------------------------------------------
class PairCollator:
    """P pairs -> 2P right-padded rows [chosen_1..P, rejected_1..P] (TRL's layout), labels -100 off the answers.

    Returns input_ids (2P, T), attention_mask (2P, T), labels (2P, T) unshifted (label = token on answer
    tokens), and num_pairs (an int, also what the resumable loader counts as consumed samples).
    """

    def __init__(self, pad_token_id: int = 0, pad_to_multiple_of: Optional[int] = None) -> None:
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, pairs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        if not pairs:
            raise ValueError("PairCollator got an empty batch")
        rows = [(list(p["prompt_ids"]), list(p[k])) for k in ("chosen_ids", "rejected_ids") for p in pairs]
        length = max(len(a) + len(b) for a, b in rows)
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            length = (length + m - 1) // m * m
        ids = torch.full((len(rows), length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, (prompt, answer) in enumerate(rows):
            n, m = len(prompt), len(answer)
            ids[i, : n + m] = torch.as_tensor(prompt + answer)
            labels[i, n : n + m] = torch.as_tensor(answer)
            mask[i, : n + m] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels, "num_pairs": len(pairs)}

