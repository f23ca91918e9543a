"""Sequence classification (single-label CE, multi-label BCE) and regression (MSE).

The loss follows transformers' rules (`problem_type`, or inferred: one label -> MSE, integer labels ->
CE ignoring -100, else BCE) and is the model's own (model/losses.py), taken as a *sum* over examples so that `FineTuneTask`
weights an optimizer step by its labelled examples, exactly as the causal LM weights by tokens.
Metrics (torchmetrics, synced across ranks): accuracy and macro-F1, or MSE and R2.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional

import torch
import torchmetrics
from torch import nn

from mistral_ft.model.losses import PROBLEM_TYPES, classification_loss_sum, infer_problem_type
from mistral_ft.training.tasks.base import IGNORE_INDEX, CheckpointMismatchError, FineTuneTask, TaskSettings

def class_report(confusion: torch.Tensor, names: list[str]) -> dict[str, Any]:
    """Per-class precision / recall and the confusion matrix (rows = true label, columns = predicted).

    Precision of class k = C[k, k] / column sum; recall = C[k, k] / row sum; a class never predicted (or never
    present) gets 0.0, as torchmetrics' ``zero_division=0`` does. Example, 2 classes, C = [[3, 1], [0, 2]]:
    precision [1.0, 0.667], recall [0.75, 1.0].
    """
    c = confusion.long().cpu()
    diag = c.diag().double()
    predicted, present = c.sum(0).double(), c.sum(1).double()
    precision = torch.where(predicted > 0, diag / predicted.clamp(min=1), torch.zeros_like(diag))
    recall = torch.where(present > 0, diag / present.clamp(min=1), torch.zeros_like(diag))
    return {"labels": list(names), "confusion": c.tolist(),
            "precision": {n: float(p) for n, p in zip(names, precision)},
            "recall": {n: float(r) for n, r in zip(names, recall)}}


class ClassificationTask(FineTuneTask):
    """Holds a `MistralForSequenceClassification` (or its peft wrapper, `score` trained in full).

    `num_labels`, `problem_type` and `id2label` are read from the model config, which train.py builds
    from the data's label names; they travel in the hyperparameters of every checkpoint.
    """

    def __init__(self, model: nn.Module, settings: TaskSettings, hparams: Optional[Mapping[str, Any]] = None) -> None:
        super().__init__(model, settings, hparams)
        mcfg = model.config
        self.num_labels = int(mcfg.num_labels)
        self.problem_type = str(mcfg.problem_type or infer_problem_type(self.num_labels))
        if self.problem_type not in PROBLEM_TYPES:
            raise ValueError(f"problem_type: {self.problem_type!r} is not one of {list(PROBLEM_TYPES)}")
        self.id2label: dict[int, str] = {int(k): str(v) for k, v in (mcfg.id2label or {}).items()}
        self.metrics = nn.ModuleDict(self._make_metrics())
        # counts / points behind the plots, kept out of `metrics` because they are not one number
        self.details = nn.ModuleDict(self._make_details())
        self.last_details: dict[str, Any] = {}

    def _make_metrics(self) -> dict[str, torchmetrics.Metric]:
        n = self.num_labels
        if self.problem_type == "regression":
            return {"val_mse": torchmetrics.MeanSquaredError(), "val_r2": torchmetrics.R2Score()}
        if self.problem_type == "multi_label_classification":
            return {
                "val_accuracy": torchmetrics.classification.MultilabelAccuracy(num_labels=n),
                "val_f1": torchmetrics.classification.MultilabelF1Score(num_labels=n, average="macro"),
            }
        return {
            "val_accuracy": torchmetrics.classification.MulticlassAccuracy(num_classes=n, average="micro", ignore_index=IGNORE_INDEX),
            "val_f1": torchmetrics.classification.MulticlassF1Score(num_classes=n, average="macro", ignore_index=IGNORE_INDEX),
        }

    def _make_details(self) -> dict[str, torchmetrics.Metric]:
        if self.problem_type == "regression":  # CatMetric syncs (concatenates) across ranks
            return {"preds": torchmetrics.CatMetric(), "target": torchmetrics.CatMetric()}
        if self.problem_type == "single_label_classification":
            return {"confusion": torchmetrics.classification.MulticlassConfusionMatrix(
                num_classes=self.num_labels, ignore_index=IGNORE_INDEX)}
        return {}

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Pooled logits (B, num_labels)."""
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits

    def loss_sum(self, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, int, Any]:
        logits = self(batch["input_ids"], batch.get("attention_mask"))
        loss, n = classification_loss_sum(logits, batch["labels"], self.problem_type)
        return loss, n, logits

    def update_val_metrics(self, batch: Mapping[str, torch.Tensor], out: Any) -> None:
        logits = out.detach().float()
        labels = batch["labels"]
        if self.problem_type == "regression":
            preds, target = logits.view(-1), labels.float().view(-1)
        elif self.problem_type == "multi_label_classification":
            preds, target = torch.sigmoid(logits), labels.long()
        else:
            preds, target = logits.argmax(-1), labels.view(-1).long()
        for metric in self.metrics.values():
            metric.update(preds, target)
        if self.problem_type == "regression":
            self.details["preds"].update(preds)
            self.details["target"].update(target)
        elif "confusion" in self.details:
            self.details["confusion"].update(preds, target)

    def val_metrics(self, val_loss: float) -> dict[str, float]:
        out = {}
        for name, metric in self.metrics.items():
            out[name] = float(metric.compute())
            metric.reset()
        if self.problem_type == "regression":
            self.last_details = {"preds": self.details["preds"].compute().view(-1).tolist(),
                                 "target": self.details["target"].compute().view(-1).tolist()}
        elif "confusion" in self.details:
            names = [self.id2label.get(i, str(i)) for i in range(self.num_labels)]
            self.last_details = class_report(self.details["confusion"].compute(), names)
        for metric in self.details.values():
            metric.reset()
        return out

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["mistral_ft"]["id2label"] = {int(k): v for k, v in self.id2label.items()}
        checkpoint["mistral_ft"]["problem_type"] = self.problem_type

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """The head's rows mean labels: resuming with another label order would silently scramble them."""
        saved = {int(k): str(v) for k, v in checkpoint.get("mistral_ft", {}).get("id2label", {}).items()}
        if saved and saved != self.id2label:
            raise CheckpointMismatchError(
                f"label mapping changed since the checkpoint: checkpoint {saved}, this run {self.id2label} "
                "(set data.labels to the checkpoint's order)"
            )
        super().on_load_checkpoint(checkpoint)
