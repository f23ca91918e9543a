"""A trained model folder (+ optional peft adapter) loaded for inference, with the checks that make a
mismatched adapter fail with a message instead of loading garbage (used by `python -m mistral_ft.generate`)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch

from mistral_ft.errors import GenerateError
from mistral_ft.model import MistralForCausalLM
from mistral_ft.model.config import read_json_object
from mistral_ft.model.hub import is_hub_id, local_model_folder
from mistral_ft.runs import ADAPTER_CONFIG, read_adapter_config
from mistral_ft.tokenizer import MistralTokenizer
from mistral_ft.tokenizer.files import FOLDER_FILE_NAMES, find_in_folder


ADAPTER_WEIGHTS = "adapter_model.safetensors"


SHAPE_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim")


def _shape_config(folder: Path) -> dict[str, Any] | None:
    p = folder / "config.json"
    if not p.is_file():
        return None
    try:
        d = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if d.get("head_dim") is None and d.get("hidden_size") and d.get("num_attention_heads"):
        d["head_dim"] = d["hidden_size"] // d["num_attention_heads"]
    return {k: d.get(k) for k in SHAPE_KEYS}


def check_adapter(adapter: Path, model: torch.nn.Module, model_path: Path) -> None:
    """Refuse, with a clear message, an adapter that was trained on another base than ``model``.

    Two checks: the base named in ``adapter_config.json`` (``base_model_name_or_path``), when it is a local
    folder, must have the same shape-deciding config as ``model``; and every tensor of the adapter must fit the
    module it targets (LoRA A: (r, in_features), B: (out_features, r); saved modules: the parameter's shape).
    A base named differently but with the same shapes (a copy, a hub id vs. its local snapshot) is accepted.
    """
    cfg = read_adapter_config(adapter)
    where = adapter / ADAPTER_CONFIG
    task = cfg.get("task_type")
    if task not in (None, "CAUSAL_LM"):
        raise GenerateError(f"{where}: task_type is {task!r}; generation needs a CAUSAL_LM adapter "
                            f"(a SEQ_CLS adapter belongs to a classification model)")
    base = cfg.get("base_model_name_or_path")
    ours = _shape_config(model_path)
    if base and ours is not None and Path(base).expanduser().is_dir():
        base_dir = Path(base).expanduser().resolve()
        theirs = _shape_config(base_dir)
        if theirs is not None and base_dir != model_path.resolve():
            diff = [f"{k}: {theirs[k]} (adapter's base) vs {ours[k]} (--model)" for k in SHAPE_KEYS
                    if theirs[k] != ours[k]]
            if diff:
                raise GenerateError(f"--adapter {adapter} was trained on base {base} ({where}: "
                                    f"base_model_name_or_path), which differs from --model {model_path}: "
                                    + "; ".join(diff))
    if base and Path(base).name != model_path.name and Path(base).expanduser().resolve() != model_path.resolve():
        # same shapes, other name: maybe a copy, maybe another fine-tune of the same architecture; say so
        print(f"note: {where} names base {base!r}; applying it to {model_path}", file=sys.stderr)
    weights = adapter / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise GenerateError(f"--adapter {adapter}: no {ADAPTER_WEIGHTS} (mistral_ft loads safetensors adapters only)")
    params = dict(model.named_parameters())
    modules = dict(model.named_modules())
    rank, ranks = cfg.get("r"), cfg.get("rank_pattern") or {}
    targets = cfg.get("target_modules")
    try:
        shapes = _tensor_shapes(weights)
    except Exception as e:  # noqa: BLE001 - a torn or foreign file: whatever safetensors says, name the file
        raise GenerateError(f"{weights}: not a readable safetensors file (truncated or corrupt: "
                            f"{str(e).splitlines()[0][:200] if str(e) else type(e).__name__})") from None
    for key, shape in shapes.items():
        name = key.removeprefix("base_model.model.")
        problem = None
        if ".lora_A." in name or ".lora_B." in name:
            path = name.split(".lora_")[0]
            module = modules.get(path)
            want_r = next((v for k, v in ranks.items() if path.endswith(k)), rank)
            r_dim = shape[0] if ".lora_A." in name else shape[-1]
            if isinstance(targets, list) and path.rsplit(".", 1)[-1] not in targets:
                raise GenerateError(f"{weights}: tensor '{key}' adapts '{path.rsplit('.', 1)[-1]}', but "
                                    f"{where} has target_modules={targets}: the config and the weights are "
                                    "from different adapters")
            if isinstance(want_r, int) and r_dim != want_r:
                raise GenerateError(f"{weights}: tensor '{key}' has shape {shape} (rank {r_dim}), but {where} "
                                    f"says r={want_r}: the config and the weights are from different adapters")
            if module is None or not hasattr(module, "in_features"):
                problem = f"targets module '{path}', which the base model does not have"
            elif ".lora_A." in name and shape[1] != module.in_features:
                problem = f"has shape {shape}, but '{path}' takes {module.in_features} input features"
            elif ".lora_B." in name and shape[0] != module.out_features:
                problem = f"has shape {shape}, but '{path}' has {module.out_features} output features"
        else:
            target = name.replace(".modules_to_save.default.", ".").replace(".original_module.", ".")
            if target in params and tuple(params[target].shape) != shape:
                problem = f"has shape {shape}, but the base model's '{target}' is {tuple(params[target].shape)}"
        if problem:
            raise GenerateError(f"--adapter {adapter} does not fit --model {model_path}: tensor '{key}' "
                                f"{problem}. Was it trained on another base (adapter_config.json says "
                                f"{base!r})?")


def _tensor_shapes(weights: Path) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as f:
        return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}


def load(model_path: str | Path, adapter: str | Path | None = None, dtype: str = "float32", attn: str = "sdpa",
         device: str | None = None) -> tuple[torch.nn.Module, Any, Path]:
    """(model ready for ``generate``, tokenizer, model folder); peft layers injected when ``adapter`` is given."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")  # generate's check_device ran before
    p = Path(str(model_path)).expanduser()
    if not p.exists() and not is_hub_id(model_path):
        raise GenerateError(f"--model {model_path}: no such folder")
    folder = local_model_folder(model_path)
    config_file = folder / "config.json"
    if config_file.is_file():
        archs = read_json_object(config_file, GenerateError).get("architectures") or []
        if archs and archs[0] == "MistralForSequenceClassification":
            raise GenerateError(f"{config_file}: this is a sequence-classification model; it cannot generate text")
    model = MistralForCausalLM.from_pretrained(folder, torch_dtype=dtype, device=device, attn_implementation=attn)
    tok_dir = None
    if adapter is not None:
        from peft import PeftModel

        adapter = Path(adapter).expanduser()
        check_adapter(adapter, model, folder)
        try:
            model = PeftModel.from_pretrained(model, str(adapter)).get_base_model()  # LoRA layers are now inside
        except (ValueError, TypeError, RuntimeError, KeyError) as e:  # peft's checks of the config we handed over
            first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
            raise GenerateError(f"--adapter {adapter}: peft cannot load it onto {folder} ({ADAPTER_CONFIG} or "
                                f"{ADAPTER_WEIGHTS}): {first}") from None
        model.eval()
        if find_in_folder(adapter) is not None:
            tok_dir = adapter
    if tok_dir is None and find_in_folder(folder) is not None:
        tok_dir = folder
    if tok_dir is None:
        if model.config.vocab_size != 32000:  # the v1 fallback fits only a v1-sized model: never guess otherwise
            raise GenerateError(f"{folder} has no tokenizer file ({', '.join(FOLDER_FILE_NAMES)}) and its vocab_size "
                                f"is {model.config.vocab_size}: copy the model's own tokenizer into the folder")
        print(f"note: {folder} has no tokenizer file; using the Mistral-7B-v0.1 tokenizer from mistral_common",
              file=sys.stderr)
    tokenizer = MistralTokenizer.from_pretrained(tok_dir)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise GenerateError(f"the tokenizer has {tokenizer.vocab_size} pieces, but the model's vocab_size is "
                            f"{model.config.vocab_size} ({config_file})")
    return model, tokenizer, folder
