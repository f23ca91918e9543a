"""The memory plan logged at the start of a run: weights, gradients, optimizer state and activations per device."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

log = logging.getLogger("mistral_ft.distributed")


GiB = 2**30


DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "auto": 2}


def estimate_memory(*, total_params: int, trainable_params: int, hidden_size: int, num_layers: int,
                    batch_size: int, seq_len: int, dtype: str = "bfloat16", method: str = "lora",
                    strategy: str = "auto", world: int = 1, optimizer: str = "adamw",
                    gradient_checkpointing: bool = False, activation_bytes_per_token_layer: float = 34.0,
                    vocab_size: int = 0, loss_chunk_size: int = 0, classification: bool = False
                    ) -> dict[str, float]:
    """Bytes per device of one training step, by part (a plan, not a measurement).

    - weights: `total_params` at the model dtype; qlora: ~0.5 byte + the NF4 block scales (0.5625 byte
      per weight with double quantization, QLoRA paper) for the quantized linears, which are ~97% of a
      Mistral's parameters; fsdp divides every resident part but activations by `world`.
    - trainable: params + grads of the trainable weights in fp32 (peft keeps adapters in fp32).
    - optimizer: AdamW 2 fp32 states (8 bytes) per trainable weight; adamw8bit 2 bytes.
    - activations: ~`activation_bytes_per_token_layer` * hidden bytes per token and layer in 16-bit
      (Korthikanti et al. 2022 count 34 * s * b * h without attention scores, which SDPA/flash never
      store); with checkpointing only each layer's input (2 * hidden bytes) plus one layer's full set.
      head_dim != hidden / heads (Nemo, Small-24B) changes only the attention projections, which
      `total_params` (counted on the model) already holds.
    - logits: the causal-LM head's (rows, vocab) output in 16-bit plus its fp32 copy/softmax (4 bytes), for
      every token, or for `loss_chunk_size` rows at a time with the chunked loss. With vocab 131072 (Tekken)
      that is 1.5 GiB per 2048 rows: not negligible. A classification head has no vocab-sized output
      (`classification=True`).
    """
    wbytes = DTYPE_BYTES.get(dtype, 2)
    if method == "qlora":
        weights = total_params * (0.97 * 0.5625 + 0.03 * wbytes)
    else:
        weights = total_params * wbytes
    if method == "none":
        weights = 0.0  # full fine-tuning: the trainable part below holds the weights
    trainable = trainable_params * (4 + 4)
    optim = trainable_params * (2 if optimizer == "adamw8bit" else 8)
    tokens = batch_size * seq_len
    act_scale = 1.0 if dtype != "float32" else 2.0
    per_layer = tokens * hidden_size * activation_bytes_per_token_layer * act_scale
    if gradient_checkpointing:
        activations = num_layers * tokens * hidden_size * wbytes + per_layer
    else:
        activations = num_layers * per_layer
    shard = world if strategy == "fsdp" else 1
    rows = min(tokens, loss_chunk_size) if loss_chunk_size else tokens
    logits = 0.0 if classification else rows * vocab_size * (wbytes + 4)
    parts = {"weights": weights / shard, "trainable": trainable / shard, "optimizer": optim / shard,
             "activations": activations, "logits": logits}
    parts["total"] = sum(parts.values())
    return parts


def log_memory_plan(c: Mapping[str, Any], model: nn.Module, trainable: int, total: int, use_cuda: bool,
                    world: int) -> dict[str, float]:
    """Log the per-device estimate and warn when it exceeds the device (CUDA) or the host RAM (CPU)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    data = c["data"]
    plan = estimate_memory(
        total_params=total, trainable_params=trainable,
        hidden_size=int(getattr(config, "hidden_size", 4096)), num_layers=int(getattr(config, "num_hidden_layers", 32)),
        batch_size=int(data.get("batch_size", 1)), seq_len=int(data.get("max_length", 2048)),
        dtype=str(c["model"].get("dtype", "bfloat16")), method=str(c["peft"]["method"]),
        strategy=str(c["strategy"]["name"]), world=world,
        optimizer=str(c["optimizer"].get("_target_") or c["optimizer"]["name"]),  # a user's class: counted as AdamW
        gradient_checkpointing=bool(c["model"].get("gradient_checkpointing")
                                    or c["strategy"].get("activation_checkpointing")),
        vocab_size=int(getattr(config, "vocab_size", 0) or 0),
        loss_chunk_size=int(c["model"].get("loss_chunk_size") or 0),  # what tasks/causal_lm.py reads
        classification=str(c.get("task", "causal_lm")) != "causal_lm")
    text = ", ".join(f"{k} {v / GiB:.2f} GiB" for k, v in plan.items())
    log.info("memory plan per device (strategy=%s, world=%d): %s", c["strategy"]["name"], world, text)
    if use_cuda:
        capacity = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
        where = f"the GPU's {capacity / GiB:.1f} GiB"
    else:
        capacity = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else 0
        where = f"this host's {capacity / GiB:.1f} GiB of RAM"
    if capacity and plan["total"] > capacity:
        log.warning("the estimated %.1f GiB per device will not fit %s: lower data.batch_size or data.max_length, "
                    "set model.gradient_checkpointing=true, use strategy=fsdp on more devices, or peft=qlora",
                    plan["total"] / GiB, where)
    return plan
