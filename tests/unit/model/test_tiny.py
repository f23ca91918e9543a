"""The embedded default: a real HF folder, deterministic, loaded through from_pretrained like a 7B model."""

from __future__ import annotations

import hashlib

import torch

from mistral_ft import MistralConfig, MistralForCausalLM
from mistral_ft.model.tiny import build_tiny, tiny_model_path
from mistral_ft.tokenizer import MistralTokenizer


def _digest(folder):
    return hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()


def test_tiny_is_a_cached_deterministic_hf_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("MISTRAL_FT_CACHE", str(tmp_path / "cache"))
    folder = tiny_model_path()
    assert folder.parent == tmp_path / "cache"
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.model"} <= {
        p.name for p in folder.iterdir()}
    assert tiny_model_path() == folder  # cached
    assert _digest(build_tiny(tmp_path / "again")) == _digest(folder)  # fixed seed
    c = MistralConfig.from_pretrained(folder)
    assert c.vocab_size == 32000 and c.num_key_value_heads < c.num_attention_heads  # real vocab, GQA
    assert c.sliding_window is not None and c.sliding_window < 64 and c.pad_token_id == 0

    model = MistralForCausalLM.from_pretrained(folder)
    tok = MistralTokenizer.from_pretrained(folder)
    batch = tok([" ".join(["A sentence long enough to outgrow the sliding window of the tiny model."] * 3),
                 "Short."], padding=True, return_tensors="pt")
    assert batch["input_ids"].shape[1] > c.sliding_window
    ids = batch["input_ids"]
    out = model(ids, attention_mask=batch["attention_mask"], labels=ids.masked_fill(ids == 0, -100))
    assert torch.isfinite(out.loss) and abs(out.loss.item() - torch.log(torch.tensor(32000.0)).item()) < 1.0
