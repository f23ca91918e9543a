"""Shared fixtures: tiny random configs, and pairs of (our model, transformers' model) on the same weights."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Every value differs from MistralConfig's default, so a field the model ignores (falling back to its
# default) shows up in the parity tests. rms_norm_eps is large enough to matter: random-init activations have
# a mean square of ~4e-4, so 1e-3 vs the default 1e-6 moves every normalised value by tens of percent.
TINY = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, sliding_window=5, pad_token_id=0,
            rms_norm_eps=1e-3, rope_theta=500.0, initializer_range=0.05, bos_token_id=3, eos_token_id=4)


def tiny_config(**overrides):
    from mistral_ft import MistralConfig

    return MistralConfig(**{**TINY, **overrides})


def make_ours(cls, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    model = cls(tiny_config(**overrides)).eval()
    # random (not unit) norm weights, so a layout bug in RMSNorm cannot hide
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model


def hf_pair(tmp_path, ours_cls_name: str, attn: str = "sdpa", seed: int = 0, **overrides):
    """Our model saved with our save_pretrained, loaded by transformers' from_pretrained (same weights)."""
    import transformers

    import mistral_ft

    ours = make_ours(getattr(mistral_ft, ours_cls_name), seed, **overrides)
    ours.config.attn_implementation = attn
    folder = tmp_path / f"{ours_cls_name}-{seed}"
    ours.save_pretrained(folder)
    theirs = getattr(transformers, ours_cls_name).from_pretrained(folder, attn_implementation=attn,
                                                                  dtype=torch.float32).eval()
    return ours, theirs, folder


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matrices: one intra-op thread is faster, and far faster on a shared 2-core machine (measured:
    10 ms/step vs 56 ms/step of tiny-model decoding with 2 threads under load). Restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)



def pytest_collection_modifyitems(config, items):
    """Tests marked gpu need a CUDA device: skipped (not failed) without one, e.g. in CI."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="not run: needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
