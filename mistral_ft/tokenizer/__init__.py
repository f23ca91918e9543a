"""Mistral tokenizers of every version behind one entry point: ``MistralTokenizer.from_pretrained(path)``.

- ``files``: which file a path means and which version it holds (from the file's contents).
- ``v1``: our exact sentencepiece path for v1 (Mistral-7B-v0.1/v0.2, Mixtral-8x7B), ``StreamDecoder``,
  ``check_token_ids``.
- ``common``: v2, v3, v7 and Tekken with mistral_common as the engine, same interface.
- ``batching``: the transformers-style batch calls both share.

``docs/tokenizers.md`` lists which models use which version and how each is encoded.
"""

from mistral_ft.tokenizer.common import IncrementalDecoder, MistralCommonTokenizer
from mistral_ft.tokenizer.files import ChatError, TokenizerFileError, TokenizerKind
from mistral_ft.tokenizer.v1 import MistralTokenizer, StreamDecoder, check_token_ids, default_tokenizer_file

__all__ = [
    "ChatError",
    "IncrementalDecoder",
    "MistralCommonTokenizer",
    "MistralTokenizer",
    "StreamDecoder",
    "TokenizerFileError",
    "TokenizerKind",
    "check_token_ids",
    "default_tokenizer_file",
]
