"""Our Mistral model family (the system of the Hugging Face Mistral page), numerically equal to transformers."""

from .cache import MistralCache
from .config import ConfigError, MistralConfig
from .modeling import (
    MistralForCausalLM,
    MistralForSequenceClassification,
    MistralModel,
    MistralPreTrainedModel,
    causal_lm_loss,
)
from .weights import CheckpointError

__all__ = [
    "CheckpointError", "ConfigError", "MistralCache", "MistralConfig", "MistralForCausalLM",
    "MistralForSequenceClassification", "MistralModel", "MistralPreTrainedModel", "causal_lm_loss",
]
