"""Which attention backend a run uses (the `auto` choice per device; the backends live in modeling.py), and
the per-batch attention metadata that the collator computes on the host: varlen segments, target positions."""

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


def varlen_segments(valid: Any, document_ids: Any) -> tuple[Any, int]:
    """``cu_seqlens`` over the (B*T) flattened tokens, one segment per run of a row that shares a document and
    padding state, and the longest segment: flash-attn's varlen arguments, and the per-document CPU path's.

    A segment starts at every row start, where the document id changes and where padding starts or ends, so
    padding forms segments of its own (their outputs are never used) and no token needs gathering. Worked
    example, one row of T = 8 with two documents and two pads (document ids 0 0 0 1 1 1 -1 -1)::

        cu_seqlens = [0, 3, 6, 8], max_seqlen = 3

    Why on the host: computed here from CPU tensors (the collator does, once per batch) it costs no device
    sync; inside each layer it cost a ``nonzero()`` and an ``int(max)`` per layer on CUDA.
    valid, document_ids: (B, T) or None (None = all valid / one document per row).
    """
    import torch

    ref = valid if valid is not None else document_ids
    B, T = ref.shape
    new = torch.zeros(B, T, dtype=torch.bool, device=ref.device)
    new[:, 0] = True
    if valid is not None:
        v = valid.bool()
        new[:, 1:] |= v[:, 1:] != v[:, :-1]
    if document_ids is not None:
        new[:, 1:] |= document_ids[:, 1:] != document_ids[:, :-1]
    starts = new.reshape(-1).nonzero().squeeze(-1)
    cu = torch.cat([starts, torch.tensor([B * T], device=ref.device)]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max())


def target_positions(labels: Any) -> Any:
    """Flattened (B*T) positions whose next-token target is not -100: the rows the LM head needs in training.

    Computed by the collator on the host, they let the head skip prompt and padding positions on CUDA too
    (``index_select`` with an index already on the device needs no sync; ``nonzero`` on the device would).
    """
    import torch

    shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:]
    return (shifted.reshape(-1) != -100).nonzero().squeeze(-1)
