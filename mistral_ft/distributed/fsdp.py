"""FSDP2 sharding of a task's model and gathering of its trainable weights (see distributed/strategy.py for why FSDP2)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from mistral_ft.distributed.rank_local import materialize_rank_local
from mistral_ft.model.modeling import MistralDecoderLayer

log = logging.getLogger("mistral_ft.distributed")


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers (unit of sharding and of activation checkpointing), peft-wrapped or not."""
    return [m for m in model.modules() if isinstance(m, MistralDecoderLayer)]


def shard_task_model(task: nn.Module, mesh: Any, s: Mapping[str, Any], precision: str) -> None:
    """Apply FSDP2 to `task.model`: each decoder layer is one shard group, the root holds the rest.

    Called from `configure_model` (after peft: LoRA/DoRA parameters are sharded with their layer,
    frozen and trainable side by side). The embeddings, final norm and lm_head/score form the root's
    group; the loss (chunked or not) runs inside the root model's forward, so those parameters are
    gathered when it needs them. Mixed precision: on CUDA with bf16-mixed, parameters are gathered in
    bf16 and gradients reduced in fp32 (MixedPrecisionPolicy); on CPU (fp32) no policy.
    """
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    model = task.model
    if any(isinstance(p, torch.distributed.tensor.DTensor) for p in model.parameters()):
        return  # configure_model runs again for validate(): already sharded
    dp_mesh = mesh["data_parallel"] if mesh is not None and "data_parallel" in (mesh.mesh_dim_names or ()) else mesh
    mp = MixedPrecisionPolicy()
    if torch.cuda.is_available() and str(precision).startswith("bf16"):
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    offload = CPUOffloadPolicy() if s.get("cpu_offload") else OffloadPolicy()
    reshard = bool(s.get("reshard_after_forward", True))
    if s.get("activation_checkpointing"):
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        inner.gradient_checkpointing_enable()
        if hasattr(inner, "enable_input_require_grads") and any(not p.requires_grad for p in inner.parameters()):
            inner.enable_input_require_grads()
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=dp_mesh, mp_policy=mp, offload_policy=offload, reshard_after_forward=reshard)
    fully_shard(model, mesh=dp_mesh, mp_policy=mp, offload_policy=offload, reshard_after_forward=reshard)
    source = getattr(model, "rank_local_source", None)  # set by train.py when the model was built on meta
    if source is not None:
        materialize_rank_local(model, source[0], source[1], task.trainer.strategy.root_device)
    import resource

    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    log.info("rank %d: model sharded (%s); peak host RSS so far %.0f MiB", rank,
             "rank-local load" if source is not None else "whole load, then sharded",
             resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter gathered to full tensors on CPU (collective: call on every rank)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def gather_trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters of a sharded model as full CPU tensors, named as `model.state_dict()` names them.

    A collective (each DTensor is all-gathered): every rank must call it, in the same order. Only the
    trainable weights are gathered (a LoRA adapter is megabytes), never the frozen base.
    """
    from torch.distributed.tensor import DTensor

    out: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            full = p.full_tensor() if isinstance(p, DTensor) else p
            out[name] = full.detach().cpu().clone()
    return out
