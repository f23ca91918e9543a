"""Parameter-efficient fine-tuning through peft, in one function.

Why one function and not our own LoRA layers: peft is what users load adapters with (and vLLM
reads its files), and because our module names are the HF names (`q_proj`, ..., `score`), an
adapter trained here has the same keys as one trained on transformers' Mistral. Copying model
classes to add LoRA (litgpt's lora.py) is the path we avoid.

Facts this relies on (checked with peft 0.21):
- `task_type="CAUSAL_LM"` wraps in `PeftModelForCausalLM`, which reads
  `prepare_inputs_for_generation` off the model (our MistralForCausalLM has it).
- `task_type="SEQ_CLS"` adds `score` to `modules_to_save`: the head trains in full and is saved in
  the adapter file next to the LoRA matrices (a new head is useless without them).
- peft keeps adapter weights in fp32 on a bf16/fp16 base (`autocast_adapter_dtype=True`), which is
  what mixed-precision training wants for the few trainable parameters.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

from torch import nn

from mistral_ft.errors import ConfigError

# All seven linear layers of a Mistral decoder layer (HF names): QLoRA's finding that adapting
# every linear layer is what closes the gap to full fine-tuning (Dettmers et al. 2023, sec. 4).
DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PEFT_METHODS = ("lora", "dora", "qlora", "none")
TASK_TYPES = {"causal_lm": "CAUSAL_LM", "classification": "SEQ_CLS"}


def apply_peft(model: nn.Module, cfg: Mapping[str, Any], task: str = "causal_lm", device: Any = None) -> nn.Module:
    """Return `model` ready for training as `cfg` (the `peft:` config group) says.

    `cfg["method"]`:
      - "none": full fine-tuning; every parameter trains, the model is returned as it is.
      - "lora": LoRA with `r`, `alpha`, `dropout` on `target_modules` (HF names; default: all seven
        linear layers). The base is frozen; for `task="classification"` the `score` head trains
        in full and is saved with the adapter, as do the modules named in `modules_to_save`
        (peft matches name suffixes: "norm" is every RMSNorm, "lm_head" the output layer).
      - "dora": LoRA with peft's `use_dora=True` (Liu et al. 2024): a trained magnitude per output row.
      - "qlora": the decoder's linear layers become frozen NF4 `Linear4bit` (mistral_ft.quantize, on
        `device`), then LoRA as above (`use_dora: true` gives QDoRA).
    Raises ValueError naming the key for a bad method, rank or target list.
    """
    method = str(cfg.get("method", "lora"))
    if method not in PEFT_METHODS:
        raise ValueError(f"peft.method: {method!r} is not one of {list(PEFT_METHODS)}")
    if task not in TASK_TYPES:
        raise ValueError(f"task: {task!r} is not one of {sorted(TASK_TYPES)}")
    if method == "none":
        for p in model.parameters():
            p.requires_grad_(True)
        return model

    from peft import get_peft_model

    targets = list(cfg.get("target_modules") or DEFAULT_TARGET_MODULES)
    _check_targets(model, targets)
    lora = lora_config(cfg, task)
    _check_to_save(model, lora.modules_to_save or [])
    if method == "qlora":
        from mistral_ft.adapters.quantize import quantize_4bit

        quantize_4bit(model, quant_type=str(cfg.get("quant_type", "nf4")), double_quant=bool(cfg.get("double_quant", True)),
                      compute_dtype=str(cfg.get("compute_dtype", "auto")), device=device)
    return get_peft_model(model, lora)


def lora_config(cfg: Mapping[str, Any], task: str) -> Any:
    """The peft `LoraConfig` of a `peft:` config group: what training applies and what export writes as
    adapter_config.json for a checkpoint-only run (one builder, so the two cannot drift).

    The rank has no default here: it comes from conf/peft/*.yaml (or the caller's dict).
    """
    from peft import LoraConfig

    if cfg.get("r") is None:
        raise ValueError("peft.r: the LoRA rank is required (conf/peft/*.yaml sets it)")
    r = int(cfg["r"])
    if r < 1:
        raise ValueError(f"peft.r: the LoRA rank must be >= 1, got {r}")
    to_save = list(cfg.get("modules_to_save") or [])
    if task == "classification" and "score" not in to_save:
        to_save.append("score")
    return LoraConfig(
        r=r,
        lora_alpha=float(cfg.get("alpha", 2 * r)),
        lora_dropout=float(cfg.get("dropout", 0.0)),
        target_modules=list(cfg.get("target_modules") or DEFAULT_TARGET_MODULES),
        bias="none",
        task_type=TASK_TYPES[task],
        modules_to_save=to_save or None,
        use_dora=cfg.get("method") == "dora" or bool(cfg.get("use_dora", False)),
    )


def _check_targets(model: nn.Module, targets: Sequence[str]) -> None:
    """Fail with the valid names instead of peft's message when a target matches no Linear."""
    linear_names = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    missing = [t for t in targets if t not in linear_names]
    if missing:
        raise ConfigError(
            f"peft.target_modules: {missing} match no linear layer of the model; "
            f"valid names: {sorted(linear_names - {'lm_head', 'score'})}"
        )


def _check_to_save(model: nn.Module, names: Sequence[str]) -> None:
    """peft silently ignores a modules_to_save name that matches nothing; we do not."""
    module_names = [name for name, _ in model.named_modules()]
    missing = [n for n in names if not any(m == n or m.endswith("." + n) or m.endswith(n) for m in module_names)]
    if missing:
        leaves = sorted({m.rsplit(".", 1)[-1] for m in module_names if m and not m.rsplit(".", 1)[-1].isdigit()})
        raise ValueError(f"peft.modules_to_save: {missing} match no module of the model; module names: {leaves}")


def trainable_parameter_count(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, for the start-of-run report."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


LABELS_FILE = "labels.json"


def describe_adapter(folder: str | os.PathLike, base_name: str, base_record: Optional[Mapping[str, Any]] = None,
                     labels: Optional[Mapping[str, Any]] = None) -> None:
    """What a client needs beside a saved adapter, so the folder loads on its own (docs/export.md):

    - `adapter_config.json`'s `base_model_name_or_path` = `base_name` (runs.adapter_base_name: the hub id, or
      the local base folder), not whatever `name_or_path` the in-memory model had (a machine-local cache path);
    - `base_model.json`: the base's fingerprint (runs.record_base), to check a copy of a local base elsewhere;
    - `labels.json` for a sequence classifier: `num_labels`, `id2label`, `label2id`, `problem_type`, the
      model-config keys peft's `AutoPeftModelForSequenceClassification` must pass on to transformers to build a
      head of the trained size (the base's config.json has none, and a default 2-label head cannot take a
      3-label `score`): `from_pretrained(folder, **labels)` with `labels = json.load(...)` and its `id2label`
      keys made ints again (JSON keys are strings; transformers converts them only when it reads a config.json).
    """
    folder = Path(folder)
    cfg_file = folder / "adapter_config.json"
    cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    cfg["base_model_name_or_path"] = base_name
    cfg_file.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    if base_record is not None:
        (folder / "base_model.json").write_text(json.dumps(dict(base_record), indent=2) + "\n", encoding="utf-8")
    if labels:
        out = dict(labels)
        if "id2label" in out:
            out["id2label"] = {str(k): v for k, v in out["id2label"].items()}
        (folder / LABELS_FILE).write_text(json.dumps(out, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def head_labels(config: Any) -> dict[str, Any]:
    """The classification-head keys of a model config (what `labels.json` holds)."""
    out: dict[str, Any] = {"num_labels": int(config.num_labels), "problem_type": config.problem_type}
    if int(config.num_labels) > 1:
        out.update(id2label={int(k): str(v) for k, v in config.id2label.items()},
                   label2id={str(k): int(v) for k, v in config.label2id.items()})
    return out
