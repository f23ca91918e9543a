"""Fixtures the data tests share: import them into a test module (`from helpers.data import tok, ...`)."""

from __future__ import annotations

import datasets
import pytest

from mistral_ft.tokenizer import MistralTokenizer


@pytest.fixture(scope="module")
def tok() -> MistralTokenizer:
    """The default (v1) tokenizer from mistral_common's files: no download."""
    return MistralTokenizer.from_pretrained(None)


@pytest.fixture(autouse=True)
def datasets_cache_in_tmp(tmp_path_factory, monkeypatch):
    """Keep the arrow caches `datasets` writes for each tmp file out of ~/.cache."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.getbasetemp() / "hf_datasets_cache")
