"""Original Mistral checkpoints (``consolidated.00.pth`` + ``params.json`` + ``tokenizer.model``) -> HF folder.

The original release (mistral-inference, the tarballs linked from the seed page) names tensors after the
reference code and stores the rotary dimensions of q/k *interleaved*: each head's rows pair up as (0, 1), (2, 3),
... and are rotated as complex numbers. Our model (and transformers) use the ``rotate_half`` layout, pairing row i
with row i + hd/2. Converting is a renaming plus one row permutation of ``wq``/``wk`` per head::

    original rows of one head (hd = 8):  r0 i0 r1 i1 r2 i2 r3 i3      (real/imaginary parts interleaved)
    HF rows:                             r0 r1 r2 r3 i0 i1 i2 i3      view(nh, hd/2, 2, D).transpose(1, 2)

Since q·k only sums over matching rows, permuting q and k the same way leaves attention unchanged; the
permutation just makes ``rotate_half`` see the pairs the complex rotation used (tests/test_convert.py checks the
logits against an independent complex-rotary reference forward).

Memory: the checkpoint is memory-mapped (``torch.load(mmap=True, weights_only=True)``) and converted tensor by
tensor, each source entry dropped as soon as it is converted, so only the output copy is ever held.

Also here: :func:`mha_to_gqa`, the seed's recipe for turning a multi-head checkpoint into a grouped-query one.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from mistral_ft.model.config import MistralConfig, read_json_object
from mistral_ft.errors import ConversionError
from mistral_ft.model.weights import resolve_dtype

# params.json key -> (required, accepted types)
PARAMS_FIELDS: dict[str, tuple[bool, tuple[type, ...]]] = {
    "dim": (True, (int,)),
    "n_layers": (True, (int,)),
    "hidden_dim": (True, (int,)),
    "n_heads": (True, (int,)),
    "norm_eps": (True, (float, int)),
    "vocab_size": (True, (int,)),
    "head_dim": (False, (int,)),
    "n_kv_heads": (False, (int,)),
    "sliding_window": (False, (int, type(None))),
    "rope_theta": (False, (float, int)),
    "max_seq_len": (False, (int,)),
    "max_position_embeddings": (False, (int,)),
}
# What `--model_size` may say, and the shape it implies (the original release: Mistral-7B-v0.1 / -Instruct-v0.1).
MODEL_SIZES: dict[str, dict[str, int]] = {"7B": {"dim": 4096, "n_layers": 32, "n_heads": 32}}
# Mistral-7B-v0.1 was trained with 8k context and a 4k window; transformers' converter writes 4096 * 8.
DEFAULT_MAX_POSITIONS = 4096 * 8
CHECKPOINT_NAME = "consolidated.00.pth"


def read_params(path: str | os.PathLike, model_size: str | None = None) -> MistralConfig:
    """``params.json`` -> :class:`MistralConfig` (HF field names), refusing keys it does not know."""
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"{path}: params.json not found")
    params = read_json_object(path, ConversionError)
    unknown = sorted(set(params) - set(PARAMS_FIELDS))
    if unknown:
        raise ConversionError(
            f"{path}: unknown field(s) {unknown}; this converter handles the dense Mistral-7B layout "
            f"(known fields: {sorted(PARAMS_FIELDS)}). A checkpoint with e.g. 'moe' or 'vision_encoder' is "
            f"another architecture.")
    for key, (required, types) in PARAMS_FIELDS.items():
        if key not in params:
            if required:
                raise ConversionError(f"{path}: required field '{key}' is missing")
            continue
        value = params[key]
        if isinstance(value, bool) or not isinstance(value, types):
            raise ConversionError(f"{path}: field '{key}' has the wrong type: {value!r}")
    if model_size is not None:
        if model_size not in MODEL_SIZES:
            raise ConversionError(f"--model_size {model_size!r} is not supported; use one of {sorted(MODEL_SIZES)}")
        for key, expected in MODEL_SIZES[model_size].items():
            if params[key] != expected:
                raise ConversionError(f"{path}: field '{key}' is {params[key]}, but --model_size {model_size} has "
                                      f"{key}={expected}; check --input_dir, or leave out --model_size")
    n_heads = params["n_heads"]
    max_pos = params.get("max_position_embeddings", params.get("max_seq_len", DEFAULT_MAX_POSITIONS))
    try:
        return MistralConfig(
            _source=str(path),
            vocab_size=params["vocab_size"], hidden_size=params["dim"], intermediate_size=params["hidden_dim"],
            num_hidden_layers=params["n_layers"], num_attention_heads=n_heads,
            num_key_value_heads=params.get("n_kv_heads", n_heads),
            head_dim=params.get("head_dim", params["dim"] // n_heads),
            rms_norm_eps=float(params["norm_eps"]), rope_theta=float(params.get("rope_theta", 10000.0)),
            sliding_window=params.get("sliding_window"), max_position_embeddings=max_pos,
            tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        )
    except ValueError as e:  # ConfigError names the HF key; say which file it came from
        raise ConversionError(f"{path}: {e}") from None


def interleaved_to_rotate_half(w: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    """Permute the rows of an original wq/wk (interleaved rotary pairs) into HF's rotate_half layout."""
    dim_in = w.shape[1]
    return w.view(n_heads, head_dim // 2, 2, dim_in).transpose(1, 2).reshape(n_heads * head_dim, dim_in)


def original_to_hf_names(num_layers: int) -> dict[str, str]:
    """Original tensor name -> HF name (w1 = gate, w2 = down, w3 = up)."""
    names = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
             "output.weight": "lm_head.weight"}
    per_layer = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj",
                 "attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj",
                 "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2": "mlp.down_proj",
                 "feed_forward.w3": "mlp.up_proj", "attention_norm": "input_layernorm",
                 "ffn_norm": "post_attention_layernorm"}
    for i in range(num_layers):
        for old, new in per_layer.items():
            names[f"layers.{i}.{old}.weight"] = f"model.layers.{i}.{new}.weight"
    return names


def _expected_shapes(config: MistralConfig) -> dict[str, tuple[int, ...]]:
    """HF name -> shape, from a model built on the meta device (no memory), so shapes follow modeling.py."""
    from mistral_ft.model.modeling import MistralForCausalLM

    with torch.device("meta"):
        model = MistralForCausalLM(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def convert_state_dict(source: dict[str, torch.Tensor], config: MistralConfig, dtype: torch.dtype | None = None,
                       where: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Rename and permute an original state dict into HF names; entries are popped from ``source`` as they go."""
    names = original_to_hf_names(config.num_hidden_layers)
    missing = sorted(set(names) - set(source), key=_natural)
    if missing:
        raise ConversionError(f"{where}: missing {len(missing)} tensor(s) that params.json implies: "
                              f"{missing[:8]}{' ...' if len(missing) > 8 else ''}")
    unexpected = sorted(set(source) - set(names), key=_natural)
    if unexpected:
        raise ConversionError(f"{where}: unexpected tensor(s) {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}"
                              f" (not part of the dense Mistral layout that params.json describes)")
    shapes = _expected_shapes(config)
    hd = config.head_dim
    out: dict[str, torch.Tensor] = {}
    for old, new in names.items():
        t = source.pop(old)
        if tuple(t.shape) != shapes[new]:
            raise ConversionError(f"{where}: tensor '{old}' has shape {tuple(t.shape)}, but params.json implies "
                                  f"{shapes[new]}")
        if old.endswith("attention.wq.weight"):
            t = interleaved_to_rotate_half(t, config.num_attention_heads, hd)
        elif old.endswith("attention.wk.weight"):
            t = interleaved_to_rotate_half(t, config.num_key_value_heads, hd)
        if dtype is not None and t.dtype != dtype:
            t = t.to(dtype)
        out[new] = t
    return out


def _natural(name: str) -> list:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def convert_checkpoint(input_dir: str | os.PathLike, output_dir: str | os.PathLike, model_size: str | None = None,
                       dtype: str | torch.dtype | None = None, max_shard_size: str | int = "5GB") -> Path:
    """Convert an original Mistral folder into an HF folder our ``from_pretrained`` (and transformers) load.

    Writes model safetensors (+ index when sharded), config.json, generation_config.json and the tokenizer
    files. ``dtype`` None keeps the checkpoint's dtype (bfloat16 for the released 7B).
    """
    from mistral_ft.model.modeling import MistralForCausalLM
    from mistral_ft.tokenizer import MistralTokenizer

    input_dir, output_dir = Path(input_dir), Path(output_dir)
    if not input_dir.is_dir():
        raise ConversionError(f"--input_dir {input_dir}: no such folder")
    config = read_params(input_dir / "params.json", model_size)
    shards = sorted(p.name for p in input_dir.glob("consolidated.*.pth"))
    if not shards:
        found = sorted(p.name for p in input_dir.iterdir())
        raise ConversionError(f"{input_dir}: no {CHECKPOINT_NAME} found (found: {found})")
    if shards != [CHECKPOINT_NAME]:
        raise ConversionError(f"{input_dir}: model-parallel shards {shards} are not supported; the 7B release has "
                              f"one {CHECKPOINT_NAME}")
    tok_file = input_dir / "tokenizer.model"
    if not tok_file.is_file():
        raise ConversionError(f"{input_dir}: tokenizer.model not found (the original release ships it next to "
                              f"params.json)")
    tokenizer = MistralTokenizer.from_pretrained(tok_file)
    if tokenizer.vocab_size != config.vocab_size:
        raise ConversionError(f"{tok_file}: the tokenizer has {tokenizer.vocab_size} pieces, but params.json says "
                              f"vocab_size={config.vocab_size}")
    ckpt = input_dir / CHECKPOINT_NAME
    try:
        source = torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # pickle with code in it, truncated file, not a zip checkpoint, ...
        raise ConversionError(f"{ckpt}: cannot be read as a weights-only torch checkpoint "
                              f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    if not isinstance(source, dict) or not all(isinstance(v, torch.Tensor) for v in source.values()):
        raise ConversionError(f"{ckpt}: expected a dict of tensors (a state dict), got {type(source).__name__}")
    target_dtype = None if dtype is None else resolve_dtype(dtype)
    state = convert_state_dict(source, config, target_dtype, where=str(ckpt))
    del source
    config.torch_dtype = str(next(iter(state.values())).dtype).removeprefix("torch.")
    with torch.device("meta"):
        shell = MistralForCausalLM(config)  # only its config and class name are used by save_pretrained
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    shell.save_pretrained(output_dir, max_shard_size=max_shard_size, state_dict=state)
    del state
    tokenizer.save_pretrained(output_dir)
    return output_dir


def mha_to_gqa(weights: dict[str, torch.Tensor] | torch.Tensor, num_heads: int, num_kv_heads: int
               ) -> dict[str, torch.Tensor] | torch.Tensor:
    """Grouped key/value heads from a multi-head checkpoint by mean-pooling each group (GQA paper, sec. 2.2).

    https://arxiv.org/abs/2305.13245 : query head h uses key/value head h // (num_heads / num_kv_heads), so
    group g averages heads g*r .. g*r + r - 1 (r = num_heads / num_kv_heads). This is an *approximation*: the
    model's outputs change unless the heads of a group were already identical, and the paper recovers quality
    with additional training ("uptraining", ~5% of pre-training). Fine-tune after converting.

    ``weights``: a key or value projection weight (num_heads * hd, D), or a state dict in which every
    ``k_proj``/``v_proj`` (HF) or ``wk``/``wv`` (original) weight is converted; other entries are passed through.
    Works in either rotary layout: the permutation is the same inside every head.
    """
    if num_heads % num_kv_heads:
        raise ValueError(f"mha_to_gqa: num_kv_heads ({num_kv_heads}) must divide num_heads ({num_heads})")
    if isinstance(weights, dict):
        pattern = re.compile(r"(\.|^)(k_proj|v_proj|wk|wv)\.weight$")
        return {k: mha_to_gqa(v, num_heads, num_kv_heads) if pattern.search(k) else v for k, v in weights.items()}
    rows, dim_in = weights.shape
    if rows % num_heads:
        raise ValueError(f"mha_to_gqa: a weight of {rows} rows cannot hold {num_heads} heads")
    hd = rows // num_heads
    grouped = weights.view(num_kv_heads, num_heads // num_kv_heads, hd, dim_in)
    return grouped.float().mean(dim=1).to(weights.dtype).reshape(num_kv_heads * hd, dim_in)


__all__ = ["ConversionError", "convert_checkpoint", "convert_state_dict", "interleaved_to_rotate_half",
           "mha_to_gqa", "read_params"]
