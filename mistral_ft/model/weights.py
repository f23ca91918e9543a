"""Hugging Face checkpoint I/O: safetensors (single or sharded with an index), hub ids, no pickle.

Loading builds the model on the meta device (no memory), reads each tensor straight from its shard into the
target dtype/device, checks names and shapes, and assigns the tensors in place: a 7B model never exists twice
in memory. Every problem is reported with the file, the key and the value at fault; nothing is loaded partially.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from mistral_ft.errors import CheckpointError

from .hub import local_model_folder

from .config import MistralConfig

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
           "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}




# Tensor-name endings of quantized checkpoints (FP8: weight_scale / weight_scale_inv / input_scale; GPTQ/AWQ:
# qweight, qzeros, scales, g_idx; bitsandbytes: absmax, quant_map, quant_state). Loading the weights beside them
# as plain floats would be silently wrong, so a checkpoint holding any of them is refused.
_QUANTIZED_SUFFIXES = ("weight_scale", "weight_scale_inv", "input_scale", "activation_scale", "qweight", "qzeros",
                       "scales", "g_idx", "absmax", "quant_map", "nested_absmax", "nested_quant_map")
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def refuse_unknown_tensor(path: Path | str, key: str, model_name: str) -> None:
    """Raise for a tensor the model has no place for: never ignored, since it may carry numbers (a quantization
    scale, a bias, an extra layer) without which the loaded model computes something else."""
    if key.split(".")[-1].startswith("quant_state") or key.split(".")[-1] in _QUANTIZED_SUFFIXES:
        raise CheckpointError(f"{path}: tensor '{key}' is a quantization scale (FP8 or another quantized "
                              f"checkpoint); mistral_ft loads unquantized weights only: use the unquantized "
                              f"release or dequantize it first")
    raise CheckpointError(f"{path}: tensor '{key}' has no place in {model_name} (refused rather than ignored: "
                          f"is this checkpoint another architecture, or does its config.json not match?)")


def check_tensor_dtype(path: Path | str, key: str, dtype: torch.dtype | str) -> None:
    """Weights must be stored as floats: an FP8/int tensor cast to float without its scale is not the weight."""
    name = str(dtype).removeprefix("torch.")
    if dtype not in _FLOAT_DTYPES and name not in ("F32", "BF16", "F16", "F64"):
        raise CheckpointError(f"{path}: tensor '{key}' is stored as {name}, not a float type (an FP8 or "
                              f"otherwise quantized checkpoint); mistral_ft loads unquantized weights only")


def resolve_dtype(dtype: str | torch.dtype | None, config: MistralConfig | None = None) -> torch.dtype:
    """None -> float32 (training default); "auto" -> the checkpoint's ``torch_dtype``; names or torch dtypes."""
    if dtype is None:
        return torch.float32
    if dtype == "auto":
        dtype = (config.torch_dtype if config is not None else None) or "float32"
    if isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of float32, bfloat16, float16, auto")
    return _DTYPES[name]


def shard_map(folder: Path) -> dict[str, list[str]]:
    """shard file -> the tensor names it should hold (from the index, or the single file)."""
    index = folder / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
        shards: dict[str, list[str]] = {}
        for name, shard in weight_map.items():
            shards.setdefault(shard, []).append(name)
        for shard in shards:
            if not (folder / shard).is_file():
                raise CheckpointError(f"{index}: shard '{shard}' listed in weight_map is missing from {folder}")
        return shards
    single = folder / WEIGHTS_NAME
    if single.is_file():
        return {WEIGHTS_NAME: []}
    others = sorted(p.name for p in folder.glob("*.safetensors"))
    if others and all(name.startswith("consolidated") for name in others):
        raise CheckpointError(f"{folder}: only original-format weights ({others[0]}) found; convert them to the "
                              f"Hugging Face format with scripts/convert_mistral_weights_to_hf.py")
    if len(others) == 1:
        return {others[0]: []}
    if list(folder.glob("*.bin")) or list(folder.glob("*.pth")) or list(folder.glob("*.pt")):
        raise CheckpointError(f"{folder}: only pickle weights (*.bin/*.pth) found; mistral_ft loads safetensors "
                              f"only (no pickle). Convert them, e.g. scripts/convert_mistral_weights_to_hf.py.")
    raise CheckpointError(f"{folder}: no {WEIGHTS_NAME} or {INDEX_NAME} found")


def read_state_dict(folder: Path, expected: dict[str, torch.Size], dtype: torch.dtype, device: torch.device | str,
                    key_map=lambda k: k) -> tuple[dict[str, torch.Tensor], list[tuple[str, str]]]:
    """Read tensors named in ``expected`` (after ``key_map``) with shape and dtype checks.

    Returns (state, unexpected): ``unexpected`` as (file, key) pairs, for the caller to refuse or to skip the few
    it knows to be harmless."""
    state: dict[str, torch.Tensor] = {}
    unexpected: list[tuple[str, str]] = []
    for shard, names in shard_map(folder).items():
        path = folder / shard
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                keys = list(f.keys())
                missing_in_shard = sorted(set(names) - set(keys))
                if missing_in_shard:
                    raise CheckpointError(f"{path}: the index lists '{missing_in_shard[0]}' in this shard, "
                                          f"but the file does not contain it")
                for key in keys:
                    name = key_map(key)
                    if name is None or name not in expected:
                        unexpected.append((str(path), key))
                        continue
                    shape = f.get_slice(key).get_shape()
                    if tuple(shape) != tuple(expected[name]):
                        raise CheckpointError(f"{path}: tensor '{key}' has shape {tuple(shape)}, but the config "
                                              f"expects {tuple(expected[name])}")
                    t = f.get_tensor(key)
                    check_tensor_dtype(path, key, t.dtype)
                    state[name] = t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
        except SafetensorError as e:
            raise CheckpointError(f"{path}: unreadable safetensors file ({e}); it may be truncated or corrupt") from None
    return state, unexpected


def load_pretrained(cls, path: str | os.PathLike, torch_dtype: str | torch.dtype | None = None,
                    device: str | torch.device | None = None, attn_implementation: str | None = None,
                    config: MistralConfig | None = None, **config_overrides: Any):
    """Build ``cls`` on the meta device and fill it from an HF folder or hub id.

    Loading a base (causal-LM) checkpoint into ``MistralForSequenceClassification`` initialises ``score`` and
    ignores ``lm_head`` (the usual start of classification fine-tuning). Anything else missing is an error.
    """
    folder = local_model_folder(path)
    if config is None:
        config = MistralConfig.from_pretrained(folder, **config_overrides)
    if attn_implementation is not None:
        config.attn_implementation = attn_implementation
        config._validate(str(folder / "config.json"))
    dtype = resolve_dtype(torch_dtype, config)
    device = torch.device(device or "cpu")
    with torch.device("meta"):
        model = cls(config)
    base_only = cls.__name__ == "MistralModel"
    expected = {k: v.shape for k, v in model.state_dict().items()}
    tied = config.tie_word_embeddings and "lm_head.weight" in expected
    if tied:
        expected.pop("lm_head.weight")

    def key_map(k: str) -> str | None:
        if base_only:  # MistralModel from a full checkpoint: drop the "model." prefix, skip the heads
            return k[len("model."):] if k.startswith("model.") else None
        return k

    state, unexpected_at = read_state_dict(folder, expected, dtype, device, key_map)
    missing = sorted(set(expected) - set(state))
    initialised: list[str] = []
    if missing == ["score.weight"]:
        initialised = missing  # a new classification head on a base checkpoint
    elif missing:
        raise CheckpointError(f"{folder}: missing {len(missing)} tensor(s) for {cls.__name__}, e.g. '{missing[0]}'"
                              f" (present: {len(state)})")
    # The other head of the same model is the one tensor a load may skip: lm_head when a base checkpoint starts a
    # classification model (or the tied copy of the embeddings), score/lm_head for MistralModel. Anything else is
    # refused, never ignored.
    skippable = {"lm_head.weight", "score.weight"} if base_only else {"lm_head.weight"}
    for shard_path, key in unexpected_at:
        if key not in skippable:
            refuse_unknown_tensor(shard_path, key, cls.__name__)
    unexpected = [key for _, key in unexpected_at]
    for name in initialised:
        t = torch.empty(expected[name], dtype=dtype, device=device)
        torch.nn.init.normal_(t, std=config.initializer_range)
        state[name] = t
    model.load_state_dict(state, strict=not tied, assign=True)
    if tied:
        model.tie_weights()
    model.loading_info = {"unexpected": unexpected, "initialised": initialised, "path": str(folder)}
    model.name_or_path = str(path)
    return model.eval()


def parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    s = size.strip().upper()
    for unit, mult in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3), ("B", 1)):
        if s.endswith(unit):
            return int(float(s[: -len(unit)]) * mult)
    return int(s)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def save_state_dict(state: dict[str, torch.Tensor], folder: str | os.PathLike, max_shard_size: int | str = "5GB"
                    ) -> list[str]:
    """Write ``state`` as safetensors shards (HF names: model-0000i-of-0000n.safetensors + index when > 1)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    limit = parse_size(max_shard_size)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][name] = t.detach().to("cpu").contiguous()
        size += nbytes
    names = [WEIGHTS_NAME] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for fname, shard in zip(names, shards):
        save_file(shard, str(folder / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in shard})
    if len(shards) > 1:
        total = sum(t.numel() * t.element_size() for t in state.values())
        (folder / INDEX_NAME).write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2) + "\n")
    return names


def save_pretrained(model, folder: str | os.PathLike, max_shard_size: int | str = "5GB",
                    state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """Write an HF folder: safetensors shards (+ index), config.json (with architectures), generation_config.json.

    The folder is written next to its destination and renamed at the end, so an interrupted save never leaves
    a folder that looks complete.
    """
    folder = Path(folder)
    config: MistralConfig = model.config
    state = dict(state_dict if state_dict is not None else model.state_dict())
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent if folder.parent.exists() else None))
    try:
        save_state_dict(state, tmp, max_shard_size)
        cfg = config.to_dict()
        cfg["architectures"] = [config.architecture_name(type(model).__name__)]
        cfg["torch_dtype"] = _dtype_name(next(iter(state.values())).dtype) if state else "float32"
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        gen = {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id}
        if config.pad_token_id is not None:
            gen["pad_token_id"] = config.pad_token_id
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        folder.mkdir(parents=True, exist_ok=True)
        if not (tmp / INDEX_NAME).exists() and (folder / INDEX_NAME).exists():
            (folder / INDEX_NAME).unlink()  # a stale index from an earlier sharded save would shadow the new file
        umask = os.umask(0)
        os.umask(umask)
        for p in tmp.iterdir():  # files we own are replaced; anything else in the folder is left alone
            os.chmod(p, 0o666 & ~umask)  # temp files are created 0600; a model folder is meant to be shared
            os.replace(p, folder / p.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
