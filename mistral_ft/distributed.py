"""Multi-device training: the strategy builders (DDP, FSDP2), sharding, sharded checkpoints, checks, memory plan.

Why FSDP2 through Lightning's `ModelParallelStrategy` and not `strategy="fsdp"`
-------------------------------------------------------------------------------
Lightning's `FSDPStrategy` is FSDP1 (`FullyShardedDataParallel`) and refuses CPU; FSDP2
(`torch.distributed.fsdp.fully_shard`) shards each parameter as a `DTensor` along dim 0, keeps
parameter names and `requires_grad` per parameter (so a frozen base and LoRA matrices live in one
group without FSDP1's `use_orig_params` rules), and runs on CPU with gloo, so it is tested in CI.
`ModelParallelStrategy` calls the LightningModule's `configure_model()` with `self.device_mesh` set;
`FineTuneTask.configure_model` calls `shard_task_model` below.

`ModelParallelStrategy()` with default sizes builds the mesh (data_parallel = num_nodes,
tensor_parallel = devices): on one node FSDP2 then shards nothing and every rank gets the same
batches. `FSDP2Strategy` fixes the mesh to (data_parallel = world, tensor_parallel = 1) once the
world size is known (in `setup_environment`, when `trainer.devices=-1` has been resolved).

Gradient averaging: FSDP2 reduce-scatters gradients as a mean over the data-parallel ranks, as DDP
all-reduces them as a mean, so the token-weighted rescaling in `FineTuneTask.on_before_optimizer_step`
(which multiplies by the world size) holds unchanged (tested: same per-step losses as one process
with the same global batch).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from mistral_ft.config_schema import ConfigError

log = logging.getLogger("mistral_ft.distributed")

STRATEGIES = ("auto", "ddp", "fsdp")


# ---- checks before anything starts --------------------------------------------------------------------
def _launcher_env() -> Optional[str]:
    """Which external launcher started this process, if any (SLURM's srun or torchrun)."""
    if "SLURM_NTASKS" in os.environ and "SLURM_PROCID" in os.environ and os.environ.get("SLURM_JOB_NAME") not in ("bash", "interactive"):
        return "slurm"
    if all(k in os.environ for k in ("MASTER_ADDR", "WORLD_SIZE", "RANK", "LOCAL_RANK")):
        return "torchrun"
    return None


def requested_devices(devices: Any, use_cuda: bool) -> int:
    """The number of devices `trainer.devices` asks for on this node (-1/"auto": all of them)."""
    available = torch.cuda.device_count() if use_cuda else (os.cpu_count() or 1)
    if devices in (-1, "-1", "auto"):
        return available if use_cuda else 1
    if isinstance(devices, (list, tuple)):
        return len(devices)
    text = str(devices)
    if "," in text:
        return len([d for d in text.split(",") if d.strip()])
    return int(text)


def check_distributed(c: Mapping[str, Any], use_cuda: bool) -> None:
    """Refuse combinations the hardware or the code cannot run, saying what to use instead.

    Raised before the run folder exists (ConfigError: one paragraph, exit status 2).
    """
    strategy = str(c["strategy"]["name"])
    trainer = c["trainer"]
    method = str(c["peft"]["method"])
    devices = requested_devices(trainer.get("devices", 1), use_cuda)
    num_nodes = int(trainer.get("num_nodes", 1) or 1)
    if use_cuda and devices > torch.cuda.device_count():
        raise ConfigError(f"trainer.devices={trainer.get('devices')}: this machine has {torch.cuda.device_count()} "
                          "CUDA device(s); use trainer.devices=-1 for all of them")
    if strategy == "fsdp" and method == "qlora":
        raise ConfigError(
            "peft=qlora with strategy=fsdp is not supported: FSDP2 cannot shard bitsandbytes' packed 4-bit "
            "weights (Params4bit). Use peft=qlora with strategy=ddp (or auto on one device), or peft=lora / "
            "peft=dora with strategy=fsdp to shard a bf16 base.")
    if strategy == "fsdp" and str(c["optimizer"]["name"]) == "adamw8bit":
        raise ConfigError("optimizer=adamw8bit with strategy=fsdp is not supported: bitsandbytes' 8-bit update "
                          "does not take FSDP2's sharded (DTensor) parameters. Use optimizer=adamw with strategy=fsdp "
                          "(its states are sharded too), or optimizer=adamw8bit with strategy=ddp.")
    if strategy == "fsdp" and not c["strategy"].get("sharded_checkpoint", True):
        raise ConfigError("strategy.sharded_checkpoint=false is not supported: a gathered checkpoint does not resume "
                          "exactly under FSDP2 (measured). Leave it true; python -m mistral_ft.export reads the "
                          "sharded folders into one set of weights.")
    if strategy == "fsdp" and c["strategy"].get("cpu_offload") and not use_cuda:
        raise ConfigError("strategy.cpu_offload=true moves FSDP2 shards between CPU and a GPU; on CPU-only training "
                          "the shards already live in RAM: leave strategy.cpu_offload=false")
    if num_nodes > 1 and _launcher_env() is None:
        raise ConfigError(
            f"trainer.num_nodes={num_nodes} needs a launcher that starts one process per device on every node: "
            "run under SLURM (sbatch scripts/slurm/multi_node.sbatch, which calls srun) or torchrun "
            "(--nnodes, --nproc-per-node, --rdzv-endpoint; see docs/distributed.md). Lightning only starts "
            "the processes of one node itself.")
    if strategy == "auto" and (devices > 1 or num_nodes > 1):
        log.info("strategy=auto on %d device(s) x %d node(s): Lightning picks DDP", devices, num_nodes)


# ---- strategies ---------------------------------------------------------------------------------------
def build_strategy(s: Mapping[str, Any]) -> Any:
    """The Lightning strategy object for the `strategy:` group."""
    name = str(s["name"])
    if name == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        return DDPStrategy(find_unused_parameters=bool(s.get("find_unused_parameters", False)))
    if name == "fsdp":
        return FSDP2Strategy(save_distributed_checkpoint=bool(s.get("sharded_checkpoint", True)))
    return "auto"


def _fsdp2_strategy_class() -> type:
    from lightning.pytorch.strategies import ModelParallelStrategy

    class _FSDP2Strategy(ModelParallelStrategy):
        """ModelParallelStrategy with a pure data-parallel mesh and a resume that reads trainable weights only.

        Our checkpoints hold only the trainable weights (`FineTuneTask.on_save_checkpoint`): Lightning's
        sharded load asks the checkpoint for *every* key of the model and fails on the frozen base. We load
        the keys the checkpoint holds (each rank reads its own shards) and the optimizer state.
        """

        def setup_environment(self) -> None:
            self._data_parallel_size = self.num_nodes * self.num_processes
            self._tensor_parallel_size = 1
            super().setup_environment()

        def load_checkpoint(self, checkpoint_path: Any, weights_only: Optional[bool] = None) -> dict[str, Any]:
            path = Path(self.broadcast(checkpoint_path))
            if not path.is_dir():
                # Measured: Lightning's load of a gathered .ckpt under FSDP2 resumes, but step 3 of a resumed
                # run then differs from the uninterrupted run (10.207 vs 10.188); the sharded path is exact.
                raise ConfigError(f"resume={path}: strategy=fsdp resumes from sharded checkpoint folders only "
                                  "(written with strategy.sharded_checkpoint=true); resume this file with "
                                  "strategy=ddp, or export it with python -m mistral_ft.export")
            return load_sharded_checkpoint(path, self.model, [getattr(o, "_optimizer", o) for o in self.optimizers])

    return _FSDP2Strategy


class _LazyStrategy:
    """Import Lightning only when the fsdp strategy is built (keeps `import mistral_ft.distributed` light)."""

    def __call__(self, **kwargs: Any) -> Any:
        return _fsdp2_strategy_class()(**kwargs)


FSDP2Strategy = _LazyStrategy()


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


# ---- sharding -----------------------------------------------------------------------------------------
def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers (unit of sharding and of activation checkpointing), peft-wrapped or not."""
    from mistral_ft.model.modeling import MistralDecoderLayer

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


# ---- memory plan --------------------------------------------------------------------------------------
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
      every token, or for `loss_chunk_size` rows at a time with the chunked loss (training's default). With
      vocab 131072 (Tekken) that is 1.5 GiB per 2048-token chunk: not negligible. A classification head has
      no vocab-sized output (`classification=True`).
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
        strategy=str(c["strategy"]["name"]), world=world, optimizer=str(c["optimizer"]["name"]),
        gradient_checkpointing=bool(c["model"].get("gradient_checkpointing")
                                    or c["strategy"].get("activation_checkpointing")),
        vocab_size=int(getattr(config, "vocab_size", 0) or 0), loss_chunk_size=int(c["model"].get("loss_chunk_size") or 0),
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


def read_sharded_checkpoint(path: Path) -> dict[str, Any]:
    """A sharded checkpoint folder as `torch.load` of a plain .ckpt would give it (for export).

    The metadata (`meta.pt`: hyper_parameters, mistral_ft extras, loop state) plus `state_dict`: the
    trainable weights assembled from every rank's shards. No optimizer state (export needs none).
    """
    ckpt = torch.load(Path(path) / "meta.pt", map_location="cpu", weights_only=True)
    ckpt["state_dict"] = read_sharded_trainable(Path(path))
    return ckpt


# ---- rank-local loading -------------------------------------------------------------------------------
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

    from mistral_ft.model.weights import _shard_map, check_tensor_dtype, refuse_unknown_tensor

    model.to_empty(device=device)
    params = dict(model.named_parameters())
    lora = {n for n in params if ".lora_" in n}
    wanted = {_hf_name(n): n for n in params if n not in lora}
    found: set[str] = set()
    base = Path(folder)
    for shard in _shard_map(base):
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
    from mistral_ft.model import MistralConfig, MistralForCausalLM
    from mistral_ft.model.weights import resolve_dtype

    config = MistralConfig.from_pretrained(model_path)
    from mistral_ft.train import resolve_attn_implementation

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
