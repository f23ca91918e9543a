"""LightningModules for fine-tuning: they hold a Mistral model and own loss, metrics and optimizer."""

from mistral_ft.model.losses import classification_loss_sum
from mistral_ft.training.registry import lr_factor
from mistral_ft.training.tasks.base import CheckpointMismatchError, FineTuneTask, TaskSettings
from mistral_ft.training.tasks.causal_lm import CausalLMTask, count_targets
from mistral_ft.training.tasks.classification import ClassificationTask
from mistral_ft.training.tasks.preference import DPOTask, RewardTask

TASKS = {"causal_lm": CausalLMTask, "classification": ClassificationTask, "dpo": DPOTask, "reward": RewardTask}

__all__ = [
    "TASKS", "CausalLMTask", "DPOTask", "RewardTask", "CheckpointMismatchError", "ClassificationTask", "FineTuneTask", "TaskSettings",
    "classification_loss_sum", "count_targets", "lr_factor",
]
