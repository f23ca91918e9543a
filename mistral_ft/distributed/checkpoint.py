"""Sharded (torch.distributed.checkpoint) checkpoint folders: restore into a sharded model, read back whole."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn


def load_sharded_checkpoint(path: Path, module: nn.Module, optimizers: list[Any]) -> dict[str, Any]:
    """Restore a DCP checkpoint folder written by ModelParallelStrategy into the sharded `module`.

    Each rank reads only the slices of its own shards (DCP re-shards if the world size changed).
    Returns the metadata (everything but weights and optimizer) with `state_dict` naming the keys that
    were loaded, which `FineTuneTask.on_load_checkpoint` checks against this run's trainable weights.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions, get_model_state_dict, get_optimizer_state_dict, set_model_state_dict, set_optimizer_state_dict)

    meta = torch.load(path / "meta.pt", weights_only=True)
    saved = set(meta.get("mistral_ft", {}).get("trainable_keys", []))
    full = get_model_state_dict(module)
    keys = saved if saved else {k for k, p in module.named_parameters() if p.requires_grad}
    model_state = {k: v for k, v in full.items() if k in keys}
    state = {"state_dict": model_state}
    dcp.load(state, checkpoint_id=path)
    set_model_state_dict(module, state["state_dict"], options=StateDictOptions(strict=False))
    for i, opt in enumerate(optimizers):
        ostate = {f"optimizer_{i}": get_optimizer_state_dict(module, opt)}
        dcp.load(ostate, checkpoint_id=path)
        set_optimizer_state_dict(module, opt, optim_state_dict=ostate[f"optimizer_{i}"])
    meta["state_dict"] = {k: None for k in model_state}
    return meta


def read_sharded_trainable(path: Path) -> dict[str, torch.Tensor]:
    """The trainable weights of a DCP checkpoint folder as one plain state dict (no process group needed).

    For export: `_load_state_dict_from_keys` reads the whole tensors (all shards) in this process.
    Keys are the LightningModule's (`model.` + the peft/model parameter name).
    """
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    metadata = FileSystemReader(str(path)).read_metadata()
    keys = {k for k in metadata.state_dict_metadata if k.startswith("state_dict.")}
    loaded = _load_state_dict_from_keys(keys, checkpoint_id=str(path))
    return {k: v for k, v in loaded["state_dict"].items()}


def read_sharded_checkpoint(path: Path) -> dict[str, Any]:
    """A sharded checkpoint folder as `torch.load` of a plain .ckpt would give it (for export).

    The metadata (`meta.pt`: hyper_parameters, mistral_ft extras, loop state) plus `state_dict`: the
    trainable weights assembled from every rank's shards. No optimizer state (export needs none).
    """
    ckpt = torch.load(Path(path) / "meta.pt", map_location="cpu", weights_only=True)
    ckpt["state_dict"] = read_sharded_trainable(Path(path))
    return ckpt
