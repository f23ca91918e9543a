"""Fixtures shared by the preference-tuning tests (data, training, TRL parity): the tiny model folder with its
tokenizer, and the bundled pairs tokenized once per module. Import the fixtures into a test module by name."""

from __future__ import annotations

import pytest

from mistral_ft.data.preference import build_pair_datasets

DATA = {"train_file": "data/preference_train.jsonl", "format": "preference", "max_length": 128}


@pytest.fixture(scope="module")
def tiny():
    from mistral_ft.model.tiny import tiny_model_path
    from mistral_ft.tokenizer import MistralTokenizer

    path = str(tiny_model_path())
    return path, MistralTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def pairs(tiny):
    train, _, _ = build_pair_datasets(DATA, tiny[1])
    return train
