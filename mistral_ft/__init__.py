"""mistral_ft: fine-tuning for Mistral models with our own exact implementation of the model.

    from mistral_ft import MistralConfig, MistralModel, MistralForCausalLM, MistralForSequenceClassification
"""

from .model import (
    MistralCache,
    MistralConfig,
    MistralForCausalLM,
    MistralForSequenceClassification,
    MistralModel,
)

__version__ = "0.1.0"
__all__ = ["MistralCache", "MistralConfig", "MistralForCausalLM", "MistralForSequenceClassification", "MistralModel"]


def __getattr__(name: str):
    # The tokenizer pulls in sentencepiece; import it only when asked for.
    if name == "MistralTokenizer":
        from .tokenizer import MistralTokenizer

        return MistralTokenizer
    raise AttributeError(name)
