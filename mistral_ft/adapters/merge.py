"""Merging a peft LoRA / DoRA adapter into base weights, one safetensors shard at a time.

Why not peft's `merge_and_unload`: it needs the whole model in memory (twice the 14.5 GB of a bf16 7B
while it builds the merged copy on some paths), and on a 4-bit model it re-quantizes the merged weight,
which throws the adapter's small update away in rounding. Here each base shard is read with safetensors,
every targeted weight gets its delta in fp32, the shard is written and freed: peak memory is about one
output shard plus the adapter (docs/export.md has the measured figure). For QLoRA the base read is the
original full-precision checkpoint, never the NF4 copy the adapter trained against.

The update rules are peft's (peft 0.21, `tuners/lora/layer.py`, `variants.py`, `dora.py`), for a Linear
weight W (out, in), lora_A (r, in), lora_B (out, r), scaling s = alpha / r (alpha / sqrt(r) with rsLoRA):

    LoRA:  W' = W + s * B @ A
    DoRA:  V  = W + s * B @ A;  W' = (m / ||V||_row)[:, None] * V
           m (out,) is `lora_magnitude_vector`; the norm is taken over dim=1 of the (out, in) matrix
           (one norm per output row, `torch.linalg.norm(weight, dim=1)` in `DoraLinearLayer`).

Adapter file keys (peft's saved form): `base_model.model.<module>.lora_A.weight`, `.lora_B.weight`,
`.lora_magnitude_vector` (DoRA) and `base_model.model.<module>.weight` for `modules_to_save` (e.g.
the classification head `score`), which replace the base tensor outright.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("mistral_ft.merge")

PREFIX = "base_model.model."


# ---- the base a run trained on --------------------------------------------------------------------


# ---- adapters -------------------------------------------------------------------------------------
def lora_scaling(adapter_cfg: Mapping[str, Any]) -> float:
    """alpha / r, or alpha / sqrt(r) with rsLoRA (peft's `LoraLayer.update_layer`)."""
    r, alpha = int(adapter_cfg["r"]), float(adapter_cfg["lora_alpha"])
    return alpha / math.sqrt(r) if adapter_cfg.get("use_rslora") else alpha / r


def split_adapter(state: Mapping[str, torch.Tensor], adapter_cfg: Mapping[str, Any], where: str
                  ) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """Adapter tensors -> ({base weight name: {"A", "B"[, "m"]}}, {base tensor name: replacement}).

    Refuses what this merge does not implement (per-module rank/alpha patterns, LoRA on embeddings,
    bias training) rather than writing a model that silently differs from base + adapter.
    """
    for key in ("rank_pattern", "alpha_pattern"):
        if adapter_cfg.get(key):
            raise ExportError(f"{where}: '{key}' is set ({adapter_cfg[key]}); export merges one rank/alpha for all layers")
    if adapter_cfg.get("peft_type", "LORA") != "LORA":
        raise ExportError(f"{where}: peft_type {adapter_cfg.get('peft_type')!r}; export merges LORA adapters only")
    if adapter_cfg.get("bias", "none") != "none" or adapter_cfg.get("lora_bias"):
        raise ExportError(f"{where}: bias={adapter_cfg.get('bias')!r}; export merges bias='none' adapters only")
    lora: dict[str, dict[str, torch.Tensor]] = {}
    whole: dict[str, torch.Tensor] = {}
    for key, t in state.items():
        if not key.startswith(PREFIX):
            raise ExportError(f"{where}: tensor '{key}' does not start with '{PREFIX}' (not a peft adapter file?)")
        name = key[len(PREFIX):]
        for part, slot in ((".lora_A.weight", "A"), (".lora_B.weight", "B"), (".lora_magnitude_vector", "m")):
            if name.endswith(part):
                lora.setdefault(name[: -len(part)] + ".weight", {})[slot] = t
                break
        else:
            if ".lora_" in name:
                raise ExportError(f"{where}: tensor '{key}' is a kind of LoRA tensor export does not merge")
            whole[name] = t
    for target, parts in lora.items():
        if "A" not in parts or "B" not in parts:
            raise ExportError(f"{where}: '{target}' has {sorted(parts)} but needs both lora_A and lora_B")
    return lora, whole


def merged_weight(weight: torch.Tensor, parts: Mapping[str, torch.Tensor], scaling: float, name: str) -> torch.Tensor:
    """W + s·B@A (LoRA) or the DoRA rule, computed in fp32; shapes are checked against `weight`."""
    a, b = parts["A"].float(), parts["B"].float()
    out_f, in_f = weight.shape
    if a.shape[1] != in_f or b.shape[0] != out_f or a.shape[0] != b.shape[1]:
        raise ExportError(f"adapter tensors for '{name}' (lora_A {tuple(a.shape)}, lora_B {tuple(b.shape)}) do not "
                          f"fit the base weight {tuple(weight.shape)}: was the adapter trained on another base?")
    v = weight.float() + scaling * (b @ a)
    if "m" in parts:
        m = parts["m"].float().reshape(-1)
        if m.shape[0] != out_f:
            raise ExportError(f"DoRA magnitude for '{name}' has {m.shape[0]} entries, the weight {out_f} rows")
        v = (m / torch.linalg.norm(v, dim=1)).unsqueeze(1) * v
    return v


def merge_shards(base: Path, out: Path, *, lora: Mapping[str, Mapping[str, torch.Tensor]], scaling: float,
                 whole: Mapping[str, torch.Tensor], dtype: torch.dtype, drop: Callable[[str], bool] = lambda k: False,
                 max_shard_size: int = 2 * 10**9) -> dict[str, Any]:
    """Write base + adapter as safetensors shards into `out`, reading one base shard at a time.

    `lora`: base weight name -> adapter parts; `whole`: base tensor name -> replacement (modules_to_save,
    or new tensors such as a classification `score` the base lacks, written last); `drop(name)`: base
    tensors not to write (`lm_head` of a classification export). Output shards are cut at `max_shard_size`
    bytes whatever the base's layout, so memory holds at most one output shard of merged tensors (plus the
    pages of the base shard being read, which are the OS's file cache). Every lora key must be used, or the
    adapter does not belong to this base. Returns {"files", "weight_map", "total_size"}.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    from mistral_ft.model.weights import INDEX_NAME, WEIGHTS_NAME, shard_map

    used: set[str] = set()
    written: list[tuple[str, list[str]]] = []
    pending: dict[str, torch.Tensor] = {}
    sizes = {"pending": 0, "total": 0}

    def add(key: str, t: torch.Tensor) -> None:
        t = t.to(dtype) if t.is_floating_point() else t
        nbytes = t.numel() * t.element_size()
        if pending and sizes["pending"] + nbytes > max_shard_size:
            flush()
        pending[key] = t
        sizes["pending"] += nbytes
        sizes["total"] += nbytes

    def flush() -> None:
        if pending:
            tmp_name = f"part-{len(written):05d}.safetensors"
            save_file(pending, str(out / tmp_name), metadata={"format": "pt"})
            written.append((tmp_name, list(pending)))
            pending.clear()
            sizes["pending"] = 0

    from tqdm import tqdm

    shards = shard_map(base)
    bar = tqdm(total=sum(len(v) for v in shards.values()), desc="merge", unit="tensor", disable=None)  # disable=None: no bar when not a terminal
    for shard in shards:
        with safe_open(str(base / shard), framework="pt", device="cpu") as f:
            for key in f.keys():
                bar.update(1)
                if drop(key):
                    continue
                t = f.get_tensor(key)
                if key in lora:
                    t = merged_weight(t, lora[key], scaling, key)
                    used.add(key)
                if key in whole:
                    if tuple(whole[key].shape) != tuple(t.shape):
                        raise ExportError(f"adapter tensor for '{key}' has shape {tuple(whole[key].shape)}, the base "
                                          f"{tuple(t.shape)}: was the adapter trained on another base?")
                    t = whole[key]
                    used.add(key)
                add(key, t)
                del t
    bar.close()
    for key in sorted(set(whole) - used):  # tensors the base lacks (a new classification head)
        add(key, whole[key])
        used.add(key)
    flush()
    unused = sorted(set(lora) - used)
    if unused:
        raise ExportError(f"the adapter targets '{unused[0]}' ({len(unused)} tensor(s) in all), which the base "
                          f"weights at {base} do not have: was it trained on another base?")
    # final names (the count is known only now) and the index, as save_state_dict writes them
    names = [WEIGHTS_NAME] if len(written) == 1 else [
        f"model-{i + 1:05d}-of-{len(written):05d}.safetensors" for i in range(len(written))]
    weight_map = {}
    for (tmp_name, keys), name in zip(written, names):
        os.replace(out / tmp_name, out / name)
        weight_map.update({k: name for k in keys})
    if len(written) > 1:
        (out / INDEX_NAME).write_text(json.dumps(
            {"metadata": {"total_size": sizes["total"]}, "weight_map": dict(sorted(weight_map.items()))}, indent=2) + "\n")
    return {"files": names, "weight_map": weight_map, "total_size": sizes["total"]}
