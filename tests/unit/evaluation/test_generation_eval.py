"""Exact match of generations (mistral_ft.evaluation.generation_eval) and the demo's frozen held-out split.

The metric is checked on hand-made references around what the model really generates, and the batched,
left-padded path against a plain one-prompt-at-a-time ``model.generate`` loop (same tokens).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from mistral_ft.evaluation.generation_eval import exact_match, normalise, split_conversation

pytestmark = pytest.mark.usefixtures("one_thread")

BUNDLED = Path(__file__).resolve().parents[3] / "mistral_ft" / "bundled_data"
# The held-out split the demo's exact match is measured on: frozen, so a score cannot be bought by editing it.
INSTRUCT_VAL_SHA256 = "583ab83e0d1a167d1b66cade669d3857c4adf4e3a618fe7f5f6e306d1e84ba67"


def _rows(name):
    return [json.loads(line) for line in (BUNDLED / name).read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.fixture(scope="module")
def tiny():
    from mistral_ft.generate import load
    from mistral_ft.model.tiny import tiny_model_path

    model, tok, _ = load(tiny_model_path(), device="cpu")
    return model, tok


def test_normalise():
    assert normalise("  Hello,   Ben.\n") == "hello, ben"
    assert normalise("A b c") == normalise("a  B c.")
    assert normalise("3.5") == "3.5" and normalise("x..") == "x."


def test_split_conversation_needs_a_reference():
    prompt, ref = split_conversation([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}])
    assert prompt == [{"role": "user", "content": "q"}] and ref == "a"
    with pytest.raises(ValueError, match="ending with an assistant turn"):
        split_conversation([{"role": "user", "content": "q"}])


def test_batched_left_padded_equals_plain_loop_and_scores_hand_made_references(tiny):
    model, tok = tiny
    prompts = [[{"role": "user", "content": "Spell the word cat."}],
               [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Greet Ann, please, now."}],
               [{"role": "user", "content": "What is 5 plus 3?"}, {"role": "assistant", "content": "8"},
                {"role": "user", "content": "And 2 plus 2?"}]]
    plain = []
    for p in prompts:  # the reference loop: one unpadded prompt at a time
        ids, _ = tok.encode_chat(p, add_generation_prompt=True)
        out = model.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False)[0, len(ids):].tolist()
        plain.append(out[:out.index(tok.eos_token_id)] if tok.eos_token_id in out else out)
    texts = [tok.decode(t, skip_special_tokens=True) for t in plain]
    refs = [f"  {texts[0]} ", texts[1].upper() + ".", texts[2] + " extra"]  # exact / normalised only / neither
    convs = [{"messages": p + [{"role": "assistant", "content": r}]} for p, r in zip(prompts, refs)]
    res = exact_match(model, tok, convs, max_new_tokens=6, batch_size=3)
    assert [s["generated"] for s in res.samples] == texts
    assert [s["generated_tokens"] for s in res.samples] == [len(t) for t in plain]
    exact_expected = [True, texts[1].upper() + "." == texts[1], False]
    assert [s["exact"] for s in res.samples] == exact_expected
    assert [s["normalised"] for s in res.samples] == [True, True, False]
    assert res.exact_match == pytest.approx(sum(exact_expected) / 3)
    assert res.normalised_match == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="max_new_tokens"):
        exact_match(model, tok, convs, max_new_tokens=0)


def test_instruct_val_split_is_frozen():
    data = (BUNDLED / "instruct_val.jsonl").read_bytes()
    assert hashlib.sha256(data).hexdigest() == INSTRUCT_VAL_SHA256


def test_no_validation_prompt_in_training_file():
    train = (BUNDLED / "instruct_train.jsonl").read_text(encoding="utf-8")
    leaked = [r["messages"][-2]["content"] for r in _rows("instruct_val.jsonl")
              if json.dumps(r["messages"][-2]["content"], ensure_ascii=False) in train]
    assert leaked == []


def test_no_validation_answer_in_training_file():
    """The held-out answers are new content (a name no training chat greets, a triple none repeats)."""
    train = (BUNDLED / "instruct_train.jsonl").read_text(encoding="utf-8")
    leaked = [r["messages"][-1]["content"] for r in _rows("instruct_val.jsonl")
              if json.dumps(r["messages"][-1]["content"], ensure_ascii=False) in train]
    assert leaked == []


def test_exact_match_before_fine_tuning_is_low(tiny):
    """The pre-trained base (model=tiny) has not seen the chat format: it does not answer the held-out chats."""
    model, tok = tiny
    res = exact_match(model, tok, _rows("instruct_val.jsonl"), max_new_tokens=16)
    assert res.exact_match <= 0.10
