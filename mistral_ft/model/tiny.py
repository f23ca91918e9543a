"""The embedded default (``model=tiny``): a small random Mistral, cached as a real HF folder.

It is built once from a fixed seed, written with ``save_pretrained`` (config.json + safetensors +
tokenizer.model) and loaded through the same ``from_pretrained`` path as a 7B checkpoint, so export, generate
and resume all reload the same base. Shapes keep every feature exercised: GQA (4 query heads, 2 key/value
heads), a sliding window (32) shorter than typical test sequences, and the real 32000-token vocabulary so the
Mistral tokenizer works unchanged.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from .config import MistralConfig

TINY_CONFIG = dict(
    vocab_size=32000, hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=4096, sliding_window=32, rms_norm_eps=1e-6,
    rope_theta=10000.0, pad_token_id=0, bos_token_id=1, eos_token_id=2, initializer_range=0.02,
)
TINY_SEED = 1234
TINY_VERSION = 2  # bump when the weights a seed produces change (init order), so stale caches are not reused


def cache_root() -> Path:
    """``$MISTRAL_FT_CACHE`` or ``~/.cache/mistral_ft``."""
    return Path(os.environ.get("MISTRAL_FT_CACHE", Path.home() / ".cache" / "mistral_ft")).expanduser()


def build_tiny(folder: str | os.PathLike, seed: int = TINY_SEED, overrides: dict | None = None) -> Path:
    """Write a freshly initialised tiny model (fixed seed) to ``folder``; returns the folder."""
    from .modeling import MistralForCausalLM

    config = MistralConfig(**{**TINY_CONFIG, **(overrides or {})})
    gen = torch.random.fork_rng()
    with gen:
        torch.manual_seed(seed)
        model = MistralForCausalLM(config)
    model.save_pretrained(folder)
    from ..tokenizer import MistralTokenizer

    MistralTokenizer.from_pretrained(None).save_pretrained(folder)  # the Mistral-7B-v0.1 tokenizer
    return Path(folder)


def tiny_model_path(seed: int = TINY_SEED, overrides: dict | None = None) -> Path:
    """The cached tiny model folder, built on first use (atomically: concurrent test workers are safe)."""
    key = hashlib.sha256(json.dumps([TINY_CONFIG, overrides or {}, seed, TINY_VERSION], sort_keys=True).encode()).hexdigest()[:12]
    folder = cache_root() / f"tiny-{key}"
    if (folder / "config.json").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-", dir=folder.parent))
    try:
        build_tiny(tmp, seed, overrides)
        try:
            os.rename(tmp, folder)
        except OSError:  # another process won the race; its folder is identical
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
