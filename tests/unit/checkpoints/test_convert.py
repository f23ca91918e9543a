"""The original-checkpoint converter and mha_to_gqa.

The converter is checked against an independent forward pass of the *original* layout written here: complex
(interleaved) rotary with torch.polar / view_as_complex, as the original reference code computes it, on random
weights for a tiny params.json. Our model loaded from the converted folder must give the same logits.
The window rule in the reference is the one in DESIGN.md (query i attends i - W < j <= i).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matrices: see conftest.one_thread


PARAMS = dict(dim=32, n_layers=2, head_dim=8, hidden_dim=48, n_heads=4, n_kv_heads=2, norm_eps=1e-5,
              sliding_window=6, vocab_size=32000, rope_theta=10000.0)


def _original_state(params: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    D, hd, nh, nkv, H = params["dim"], params["head_dim"], params["n_heads"], params["n_kv_heads"], params["hidden_dim"]

    def rnd(*shape, scale=0.2):
        return torch.randn(*shape, generator=g) * scale

    sd = {"tok_embeddings.weight": rnd(params["vocab_size"], D, scale=1.0), "norm.weight": 1 + rnd(D),
          "output.weight": rnd(params["vocab_size"], D)}
    for i in range(params["n_layers"]):
        p = f"layers.{i}."
        sd.update({p + "attention.wq.weight": rnd(nh * hd, D), p + "attention.wk.weight": rnd(nkv * hd, D),
                   p + "attention.wv.weight": rnd(nkv * hd, D), p + "attention.wo.weight": rnd(D, nh * hd),
                   p + "feed_forward.w1.weight": rnd(H, D), p + "feed_forward.w2.weight": rnd(D, H),
                   p + "feed_forward.w3.weight": rnd(H, D), p + "attention_norm.weight": 1 + rnd(D),
                   p + "ffn_norm.weight": 1 + rnd(D)})
    return sd


def _reference_logits(sd: dict[str, torch.Tensor], params: dict, tokens: torch.Tensor) -> torch.Tensor:
    """The original model on one sequence (T,): complex rotary on interleaved pairs, repeated kv heads."""
    T = tokens.shape[0]
    nh, nkv, hd, W = params["n_heads"], params["n_kv_heads"], params["head_dim"], params["sliding_window"]
    eps = params["norm_eps"]

    def rms(x, w):
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    freqs = 1.0 / (params["rope_theta"] ** (torch.arange(0, hd, 2).float() / hd))  # (hd/2,)
    angles = torch.outer(torch.arange(T).float(), freqs)  # (T, hd/2)
    cis = torch.polar(torch.ones_like(angles), angles)  # e^{i * pos * freq}

    def rotary(x):  # (T, heads, hd): consecutive pairs are (real, imaginary)
        xc = torch.view_as_complex(x.float().reshape(T, x.shape[1], hd // 2, 2))
        return torch.view_as_real(xc * cis[:, None, :]).reshape(T, x.shape[1], hd)

    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    allowed = (j <= i) & (j > i - W)
    h = sd["tok_embeddings.weight"][tokens]  # (T, D)
    for layer in range(params["n_layers"]):
        p = f"layers.{layer}."
        x = rms(h, sd[p + "attention_norm.weight"])
        q = rotary((x @ sd[p + "attention.wq.weight"].T).view(T, nh, hd))
        k = rotary((x @ sd[p + "attention.wk.weight"].T).view(T, nkv, hd))
        v = (x @ sd[p + "attention.wv.weight"].T).view(T, nkv, hd)
        k, v = k.repeat_interleave(nh // nkv, dim=1), v.repeat_interleave(nh // nkv, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(hd)
        scores = scores.masked_fill(~allowed, float("-inf"))
        att = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(T, nh * hd)
        h = h + att @ sd[p + "attention.wo.weight"].T
        x = rms(h, sd[p + "ffn_norm.weight"])
        ff = F.silu(x @ sd[p + "feed_forward.w1.weight"].T) * (x @ sd[p + "feed_forward.w3.weight"].T)
        h = h + ff @ sd[p + "feed_forward.w2.weight"].T
    return rms(h, sd["norm.weight"]) @ sd["output.weight"].T  # (T, V)


def _write_original(folder: Path, params: dict, sd: dict[str, torch.Tensor]) -> Path:
    from mistral_ft.tokenizer import default_tokenizer_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "params.json").write_text(json.dumps(params))
    torch.save(sd, folder / "consolidated.00.pth")
    (folder / "tokenizer.model").write_bytes(Path(default_tokenizer_file()).read_bytes())
    return folder


def test_converted_checkpoint_matches_original_reference(tmp_path):
    from mistral_ft import MistralForCausalLM
    from mistral_ft.checkpoints.convert import convert_checkpoint
    from mistral_ft.tokenizer import MistralTokenizer

    sd = _original_state(PARAMS)
    src = _write_original(tmp_path / "orig", PARAMS, sd)
    out = convert_checkpoint(src, tmp_path / "hf", max_shard_size="1MB")  # sharded output + index
    assert (out / "model.safetensors.index.json").is_file()
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["MistralForCausalLM"]
    assert (cfg["hidden_size"], cfg["num_key_value_heads"], cfg["head_dim"], cfg["sliding_window"]) == (32, 2, 8, 6)
    assert cfg["pad_token_id"] == 0 and cfg["torch_dtype"] == "float32"
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 2
    model = MistralForCausalLM.from_pretrained(out)
    tokens = torch.randint(3, PARAMS["vocab_size"], (13,), generator=torch.Generator().manual_seed(1))  # T > W
    ref = _reference_logits(sd, PARAMS, tokens)
    ours = model(tokens[None]).logits[0]
    assert (ours - ref).abs().max().item() < 1e-4  # fails without the q/k row permutation (checked)
    tok = MistralTokenizer.from_pretrained(out)
    assert tok.encode("Hello world") == MistralTokenizer.from_pretrained(None).encode("Hello world")


def test_transformers_loads_the_converted_folder(tmp_path):
    import transformers

    from mistral_ft.checkpoints.convert import convert_checkpoint

    sd = _original_state(PARAMS, seed=2)
    out = convert_checkpoint(_write_original(tmp_path / "orig", PARAMS, sd), tmp_path / "hf", dtype="bfloat16")
    theirs = transformers.MistralForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tokens = torch.randint(3, PARAMS["vocab_size"], (5,), generator=torch.Generator().manual_seed(3))
    ref = _reference_logits({k: v.bfloat16().float() for k, v in sd.items()}, PARAMS, tokens)
    assert (theirs(tokens[None]).logits[0] - ref).abs().max().item() < 1e-4


def test_missing_key_unknown_field_and_size_mismatch_are_clear_errors(tmp_path):
    from mistral_ft.checkpoints.convert import ConversionError, convert_checkpoint
    from mistral_ft.convert import main

    sd = _original_state(PARAMS)
    del sd["layers.1.feed_forward.w3.weight"]
    src = _write_original(tmp_path / "a", PARAMS, sd)
    with pytest.raises(ConversionError, match=r"missing 1 tensor.*layers\.1\.feed_forward\.w3\.weight"):
        convert_checkpoint(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()

    src = _write_original(tmp_path / "b", {**PARAMS, "moe": {"num_experts": 8}}, _original_state(PARAMS))
    with pytest.raises(ConversionError, match=r"params\.json: field 'moe' is not supported: a mixture-of-experts"):
        convert_checkpoint(src, tmp_path / "out")

    src = _write_original(tmp_path / "c", PARAMS, _original_state(PARAMS))
    with pytest.raises(ConversionError, match="field 'dim' is 32, but --model_size 7B has dim=4096"):
        convert_checkpoint(src, tmp_path / "out", model_size="7B")

    bad = _original_state(PARAMS)
    bad["layers.0.attention.wk.weight"] = bad["layers.0.attention.wq.weight"]  # MHA-sized k with n_kv_heads=2
    src = _write_original(tmp_path / "d", PARAMS, bad)
    with pytest.raises(ConversionError, match=r"'layers\.0\.attention\.wk\.weight' has shape \(32, 32\).*\(16, 32\)"):
        convert_checkpoint(src, tmp_path / "out")

    params = dict(PARAMS)
    del params["n_heads"]
    src = _write_original(tmp_path / "e", params, _original_state(PARAMS))
    assert main(["--input_dir", str(src), "--output_dir", str(tmp_path / "out")]) == 2  # CLI: message, no traceback


def test_script_runs_as_the_seed_documents(tmp_path, monkeypatch, capsys):
    """scripts/convert_mistral_weights_to_hf.py with the seed's arguments (run in-process: no 5 s interpreter start)."""
    import runpy

    sd = _original_state(PARAMS)
    src = _write_original(tmp_path / "orig", PARAMS, sd)
    script = Path(__file__).resolve().parents[3] / "scripts" / "convert_mistral_weights_to_hf.py"
    monkeypatch.setattr(sys, "argv", [str(script), "--input_dir", str(src), "--output_dir", str(tmp_path / "hf"),
                                      "--model_size", "7B"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(script), run_name="__main__")
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("error: ") and "Traceback" not in err
    assert "--model_size 7B" in err
    monkeypatch.setattr(sys, "argv", [str(script), "--input_dir", str(src), "--output_dir", str(tmp_path / "hf")])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(script), run_name="__main__")
    assert exit_info.value.code == 0 and (tmp_path / "hf" / "model.safetensors").is_file()


def test_mha_to_gqa_shapes_and_exact_for_identical_heads():
    from conftest import make_ours

    from mistral_ft import MistralForCausalLM
    from mistral_ft.checkpoints.convert import mha_to_gqa

    w = torch.randn(4 * 8, 32)
    assert mha_to_gqa(w, 4, 2).shape == (2 * 8, 32)
    assert mha_to_gqa(w, 4, 1).shape == (8, 32)
    assert torch.allclose(mha_to_gqa(w, 4, 2)[:8], w[:16].view(2, 8, 32).mean(0))
    with pytest.raises(ValueError, match="must divide"):
        mha_to_gqa(w, 4, 3)

    mha = make_ours(MistralForCausalLM, num_key_value_heads=4)
    gqa = make_ours(MistralForCausalLM, num_key_value_heads=2)
    state = mha.state_dict()
    hd = mha.config.head_dim
    for name in list(state):
        if name.endswith(("k_proj.weight", "v_proj.weight")):  # make heads 2g and 2g+1 identical
            heads = state[name].view(4, hd, -1).clone()
            heads[1::2] = heads[0::2]
            state[name] = heads.reshape(4 * hd, -1)
    mha.load_state_dict(state)
    converted = mha_to_gqa(state, 4, 2)
    assert converted["model.layers.0.self_attn.k_proj.weight"].shape == (2 * hd, mha.config.hidden_size)
    assert converted["model.layers.0.self_attn.q_proj.weight"] is state["model.layers.0.self_attn.q_proj.weight"]
    gqa.load_state_dict(converted)
    x = torch.randint(1, 128, (2, 9))
    assert (gqa(x).logits - mha(x).logits).abs().max().item() < 1e-5


def test_converter_refuses_a_non_empty_output_folder_and_replaces_it_whole_with_overwrite(tmp_path, capsys):
    from mistral_ft.convert import main

    orig = _write_original(tmp_path / "orig", PARAMS, _original_state(PARAMS, seed=4))
    out = tmp_path / "hf"
    out.mkdir()
    (out / "config.json").write_text("{\"mine\": true}")
    assert main(["--input_dir", str(orig), "--output_dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"--output_dir {out}: already exists and is not empty" in err and "--overwrite" in err
    assert "Traceback" not in err and [p.name for p in out.iterdir()] == ["config.json"]
    assert (out / "config.json").read_text() == "{\"mine\": true}"  # not overwritten
    assert main(["--input_dir", str(orig), "--output_dir", str(out), "--overwrite"]) == 0
    assert "mine" not in (out / "config.json").read_text() and (out / "model.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "orig"]  # no temporary folder left
