"""Preference pairs: both row shapes, SFT-identical tokens and masks, errors naming file/line/field,
skip_invalid, the truncation policy, no packing, the pair collator."""

from __future__ import annotations

import json

import pytest
import torch

from mistral_ft.data import DataError
from mistral_ft.data.preference import PairCollator, build_pair_datasets

from helpers.preference import DATA, pairs, tiny  # noqa: F401 (shared fixtures)


# ---- data ---------------------------------------------------------------------------------------------
def _write(tmp_path, rows, name="pairs.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


GOOD = {"prompt": "Greet Ben.", "chosen": "Hello Ben!", "rejected": "Hello Ana!"}


def test_both_row_shapes_give_the_same_tokens(tmp_path, tiny):
    conv = {"chosen": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Greet Ben."},
                       {"role": "assistant", "content": "Hello Ben!"}],
            "rejected": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Greet Ben."},
                         {"role": "assistant", "content": "Hello Ana!"}]}
    explicit = {"prompt": conv["chosen"][:2], "chosen": [{"role": "assistant", "content": "Hello Ben!"}], "rejected": "Hello Ana!"}
    train, _, _ = build_pair_datasets({**DATA, "train_file": _write(tmp_path, [conv, explicit])}, tiny[1])
    assert train[0] == train[1]
    tok = tiny[1]
    prompt_ids, _ = tok.encode_chat(conv["chosen"][:2], add_generation_prompt=True)
    full, mask = tok.encode_chat(conv["chosen"])  # SFT's encoding of the chosen conversation
    assert train[0]["prompt_ids"] == prompt_ids and train[0]["prompt_ids"] + train[0]["chosen_ids"] == full
    assert [bool(m) for m in mask] == [False] * len(prompt_ids) + [True] * len(train[0]["chosen_ids"])
    assert train[0]["chosen_ids"][-1] == tok.eos_token_id


@pytest.mark.parametrize("row, match", [
    ({"prompt": "Hi", "chosen": "Yes", "rejected": "Yes"}, "line 1.*field 'rejected': identical"),
    ({"prompt": "Hi", "chosen": "Yes"}, "line 1.*field 'rejected': missing"),
    ({"prompt": "Hi", "chosen": "  ", "rejected": "No"}, "line 1.*field 'chosen': empty text"),
    ({"prompt": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}], "chosen": "a", "rejected": "b"},
     "line 1.*field 'prompt\\[1\\].role': a prompt must end with a user message"),
    ({"prompt": "Hi", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"}, "field 'chosen\\[0\\].role'"),
    ({"chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "a"}],
      "rejected": [{"role": "user", "content": "Ho"}, {"role": "assistant", "content": "b"}]},
     "field 'rejected\\[0\\]': differs from chosen\\[0\\]"),
])
def test_bad_rows_name_file_line_and_field(tmp_path, tiny, row, match):
    path = _write(tmp_path, [GOOD, row], "bad.jsonl")
    with pytest.raises(DataError, match=match.replace("line 1", "bad.jsonl:2")):
        build_pair_datasets({**DATA, "train_file": path}, tiny[1])


def test_bad_row_is_skipped_and_counted_with_skip_invalid(tmp_path, tiny):
    path = _write(tmp_path, [GOOD, {"prompt": "Hi", "chosen": "Yes", "rejected": "Yes"}, GOOD])
    train, _, info = build_pair_datasets({**DATA, "train_file": path, "skip_invalid": True}, tiny[1])
    assert len(train) == 2 and info.skipped["train"] == 1


def test_truncation_policy(tmp_path, tiny):
    tok = tiny[1]
    prompt_len = len(tok.encode_chat([{"role": "user", "content": GOOD["prompt"]}], add_generation_prompt=True)[0])
    differ_early = {"prompt": GOOD["prompt"], "chosen": "yes one two three four", "rejected": "no one two three four"}
    differ_late = {"prompt": GOOD["prompt"], "chosen": "one two three four five six", "rejected": "one two three four five seven"}
    # answers cut at the end (keep_start), counted
    cfg = {**DATA, "train_file": _write(tmp_path, [differ_early]), "max_length": prompt_len + 3}
    train, _, info = build_pair_datasets(cfg, tok)
    assert info.truncated["train"] == 1 and len(train[0]["chosen_ids"]) == 3 and len(train[0]["rejected_ids"]) == 3
    assert train[0]["chosen_ids"] == tok.encode(differ_early["chosen"], add_bos=False)[:3]
    # cut until identical: refused with the row's location
    with pytest.raises(DataError, match="pairs.jsonl:1: chosen and rejected are identical once cut"):
        build_pair_datasets({**cfg, "train_file": _write(tmp_path, [differ_late])}, tok)
    # a prompt with no room for an answer: refused, or skipped and counted
    cfg = {**DATA, "train_file": _write(tmp_path, [GOOD, {**GOOD, "prompt": "word " * 200}]), "max_length": 64}
    with pytest.raises(DataError, match="pairs.jsonl:2: field 'prompt': the prompt is .* no room"):
        build_pair_datasets(cfg, tok)
    train, _, info = build_pair_datasets({**cfg, "skip_invalid": True}, tok)
    assert len(train) == 1 and info.skipped["train"] == 1


def test_packing_is_refused(tiny):
    with pytest.raises(DataError, match="pack"):
        build_pair_datasets({**DATA, "pack": True}, tiny[1])


def test_collator_keeps_pairs_together_and_the_loader_counts_pairs(pairs):
    from mistral_ft.data.sampler import _batch_len

    batch = PairCollator(0)([pairs[0], pairs[1], pairs[2]])
    assert batch["input_ids"].shape[0] == 6 and _batch_len(batch) == 3
    for i in range(3):
        chosen, rejected = batch["labels"][i], batch["labels"][i + 3]
        n = len(pairs[i]["prompt_ids"])
        assert torch.equal(batch["input_ids"][i, :n], batch["input_ids"][i + 3, :n])  # the same prompt
        assert (chosen[:n] == -100).all() and (rejected[:n] == -100).all()
        assert chosen[chosen != -100].tolist() == pairs[i]["chosen_ids"]
        assert rejected[rejected != -100].tolist() == pairs[i]["rejected_ids"]
