"""The converter on today's original release layouts (tiny random weights, the tokenizer files mistral_common ships).

v0.3 layout: ``consolidated.safetensors`` + ``params.json`` (head_dim, rope_theta 1e6, no window, no max_seq_len)
+ ``tokenizer.model.v3``. Nemo layout: the same with ``tekken.json``, vocab 131072 and head_dim != dim / n_heads.
Each converted folder is checked against a reference forward written here on the *original*, un-permuted weights
(complex rotary on interleaved pairs, as the reference code computes it), through our model and through
transformers, so a wrong q/k permutation, a lost head_dim or rope_theta cannot pass.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

pytestmark = pytest.mark.usefixtures("one_thread")

ATOL = 1e-5
V03 = dict(dim=32, n_layers=2, head_dim=8, hidden_dim=48, n_heads=4, n_kv_heads=2, norm_eps=1e-5,
           vocab_size=32768, rope_theta=1e6)
NEMO = dict(dim=32, n_layers=2, head_dim=16, hidden_dim=40, n_heads=4, n_kv_heads=1, norm_eps=1e-5,
            vocab_size=131072, rope_theta=1e6)


def _data_file(name: str) -> Path:
    import mistral_common

    return Path(mistral_common.__file__).parent / "data" / name


def _original_state(params: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    D, hd, nh, nkv, H = params["dim"], params["head_dim"], params["n_heads"], params["n_kv_heads"], params["hidden_dim"]

    def rnd(*shape, scale=0.2):
        return (torch.randn(*shape, generator=g) * scale).to(torch.bfloat16)

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
    """The original model on one sequence (T,), fp32: complex rotary on interleaved pairs, repeated kv heads,
    full causal attention (these releases have no window)."""
    sd = {k: v.float() for k, v in sd.items()}
    T = tokens.shape[0]
    nh, nkv, hd, eps = params["n_heads"], params["n_kv_heads"], params["head_dim"], params["norm_eps"]

    def rms(x, w):
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    freqs = 1.0 / (params["rope_theta"] ** (torch.arange(0, hd, 2).float() / hd))  # (hd/2,)
    cis = torch.polar(torch.ones(T, hd // 2), torch.outer(torch.arange(T).float(), freqs))  # (T, hd/2)

    def rotary(x):  # (T, heads, hd): consecutive pairs are (real, imaginary)
        xc = torch.view_as_complex(x.reshape(T, x.shape[1], hd // 2, 2))
        return torch.view_as_real(xc * cis[:, None]).reshape(T, x.shape[1], hd)

    causal = torch.ones(T, T, dtype=torch.bool).tril()
    h = sd["tok_embeddings.weight"][tokens]  # (T, D)
    for i in range(params["n_layers"]):
        p = f"layers.{i}."
        x = rms(h, sd[p + "attention_norm.weight"])
        q = rotary((x @ sd[p + "attention.wq.weight"].T).view(T, nh, hd))
        k = rotary((x @ sd[p + "attention.wk.weight"].T).view(T, nkv, hd))
        v = (x @ sd[p + "attention.wv.weight"].T).view(T, nkv, hd)
        k, v = k.repeat_interleave(nh // nkv, 1), v.repeat_interleave(nh // nkv, 1)
        scores = torch.einsum("thd,shd->hts", q, k) / hd ** 0.5
        att = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        h = h + torch.einsum("hts,shd->thd", att, v).reshape(T, nh * hd) @ sd[p + "attention.wo.weight"].T
        x = rms(h, sd[p + "ffn_norm.weight"])
        h = h + (F.silu(x @ sd[p + "feed_forward.w1.weight"].T) * (x @ sd[p + "feed_forward.w3.weight"].T)) \
            @ sd[p + "feed_forward.w2.weight"].T
    return rms(h, sd["norm.weight"]) @ sd["output.weight"].T


def _write_release(folder: Path, params: dict, sd: dict, tokenizer: str, as_name: str, shards: int = 0) -> Path:
    folder.mkdir(parents=True)
    (folder / "params.json").write_text(json.dumps(params))
    (folder / as_name).write_bytes(_data_file(tokenizer).read_bytes())
    if not shards:
        save_file(sd, str(folder / "consolidated.safetensors"))
        return folder
    keys = list(sd)
    for i in range(shards):
        part = {k: sd[k] for k in keys[i::shards]}
        save_file(part, str(folder / f"consolidated-{i + 1:05d}-of-{shards:05d}.safetensors"))
    return folder


LAYOUTS = {
    "v0.3": (V03, "mistral_instruct_tokenizer_240323.model.v3", "tokenizer.model.v3", 32768),
    "nemo": (NEMO, "tekken_240718.json", "tekken.json", 1024000),
}


@pytest.mark.parametrize("shards", [0, 3])
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_release_layout_matches_reference_forward(tmp_path, layout, shards):
    import transformers

    from mistral_ft import MistralForCausalLM
    from mistral_ft.convert import main

    params, tok_src, tok_name, max_pos = LAYOUTS[layout]
    sd = _original_state(params, seed=len(layout))
    src = _write_release(tmp_path / "orig", params, sd, tok_src, tok_name, shards)
    out = tmp_path / "hf"
    assert main(["--input_dir", str(src), "--output_dir", str(out), "--dtype", "float32",
                 "--max_position_embeddings", str(max_pos), "--max_shard_size", "1MB"]) == 0
    assert (out / tok_name).read_bytes() == (src / tok_name).read_bytes()  # copied as it came
    # written through the tokenizer entry point, as export writes it: transformers' AutoTokenizer reads it with
    # mistral_common (tokenizer_config.json), and the chat ids equal ours
    from mistral_ft.tokenizer import MistralTokenizer

    chat = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"}]
    our_ids, _ = MistralTokenizer.from_pretrained(out).encode_chat(chat)
    hf_tok = transformers.AutoTokenizer.from_pretrained(out, mode="finetuning")
    assert type(hf_tok).__name__ == "MistralCommonBackend"
    hf_ids = hf_tok.apply_chat_template(chat, tokenize=True)
    assert list(getattr(hf_ids, "input_ids", hf_ids)) == list(our_ids)
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["head_dim"], cfg["rope_theta"], cfg["sliding_window"], cfg["max_position_embeddings"],
            cfg["vocab_size"]) == (params["head_dim"], 1e6, None, max_pos, params["vocab_size"])
    assert cfg["pad_token_id"] != cfg["eos_token_id"]
    tokens = torch.randint(0, params["vocab_size"], (11,), generator=torch.Generator().manual_seed(1))
    ref = _reference_logits(sd, params, tokens)
    ours = MistralForCausalLM.from_pretrained(out)(tokens[None]).logits[0]
    theirs = transformers.MistralForCausalLM.from_pretrained(out, dtype=torch.float32)(tokens[None]).logits[0]
    d_ours, d_theirs = (ours - ref).abs().max().item(), (theirs - ref).abs().max().item()
    assert d_ours < ATOL and d_theirs < ATOL, (d_ours, d_theirs)


def test_without_permutation_the_reference_disagrees(tmp_path):
    """The check above can fail: the same weights loaded un-permuted give other logits."""
    from mistral_ft import MistralConfig, MistralForCausalLM
    from mistral_ft.checkpoints.convert import convert_state_dict, read_params

    sd = _original_state(NEMO)
    (tmp_path / "params.json").write_text(json.dumps(NEMO))
    config = read_params(tmp_path / "params.json", max_position_embeddings=4096)
    model = MistralForCausalLM(config).eval()
    state = convert_state_dict(dict(sd), config, torch.float32)
    for key in [k for k in state if k.endswith(("q_proj.weight", "k_proj.weight"))]:
        i, kind = key.split(".")[2], "wq" if "q_proj" in key else "wk"
        state[key] = sd[f"layers.{i}.attention.{kind}.weight"].float()
    model.load_state_dict(state)
    tokens = torch.arange(1, 12)
    assert (model(tokens[None]).logits[0] - _reference_logits(sd, NEMO, tokens)).abs().max() > 1e-3
    assert isinstance(config, MistralConfig) and config.head_dim * config.num_attention_heads != config.hidden_size


def test_harmless_params_fields_accepted_and_numeric_ones_refused(tmp_path):
    from mistral_ft.checkpoints.convert import ConversionError, read_params

    path = tmp_path / "params.json"
    path.write_text(json.dumps({**V03, "model_type": "transformer", "max_batch_size": 1, "max_seq_len": 32768}))
    config = read_params(path)
    assert config.max_position_embeddings == 32768 and "model_type" not in config.extra
    for extra, match in [({"model_type": "mamba"}, "field 'model_type' is 'mamba'"),
                         ({"moe": {"num_experts": 8}}, "field 'moe' is not supported: a mixture-of-experts"),
                         ({"vision_encoder": {}}, "field 'vision_encoder' is not supported"),
                         ({"lora": {"rank": 8}}, "field 'lora' is not supported"),
                         ({"quantization": {"qformat_weight": "fp8_e4m3"}}, "field 'quantization' is not supp"),
                         ({"yarn": {"factor": 4}}, "field 'yarn' is not supported"),
                         ({"tied_embeddings": True}, "field 'tied_embeddings' is True"),
                         ({"something_new": 1}, r"unknown field\(s\) \['something_new'\]")]:
        path.write_text(json.dumps({**V03, "max_seq_len": 4096, **extra}))
        with pytest.raises(ConversionError, match=match):
            read_params(path)


def test_release_errors_are_clear_and_write_nothing(tmp_path, capsys):
    from mistral_ft.convert import main

    sd = _original_state(V03)
    src = _write_release(tmp_path / "a", V03, sd, "mistral_instruct_tokenizer_240323.model.v3", "tokenizer.model.v3")
    out = tmp_path / "out"
    # no max_seq_len in params.json and no option: the context length cannot be guessed
    assert main(["--input_dir", str(src), "--output_dir", str(out)]) == 2
    # a v3 tokenizer beside a Nemo-sized vocabulary
    nemo = _write_release(tmp_path / "b", {**V03, "vocab_size": 131072}, _original_state({**V03, "vocab_size": 131072}),
                          "mistral_instruct_tokenizer_240323.model.v3", "tokenizer.model.v3")
    assert main(["--input_dir", str(nemo), "--output_dir", str(out), "--max_position_embeddings", "64"]) == 2
    # two tokenizer files
    (src / "tekken.json").write_bytes(_data_file("tekken_240718.json").read_bytes())
    assert main(["--input_dir", str(src), "--output_dir", str(out), "--max_position_embeddings", "64"]) == 2
    (src / "tekken.json").unlink()
    # an incomplete shard set
    shard = _write_release(tmp_path / "c", V03, sd, "mistral_instruct_tokenizer_240323.model.v3",
                           "tokenizer.model.v3", shards=3)
    (shard / "consolidated-00002-of-00003.safetensors").unlink()
    assert main(["--input_dir", str(shard), "--output_dir", str(out), "--max_position_embeddings", "64"]) == 2
    # an FP8 release: scale tensors beside the weights
    fp8 = {**sd, "layers.0.attention.wq.qscale_weight": torch.ones(1)}
    f = _write_release(tmp_path / "d", V03, fp8, "mistral_instruct_tokenizer_240323.model.v3", "tokenizer.model.v3")
    assert main(["--input_dir", str(f), "--output_dir", str(out), "--max_position_embeddings", "64"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 5 and all(line.startswith("error: ") for line in err), err
    assert "no 'max_seq_len' field; pass --max_position_embeddings" in err[0]
    assert "tokenizer.model.v3: the tokenizer has 32768 tokens, but params.json says vocab_size=131072" in err[1]
    assert "several tokenizer files ['tekken.json', 'tokenizer.model.v3']" in err[2]
    assert "consolidated-00002-of-00003.safetensors" in err[3]
    assert "unexpected tensor(s) ['layers.0.attention.wq.qscale_weight']" in err[4]
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp")]


def test_fp8_dtype_refused(tmp_path):
    from mistral_ft.checkpoints.convert import ConversionError, convert_checkpoint
    from mistral_ft.model import CheckpointError

    sd = _original_state(V03)
    sd["layers.1.feed_forward.w1.weight"] = sd["layers.1.feed_forward.w1.weight"].to(torch.float8_e4m3fn)
    src = _write_release(tmp_path / "a", V03, sd, "mistral_instruct_tokenizer_240323.model.v3", "tokenizer.model.v3")
    with pytest.raises((ConversionError, CheckpointError), match="layers.1.feed_forward.w1.weight' is stored as float8"):
        convert_checkpoint(src, tmp_path / "out", max_position_embeddings=64)
    assert not (tmp_path / "out").exists()
