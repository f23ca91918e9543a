"""What the fine-tuning LightningModules share: token-weighted steps, optimizer, schedule, lean checkpoints.

The modules *hold* a model (ours, possibly wrapped by peft) instead of subclassing it: the model stays
a plain HF-shaped `nn.Module` that saves, loads and exports on its own, and the training concerns
(loss weighting, metrics, optimizer, checkpoint contents) live here.

Token-weighted loss across micro-batches and ranks
--------------------------------------------------
The loss of an optimizer step is  sum of token losses over all its micro-batches and ranks / total
target tokens of the step.  Lightning's accumulation divides each micro-batch loss by
`accumulate_grad_batches` and DDP averages gradients over ranks: on their own they give a mean of
per-batch means, which over-weights short batches. Worked example (one rank, k = 2):

    micro-batch 1: 3 targets, summed loss S1;  micro-batch 2: 30 targets, summed loss S2
    mean of means:   (S1/3 + S2/30) / 2     <- what plain accumulation optimizes
    token-weighted:  (S1 + S2) / 33         <- what one batch holding both optimizes

We cannot know the 30 while back-propagating the 3 (the data loader has not produced it yet), so
each micro-batch back-propagates S_i / c with one constant c per step (the first micro-batch's
target count, averaged over ranks so every rank uses the same c and keeps fp16 gradients in a sane
range). After the last backward, when all targets are known, `on_before_optimizer_step` multiplies
the gradients by  c * k * W / N  (N = all-reduced target count, k = accumulate_grad_batches, W = world
size), which turns Lightning's  (1/W) sum_ranks (1/k) sum_i grad(S_i)/c  into  sum grad(S_i) / N.
That hook runs after AMP unscaling and before gradient clipping, so clipping sees the true gradient.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Mapping
from typing import Any, Optional

import lightning as L
import torch
from torch import nn

from mistral_ft.errors import UserError
from mistral_ft.training.registry import build
from mistral_ft.training.reliability import check_nonfinite, grad_probe, trainable_grads
from mistral_ft.training.tasks.preference_loss import preference_settings

IGNORE_INDEX = -100


def host_to_device(values: list[float], device: torch.device) -> torch.Tensor:
    """Host numbers as a float32 device tensor without a stream sync: through pinned memory on CUDA
    (``torch.tensor(x, device="cuda")`` copies from pageable memory and waits for the stream)."""
    t = torch.tensor(values, dtype=torch.float32)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


class CheckpointMismatchError(UserError):
    """A checkpoint whose trainable weights do not match this run's (e.g. another peft config)."""


@dataclasses.dataclass(frozen=True)
class TaskSettings:
    """What a task module reads from the run config, typed; `from_config` is the one place it is read.

    `optimizer` / `scheduler` are those groups as validated (a built-in `name:` or a `_target_` with its
    keyword arguments), built by `training.registry.build`; `fsdp` holds the strategy group when
    strategy=fsdp (None otherwise); `preference` is the checked `preference:` node (task=dpo).
    """

    optimizer: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    scheduler: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    fsdp: Optional[Mapping[str, Any]] = None
    loss_chunk_size: int = 0        # causal LM: tokens per chunk of the fused linear + cross-entropy (0 = plain)
    skip_nonfinite: bool = False    # a NaN/inf step: skip it instead of stopping
    preference: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_config(cls, c: Mapping[str, Any]) -> "TaskSettings":
        strategy = c.get("strategy") or {}
        preference = preference_settings(c) if str(c.get("task", "dpo")) == "dpo" else {}
        return cls(optimizer=dict(c.get("optimizer") or {}), scheduler=dict(c.get("scheduler") or {}),
                   fsdp=dict(strategy) if strategy.get("name") == "fsdp" else None,
                   loss_chunk_size=int((c.get("model") or {}).get("loss_chunk_size") or 0),
                   skip_nonfinite=bool(c.get("skip_nonfinite", False)), preference=preference)


class FineTuneTask(L.LightningModule):
    """Base of the task modules; subclasses implement `loss_sum(batch)` and the validation metrics.

    `settings` is what the module reads; `hparams` (the whole run config, secrets stripped, as a plain
    dict: checkpoints are read with `torch.load(weights_only=True)`, which refuses OmegaConf objects) is
    only recorded in every checkpoint, where `resume=` and export compare it with the run folder's.
    """

    def __init__(self, model: nn.Module, settings: TaskSettings, hparams: Optional[Mapping[str, Any]] = None) -> None:
        super().__init__()
        self.model = model
        self.settings = settings
        self.save_hyperparameters(dict(hparams or {}))
        # Checkpoints hold only trainable weights; the frozen base comes from model.path on load.
        self.strict_loading = False
        self._norm: Optional[float] = None  # provisional per-step divisor c (see module docstring)
        self._acc_loss = torch.zeros(())  # summed loss of the current step's micro-batches (this rank)
        self._acc_targets = 0  # targets of the current step's micro-batches (this rank)
        self._val_loss = 0.0
        self._val_targets = 0
        self.loss_history: list[tuple[int, float]] = []  # (optimizer step, token-weighted step loss), rank 0
        self.val_history: list[dict[str, float]] = []
        self.nonfinite_skips: list[dict[str, Any]] = []  # steps dropped with skip_nonfinite=true
        self.tokens_seen = 0  # non-pad tokens trained on by this rank since this process started
        self.tokens_before = 0  # all ranks' tokens of earlier (resumed-from) segments
        self.targets_seen = 0  # useful tokens (the ones with a loss: labels != -100) of this rank
        self.targets_before = 0  # all ranks' useful tokens of earlier segments
        self.train_time_s = 0.0  # training wall time without validation, over all resumed segments
        self._t_start: Optional[float] = None
        self._t_val: Optional[float] = None

    def configure_model(self) -> None:
        """strategy=fsdp: shard the model with FSDP2 (Lightning's ModelParallelStrategy calls this with
        `self.device_mesh` set, after peft was applied); a no-op for the other strategies."""
        if self.settings.fsdp is not None:
            from mistral_ft.distributed.fsdp import shard_task_model

            shard_task_model(self, self.device_mesh, self.settings.fsdp, str(self.trainer.precision))

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Count real tokens on the host, before the batch moves to the device (no sync in the step)."""
        if isinstance(batch, dict) and "input_ids" in batch:
            mask = batch.get("attention_mask")
            batch["num_tokens"] = int(mask.sum()) if mask is not None else int(batch["input_ids"].numel())
        return batch

    # ---- subclass interface -------------------------------------------------------------------
    def loss_sum(self, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, int, Any]:
        """(summed loss over the batch's targets, number of targets, model output)."""
        raise NotImplementedError

    # ---- training -----------------------------------------------------------------------------
    def training_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss_sum, n_targets, _ = self.loss_sum(batch)
        if self._norm is None:  # first micro-batch of an optimizer step
            if self.trainer.world_size == 1:
                self._norm = max(1.0, float(n_targets))  # a host int: no device work at all
            else:  # averaged over ranks: a collective on a device tensor, never read back on the host here
                first = host_to_device([float(n_targets)], loss_sum.device)[0]
                self._norm = self.trainer.strategy.reduce(first, reduce_op="mean").clamp(min=1.0)
        self._acc_loss = self._acc_loss.to(loss_sum.device) + loss_sum.detach().float()
        self._acc_targets += n_targets
        n_tokens = batch.get("num_tokens")  # counted on the host (on_before_batch_transfer): no sync
        if n_tokens is None:
            mask = batch.get("attention_mask")
            n_tokens = int(mask.sum()) if mask is not None else int(batch["input_ids"].numel())
        self.tokens_seen += int(n_tokens)
        self.targets_seen += int(n_targets)  # a host int (the collator counts targets): no sync
        return loss_sum / self._norm

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Rescale the accumulated gradients to the token-weighted mean and log the step loss."""
        if self._norm is None:  # no training_step since the last optimizer step (should not happen)
            return
        device = self._acc_loss.device
        # + 0 or NaN when a gradient is not finite: the non-finite check rides on the step's one host read
        probe = grad_probe(optimizer, device)
        if self.trainer.world_size == 1:
            loss_total, n_total, norm = float(self._acc_loss + probe), float(self._acc_targets), float(self._norm)
        else:  # one all-reduce of (loss + probe, targets), then one host read of it and the divisor c
            local = torch.stack([self._acc_loss + probe, host_to_device([float(self._acc_targets)], device)[0]])
            total = self.trainer.strategy.reduce(local, reduce_op="sum")
            loss_total, n_total, norm = torch.cat([total.double(), self._norm.double().reshape(1)]).tolist()
        if not math.isfinite(loss_total) and check_nonfinite(self, optimizer, loss_total / max(n_total, 1.0), self._acc_loss):
            self._norm, self._acc_loss, self._acc_targets = None, torch.zeros((), device=device), 0
            return  # skipped (skip_nonfinite=true): no gradients, no update; otherwise it raised
        scale = norm * self.trainer.accumulate_grad_batches * self.trainer.world_size / max(n_total, 1.0)
        # one fused multiply over all gradients (FSDP2's DTensor grads: their local shards), not a Python loop
        torch._foreach_mul_(trainable_grads(optimizer), scale)
        step_loss = loss_total / max(n_total, 1.0)
        self.loss_history.append((int(self.global_step), step_loss))
        self.log("train_loss", step_loss, on_step=True, on_epoch=False, prog_bar=True, batch_size=1)
        self.log("lr", float(optimizer.param_groups[0]["lr"]), on_step=True, on_epoch=False, batch_size=1)
        self.log("train_targets", n_total, on_step=True, on_epoch=False, batch_size=1)
        self._norm = None
        self._acc_loss = torch.zeros((), device=device)
        self._acc_targets = 0

    def on_train_start(self) -> None:
        self._t_start = time.perf_counter()

    def on_train_end(self) -> None:
        if self._t_start is not None:
            self.train_time_s += time.perf_counter() - self._t_start
            self._t_start = None

    # ---- validation ---------------------------------------------------------------------------
    def on_validation_start(self) -> None:
        self._t_val = time.perf_counter()

    def on_validation_end(self) -> None:
        # Validation time is not training time: keep tokens_per_s honest.
        if self._t_val is not None and self._t_start is not None:
            self._t_start += time.perf_counter() - self._t_val
        self._t_val = None

    def validation_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> None:
        loss_sum, n_targets, out = self.loss_sum(batch)
        self._val_loss += float(loss_sum.detach().float())
        self._val_targets += n_targets
        self.update_val_metrics(batch, out)

    def update_val_metrics(self, batch: Mapping[str, torch.Tensor], out: Any) -> None:
        """Hook for task metrics (classification); the causal LM has none beyond the loss."""

    def val_metrics(self, val_loss: float) -> dict[str, float]:
        """Task metrics to log at the end of validation, given the token-weighted val loss."""
        return {}

    def on_validation_epoch_end(self) -> None:
        strategy = self.trainer.strategy
        device = self.device
        total = float(strategy.reduce(torch.tensor(self._val_loss, device=device), reduce_op="sum"))
        n = float(strategy.reduce(torch.tensor(float(self._val_targets), device=device), reduce_op="sum"))
        self._val_loss, self._val_targets = 0.0, 0
        if n == 0:
            return
        metrics = {"val_loss": total / n, **self.val_metrics(total / n)}
        for key, value in metrics.items():
            self.log(key, value, prog_bar=key == "val_loss", batch_size=1)
        if not self.trainer.sanity_checking:
            self.val_history.append({"step": int(self.global_step), **metrics})

    # ---- optimizer ----------------------------------------------------------------------------
    def configure_optimizers(self) -> dict[str, Any]:
        """The optimizer and schedule groups through `training.registry.build` (a built-in or a `_target_`)."""
        named = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("no trainable parameters: check peft.method / peft.target_modules")
        opt = self.settings.optimizer
        # Weight decay on matrices only: decaying norm gains and biases toward 0 hurts (GPT-2/BERT practice).
        # A `_target_` optimizer without a weight_decay key keeps its own default on every group.
        decay = [p for _, p in named if p.ndim >= 2]
        no_decay = [p for _, p in named if p.ndim < 2]
        wd = {"weight_decay": float(opt["weight_decay"])} if "weight_decay" in opt else {}
        groups = [g for g in ({"params": decay, **wd}, {"params": no_decay, **({"weight_decay": 0.0} if wd else {})})
                  if g["params"]]
        optimizer = build("optimizer", opt, groups)
        total = self.trainer.max_steps if self.trainer.max_steps and self.trainer.max_steps > 0 else int(
            self.trainer.estimated_stepping_batches
        )
        scheduler = build("scheduler", self.settings.scheduler, optimizer, total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ---- checkpoints --------------------------------------------------------------------------
    def trainable_names(self) -> set[str]:
        return {n for n, p in self.named_parameters() if p.requires_grad}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep only trainable weights: a LoRA checkpoint of a 7B model is megabytes, not 14 GB."""
        keep = self.trainable_names()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        checkpoint["mistral_ft"] = {
            "loss_history": [[s, v] for s, v in self.loss_history],
            "val_history": [dict(v) for v in self.val_history],
            "nonfinite_skips": [dict(v) for v in self.nonfinite_skips],
            "tokens_seen": self.total_tokens_seen(),
            "targets_seen": self.total_targets_seen(),
            "train_time_s": float(self.train_time_s + (time.perf_counter() - self._t_start if self._t_start else 0.0)),
            "trainable_keys": sorted(keep),
        }

    def total_tokens_seen(self) -> int:
        """Tokens trained on over all ranks and resumed segments (collective: call on every rank)."""
        local = torch.tensor(float(self.tokens_seen), device=self.device)
        return self.tokens_before + int(self.trainer.strategy.reduce(local, reduce_op="sum"))

    def total_targets_seen(self) -> int:
        """Useful (target) tokens over all ranks and resumed segments (collective: call on every rank)."""
        local = torch.tensor(float(self.targets_seen), device=self.device)
        return self.targets_before + int(self.trainer.strategy.reduce(local, reduce_op="sum"))

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint trained with other trainable weights: strict=False would load nothing silently."""
        saved = set(checkpoint.get("state_dict", {}))
        expected = self.trainable_names()
        if saved != expected:
            missing = sorted(expected - saved)[:3]
            unexpected = sorted(saved - expected)[:3]
            raise CheckpointMismatchError(
                "the checkpoint's trainable weights do not match this run's (was it trained with another "
                f"peft/model config?): missing {missing}, unexpected {unexpected}"
            )
        extra = checkpoint.get("mistral_ft", {})
        self.loss_history = [(int(s), float(v)) for s, v in extra.get("loss_history", [])]
        self.val_history = [dict(v) for v in extra.get("val_history", [])]
        self.nonfinite_skips = [dict(v) for v in extra.get("nonfinite_skips", [])]
        self.tokens_before = int(extra.get("tokens_seen", 0))
        self.tokens_seen = 0
        self.targets_before = int(extra.get("targets_seen", 0))
        self.targets_seen = 0
        self.train_time_s = float(extra.get("train_time_s", 0.0))
