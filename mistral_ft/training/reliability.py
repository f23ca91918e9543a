"""Crash safety: atomic checkpoints, `resume=auto`, non-finite steps, out-of-memory advice.

Why each piece exists
---------------------
* A job killed by SLURM preemption, the OOM killer or a power cut can die in the middle of
  `torch.save`. Lightning writes the final path through an fsspec transaction (a move at the end) but
  never fsyncs, so after a crash the page cache may not have reached the disk: a file that exists can
  still be short. `AtomicCheckpointIO` writes `.NAME.tmp-PID` in the same folder, fsyncs it, renames it
  over NAME (`os.replace` is atomic within one file system) and fsyncs the folder, so NAME is either the
  old complete file or the new complete file, never a torn one. `last.ckpt` goes through the same path.
* `resume=auto` makes a requeued job's command line idempotent: the same command starts fresh the
  first time and continues from the newest *complete* checkpoint afterwards (`newest_checkpoint`).
* Resume is exact with dropout on because checkpoints carry every random state training draws from
  (`RngStates`): torch CPU, CUDA per device, Python `random` and numpy, one entry per rank. They are
  captured when the checkpoint is written (after optimizer step N) and put back just before the first
  training batch after the restore, i.e. at the same point of the random streams where the uninterrupted
  run drew step N+1's dropout masks. Nothing else may draw from the global streams between two training
  batches: the DataLoaders therefore carry their own generators (worker seeds from seed and epoch, see
  data/sampler.py), and the sampler's order is a pure function of (seed, epoch) plus the saved position.
* A NaN/inf step would silently poison the weights (AdamW spreads it to every parameter it touches)
  and every later checkpoint. `check_nonfinite` stops before the optimizer step (so no checkpoint is
  written after the bad step) or, with `skip_nonfinite=true`, drops that step's gradients.

Fault injection (tests only) lives outside this package: tests/helpers/faults.py holds Lightning
callbacks (kill after step N, NaN gradient or loss, out-of-memory) that a test adds with
`+callbacks.fault._target_=tests.helpers.faults.KillAfterStep +callbacks.fault.step=4`, and one that
dies halfway through the K-th checkpoint write by wrapping `AtomicCheckpointIO.write`, the one place
checkpoint bytes reach the disk. A production run carries none of it.
"""

from __future__ import annotations

import io
import logging
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.io import TorchCheckpointIO

from mistral_ft.errors import TrainingStopped
from mistral_ft.fs import atomic_write_bytes
from mistral_ft.runs import read_checkpoint

log = logging.getLogger("mistral_ft.reliability")

class NonFiniteError(TrainingStopped):
    """Training stopped at a step whose loss or gradients were NaN/inf (message: step, batches, what)."""


# ---- atomic writes ----------------------------------------------------------------------------------


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's `TorchCheckpointIO` with atomic, fsynced writes and `weights_only=True` reads.

    Serializes to memory first, as Lightning's own `_atomic_save` does (so host memory briefly holds one
    checkpoint's bytes: megabytes for LoRA, the full trainable weights and optimizer state otherwise). Reads
    never unpickle code (`weights_only=True`): our checkpoints hold only tensors and plain containers.
    """

    @staticmethod
    def of(trainer: Any) -> "AtomicCheckpointIO":
        """The trainer's own instance (what a test's fault callback wraps), or a new one (fsdp has none)."""
        io_ = getattr(trainer.strategy, "checkpoint_io", None)
        return io_ if isinstance(io_, AtomicCheckpointIO) else AtomicCheckpointIO()

    def write(self, path: Path, data: bytes) -> None:
        """Every checkpoint file goes through here: step-N.ckpt, last.ckpt and the final copy."""
        atomic_write_bytes(path, data)

    def copy(self, src: Path, dst: Path) -> None:
        """Copy a (complete) checkpoint to `dst` atomically, e.g. the final step-N.ckpt to last.ckpt."""
        self.write(Path(dst), Path(src).read_bytes())

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Optional[Any] = None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO does not take storage_options")
        buf = io.BytesIO()
        torch.save(checkpoint, buf)
        self.write(Path(path), buf.getvalue())

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: Optional[bool] = None) -> dict[str, Any]:
        return read_checkpoint(Path(path), map_location=map_location)


# ---- random states -----------------------------------------------------------------------------------
def capture_rng_states() -> dict[str, Any]:
    """This process's random states as tensors and plain containers (readable with weights_only=True)."""
    import numpy as np

    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: Mapping[str, Any]) -> None:
    """Put back what `capture_rng_states` returned (CUDA only when this process has CUDA devices)."""
    import numpy as np

    torch.set_rng_state(states["torch"])
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    n = states["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if "cuda" in states and torch.cuda.is_available():
        if len(states["cuda"]) != torch.cuda.device_count():
            raise ValueError(f"cannot resume the random state: the checkpoint saved {len(states['cuda'])} CUDA "
                             f"device state(s) on this rank, this process sees {torch.cuda.device_count()}")
        torch.cuda.set_rng_state_all(states["cuda"])


class RngStates(Callback):
    """Saves every rank's random states in each checkpoint and restores them at the first batch after resume.

    `state_dict` runs on every rank while a checkpoint is dumped (Lightning calls it on all ranks before
    rank 0 writes), so under DDP/FSDP the states are gathered there: entry r belongs to rank r.
    """

    def __init__(self) -> None:
        self._pending: Optional[dict[str, Any]] = None

    def state_dict(self) -> dict[str, Any]:
        mine = capture_rng_states()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            ranks: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(ranks, mine)
            return {"ranks": ranks}
        return {"ranks": [mine]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        ranks = state_dict.get("ranks") or []
        world, rank = ((dist.get_world_size(), dist.get_rank())
                       if dist.is_available() and dist.is_initialized() else (1, 0))
        if len(ranks) != world:
            raise ValueError(f"cannot resume the random state: the checkpoint holds {len(ranks)} rank(s), "
                             f"this run has {world} (resume with the same number of processes)")
        self._pending = ranks[rank]

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if self._pending is not None:
            restore_rng_states(self._pending)
            self._pending = None



# ---- non-finite steps --------------------------------------------------------------------------------
def grad_probe(optimizer: torch.optim.Optimizer, device: torch.device) -> torch.Tensor:
    """0.0 when every gradient is finite, NaN otherwise, as a device tensor (no host sync).

    0 * max|grad| is 0 for finite values and NaN for inf/NaN; added to the step loss before the one
    all-reduce the step already does, it costs a pass over the gradients (clipping does the same) and
    no extra host sync.
    """
    grads = trainable_grads(optimizer)
    if not grads:
        return torch.zeros((), device=device)
    # one fused max-|g| per tensor (a multi-tensor kernel on CUDA, not one reduction launch per gradient);
    # the max norm is inf/NaN exactly when a value is, and cannot overflow as a sum of squares could
    peaks = torch._foreach_norm(grads, ord=float("inf"), dtype=torch.float32)
    if any(p.device != device for p in peaks):  # CPU-offloaded grads: gather the few scalars first
        peaks = [p.to(device) for p in peaks]
    return torch.stack(peaks).sum() * 0.0


def trainable_grads(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The optimizer's gradients as plain tensors (FSDP2's DTensor grads: their local shards, which are what a
    probe or an in-place rescale needs, and which a plain all-reduce can join)."""
    return [getattr(p.grad, "_local_tensor", p.grad) for g in optimizer.param_groups for p in g["params"]
            if p.grad is not None]


def check_nonfinite(module: Any, optimizer: torch.optim.Optimizer, step_loss: float, local_loss: torch.Tensor) -> bool:
    """Called when the step's reduced loss (+ gradient probe) is not finite: stop, or skip the step.

    Returns True when the step was skipped (its gradients dropped); raises `NonFiniteError` otherwise.
    Every rank sees the same all-reduced value, so every rank takes the same branch.
    """
    step = int(module.global_step)
    try:  # batches of this epoch fetched so far: the step's micro-batches are the last `accumulate` of them
        last = int(module.trainer.fit_loop.epoch_loop.batch_progress.current.ready) - 1
        first = max(0, last - int(module.trainer.accumulate_grad_batches) + 1)
        batches = str(last) if first == last else f"{first}..{last}"
    except (AttributeError, RuntimeError):
        batches = "?"
    bad = [n for g in optimizer.param_groups for n, p in zip(_names(module, g["params"]), g["params"])
           if p.grad is not None and not bool(torch.isfinite(p.grad).all())]
    loss_ok = bool(torch.isfinite(local_loss).all())
    what = ("loss " + ("is finite" if loss_ok else "is not finite")
            + (f"; non-finite gradients in {len(bad)} tensor(s), e.g. {bad[0]}" if bad else ""))
    where = f"optimizer step {step} (batch index {batches}, epoch {module.current_epoch})"
    if module.settings.skip_nonfinite:
        for g in optimizer.param_groups:
            for p in g["params"]:
                p.grad = None  # AdamW leaves parameters without a gradient untouched
        module.nonfinite_skips.append({"step": step, "batches": batches})
        log.warning("skipped %s: %s (skip_nonfinite=true)", where, what)
        return True
    raise NonFiniteError(
        f"non-finite training step at {where}: {what} (step loss {step_loss}). Stopped before the optimizer "
        "step, so no checkpoint holds it; the last good checkpoint is the newest one in the run folder "
        "(continue with resume=RUN_FOLDER, e.g. with a lower optimizer.lr), or set skip_nonfinite=true to skip "
        "such steps (counted in summary.json)."
    )


def _names(module: Any, params: list[torch.nn.Parameter]) -> list[str]:
    by_id = {id(p): n for n, p in module.named_parameters()}
    return [by_id.get(id(p), "?") for p in params]


# ---- out of memory -----------------------------------------------------------------------------------
def oom_advice(c: Mapping[str, Any]) -> str:
    """What to change when the GPU runs out of memory, with this run's current values."""
    data, trainer = c.get("data", {}), c.get("trainer", {})
    bs, acc = int(data.get("batch_size", 1)), int(trainer.get("accumulate_grad_batches", 1) or 1)
    lines = [
        "out of memory. Settings that reduce memory (the first keeps the global batch):",
        f"  data.batch_size={max(1, bs // 2)} trainer.accumulate_grad_batches={acc * 2}   (now {bs} x {acc})"
        if bs > 1 else f"  data.batch_size is already 1; raise trainer.accumulate_grad_batches instead (now {acc})",
        f"  data.max_length={max(2, int(data.get('max_length', 1024)) // 2)}   (now {data.get('max_length')}; "
        "longer examples are truncated)",
    ]
    if not c.get("model", {}).get("gradient_checkpointing"):
        lines.append("  model.gradient_checkpointing=true   (activation checkpointing: ~30% slower)")
    if c.get("peft", {}).get("method") != "qlora":
        lines.append("  peft=qlora   (4-bit base weights)")
    return "\n".join(lines)
