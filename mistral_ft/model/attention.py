"""Which attention backend a run uses: the `auto` choice per device (the backends live in modeling.py)."""

from __future__ import annotations

from typing import Any


def resolve_attn_implementation(name: str, device: Any) -> str:
    """`auto`: on CUDA flash-attn 2 (varlen, window) when installed, else FlexAttention (block mask: padding,
    packed documents and the window skip whole blocks), else SDPA; on CPU SDPA (FlexAttention has no CPU
    backward). The GPU choices are unverified on hardware in this repository's CI (see docs/benchmarks.md)."""
    if name != "auto":
        return name
    import importlib.util

    import torch

    if torch.device(device).type != "cuda":
        return "sdpa"
    if importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    try:
        import torch.nn.attention.flex_attention  # noqa: F401
    except ImportError:
        return "sdpa"
    return "flex_attention"
