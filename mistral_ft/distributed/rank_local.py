"""Rank-local loading for strategy=fsdp: build on meta, then each rank reads only the rows of its own shards.

A 7B base never sits whole in any one process: each rank opens the safetensors files and reads the
slice of dim 0 that its DTensor shard holds, and replays the LoRA init from the recorded RNG state.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mistral_ft.model import MistralConfig, MistralForCausalLM
from mistral_ft.model.attention import resolve_attn_implementation
from mistral_ft.model.weights import check_tensor_dtype, refuse_unknown_tensor, resolve_dtype, shard_map


def rank_local_load_applies(c: Mapping[str, Any]) -> bool:
    """Whether this run builds the model on the meta device and lets each rank read only its own shards.

    strategy=fsdp with peft=lora or full fine-tuning of a causal LM (strategy.rank_local_load, default on).
    Not (yet) for DoRA (its magnitude vector is computed from the base weights when peft wraps them) nor
    classification (a new `score` head is initialised at load time): those load whole, then shard.
    """
    return (str(c["strategy"]["name"]) == "fsdp" and bool(c["strategy"].get("rank_local_load", True))
            and str(c["peft"]["method"]) in ("lora", "none") and str(c["task"]) == "causal_lm")


_ST_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}


def _read_rows(fh: Any, data_start: int, meta: Mapping[str, Any], row0: int, rows: int, out: torch.Tensor) -> None:
    """Read rows [row0, row0 + rows) of one safetensors tensor straight into `out` with a plain file read.

    Why not `safe_open(...).get_slice()`: it reads through a memory map, and the mapped file pages count
    in the process's resident memory while the file is open (measured: a rank-local load then peaks as
    high as a whole load). A seek + readinto touches only this rank's bytes, and only in the page cache.
    """
    dtype = _ST_DTYPES.get(str(meta["dtype"]))
    if dtype is None:
        raise RuntimeError(f"rank-local load: safetensors dtype {meta['dtype']} is not supported; "
                           "set strategy.rank_local_load=false")
    start, end = (int(x) for x in meta["data_offsets"])
    shape = [int(x) for x in meta["shape"]]
    row_bytes = (end - start) // shape[0]
    fh.seek(data_start + start + row0 * row_bytes)
    direct = out.dtype == dtype and out.device.type == "cpu" and out.is_contiguous()
    buf = out if direct else torch.empty((rows, *shape[1:]), dtype=dtype)
    view = buf.reshape(-1).view(torch.uint8).numpy()
    if fh.readinto(memoryview(view)) != rows * row_bytes:
        raise RuntimeError(f"rank-local load: {fh.name} ended early (truncated file?)")
    if not direct:
        out.copy_(buf)


def _hf_name(name: str) -> str:
    """peft parameter name -> the checkpoint's HF name (`base_model.model.X.base_layer.weight` -> `X.weight`)."""
    name = name.removeprefix("base_model.model.")
    for wrapper in (".base_layer.", ".original_module.", ".modules_to_save.default."):
        name = name.replace(wrapper, ".")
    return name


def _local_rows(p: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """(local tensor, first row, row count) of a parameter; FSDP2 shards dim 0 (a plain tensor: all rows)."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if not isinstance(p, DTensor):
        return p.data, 0, p.shape[0]
    shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    return p.to_local(), int(offset[0]), int(shape[0])


@torch.no_grad()
def materialize_rank_local(model: nn.Module, folder: str, rng_state: torch.Tensor, device: torch.device) -> None:
    """Fill a meta-built, already sharded model: each rank reads only the rows of its own shards.

    Base weights: each rank reads just the rows of its shards from the safetensors file (`_read_rows`:
    seek + readinto into the local shard), so host memory per rank stays near 1/world of the model.
    LoRA weights: re-drawn with the random state `apply_peft` saw, in peft's order (per layer: lora_A and
    lora_B constructors' kaiming init, then peft's reset: kaiming A, zero B), so a sharded run starts from
    exactly the adapter a single-process run draws (tested: same per-step losses).
    """
    import json
    import math

    model.to_empty(device=device)
    params = dict(model.named_parameters())
    lora = {n for n in params if ".lora_" in n}
    wanted = {_hf_name(n): n for n in params if n not in lora}
    found: set[str] = set()
    base = Path(folder)
    for shard in shard_map(base):
        with open(base / shard, "rb") as fh:
            header_len = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(header_len))
            for key, meta in header.items():
                if key == "__metadata__" or key == "lm_head.weight" and "lm_head.weight" not in wanted:
                    continue  # file metadata; the tied copy of the embeddings
                if key not in wanted:
                    refuse_unknown_tensor(base / shard, key, type(model).__name__)
                check_tensor_dtype(base / shard, key, str(meta["dtype"]))
                local, row0, rows = _local_rows(params[wanted[key]])
                if rows:
                    _read_rows(fh, 8 + header_len, meta, row0, rows, local)
                found.add(key)
    missing = sorted(set(wanted) - found)
    if missing:
        raise RuntimeError(f"{folder}: no tensor for {missing[:3]} (rank-local load); set strategy.rank_local_load=false")
    with torch.random.fork_rng(devices=[]):
        torch.set_rng_state(rng_state)
        for name, module in model.named_modules():
            a_name, b_name = f"{name}.lora_A.default.weight", f"{name}.lora_B.default.weight"
            if a_name not in params:
                continue
            a = torch.empty(params[a_name].shape)
            b = torch.empty(params[b_name].shape)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # nn.Linear(in, r) constructor
            nn.init.kaiming_uniform_(b, a=math.sqrt(5))  # nn.Linear(r, out) constructor
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # peft reset_lora_parameters (init_lora_weights=True)
            b.zero_()
            for pname, full in ((a_name, a), (b_name, b)):
                local, row0, rows = _local_rows(params[pname])
                local.copy_(full[row0:row0 + rows].to(local.dtype))


def meta_model(c: Mapping[str, Any], model_path: str) -> nn.Module:
    """The causal LM of `model_path` built on the meta device: shapes and dtype, no storage, nothing read.

    What `from_pretrained` builds before it reads the tensors; `materialize_rank_local` reads them later,
    each rank only its own shard rows.
    """

    config = MistralConfig.from_pretrained(model_path)

    on_cuda = torch.cuda.is_available() and str(c["trainer"].get("accelerator", "auto")) != "cpu"
    config.attn_implementation = resolve_attn_implementation(str(c["model"]["attn_implementation"]),
                                                             "cuda" if on_cuda else "cpu")
    dtype = resolve_dtype(c["model"]["dtype"], config)
    with torch.device("meta"):
        model = MistralForCausalLM(config)
    model.to(dtype)
    model.name_or_path = str(model_path)
    model.loading_info = {"unexpected": [], "initialised": [], "path": str(model_path), "rank_local": True}
    return model.train()
