"""Fault injection for the crash-safety tests: Lightning callbacks a test run adds through the callbacks group.

    +callbacks.fault._target_=tests.helpers.faults.KillAfterStep +callbacks.fault.step=4

None of this is in the package: production code has no test hooks. `fault_args` spells the overrides.

* KillAfterStep(step)        SIGKILL after optimizer step N, before its checkpoint (ModelCheckpoint's hook
                             runs after ours: Lightning orders checkpoint callbacks last)
* KillDuringWrite(write)     SIGKILL in the middle of this process's K-th checkpoint write: half the bytes in
                             the temporary file, fsynced (what a crash inside `fs.atomic_write_bytes` leaves).
                             It wraps `AtomicCheckpointIO.write`, through which every checkpoint file goes.
* NonFinite(kind, step)      kind "grad": one gradient element NaN at step N; "loss": the step loss inf
* OutOfMemory(step)          raise torch.OutOfMemoryError at step N (the CUDA error, on any device)
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import lightning as L
import torch

from mistral_ft.fs import temp_path
from mistral_ft.training.reliability import AtomicCheckpointIO

_MODULE = __name__


def fault_args(cls: str, **kwargs: Any) -> list[str]:
    """The command-line overrides that add fault `cls` (a class name of this module) with its arguments."""
    return [f"+callbacks.fault._target_={_MODULE}.{cls}", *(f"+callbacks.fault.{k}={v}" for k, v in kwargs.items())]


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


class KillAfterStep(L.Callback):
    def __init__(self, step: int) -> None:
        self.step = int(step)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self.step:
            _die()


class KillDuringWrite(L.Callback):
    def __init__(self, write: int) -> None:
        self.write, self.count = int(write), 0

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        io = AtomicCheckpointIO.of(trainer)
        assert io is trainer.strategy.checkpoint_io, "the run's checkpoints do not go through AtomicCheckpointIO"
        original = io.write

        def write(path: Path, data: bytes) -> None:
            self.count += 1
            if self.count != self.write:
                return original(path, data)
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            with open(temp_path(Path(path)), "wb") as fh:
                fh.write(data[: len(data) // 2])
                fh.flush()
                os.fsync(fh.fileno())
            _die()

        io.write = write  # this trainer's instance only


class NonFinite(L.Callback):
    def __init__(self, kind: str, step: int) -> None:
        assert kind in ("grad", "loss"), kind
        self.kind, self.step = kind, int(step)

    def on_after_backward(self, trainer: Any, pl_module: Any) -> None:
        if trainer.global_step != self.step:
            return
        if self.kind == "grad":
            p = next(p for p in pl_module.parameters() if p.grad is not None)
            p.grad.view(-1)[0] = float("nan")
        else:
            pl_module._acc_loss = pl_module._acc_loss + float("inf")


class OutOfMemory(L.Callback):
    def __init__(self, step: int) -> None:
        self.step = int(step)

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self.step:
            raise torch.OutOfMemoryError(f"CUDA out of memory (test fault OutOfMemory(step={self.step}))")
