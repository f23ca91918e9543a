"""Preference tuning: DPO on the causal LM (`DPOTask`) and Bradley-Terry reward models (`RewardTask`).

Batches come from `mistral_ft.data.preference.PairCollator`: 2P rows [chosen_1..P, rejected_1..P] of P
whole pairs (a pair never straddles ranks or micro-batches). The losses are in `preference_loss.py`.

Weighting: `loss_sum` returns the SUM of per-pair losses and the pair count, so `FineTuneTask` makes an
optimizer step's loss  sum over pairs of all micro-batches and ranks / total pairs  (a mean over pairs,
exactly, under gradient accumulation and DDP; see training/tasks/base.py), the way the causal LM weights tokens.

Reference model (DPO): with a peft adapter, the same module with the adapter disabled (peft's
`disable_adapter()` context: no second copy of the weights; with QLoRA the reference is the quantized
base, as in TRL); with peft=none, a frozen copy made before training (twice the weight memory). Its
log-probs are computed under no_grad in every step; precomputing them once per dataset is not implemented.

Dropout: off by default (`preference.disable_dropout`, as TRL's `disable_dropout=True`): with dropout the
policy differs from the reference at step 0 and the implicit rewards are noise. It sets every `nn.Dropout`
(peft's LoRA dropout included) to p=0 and the model's attention dropout to 0.

Logged per optimizer step (over all its pairs and ranks) and per validation: loss, reward accuracy,
chosen / rejected rewards, margin and summed answer log-probs (DPO); pair accuracy, margin and scores (reward).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Mapping
from typing import Any, Iterator, Optional

import torch
from torch import nn

from mistral_ft.training.tasks.base import FineTuneTask, TaskSettings
from mistral_ft.training.tasks.preference_loss import answer_logps, bradley_terry_loss, preference_loss

def disable_dropout(model: nn.Module) -> None:
    """p=0 on every nn.Dropout and attention dropout 0 (the config value our attention reads)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        cfg = getattr(module, "config", None)
        if cfg is not None and getattr(cfg, "attention_dropout", 0.0):
            cfg.attention_dropout = 0.0


class _PairMetrics:
    """Sums of per-pair statistics, reduced over ranks on demand (one all-reduce of a small vector)."""

    def __init__(self, keys: tuple[str, ...]) -> None:
        self.keys = keys
        self.sums = torch.zeros(len(keys) + 1, dtype=torch.float64)  # + the pair count

    def add(self, stats: Mapping[str, torch.Tensor], losses: torch.Tensor) -> None:
        vals = [losses.detach().double().sum() if k == "loss" else stats[k].double().sum() for k in self.keys]
        vec = torch.stack([*vals, torch.tensor(float(losses.numel()), dtype=torch.float64, device=losses.device)])
        self.sums = self.sums.to(vec.device) + vec

    def compute(self, strategy: Any, prefix: str) -> dict[str, float]:
        total = strategy.reduce(self.sums.clone(), reduce_op="sum")
        self.sums = torch.zeros_like(self.sums)
        n = float(total[-1])
        if n == 0:
            return {}
        return {f"{prefix}{k}": float(total[i]) / n for i, k in enumerate(self.keys)}


class _PreferenceTask(FineTuneTask):
    """Shared step logic: per-pair losses summed, pair count as the weight, pair statistics logged."""

    metric_keys: tuple[str, ...] = ()

    def __init__(self, model: nn.Module, settings: TaskSettings, hparams: Optional[Mapping[str, Any]] = None) -> None:
        super().__init__(model, settings, hparams)
        self._train_metrics = _PairMetrics(self.metric_keys)
        self._val_metrics = _PairMetrics(self.metric_keys)

    def pair_losses(self, batch: Mapping[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def loss_sum(self, batch: Mapping[str, Any]) -> tuple[torch.Tensor, int, Any]:
        losses, stats = self.pair_losses(batch)
        if self.training:
            self._train_metrics.add(stats, losses)
        return losses.sum(), int(losses.numel()), (losses.detach(), stats)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self._norm is not None:  # a real step (see FineTuneTask): log its pair statistics, then rescale
            for key, value in self._train_metrics.compute(self.trainer.strategy, "train_").items():
                if key != "train_loss":
                    self.log(key, value, on_step=True, on_epoch=False, batch_size=1)
        super().on_before_optimizer_step(optimizer)

    def update_val_metrics(self, batch: Mapping[str, Any], out: Any) -> None:
        losses, stats = out
        self._val_metrics.add(stats, losses)

    def val_metrics(self, val_loss: float) -> dict[str, float]:
        return {k: v for k, v in self._val_metrics.compute(self.trainer.strategy, "val_").items() if k != "val_loss"}


class DPOTask(_PreferenceTask):
    """DPO / IPO / robust DPO (+ RPO term) on a `MistralForCausalLM`, usually wrapped by peft."""

    metric_keys = ("loss", "reward_accuracy", "reward_chosen", "reward_rejected", "reward_margin",
                   "logps_chosen", "logps_rejected")

    def __init__(self, model: nn.Module, settings: TaskSettings, hparams: Optional[Mapping[str, Any]] = None) -> None:
        super().__init__(model, settings, hparams)
        if settings.preference["disable_dropout"]:
            disable_dropout(model)
        self.has_adapter = callable(getattr(model, "disable_adapter", None))
        if not self.has_adapter:
            if settings.fsdp is not None:
                raise ValueError("task=dpo with peft=none and strategy=fsdp is not supported: the frozen reference "
                                 "copy would not be sharded. Use a peft adapter (its reference is the base with the "
                                 "adapter disabled) or strategy=ddp")
            ref = copy.deepcopy(model)
            for p in ref.parameters():
                p.requires_grad_(False)
            disable_dropout(ref)
            self.ref_model = ref.eval()

    def _log_probs(self, batch: Mapping[str, Any]) -> Any:
        out = self.model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), return_logits=True)
        return answer_logps(out.logits, batch["labels"])

    @contextlib.contextmanager
    def _reference(self) -> Iterator[nn.Module]:
        if self.has_adapter:
            with self.model.disable_adapter():
                yield self.model
        else:
            self.ref_model.eval()  # Lightning's .train() on the task reaches the copy too
            yield self.ref_model

    def reference_logps(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """Summed answer log-probs of the reference (2P,), no gradient."""
        with torch.no_grad(), self._reference() as ref:
            out = ref(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), return_logits=True)
            return answer_logps(out.logits, batch["labels"]).sum

    def pair_losses(self, batch: Mapping[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        P = batch["input_ids"].shape[0] // 2
        ref = self.reference_logps(batch)
        lp = self._log_probs(batch)
        s = self.settings.preference
        losses, stats = preference_loss(
            lp.sum[:P], lp.sum[P:], ref[:P], ref[P:], chosen_count=lp.count[:P], rejected_count=lp.count[P:],
            loss_type=s["loss_type"], beta=float(s["beta"]), label_smoothing=float(s["label_smoothing"]),
            rpo_alpha=float(s["rpo_alpha"]),
        )
        named = {
            "reward_accuracy": stats["accuracy"], "reward_chosen": stats["reward_chosen"],
            "reward_rejected": stats["reward_rejected"], "reward_margin": stats["margin"],
            "logps_chosen": stats["logps_chosen"], "logps_rejected": stats["logps_rejected"],
        }
        return losses, named


class RewardTask(_PreferenceTask):
    """Bradley-Terry on a `MistralForSequenceClassification` with num_labels=1, pooled at the last non-pad token."""

    metric_keys = ("loss", "accuracy", "margin", "score_chosen", "score_rejected")

    def __init__(self, model: nn.Module, settings: TaskSettings, hparams: Optional[Mapping[str, Any]] = None) -> None:
        super().__init__(model, settings, hparams)
        if int(model.config.num_labels) != 1:
            raise ValueError(f"task=reward needs a one-label score head, got num_labels={model.config.num_labels}")
        self.id2label = {0: "reward"}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Scores (B,)."""
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits.view(-1)

    def pair_losses(self, batch: Mapping[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        P = batch["input_ids"].shape[0] // 2
        scores = self(batch["input_ids"], batch.get("attention_mask"))
        return bradley_terry_loss(scores[:P], scores[P:])
