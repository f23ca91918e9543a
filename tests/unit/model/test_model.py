"""Our model on its own: config I/O, checkpoint loading errors, dtypes, KV cache, packing, flash-attn mapping."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from conftest import TINY, make_ours, tiny_config
from mistral_ft import MistralConfig, MistralForCausalLM, MistralForSequenceClassification, MistralModel
from mistral_ft.model import CheckpointError, ConfigError, MistralCache
from mistral_ft.model.attention import varlen_segments
from mistral_ft.model.modeling import flash_attention


def _ids(B, T, seed=0):
    return torch.randint(1, TINY["vocab_size"], (B, T), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------ config
def test_config_defaults_are_mistral_7b():
    c = MistralConfig()
    assert (c.vocab_size, c.hidden_size, c.intermediate_size, c.num_hidden_layers) == (32000, 4096, 14336, 32)
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (32, 8, 128)
    assert (c.sliding_window, c.rope_theta, c.max_position_embeddings, c.rms_norm_eps) == (4096, 10000.0, 131072, 1e-6)
    assert (c.bos_token_id, c.eos_token_id, c.pad_token_id, c.tie_word_embeddings) == (1, 2, None, False)
    assert c.num_labels == 2 and c.id2label == {0: "LABEL_0", 1: "LABEL_1"}


def test_config_reads_both_spellings_writes_hub_style_keeps_unknown(tmp_path):
    v5 = {"model_type": "mistral", "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
          "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}, "dtype": "bfloat16",
          "my_custom_key": [1, 2], "id2label": {"0": "neg", "1": "pos"}}
    (tmp_path / "config.json").write_text(json.dumps(v5))
    c = MistralConfig.from_pretrained(tmp_path)
    assert c.rope_theta == 1e6 and c.torch_dtype == "bfloat16" and c.head_dim == 16
    assert c.id2label == {0: "neg", 1: "pos"} and c.label2id == {"neg": 0, "pos": 1} and c.num_labels == 2
    c.save_pretrained(tmp_path / "out")
    d = json.loads((tmp_path / "out" / "config.json").read_text())
    assert d["rope_theta"] == 1e6 and d["torch_dtype"] == "bfloat16" and d["my_custom_key"] == [1, 2]
    assert "rope_parameters" not in d and "dtype" not in d
    assert MistralConfig.from_pretrained(tmp_path / "out") == c


@pytest.mark.parametrize("key,value", [("hidden_size", "64"), ("sliding_window", 1.5), ("use_cache", "yes"),
                                       ("num_key_value_heads", 3)])
def test_config_wrong_types_name_file_key_value(tmp_path, key, value):
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 64, "num_attention_heads": 4,
                                                      "num_key_value_heads": 2, key: value}))
    with pytest.raises(ConfigError) as e:
        MistralConfig.from_pretrained(tmp_path)
    msg = str(e.value)
    assert str(tmp_path / "config.json") in msg and key in msg and str(value) in msg


def test_config_invalid_json_names_line(tmp_path):
    (tmp_path / "config.json").write_text('{\n "hidden_size": 64,\n oops\n}')
    with pytest.raises(ConfigError, match=r"config.json: line 3"):
        MistralConfig.from_pretrained(tmp_path)


# ------------------------------------------------------------------------------------------------ weights
def test_save_sharded_and_reload_exact(tmp_path):
    m = make_ours(MistralForCausalLM)
    m.save_pretrained(tmp_path, max_shard_size="50KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == ["MistralForCausalLM"]
    assert json.loads((tmp_path / "generation_config.json").read_text())["eos_token_id"] == TINY["eos_token_id"]
    r = MistralForCausalLM.from_pretrained(tmp_path)
    for (n, a), (_, b) in zip(m.state_dict().items(), r.state_dict().items()):
        assert torch.equal(a, b), n
    assert not any(p.is_meta for p in r.parameters())
    base = MistralModel.from_pretrained(tmp_path)  # the decoder alone from a full checkpoint
    x = _ids(1, 6)
    assert torch.allclose(base(x).last_hidden_state, m.model(x).last_hidden_state)


def test_missing_shard_is_named(tmp_path):
    make_ours(MistralForCausalLM).save_pretrained(tmp_path, max_shard_size="50KB")
    shard = sorted(tmp_path.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=shard.name):
        MistralForCausalLM.from_pretrained(tmp_path)


def test_wrong_shape_names_file_key_shapes(tmp_path):
    make_ours(MistralForCausalLM).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError) as e:
        MistralForCausalLM.from_pretrained(tmp_path)
    assert "model.safetensors" in str(e.value) and "mlp" in str(e.value) and "expects (32, 96)" in str(e.value)


def test_truncated_file_and_missing_tensor(tmp_path):
    make_ours(MistralForCausalLM).save_pretrained(tmp_path)
    f = tmp_path / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        MistralForCausalLM.from_pretrained(tmp_path)
    # a classifier checkpoint lacks lm_head: loading it as a causal LM must fail, not leave lm_head random
    make_ours(MistralForSequenceClassification).save_pretrained(tmp_path / "cls")
    with pytest.raises(CheckpointError, match="lm_head.weight"):
        MistralForCausalLM.from_pretrained(tmp_path / "cls")


def test_no_weights_pickle_only_and_offline_hub(tmp_path):
    tiny_config().save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        MistralForCausalLM.from_pretrained(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80")
    with pytest.raises(CheckpointError, match="no pickle"):
        MistralForCausalLM.from_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="local folder"):
        MistralForCausalLM.from_pretrained("mistralai/definitely-not-cached-here")


def test_classifier_from_base_checkpoint_gets_new_head(tmp_path):
    base = make_ours(MistralForCausalLM)
    base.save_pretrained(tmp_path)
    clf = MistralForSequenceClassification.from_pretrained(tmp_path, num_labels=3)
    assert clf.loading_info["initialised"] == ["score.weight"] and "lm_head.weight" in clf.loading_info["unexpected"]
    assert clf.score.weight.shape == (3, TINY["hidden_size"])
    assert torch.equal(clf.model.embed_tokens.weight, base.model.embed_tokens.weight)


def test_token_ids_out_of_vocab_are_named():
    m = make_ours(MistralForCausalLM)
    x = _ids(2, 5)
    x[1, 3] = TINY["vocab_size"]
    with pytest.raises(ValueError, match=r"input_ids\[1, 3\] = 128 is outside the vocabulary"):
        m(x)


def test_tied_embeddings_roundtrip(tmp_path):
    m = make_ours(MistralForCausalLM, tie_word_embeddings=True)
    assert m.lm_head.weight is m.model.embed_tokens.weight
    m.save_pretrained(tmp_path)
    r = MistralForCausalLM.from_pretrained(tmp_path)
    assert r.lm_head.weight is r.model.embed_tokens.weight
    x = _ids(1, 5)
    assert torch.allclose(r(x).logits, m(x).logits)


# ------------------------------------------------------------------------------------------------ dtypes
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_forward_is_finite_and_close(tmp_path, dtype):
    m = make_ours(MistralForCausalLM)
    m.save_pretrained(tmp_path)
    h = MistralForCausalLM.from_pretrained(tmp_path, torch_dtype=dtype)
    assert h.dtype == dtype
    x = _ids(2, 9)
    mask = torch.ones_like(x)
    mask[1, :4] = 0
    ref, out = m(x, attention_mask=mask).logits, h(x, attention_mask=mask).logits
    assert out.dtype == dtype and torch.isfinite(out).all()
    # measured on this config over 5 inputs (logits up to ~0.94): bf16 max error 7.1e-3..1.0e-2, fp16 8.2e-4..1.1e-3;
    # the bounds are ~2-3x the worst, so a half-precision bug (an fp32 path lost) fails them
    bound = {torch.bfloat16: 2.5e-2, torch.float16: 3e-3}[dtype]
    assert (out.float() - ref)[mask.bool()].abs().max() < bound
    h(x, labels=x).loss.backward()  # training works in half precision too


def test_flash_requested_without_package_is_a_clear_error():
    with pytest.raises(ImportError, match="flash-attn"):
        MistralForCausalLM(tiny_config(attn_implementation="flash_attention_2"))


# ------------------------------------------------------------------------------------------------ KV cache
@pytest.mark.parametrize("window", [5, None])
def test_cached_decoding_equals_full_forward(window):
    m = make_ours(MistralForCausalLM, sliding_window=window)
    x = _ids(2, 17)
    full = m(x, use_cache=False).logits
    out = m(x[:, :7], use_cache=True)  # prefill longer than the window
    cache = out.past_key_values
    steps = [out.logits]
    for t in range(7, 17):
        out = m(x[:, t:t + 1], past_key_values=cache, use_cache=True)
        steps.append(out.logits)
        if window is not None:
            assert all(k.shape[2] <= window for k in cache.keys)  # the rolling buffer never grows
    assert (torch.cat(steps, 1) - full).abs().max() < 1e-5
    # a multi-token chunk on top of a full ring buffer
    out = m(x[:, :12], use_cache=True)
    out2 = m(x[:, 12:], past_key_values=out.past_key_values, use_cache=True)
    assert (torch.cat([out.logits, out2.logits], 1) - full).abs().max() < 1e-5


def test_cached_decoding_left_padded():
    m = make_ours(MistralForCausalLM)
    x = _ids(2, 14)
    mask = torch.ones_like(x)
    mask[0, :5] = 0
    x[0, :5] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    full = m(x, attention_mask=mask, position_ids=pos).logits
    cache = MistralCache(TINY["num_hidden_layers"], TINY["sliding_window"])
    logits = []
    for t in range(14):  # one token at a time, HF-style growing attention mask
        o = m(x[:, t:t + 1], attention_mask=mask[:, :t + 1], position_ids=pos[:, t:t + 1], past_key_values=cache)
        logits.append(o.logits)
    got = torch.cat(logits, 1)
    assert (got - full)[mask.bool()].abs().max() < 1e-5


# ------------------------------------------------------------------------------------------------ packing
def test_packed_rows_equal_per_example_forwards():
    m = make_ours(MistralForCausalLM)
    docs = [_ids(1, n, seed=n)[0] for n in (4, 9, 3)]
    x = torch.cat(docs)[None]
    pos = torch.cat([torch.arange(len(d)) for d in docs])[None]
    doc = torch.cat([torch.full((len(d),), i) for i, d in enumerate(docs)])[None]
    packed = m(x, position_ids=pos, document_ids=doc).logits[0]
    alone = torch.cat([m(d[None]).logits[0] for d in docs])
    assert (packed - alone).abs().max() < 1e-5


# ------------------------------------------------------------------------------------------------ flash-attn mapping
def _standin_dense(q, k, v, dropout_p, softmax_scale, causal, window_size):
    """Plain-PyTorch stand-in with flash-attn's documented semantics: (B, T, h, hd) layout, GQA by head groups,
    causal + window_size=(left, right) meaning query i sees keys in [i - left, i + right] (-1 = unbounded)."""
    B, T, nh, hd = q.shape
    rep = nh // k.shape[2]
    k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
    i = torch.arange(T)[:, None]
    j = torch.arange(T)[None, :]
    ok = j <= i if causal else torch.ones(T, T, dtype=torch.bool)
    left, right = window_size
    if left >= 0:
        ok = ok & (j >= i - left)
    if right >= 0:
        ok = ok & (j <= i + right)
    s = torch.einsum("bihd,bjhd->bhij", q, k) * softmax_scale
    s = s.masked_fill(~ok, float("-inf"))
    return torch.einsum("bhij,bjhd->bihd", s.softmax(-1), v)


def _standin_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale,
                    causal, window_size):
    assert torch.equal(cu_seqlens_q, cu_seqlens_k) and cu_seqlens_q.dtype == torch.int32
    outs = []
    for a, b in zip(cu_seqlens_q[:-1].tolist(), cu_seqlens_q[1:].tolist()):
        assert b - a <= max_seqlen_q
        outs.append(_standin_dense(q[None, a:b], k[None, a:b], v[None, a:b], dropout_p, softmax_scale, causal,
                                   window_size)[0])
    return torch.cat(outs)


def test_flash_argument_mapping_matches_sdpa():
    """flash-attn itself cannot be installed here: this checks OUR mapping onto its API against a stand-in."""
    torch.manual_seed(0)
    B, nh, nkv, T, hd, W = 2, 4, 2, 11, 8, 4
    q, k, v = torch.randn(B, nh, T, hd), torch.randn(B, nkv, T, hd), torch.randn(B, nkv, T, hd)
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[1, 7:] = False  # right padding
    docs = torch.tensor([[0] * 5 + [1] * 6, [0] * 3 + [1] * 8])
    from mistral_ft.model.modeling import build_attention_mask

    idx = torch.arange(T)
    for key_valid, doc in [(None, None), (valid, None), (None, docs), (valid, docs)]:
        mask = build_attention_mask(idx, idx, W, key_valid, doc)
        mask = mask | ~mask.any(-1, keepdim=True)
        ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=hd ** -0.5, enable_gqa=True)
        cu, longest = varlen_segments(key_valid, doc) if key_valid is not None or doc is not None else (None, None)
        got = flash_attention(q, k, v, cu, longest, W, hd ** -0.5, 0.0, _standin_dense, _standin_varlen)
        rows = valid if key_valid is not None else torch.ones_like(valid)
        assert (got - ref).transpose(1, 2)[rows].abs().max() < 1e-5


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_chunked_loss_equals_plain_values_and_gradients(reduction):
    m = make_ours(MistralForCausalLM)
    x = _ids(2, 11)
    labels = x.clone()
    labels[0, :4] = -100
    grads = []
    for chunk in (None, 5):
        m.zero_grad()
        out = m(x, labels=labels, loss_reduction=reduction, loss_chunk_size=chunk, return_logits=chunk is None)
        assert (out.logits is None) == (chunk is not None)
        out.loss.backward()
        grads.append((out.loss.detach(), [p.grad.clone() for p in m.parameters()]))
    (l0, g0), (l1, g1) = grads
    assert abs(l0 - l1) < 1e-5 * max(1.0, abs(l0.item()))
    for a, b in zip(g0, g1):
        assert (a - b).abs().max() < 1e-6


@pytest.mark.parametrize("select", [True, False], ids=["selected(cpu)", "masked-in-chunks(cuda)"])
def test_chunked_loss_both_device_paths_mask_ignored_positions(select):
    """The CUDA path sends every position through the head and relies on the in-chunk ignore mask; run it on
    CPU too (select_targets=False) so a broken mask cannot hide behind the CPU's target selection."""
    from mistral_ft.model.modeling import causal_lm_loss, chunked_causal_lm_loss

    torch.manual_seed(0)
    head = torch.nn.Linear(TINY["hidden_size"], TINY["vocab_size"], bias=False)
    hidden = torch.randn(2, 9, TINY["hidden_size"], requires_grad=True)
    labels = torch.randint(0, TINY["vocab_size"], (2, 9))
    labels[0, :5] = -100  # an ignored run that spans chunk boundaries (chunk 4)
    labels[1, 6] = -100
    for reduction in ("mean", "sum"):
        ref = causal_lm_loss(head(hidden), labels, reduction)
        g_ref = torch.autograd.grad(ref, [hidden, head.weight])
        got = chunked_causal_lm_loss(hidden, head, labels, 4, reduction, select_targets=select)
        g_got = torch.autograd.grad(got, [hidden, head.weight])
        assert abs(got.item() - ref.item()) < 1e-5 * max(1.0, abs(ref.item()))
        for a, b in zip(g_ref, g_got):
            assert (a - b).abs().max() < 1e-6


_PEAK_SCRIPT = """
import resource, torch
from mistral_ft.model.modeling import chunked_causal_lm_loss
torch.manual_seed(0)
n, d, v = 512, 64, 32000
head = torch.nn.Linear(d, v, bias=False)
hidden = torch.randn(1, n, d, requires_grad=True)
labels = torch.randint(0, v, (1, n))
chunked_causal_lm_loss(hidden[:, :8], head, labels[:, :8], 8, "sum")  # first-call allocations
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
chunked_causal_lm_loss(hidden, head, labels, n, "sum").backward()
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before) / (n * v * 4))
"""


def test_fused_loss_holds_one_chunk_of_logits_at_a_time():
    """The fused loss's peak is one (chunk, V) fp32 buffer (+ grad_h, grad_W), not two: torch.logsumexp on the
    logits allocated a second one for its exp (the CLI's peak RSS on CPU). Peak RSS of a fresh process (64 MB
    buffer): 1.09 buffers with the in-place softmax, 1.93 with logsumexp."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[3])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT], capture_output=True, text=True, env=env, check=True)
    assert float(out.stdout.strip().splitlines()[-1]) < 1.5, out.stdout


def test_gradient_checkpointing_gives_same_gradients():
    m = make_ours(MistralForCausalLM).train()
    x = _ids(2, 9)
    grads = []
    for ckpt in (False, True):
        m.zero_grad()
        m.gradient_checkpointing_enable() if ckpt else m.gradient_checkpointing_disable()
        m(x, labels=x).loss.backward()
        grads.append([p.grad.clone() for p in m.parameters()])
    for a, b in zip(*grads):
        assert (a - b).abs().max() < 1e-6


def test_flex_attention_forward_matches_sdpa():
    """FlexAttention (the CUDA training path for packed/padded rows) has a forward on CPU: compare with SDPA."""
    m = make_ours(MistralForCausalLM)
    x = _ids(2, 40)
    mask = torch.ones_like(x)
    mask[1, 30:] = 0  # right padding
    doc = torch.cat([torch.zeros(2, 17, dtype=torch.long), torch.ones(2, 23, dtype=torch.long)], 1)
    pos = torch.cat([torch.arange(17), torch.arange(23)]).expand(2, -1)
    with torch.no_grad():
        m.config.attn_implementation = "sdpa"
        ref = m(x, attention_mask=mask, position_ids=pos, document_ids=doc).logits
        m.config.attn_implementation = "flex_attention"
        got = m(x, attention_mask=mask, position_ids=pos, document_ids=doc).logits
    assert (got - ref)[mask.bool()].abs().max() < 1e-5


def test_chunked_loss_with_wrapped_or_frozen_head_and_no_targets():
    import peft

    m = make_ours(MistralForCausalLM)
    x = _ids(2, 10)
    labels = x.clone()
    labels[:, :6] = -100
    ref = m(x, labels=labels).loss
    # peft wraps lm_head (modules_to_save): the checkpointed-chunk path
    pm = peft.get_peft_model(m, peft.LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    out = pm(input_ids=x, labels=labels, loss_chunk_size=3, return_logits=False)
    assert abs(out.loss.item() - ref.item()) < 1e-5
    out.loss.backward()
    head = pm.base_model.model.lm_head.modules_to_save["default"].weight
    assert head.grad is not None and head.grad.abs().sum() > 0
    # every target masked: NaN like transformers' mean, 0 as a sum
    none = torch.full_like(x, -100)
    assert torch.isnan(m(x, labels=none, loss_chunk_size=4).loss)
    assert m(x, labels=none, loss_chunk_size=4, loss_reduction="sum").loss.item() == 0.0


def test_rms_norm_upcasts_to_fp32_in_bf16_at_model_width():
    """At hidden 4096 a bf16 sum of squares loses bits that fp32 keeps: ours must equal transformers' RMSNorm
    bit for bit in bf16 (both upcast), and stay within bf16 rounding of an fp32 reference."""
    from transformers.models.mistral.modeling_mistral import MistralRMSNorm as HFRMSNorm

    from mistral_ft.model.modeling import MistralRMSNorm

    torch.manual_seed(0)
    x = (torch.randn(8, 4096) * 3 + 1).to(torch.bfloat16)
    w = torch.rand(4096) + 0.5
    ours, theirs = MistralRMSNorm(4096, eps=1e-5), HFRMSNorm(4096, eps=1e-5)
    with torch.no_grad():
        ours.weight.copy_(w)
        theirs.weight.copy_(w)
    ours, theirs = ours.to(torch.bfloat16), theirs.to(torch.bfloat16)
    with torch.no_grad():
        got = ours(x)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, theirs(x))
    xf = x.float()
    ref = w.to(torch.bfloat16) * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)).to(torch.bfloat16)
    assert torch.equal(got, ref)
