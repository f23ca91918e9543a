"""Original Mistral checkpoints (``params.json`` + weights + tokenizer file) -> HF folder.

Layouts read (every release since 7B-v0.1):
  * weights: ``consolidated.safetensors`` or its shards ``consolidated-0000N-of-0000M.safetensors`` (7B-v0.3,
    Nemo, Small, every release since), else ``consolidated.00.pth`` (7B-v0.1, read with weights_only=True);
  * tokenizer: ``tokenizer.model`` (v1), ``tokenizer.model.vN`` (v3: 7B-v0.3, Codestral) or ``tekken.json``
    (Nemo, Small-24B), copied as it came, under its own name;
  * params.json with ``head_dim`` != dim / n_heads (Nemo), ``rope_theta``, no ``max_seq_len`` (then
    ``--max_position_embeddings``), and a few harmless bookkeeping fields (:data:`HARMLESS_PARAMS`).

The original release (mistral-inference, the tarballs linked from the seed page) names tensors after the
reference code and stores the rotary dimensions of q/k *interleaved*: each head's rows pair up as (0, 1), (2, 3),
... and are rotated as complex numbers. Our model (and transformers) use the ``rotate_half`` layout, pairing row i
with row i + hd/2. Converting is a renaming plus one row permutation of ``wq``/``wk`` per head::

    original rows of one head (hd = 8):  r0 i0 r1 i1 r2 i2 r3 i3      (real/imaginary parts interleaved)
    HF rows:                             r0 r1 r2 r3 i0 i1 i2 i3      view(nh, hd/2, 2, D).transpose(1, 2)

Since q·k only sums over matching rows, permuting q and k the same way leaves attention unchanged; the
permutation just makes ``rotate_half`` see the pairs the complex rotation used (the converter tests check the
logits against an independent complex-rotary reference forward).

Memory: the checkpoint is memory-mapped (``torch.load(mmap=True, weights_only=True)``) and converted tensor by
tensor, each source entry dropped as soon as it is converted, so only the output copy is ever held.

Also here: :func:`mha_to_gqa`, the seed's recipe for turning a multi-head checkpoint into a grouped-query one.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import torch

from mistral_ft.errors import ConversionError
from mistral_ft.model.config import MistralConfig, read_json_object
from mistral_ft.model.weights import check_tensor_dtype, resolve_dtype

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
# params.json fields that do not change the numbers: value checked (None = any value), then dropped.
HARMLESS_PARAMS: dict[str, tuple | None] = {
    "model_type": ("transformer",),  # mistral-inference's name for the dense decoder ("mamba" is not ours)
    "max_batch_size": None,  # an inference-server batch size
    "torch_dtype": None, "dtype": None,  # informational: the tensors carry their own dtype
    "causal": (True,),
    "tied_embeddings": (False,),  # true would mean no `output` tensor: not the layout converted here
    "use_biases": (False,),
}
# params.json fields of other architectures or of numbers we do not compute: refused with the reason.
REFUSED_PARAMS = {
    "moe": "a mixture-of-experts model (Mixtral)", "vision_encoder": "a vision model (Pixtral)",
    "lora": "a LoRA adapter, not full weights", "quantization": "quantized weights",
    "yarn": "yarn RoPE in mistral-inference's spelling (not verified against transformers here)",
    "llama_4_scaling": "attention-temperature scaling", "q_lora_rank": "latent attention",
}
# What `--model_size` may say, and the shape it implies (the original release: Mistral-7B-v0.1 / -Instruct-v0.1).
MODEL_SIZES: dict[str, dict[str, int]] = {"7B": {"dim": 4096, "n_layers": 32, "n_heads": 32}}
# Mistral-7B-v0.1 was trained with 8k context and a 4k window; transformers' converter writes 4096 * 8.
DEFAULT_MAX_POSITIONS = 4096 * 8
CHECKPOINT_NAME = "consolidated.00.pth"


def read_params(path: str | os.PathLike, model_size: str | None = None, max_position_embeddings: int | None = None,
                default_max_positions: int | None = DEFAULT_MAX_POSITIONS) -> MistralConfig:
    """``params.json`` -> :class:`MistralConfig` (HF field names), refusing keys it does not know.

    max_position_embeddings: params.json's ``max_seq_len`` (or ``max_position_embeddings``) if it has one, else
    the ``max_position_embeddings`` argument, else ``default_max_positions`` (the 7B-v0.1 release's 32768, as
    transformers' converter writes it); None there makes a missing value an error (it cannot be guessed).
    """
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"{path}: params.json not found")
    params = read_json_object(path, ConversionError)
    for key in sorted(set(params) & set(REFUSED_PARAMS)):
        raise ConversionError(f"{path}: field '{key}' is not supported: {REFUSED_PARAMS[key]}; this converter "
                              f"handles the dense Mistral decoder only")
    for key in sorted(set(params) & set(HARMLESS_PARAMS)):
        allowed = HARMLESS_PARAMS[key]
        if allowed is not None and params[key] not in allowed:
            raise ConversionError(f"{path}: field '{key}' is {params[key]!r}; only {list(allowed)} is the dense "
                                  f"Mistral decoder converted here")
    params = {k: v for k, v in params.items() if k not in HARMLESS_PARAMS}
    unknown = sorted(set(params) - set(PARAMS_FIELDS))
    if unknown:
        raise ConversionError(
            f"{path}: unknown field(s) {unknown}; this converter handles the dense Mistral decoder "
            f"(known fields: {sorted(PARAMS_FIELDS)}; accepted and ignored: {sorted(HARMLESS_PARAMS)}). A "
            f"checkpoint with e.g. 'moe' or 'vision_encoder' is another architecture.")
    for key, (required, types) in PARAMS_FIELDS.items():
        if key not in params:
            if required:
                raise ConversionError(f"{path}: required field '{key}' is missing")
            continue
        value = params[key]
        if isinstance(value, bool) or not isinstance(value, types):
            raise ConversionError(f"{path}: field '{key}' has the wrong type: {value!r}")
    for key in ("dim", "n_layers", "hidden_dim", "n_heads", "vocab_size", "head_dim", "n_kv_heads", "max_seq_len",
                "max_position_embeddings", "sliding_window"):
        if params.get(key) is not None and params[key] < 1:
            raise ConversionError(f"{path}: field '{key}' is {params[key]}; it must be >= 1")
    for key in ("norm_eps", "rope_theta"):
        if key in params and not (math.isfinite(params[key]) and params[key] > 0):
            raise ConversionError(f"{path}: field '{key}' is {params[key]}; it must be a finite number > 0")
    if params["n_heads"] % params.get("n_kv_heads", params["n_heads"]):
        raise ConversionError(f"{path}: field 'n_kv_heads' is {params['n_kv_heads']}, which does not divide "
                              f"n_heads={params['n_heads']} (each key/value head serves a whole group of query heads)")
    if "head_dim" not in params and params["dim"] % params["n_heads"]:
        raise ConversionError(f"{path}: dim={params['dim']} is not a multiple of n_heads={params['n_heads']} and "
                              "there is no 'head_dim' field")
    if model_size is not None:
        if model_size not in MODEL_SIZES:
            raise ConversionError(f"--model_size {model_size!r} is not supported; use one of {sorted(MODEL_SIZES)}")
        for key, expected in MODEL_SIZES[model_size].items():
            if params[key] != expected:
                raise ConversionError(f"{path}: field '{key}' is {params[key]}, but --model_size {model_size} has "
                                      f"{key}={expected}; check --input_dir, or leave out --model_size")
    n_heads = params["n_heads"]
    max_pos = params.get("max_position_embeddings", params.get("max_seq_len", max_position_embeddings))
    if max_position_embeddings is not None and max_pos != max_position_embeddings:
        raise ConversionError(f"{path}: max_seq_len is {max_pos}, but --max_position_embeddings says "
                              f"{max_position_embeddings}; leave the option out")
    if max_pos is None:
        max_pos = default_max_positions
    if max_pos is None:
        raise ConversionError(f"{path}: no 'max_seq_len' field; pass --max_position_embeddings (the context the "
                              f"model was trained for: 32768 for Mistral-7B-v0.3, Small-24B and Codestral-22B, "
                              f"1024000 for Nemo-12B, as their Hugging Face config.json files say)")
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


_SHARD = re.compile(r"consolidated-(\d+)-of-(\d+)\.safetensors")
_TOKENIZER = re.compile(r"tokenizer\.model(\.v\d+(m\d+)?)?|tekken\.json")


class _LazySafetensors:
    """Tensor name -> tensor, read from consolidated safetensors file(s) only when popped.

    What :func:`convert_state_dict` needs of a state dict (iteration, ``pop``), without ever holding the whole
    source: a 24B model is converted one tensor at a time.
    """

    def __init__(self, files: list[Path]):
        from safetensors import SafetensorError, safe_open

        self._files: dict[Path, object] = {}
        self._where: dict[str, Path] = {}
        for f in files:
            try:
                self._files[f] = handle = safe_open(str(f), framework="pt", device="cpu")
            except SafetensorError as e:
                raise ConversionError(f"{f}: unreadable safetensors file ({e}); it may be truncated") from None
            for key in handle.keys():
                if key in self._where:
                    raise ConversionError(f"{f}: tensor '{key}' is also in {self._where[key].name}")
                self._where[key] = f

    def __iter__(self):
        return iter(list(self._where))

    def pop(self, key: str) -> torch.Tensor:
        f = self._where.pop(key)
        t = self._files[f].get_tensor(key)
        check_tensor_dtype(f, key, t.dtype)
        return t


def find_weights(input_dir: Path) -> list[Path]:
    """The release's weight files: consolidated.safetensors, or all its shards, or consolidated.00.pth."""
    single = input_dir / "consolidated.safetensors"
    shards = sorted(p for p in input_dir.glob("consolidated-*-of-*.safetensors") if _SHARD.fullmatch(p.name))
    if single.is_file() and shards:
        raise ConversionError(f"{input_dir}: both consolidated.safetensors and {shards[0].name} found; keep one")
    if single.is_file():
        return [single]
    if shards:
        total = int(_SHARD.fullmatch(shards[0].name).group(2))
        want = {f"consolidated-{i:05d}-of-{total:05d}.safetensors" for i in range(1, total + 1)}
        have = {p.name for p in shards}
        if have != want:
            gap = sorted(want - have) or sorted(have - want)
            raise ConversionError(f"{input_dir}: the consolidated shards are incomplete or mixed: {gap[:3]} "
                                  f"({len(have)} found, {total} expected)")
        return shards
    pths = sorted(p.name for p in input_dir.glob("consolidated.*.pth"))
    if not pths:
        found = sorted(p.name for p in input_dir.iterdir())
        raise ConversionError(f"{input_dir}: no consolidated.safetensors or {CHECKPOINT_NAME} found (found: {found})")
    if pths != [CHECKPOINT_NAME]:
        raise ConversionError(f"{input_dir}: model-parallel shards {pths} are not supported; the 7B release has "
                              f"one {CHECKPOINT_NAME}")
    return [input_dir / CHECKPOINT_NAME]


def find_tokenizer(input_dir: Path) -> Path:
    """The one tokenizer file of a release: tokenizer.model, tokenizer.model.vN or tekken.json."""
    found = sorted(p for p in input_dir.iterdir() if _TOKENIZER.fullmatch(p.name) and p.is_file())
    if not found:
        raise ConversionError(f"{input_dir}: no tokenizer file (tokenizer.model, tokenizer.model.vN or tekken.json) "
                              f"found next to params.json")
    if len(found) > 1:
        raise ConversionError(f"{input_dir}: several tokenizer files {[p.name for p in found]}; keep the one "
                              f"the model was released with")
    return found[0]


def _read_tokenizer(tok_file: Path):
    """The release's tokenizer through our one entry point, which reads its version from the file's contents
    (v1/v2/v3/v7 sentencepiece, Tekken): the converted folder then gets exactly what export writes (the file
    under its versioned name, plus the tokenizer_config.json transformers needs), and bos/eos/pad from it.

    Pad: the tokenizer's pad id (Tekken has one), else ``<unk>`` (never produced with byte fallback): never EOS.
    """
    from mistral_ft.tokenizer import MistralTokenizer, TokenizerFileError

    try:
        return MistralTokenizer.from_pretrained(tok_file)
    except TokenizerFileError as e:
        raise ConversionError(str(e)) from None
    except Exception as e:  # noqa: BLE001 - any parse failure of a user's file is bad input
        raise ConversionError(f"{tok_file}: not a tokenizer file we can read ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None


def convert_checkpoint(input_dir: str | os.PathLike, output_dir: str | os.PathLike, model_size: str | None = None,
                       dtype: str | torch.dtype | None = None, max_shard_size: str | int = "5GB",
                       max_position_embeddings: int | None = None, overwrite: bool = False) -> Path:
    """Convert an original Mistral folder into an HF folder our ``from_pretrained`` (and transformers) load.

    Writes model safetensors (+ index when sharded), config.json, generation_config.json and the tokenizer
    file under its own name (``tokenizer.model`` also gets the v1 tokenizer files our tokenizer writes).
    ``dtype`` None keeps the checkpoint's dtype (bfloat16 for the releases). The folder appears whole or not at
    all: everything is written to a temporary sibling first, renamed to ``output_dir`` at the end. A non-empty
    ``output_dir`` is refused before anything is read unless ``overwrite`` (then the old folder is replaced
    whole, after the new one is complete: a failed conversion leaves it as it was).
    """
    import shutil
    import tempfile

    from mistral_ft.model.modeling import MistralForCausalLM

    input_dir, output_dir = Path(input_dir), Path(output_dir)
    if output_dir.exists() and (not output_dir.is_dir() or any(output_dir.iterdir())) and not overwrite:
        raise ConversionError(f"--output_dir {output_dir}: already exists and is not empty; nothing was written "
                              "(choose a new folder, or pass --overwrite to replace it)")
    if not input_dir.is_dir():
        raise ConversionError(f"--input_dir {input_dir}: no such folder")
    weights = find_weights(input_dir)
    legacy = weights[0].suffix == ".pth"  # the 7B-v0.1 layout: its params.json has no max_seq_len
    config = read_params(input_dir / "params.json", model_size, max_position_embeddings,
                         DEFAULT_MAX_POSITIONS if legacy else None)
    tok_file = find_tokenizer(input_dir)
    tokenizer = _read_tokenizer(tok_file)
    vocab = tokenizer.vocab_size
    config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    if vocab > config.vocab_size or config.vocab_size - vocab >= 1024:
        raise ConversionError(f"{tok_file}: the tokenizer has {vocab} tokens, but params.json says "
                              f"vocab_size={config.vocab_size}: they do not belong together")
    if legacy:
        ckpt = weights[0]
        try:
            source = torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # pickle with code in it, truncated file, not a zip checkpoint, ...
            raise ConversionError(f"{ckpt}: cannot be read as a weights-only torch checkpoint "
                                  f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
        if not isinstance(source, dict) or not all(isinstance(v, torch.Tensor) for v in source.values()):
            raise ConversionError(f"{ckpt}: expected a dict of tensors (a state dict), got {type(source).__name__}")
        for key, t in source.items():
            check_tensor_dtype(ckpt, key, t.dtype)
    else:
        source = _LazySafetensors(weights)
    where = str(weights[0]) if len(weights) == 1 else f"{input_dir}/consolidated-*.safetensors"
    target_dtype = None if dtype is None else resolve_dtype(dtype)
    state = convert_state_dict(source, config, target_dtype, where=where)
    del source
    config.torch_dtype = str(next(iter(state.values())).dtype).removeprefix("torch.")
    with torch.device("meta"):
        shell = MistralForCausalLM(config)  # only its config and class name are used by save_pretrained
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.tmp-", dir=output_dir.parent))
    try:
        shell.save_pretrained(tmp / "out", max_shard_size=max_shard_size, state_dict=state)
        del state
        tokenizer.save_pretrained(tmp / "out")  # v2+/Tekken: the file as it came, under its versioned name
        _share_folder(tmp / "out")
        if output_dir.is_dir() and any(output_dir.iterdir()):  # --overwrite: move the old folder aside first
            os.rename(output_dir, tmp / "old")
        elif output_dir.exists():
            output_dir.rmdir() if output_dir.is_dir() else output_dir.unlink()
        try:
            os.rename(tmp / "out", output_dir)
        except OSError as err:  # another process filled output_dir meanwhile: keep its files
            raise ConversionError(f"--output_dir {output_dir}: filled by another process while converting "
                                  f"({err.strerror or err}); this conversion's files were discarded") from err
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return output_dir


def _share_folder(folder: Path) -> None:
    """mkdtemp makes a 0700 folder: give the published one the usual permissions (umask applies)."""
    mask = os.umask(0)
    os.umask(mask)
    folder.chmod(0o777 & ~mask)


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


__all__ = ["ConversionError", "convert_checkpoint", "convert_state_dict", "find_tokenizer", "find_weights",
           "interleaved_to_rotate_half", "mha_to_gqa", "read_params"]
