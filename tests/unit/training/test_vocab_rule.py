"""The vocabulary rule where tokenizer and model meet (training and validate): more tokens than the model's
vocab_size is an error; fewer is an error unless the gap is embedding padding (< 1024) or
model.allow_vocab_mismatch=true."""

from __future__ import annotations

import importlib.resources
import json
from pathlib import Path

import pytest

from mistral_ft.tokenizer import MistralTokenizer
from mistral_ft.training.run import VOCAB_PADDING_LIMIT, check_tokenizer_matches_model

DATA = Path(str(importlib.resources.files("mistral_common") / "data"))


@pytest.fixture(scope="module")
def v3() -> MistralTokenizer:
    return MistralTokenizer.from_pretrained(DATA / "mistral_instruct_tokenizer_240323.model.v3")


def model_folder(tmp_path: Path, vocab_size: int) -> Path:
    folder = tmp_path / f"model_{vocab_size}"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "mistral", "vocab_size": vocab_size}))
    return folder


def test_equal_and_padded_vocabularies_pass(tmp_path: Path, v3) -> None:
    assert v3.vocab_size == 32768
    assert check_tokenizer_matches_model(v3, model_folder(tmp_path, 32768)) is None
    assert check_tokenizer_matches_model(v3, model_folder(tmp_path, 32768 + VOCAB_PADDING_LIMIT - 1)) is None


def test_larger_tokenizer_is_always_an_error(tmp_path: Path, v3) -> None:
    folder = model_folder(tmp_path, 32000)
    for allow in (False, True):
        problem = check_tokenizer_matches_model(v3, folder, allow_mismatch=allow)
        assert problem and "32768 tokens" in problem and "vocab_size 32000" in problem and "v3" in problem


def test_much_smaller_tokenizer_needs_allow_vocab_mismatch(tmp_path: Path, v3) -> None:
    nemo = model_folder(tmp_path, 131072)  # a v3 tokenizer on a Nemo-sized embedding
    problem = check_tokenizer_matches_model(v3, nemo)
    assert problem and "allow_vocab_mismatch" in problem and "98304 more" in problem
    assert check_tokenizer_matches_model(v3, model_folder(tmp_path, 32768 + VOCAB_PADDING_LIMIT)) is not None
    assert check_tokenizer_matches_model(v3, nemo, allow_mismatch=True) is None
