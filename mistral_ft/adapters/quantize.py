"""4-bit NF4 quantization of our Mistral model for QLoRA (bitsandbytes `Linear4bit`).

QLoRA (Dettmers et al. 2023, https://arxiv.org/abs/2305.14314) freezes the base in 4-bit NormalFloat with
double quantization (the per-block absmax scales are themselves quantized, ~0.37 bit/param saved) and
trains LoRA adapters in a higher-precision compute dtype. transformers does this inside `from_pretrained`
(`BitsAndBytesConfig`); we load our model as usual and swap each decoder `nn.Linear` for a
`bnb.nn.Linear4bit` built from its full-precision weight.

Why these choices (checked against peft 0.21 and bitsandbytes 0.50):
- peft wraps a `Linear4bit` in its own 4-bit LoRA layer only when the model says it is loaded in 4 bit
  (`getattr(model, "is_loaded_in_4bit")`, passed as `loaded_in_4bit` to `dispatch_bnb_4bit`); without the
  attribute it would treat the layer as a plain Linear and read the packed uint8 weight as a matrix.
- `lm_head` and `score` stay in full precision, as in transformers' `llm_int8_skip_modules` default:
  the output layer is small next to the decoder and quantizing it costs the most accuracy.
- We do not call peft's `prepare_model_for_kbit_training`: it freezes every parameter (peft does that),
  casts every non-4-bit parameter (embeddings, norms, lm_head) to fp32 (+1 GB on a 7B model, while our
  RMSNorm already computes in fp32 and Lightning's bf16-mixed autocasts the rest), and turns gradient
  checkpointing on (we leave that to `model.gradient_checkpointing`, which the QLoRA recipe sets).
- `Params4bit.to(device)` quantizes: on CPU (fp32 or bf16 compute) as on CUDA, so QLoRA trains in CI.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

SKIP_MODULES = ("lm_head", "score")
QUANT_TYPES = ("nf4", "fp4")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_compute_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto`: bf16 on a CUDA device (the QLoRA paper's choice), fp32 on CPU (bf16 matmuls are slow there)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in _DTYPES:
        raise ValueError(f"peft.compute_dtype: {name!r} is not one of {['auto', *_DTYPES]}")
    return _DTYPES[name]


def quantize_4bit(model: nn.Module, *, quant_type: str = "nf4", double_quant: bool = True,
                  compute_dtype: str | torch.dtype = "auto", device: Optional[torch.device | str] = None,
                  skip: tuple[str, ...] = SKIP_MODULES) -> nn.Module:
    """Replace every `nn.Linear` of `model` (except `skip` names) by a frozen 4-bit `bnb.nn.Linear4bit`.

    Each full-precision weight is quantized on `device` (default: where it is) and then dropped, so a
    model loaded on CPU can be quantized layer by layer onto a GPU without ever holding two copies there.
    Marks the model the way peft checks for (`is_loaded_in_4bit`) and records the settings in
    `model.quantization_config` (a plain dict; export reads nothing from it: it merges into the original
    full-precision weights, never into these).
    """
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"peft.quant_type: {quant_type!r} is not one of {list(QUANT_TYPES)}")
    import bitsandbytes as bnb

    first = next(model.parameters())
    target = torch.device(device) if device is not None else first.device
    dtype = compute_dtype if isinstance(compute_dtype, torch.dtype) else resolve_compute_dtype(str(compute_dtype), target)
    replaced = 0
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            if type(child) is not nn.Linear or child_name in skip:
                continue
            q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                  compute_dtype=dtype, compress_statistics=double_quant, quant_type=quant_type,
                                  device="meta")
            weight = child.weight.detach()
            q.weight = bnb.nn.Params4bit(weight.to(target), requires_grad=False, compress_statistics=double_quant,
                                         quant_type=quant_type, module=q).to(target)  # .to() quantizes
            if child.bias is not None:
                q.bias = nn.Parameter(child.bias.detach().to(target, dtype), requires_grad=False)
            q.train(child.training)
            setattr(parent, child_name, q)
            del weight, child
            replaced += 1
    if not replaced:
        raise ValueError("peft.method=qlora: the model has no nn.Linear layer to quantize")
    model.is_loaded_in_4bit = True  # what peft checks before it uses its bitsandbytes LoRA layers
    model.quantization_method = "bitsandbytes"
    model.quantization_config = {"quant_type": quant_type, "double_quant": double_quant,
                                 "compute_dtype": str(dtype).removeprefix("torch."), "skip_modules": list(skip),
                                 "layers": replaced}
    return model


def count_4bit_layers(model: nn.Module) -> int:
    """How many `Linear4bit` layers a (possibly peft-wrapped) model holds, for tests and reports."""
    import bitsandbytes as bnb

    return sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())


def describe(model: nn.Module) -> dict[str, Any]:
    """The `quantization_config` recorded by `quantize_4bit`, or {} for a full-precision model."""
    return dict(getattr(model, "quantization_config", {}) or {})
