"""The embedded default: a real HF folder, deterministic, loaded through from_pretrained like a 7B model.

Two of them: the pre-trained base ``model=tiny`` loads (shipped, checksummed here) and its random twin."""

from __future__ import annotations

import hashlib

import torch

from mistral_ft import MistralConfig, MistralForCausalLM
from mistral_ft.model.tiny import TINY_BASE_DIR, build_tiny, random_tiny_path, tiny_base_digest, tiny_model_path
from mistral_ft.tokenizer import MistralTokenizer


def _digest(folder):
    return hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()


# sha256 of mistral_ft/model/tiny_base/model.safetensors, as scripts/build_tiny_base.py wrote it: a rebuilt
# base (whose floats differ on another CPU type) must be a deliberate change of this line
TINY_BASE_SHA256 = "ea105ebdbdd69e2a7a225ac56b121f1c0fbb6562fc646cf7024fe38904617c2d"


def test_random_tiny_is_a_cached_deterministic_hf_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("MISTRAL_FT_CACHE", str(tmp_path / "cache"))
    folder = random_tiny_path()
    assert folder.parent == tmp_path / "cache"
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.model"} <= {
        p.name for p in folder.iterdir()}
    assert random_tiny_path() == folder  # cached
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


def test_the_shipped_base_is_the_checksummed_pretrained_model(tmp_path, monkeypatch):
    from safetensors import safe_open

    assert tiny_base_digest() == TINY_BASE_SHA256
    assert (TINY_BASE_DIR / "model.safetensors").stat().st_size < 6_000_000  # a few MB in the package
    monkeypatch.setenv("MISTRAL_FT_CACHE", str(tmp_path / "cache"))
    with safe_open(TINY_BASE_DIR / "model.safetensors", "pt") as f:
        assert "lm_head.weight" not in f.keys()  # shipped tied to the embeddings: half the bytes
        shipped = {k: f.get_tensor(k) for k in f.keys()}
    assert shipped["model.embed_tokens.weight"].dtype == torch.bfloat16
    assert MistralConfig.from_pretrained(TINY_BASE_DIR).tie_word_embeddings
    folder = tiny_model_path()
    assert tiny_model_path() == folder and folder.parent == tmp_path / "cache"  # cached
    c = MistralConfig.from_pretrained(folder)
    assert not c.tie_word_embeddings and c.vocab_size == 32000 and c.hidden_size == 64 and c.num_hidden_layers == 2
    assert c.torch_dtype == "float32"  # as the random tiny model: exports of the demo stay float32
    model = MistralForCausalLM.from_pretrained(folder)
    state = model.state_dict()
    assert all(torch.equal(state[k], v.float()) for k, v in shipped.items())  # the shipped weights, untied
    assert torch.equal(state["lm_head.weight"], shipped["model.embed_tokens.weight"].float())
    tok = MistralTokenizer.from_pretrained(folder)
    # what plain-text pre-training taught it: far better than chance (ln 32000 = 10.4) on text like its corpus
    ids = torch.tensor([tok.encode("Who is at the door? It is Ben. Come in, Ben!", add_bos=True, add_eos=True)])
    assert model(ids, labels=ids).loss.item() < 5.0
