"""Multi-device training: the Lightning strategy builders (DDP, FSDP2).

Siblings: checks (before start), fsdp (sharding), checkpoint (sharded folders), rank_local (loading).

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

from mistral_ft.distributed.checkpoint import load_sharded_checkpoint
from mistral_ft.errors import ConfigError

log = logging.getLogger("mistral_ft.distributed")


# ---- checks before anything starts --------------------------------------------------------------------


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


# ---- sharding -----------------------------------------------------------------------------------------


# ---- memory plan --------------------------------------------------------------------------------------


# ---- rank-local loading -------------------------------------------------------------------------------


