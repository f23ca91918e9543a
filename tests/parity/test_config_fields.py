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


def test_layer_types_flex_attention_and_packing_match_sdpa():
    """FlexAttention gets one block mask per window (forward only on CPU), and packed rows keep each layer's
    own window: packed logits equal per-document forwards."""
    from mistral_ft import MistralForCausalLM

    m = make_ours(MistralForCausalLM, seed=9, num_hidden_layers=4, layer_types=MIXED)
    assert [layer.self_attn.sliding_window for layer in m.model.layers] == [5, None, None, 5]
    x = _ids(2, 30, seed=9)
    mask = torch.ones_like(x)
    mask[1, 24:] = 0
    doc = torch.cat([torch.zeros(2, 12, dtype=torch.long), torch.ones(2, 18, dtype=torch.long)], 1)
    pos = torch.cat([torch.arange(12), torch.arange(18)]).expand(2, -1)
    with torch.no_grad():
        ref = m(x, attention_mask=mask, position_ids=pos, document_ids=doc).logits
        m.config.attn_implementation = "flex_attention"
        got = m(x, attention_mask=mask, position_ids=pos, document_ids=doc).logits
        m.config.attn_implementation = "sdpa"
        alone = m(x[:1, 12:]).logits
    assert _maxdiff(got[mask.bool()], ref[mask.bool()]) < ATOL
    assert _maxdiff(ref[:1, 12:], alone) < ATOL


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


# ------------------------------------------------------------------------------------------------ yarn RoPE
YARN_CASES = {
    "plain": {"factor": 4.0, "original_max_position_embeddings": 32},
    "betas": {"factor": 8.0, "original_max_position_embeddings": 16, "beta_fast": 16, "beta_slow": 2},
    "attention_factor": {"factor": 4.0, "original_max_position_embeddings": 32, "attention_factor": 1.3},
    "mscale": {"factor": 4.0, "original_max_position_embeddings": 32, "mscale": 0.8, "mscale_all_dim": 0.5},
    "no_truncate": {"factor": 3.0, "original_max_position_embeddings": 24, "truncate": False},
    "factor_null": {"factor": None, "original_max_position_embeddings": 64},
}
YARN_TINY = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                 sliding_window=None)


def _spelled(params, spelling, theta):
    if spelling == "5.x":
        return {"rope_parameters": {"rope_type": "yarn", "rope_theta": theta, **params}}
    return {"rope_scaling": {"type": "yarn", **params}, "rope_theta": theta}


@pytest.mark.parametrize("theta", [10000.0, 1e6])
@pytest.mark.parametrize("case", sorted(YARN_CASES))
def test_yarn_inv_freq_equals_transformers(case, theta):
    """The frequencies and the cos/sin scale are bit-for-bit those of transformers 5.24's yarn."""
    import transformers
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from mistral_ft.model.modeling import MistralRotaryEmbedding
    from conftest import tiny_config

    for spelling in ("5.x", "4.x"):
        kw = {**TINY, **YARN_TINY, **_spelled(YARN_CASES[case], spelling, theta)}
        ours = MistralRotaryEmbedding(tiny_config(**kw))
        inv, scale = ROPE_INIT_FUNCTIONS["yarn"](transformers.MistralConfig(**kw))
        assert torch.equal(ours._inv_freq, inv), (spelling, ours._inv_freq, inv)
        assert ours.attention_scaling == scale


@pytest.mark.parametrize("spelling", ["5.x", "4.x"])
@pytest.mark.parametrize("case", ["plain", "mscale", "no_truncate"])
def test_yarn_logits_match_transformers_past_original_length(tmp_path, case, spelling):
    """Logits at T = 200, far past original_max_position_embeddings (16..32), read from either spelling."""
    from mistral_ft import MistralForCausalLM

    ours = make_ours(MistralForCausalLM, seed=6, **YARN_TINY, **_spelled(YARN_CASES[case], spelling, 1e6))
    ours.save_pretrained(tmp_path / "m")
    path = tmp_path / "m" / "config.json"
    cfg = json.loads(path.read_text())
    assert cfg["rope_scaling"]["rope_type"] == "yarn" and cfg["rope_theta"] == 1e6  # written in the 4.x spelling
    for key in ("rope_scaling", "rope_theta"):
        cfg.pop(key)
    path.write_text(json.dumps({**cfg, **_spelled(YARN_CASES[case], spelling, 1e6)}))
    back = MistralForCausalLM.from_pretrained(tmp_path / "m")
    theirs = _theirs(tmp_path / "m")
    x = _ids(2, 200, seed=6)
    a, b = back(x).logits, theirs(x).logits
    assert torch.equal(a, ours(x).logits)
    d = _maxdiff(a, b)
    assert d < ATOL, d
    default = make_ours(MistralForCausalLM, seed=6, **YARN_TINY, rope_theta=1e6)
    assert _maxdiff(default(x).logits, b) > 1e-3  # yarn changes the numbers: this test can fail


def test_yarn_cached_generation_equals_full_forward():
    from mistral_ft import MistralForCausalLM

    ours = make_ours(MistralForCausalLM, seed=7, **YARN_TINY, **_spelled(YARN_CASES["plain"], "5.x", 1e4))
    x, mask = _left_padded(40, [0, 7], seed=7)
    out = ours.generate(x, attention_mask=mask, max_new_tokens=10, eos_token_id=[], return_dict_in_generate=True,
                        output_logits=True)
    full_mask = torch.cat([mask, mask.new_ones(2, 10)], 1)
    pos = (full_mask.cumsum(-1) - 1).clamp(min=0)
    ref = ours(out.sequences, attention_mask=full_mask, position_ids=pos).logits[:, 39:-1]
    assert _maxdiff(torch.stack(out.logits, 1), ref) < ATOL


@pytest.mark.parametrize("rope,match", [
    ({"rope_parameters": {"rope_type": "linear", "factor": 2.0}}, "'rope_parameters': RoPE type 'linear'"),
    ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "'rope_scaling': RoPE type 'dynamic'"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "'rope_scaling': RoPE type 'llama3'"),
    ({"rope_parameters": {"rope_type": "longrope", "short_factor": [1.0]}}, "RoPE type 'longrope'"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 8,
                          "low_freq_factor": 1}}, r"unsupported yarn field\(s\) \['low_freq_factor'\]"),
    ({"rope_parameters": {"rope_type": "yarn", "original_max_position_embeddings": 8}}, "yarn needs 'factor'"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": "2"}}, r"'rope_parameters.factor' must be a number"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4},
      "rope_scaling": {"type": "yarn", "factor": 2.0}}, "both 'rope_parameters' and 'rope_scaling'"),
    ({"rope_parameters": {"rope_type": "default", "factor": 2.0}}, "unexpected field"),
    ({"partial_rotary_factor": 0.5}, "key 'partial_rotary_factor'"),
    ({"quantization_config": {"quant_method": "fp8"}}, "key 'quantization_config'.*FP8"),
    ({"attention_bias": True}, "key 'attention_bias' is not supported"),
    ({"mlp_bias": True}, "key 'mlp_bias' is not supported"),
    ({"num_local_experts": 8}, "key 'num_local_experts'.*mixture-of-experts"),
])
def test_rope_and_quantization_fields_refused(tmp_path, rope, match):
    from mistral_ft import MistralConfig
    from mistral_ft.model import ConfigError

    path = tmp_path / "config.json"
    path.write_text(json.dumps({**TINY, **rope}))
    with pytest.raises(ConfigError, match=match) as e:
        MistralConfig.from_pretrained(tmp_path)
    assert str(path) in str(e.value)


def test_default_rope_spellings_agree():
    from mistral_ft import MistralConfig

    a = MistralConfig(rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    b = MistralConfig(rope_theta=1e6, rope_scaling=None)
    c = MistralConfig(rope_parameters={"rope_type": "default", "rope_theta": 1e6}, rope_theta=5.0)  # dict wins
    assert a.rope_theta == b.rope_theta == c.rope_theta == 1e6 and a.rope_scaling is None
    assert "rope_scaling" not in a.to_dict() and "layer_types" not in a.to_dict()


# ------------------------------------------------------------------------------------------------ FP8 / unknown tensors
def _saved_tiny(tmp_path):
    from mistral_ft import MistralForCausalLM

    model = make_ours(MistralForCausalLM, seed=8)
    model.save_pretrained(tmp_path / "m")
    return tmp_path / "m"


def _rewrite_weights(folder, edit):
    from safetensors.torch import load_file, save_file

    state = load_file(folder / "model.safetensors")
    edit(state)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})


def _fp8(state):
    """What an FP8 release holds: e4m3 weights plus a per-tensor inverse scale beside each linear."""
    for key in [k for k in state if k.endswith("_proj.weight")]:
        w = state[key]
        scale = w.abs().max() / 448.0
        state[key] = (w / scale).to(torch.float8_e4m3fn)
        state[key + "_scale_inv"] = scale.reshape(1)


def test_fp8_config_refused_naming_the_field(tmp_path):
    from mistral_ft import MistralForCausalLM
    from mistral_ft.model import ConfigError

    folder = _saved_tiny(tmp_path)
    _rewrite_weights(folder, _fp8)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "weight_block_size": None, "activation_scheme": "dynamic"}
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"config.json: key 'quantization_config' is not supported.*FP8"):
        MistralForCausalLM.from_pretrained(folder)


def test_fp8_scale_tensors_refused_without_the_config_field(tmp_path):
    from mistral_ft import MistralForCausalLM
    from mistral_ft.model import CheckpointError

    folder = _saved_tiny(tmp_path)
    _rewrite_weights(folder, _fp8)
    with pytest.raises(CheckpointError, match=r"model.safetensors: tensor 'model\.layers\.\d+\.\w+\.\w+_proj"
                                              r"\.weight(_scale_inv)?' (is a quantization scale|is stored as float8)"):
        MistralForCausalLM.from_pretrained(folder)


def test_fp8_weights_without_scales_refused_by_dtype(tmp_path):
    from mistral_ft import MistralForCausalLM
    from mistral_ft.model import CheckpointError

    folder = _saved_tiny(tmp_path)

    def cast(state):
        state["model.layers.0.mlp.up_proj.weight"] = state["model.layers.0.mlp.up_proj.weight"].to(torch.float8_e4m3fn)

    _rewrite_weights(folder, cast)
    with pytest.raises(CheckpointError, match=r"'model.layers.0.mlp.up_proj.weight' is stored as float8_e4m3fn"):
        MistralForCausalLM.from_pretrained(folder)


@pytest.mark.parametrize("key", ["model.layers.0.self_attn.q_proj.bias", "model.layers.2.mlp.up_proj.weight",
                                 "model.layers.0.self_attn.rotary_emb.inv_freq"])
def test_unknown_tensor_refused_never_ignored(tmp_path, key):
    from mistral_ft import MistralForCausalLM, MistralForSequenceClassification, MistralModel
    from mistral_ft.model import CheckpointError

    folder = _saved_tiny(tmp_path)
    _rewrite_weights(folder, lambda state: state.__setitem__(key, torch.zeros(4)))
    for cls in (MistralForCausalLM, MistralForSequenceClassification, MistralModel):
        with pytest.raises(CheckpointError, match=f"tensor '{key}' has no place in {cls.__name__}"):
            cls.from_pretrained(folder)


def test_the_other_head_is_still_skipped(tmp_path):
    """A base checkpoint starts a classifier (lm_head skipped, score initialised), and MistralModel skips heads."""
    from mistral_ft import MistralForSequenceClassification, MistralModel

    folder = _saved_tiny(tmp_path)
    clf = MistralForSequenceClassification.from_pretrained(folder)
    assert clf.loading_info["unexpected"] == ["lm_head.weight"]
    assert MistralModel.from_pretrained(folder).loading_info["unexpected"] == ["lm_head.weight"]


def test_original_layout_folder_points_at_the_converter(tmp_path):
    from safetensors.torch import save_file

    from mistral_ft import MistralForCausalLM
    from mistral_ft.model import CheckpointError

    folder = _saved_tiny(tmp_path)
    (folder / "model.safetensors").unlink()
    save_file({"tok_embeddings.weight": torch.zeros(2, 2)}, str(folder / "consolidated.safetensors"))
    with pytest.raises(CheckpointError, match="original-format weights.*convert_mistral_weights_to_hf.py"):
        MistralForCausalLM.from_pretrained(folder)


def test_rank_local_load_refuses_unknown_and_fp8_tensors(tmp_path):
    """The FSDP rank-local reader (its own safetensors parser) applies the same two rules."""
    from mistral_ft import MistralConfig, MistralForCausalLM
    from mistral_ft.distributed.rank_local import materialize_rank_local
    from mistral_ft.model import CheckpointError

    folder = _saved_tiny(tmp_path)

    def build():
        with torch.device("meta"):
            return MistralForCausalLM(MistralConfig.from_pretrained(folder))

    materialize_rank_local(build(), str(folder), torch.get_rng_state(), torch.device("cpu"))  # a clean load works
    _rewrite_weights(folder, lambda state: state.__setitem__("model.extra.weight", torch.zeros(3)))
    with pytest.raises(CheckpointError, match="tensor 'model.extra.weight' has no place"):
        materialize_rank_local(build(), str(folder), torch.get_rng_state(), torch.device("cpu"))
    _rewrite_weights(folder, lambda state: (state.pop("model.extra.weight"), _fp8(state)))
    with pytest.raises(CheckpointError, match="float8|quantization scale"):
        materialize_rank_local(build(), str(folder), torch.get_rng_state(), torch.device("cpu"))


def test_fields_of_current_release_configs_are_used_exactly():
    """Every field of the hub config.json of 7B-v0.3 / Nemo / Small-24B / Ministral-8B-style files is either one
    we compute (read into the config, equal to transformers' reading) or bookkeeping kept as is."""
    import transformers

    from mistral_ft import MistralConfig

    nemo = {"architectures": ["MistralForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 1, "eos_token_id": 2,
            "head_dim": 128, "hidden_act": "silu", "hidden_size": 5120, "initializer_range": 0.02,
            "intermediate_size": 14336, "max_position_embeddings": 1024000, "model_type": "mistral",
            "num_attention_heads": 32, "num_hidden_layers": 40, "num_key_value_heads": 8, "rms_norm_eps": 1e-05,
            "rope_theta": 1000000.0, "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
            "transformers_version": "4.43.0.dev0", "use_cache": True, "vocab_size": 131072}
    small_5x = {**nemo, "intermediate_size": 32768, "max_position_embeddings": 32768, "dtype": "bfloat16",
                "rope_parameters": {"rope_type": "default", "rope_theta": 100000000.0}, "pad_token_id": 11}
    small_5x.pop("rope_theta")
    small_5x.pop("torch_dtype")
    ministral = {**nemo, "model_type": "ministral", "num_hidden_layers": 4, "sliding_window": 32768,
                 "layer_types": ["sliding_attention", "full_attention"] * 2}
    for d in (nemo, small_5x, ministral):
        ours = MistralConfig.from_dict(d)
        cls = transformers.MinistralConfig if d["model_type"] == "ministral" else transformers.MistralConfig
        theirs = cls(**{k: v for k, v in d.items() if k != "model_type"})
        for key in ("head_dim", "hidden_size", "intermediate_size", "max_position_embeddings", "num_attention_heads",
                    "num_hidden_layers", "num_key_value_heads", "rms_norm_eps", "sliding_window", "vocab_size",
                    "tie_word_embeddings", "attention_dropout", "bos_token_id", "eos_token_id", "pad_token_id",
                    "use_cache"):
            assert getattr(ours, key) == getattr(theirs, key), (key, d["model_type"])
        assert ours.rope_theta == theirs.rope_parameters["rope_theta"] and ours.rope_scaling is None
        assert ours.torch_dtype == "bfloat16" and not ours.extra
        if d is ministral:
            assert ours.layer_windows == [32768, None, 32768, None] and ours.layer_types == theirs.layer_types
