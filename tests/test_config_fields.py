"""Config fields of current Mistral checkpoints, each computed exactly (parity with transformers' own classes) or
refused with a message naming the field: ``layer_types`` (Ministral), yarn RoPE in both spellings, FP8 /
``quantization_config``, unknown tensors. Tiny random configs, fp32 CPU.
"""

from __future__ import annotations

import json

import pytest
import torch

from conftest import TINY, make_ours

ATOL = 1e-5
MIXED = ["sliding_attention", "full_attention", "full_attention", "sliding_attention"]


def _ids(B, T, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, TINY["vocab_size"], (B, T), generator=g)


def _maxdiff(a, b):
    return (a - b).abs().max().item()


def _left_padded(T, pads, seed=0):
    x = _ids(len(pads), T, seed)
    mask = torch.ones_like(x)
    for row, n in enumerate(pads):
        mask[row, :n] = 0
        x[row, :n] = 0
    return x, mask


def _theirs(folder, cls_name="AutoModelForCausalLM", attn="sdpa"):
    import transformers

    return getattr(transformers, cls_name).from_pretrained(folder, attn_implementation=attn,
                                                           dtype=torch.float32).eval()


# ------------------------------------------------------------------------------------------------ layer_types
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_layer_types_match_transformers_ministral(tmp_path, attn):
    from mistral_ft import MistralForCausalLM

    ours = make_ours(MistralForCausalLM, seed=3, num_hidden_layers=4, layer_types=MIXED)
    ours.config.attn_implementation = attn
    ours.save_pretrained(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["model_type"] == "ministral" and cfg["architectures"] == ["MinistralForCausalLM"]
    theirs = _theirs(tmp_path / "m", attn=attn)
    assert type(theirs).__name__ == "MinistralForCausalLM"
    x, mask = _left_padded(17, [0, 3, 9])  # window 5: sliding layers see a truncated window, full layers all
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    a = ours(x, attention_mask=mask, position_ids=pos).logits
    b = theirs(x, attention_mask=mask, position_ids=pos).logits
    valid = mask.bool()
    d = _maxdiff(a[valid], b[valid])
    assert d < ATOL, d
    # the per-layer rule matters: all-sliding (plain Mistral) gives other numbers on the same weights
    ours.config.layer_types = None
    plain = MistralForCausalLM(ours.config).eval()
    plain.load_state_dict(ours.state_dict())
    assert _maxdiff(plain(x, attention_mask=mask, position_ids=pos).logits[valid], b[valid]) > 1e-3


def test_layer_types_round_trip_and_reload(tmp_path):
    from mistral_ft import MistralConfig, MistralForCausalLM

    ours = make_ours(MistralForCausalLM, seed=3, num_hidden_layers=4, layer_types=MIXED)
    ours.save_pretrained(tmp_path / "m")
    back = MistralForCausalLM.from_pretrained(tmp_path / "m")
    assert back.config.layer_types == MIXED and back.config.layer_windows == [5, None, None, 5]
    x = _ids(2, 12)
    assert torch.equal(back(x).logits, ours(x).logits)
    cfg = MistralConfig.from_pretrained(tmp_path / "m")
    assert cfg.to_dict()["model_type"] == "ministral"


@pytest.mark.parametrize("kind,window", [("full_attention", None), ("sliding_attention", 5)])
def test_uniform_layer_types_equal_plain_mistral(tmp_path, kind, window):
    """All layers full == Mistral without a window; all sliding == Mistral with it (and in transformers too)."""
    from mistral_ft import MistralForCausalLM

    ministral = make_ours(MistralForCausalLM, seed=4, layer_types=[kind] * TINY["num_hidden_layers"])
    plain = make_ours(MistralForCausalLM, seed=4, sliding_window=window)
    x = _ids(2, 13)
    a, b = ministral(x).logits, plain(x).logits
    assert torch.equal(a, b)
    ministral.save_pretrained(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    # full layers with a window set: transformers' Mistral would slide, so the folder must name Ministral
    assert cfg["model_type"] == ("ministral" if kind == "full_attention" else "mistral")
    assert _maxdiff(_theirs(tmp_path / "m")(x).logits, a) < ATOL


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_layer_types_cached_generation_equals_full_forward_and_transformers(tmp_path, attn):
    """Each layer's cache honours its own window: sliding layers keep a W-slot ring, full layers every token."""
    from mistral_ft import MistralCache, MistralForCausalLM

    ours = make_ours(MistralForCausalLM, seed=5, num_hidden_layers=4, layer_types=MIXED)
    ours.config.attn_implementation = attn
    x, mask = _left_padded(9, [0, 6, 2], seed=5)
    cache = MistralCache.for_config(ours.config)
    steps = 12
    out = ours.generate(x, attention_mask=mask, max_new_tokens=steps, eos_token_id=[], past_key_values=cache,
                        return_dict_in_generate=True, output_logits=True)
    W = TINY["sliding_window"]
    assert [k.shape[2] for k in cache.keys] == [W, 9 + steps - 1, 9 + steps - 1, W]
    full_mask = torch.cat([mask, mask.new_ones(3, steps)], 1)
    pos = (full_mask.cumsum(-1) - 1).clamp(min=0)
    ref = ours(out.sequences, attention_mask=full_mask, position_ids=pos).logits[:, 8:-1]
    assert _maxdiff(torch.stack(out.logits, 1), ref) < ATOL
    ours.save_pretrained(tmp_path / "m")
    theirs = _theirs(tmp_path / "m", attn=attn)
    b = theirs.generate(x, attention_mask=mask, max_new_tokens=steps, do_sample=False, pad_token_id=0,
                        eos_token_id=None, min_new_tokens=steps)
    assert torch.equal(out.sequences, b)


def test_cache_of_another_layout_is_refused():
    from mistral_ft import MistralCache, MistralForCausalLM

    ours = make_ours(MistralForCausalLM, num_hidden_layers=4, layer_types=MIXED)
    with pytest.raises(ValueError, match="MistralCache.for_config"):
        ours(_ids(1, 4), past_key_values=MistralCache(4, TINY["sliding_window"]))


@pytest.mark.parametrize("layer_types,match", [
    (["sliding_attention"], "for each of the 2 layers"),
    (["sliding_attention", "chunked_attention"], "for each of the 2 layers"),
])
def test_bad_layer_types_refused(layer_types, match):
    from mistral_ft.model import ConfigError
    from conftest import tiny_config

    with pytest.raises(ConfigError, match=match):
        tiny_config(layer_types=layer_types)
    with pytest.raises(ConfigError, match="'sliding_window' is null"):
        tiny_config(layer_types=["sliding_attention", "full_attention"], sliding_window=None)
