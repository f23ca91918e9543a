"""Multi-device checks before anything starts: launcher, device count, strategy and node combinations."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any, Optional

import torch

from mistral_ft.errors import ConfigError

log = logging.getLogger("mistral_ft.distributed")


def _launcher_env() -> Optional[str]:
    """Which external launcher started this process, if any (SLURM's srun or torchrun)."""
    if "SLURM_NTASKS" in os.environ and "SLURM_PROCID" in os.environ and os.environ.get("SLURM_JOB_NAME") not in ("bash", "interactive"):
        return "slurm"
    if all(k in os.environ for k in ("MASTER_ADDR", "WORLD_SIZE", "RANK", "LOCAL_RANK")):
        return "torchrun"
    return None


def launcher_ranks() -> tuple[int, int]:
    """(global rank, local rank) of this process before Lightning has set anything up.

    Why not LOCAL_RANK alone: under srun no LOCAL_RANK/RANK exists yet (Lightning's SLURMEnvironment reads
    SLURM_PROCID / SLURM_LOCALID), so every task would think it is rank 0, write the run folder's files and
    load the model onto cuda:0; under torchrun on the second node LOCAL_RANK is 0 but RANK is not.
    Lightning's own launcher (one node) sets LOCAL_RANK in its children, where it is also the global rank.
    """
    env = os.environ
    if _launcher_env() == "slurm":
        return int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", env["SLURM_PROCID"]))
    local = int(env.get("LOCAL_RANK", env.get("RANK", "0")))
    return int(env.get("RANK", local)), local


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
    if strategy == "fsdp" and str(c["optimizer"]["name"]) == "adamw8bit" and not c["optimizer"].get("_target_"):
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
