"""The bundled tool-call set (data/tools_train.jsonl, the README's v0.3 example): fresh from its script, every
row's ids equal mistral_common's finetuning encoding on v3 and Tekken, and v1 refuses it naming a row."""

from __future__ import annotations

import importlib.resources
import json
import subprocess
import sys
from pathlib import Path

import pytest

from mistral_ft.data import build_datasets
from mistral_ft.data.errors import DataError
from mistral_ft.data.formats import IGNORE_INDEX
from mistral_ft.tokenizer import MistralTokenizer

ROOT = Path(__file__).resolve().parents[3]
FILE = ROOT / "data" / "tools_train.jsonl"
MC = Path(str(importlib.resources.files("mistral_common") / "data"))


@pytest.fixture(autouse=True)
def _datasets_cache_in_tmp(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path_factory.mktemp("hf_datasets_cache")))


def test_bundled_tool_data_is_fresh():
    assert subprocess.run([sys.executable, "scripts/make_tool_data.py", "--check"], cwd=ROOT).returncode == 0


@pytest.mark.parametrize("name", ["mistral_instruct_tokenizer_240323.model.v3", "tekken_240718.json"])
def test_bundled_tool_rows_match_mistral_common(name):
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.protocol.instruct.validator import ValidationMode
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer as MC_Tokenizer

    tok = MistralTokenizer.from_pretrained(MC / name)
    train, _, _ = build_datasets({"train_file": str(FILE), "format": "messages", "max_length": 1024}, tok)
    ref = MC_Tokenizer.from_file(str(MC / name), mode=ValidationMode.finetuning)
    rows = [json.loads(line) for line in FILE.read_text().splitlines()]
    assert len(train) == len(rows) == 48
    for i in (0, 1, 2, 17, 47):  # one of each kind, and the ends
        want = ref.encode_chat_completion(ChatCompletionRequest.model_validate(rows[i])).tokens
        ex = train[i]
        assert list(ex["input_ids"]) == want, i
        labels = list(ex["labels"])
        trained = [t for t, lab in zip(want, labels) if lab != IGNORE_INDEX]
        assert trained and trained.count(tok.eos_token_id) == sum(m["role"] == "assistant" for m in rows[i]["messages"])


def test_bundled_tool_rows_need_a_tool_capable_tokenizer():
    tok = MistralTokenizer.from_pretrained(MC / "tokenizer.model.v1")
    with pytest.raises(DataError, match=r"tools_train.jsonl:1: field .tools.: tool calls need a tokenizer of version v3"):
        build_datasets({"train_file": str(FILE), "format": "messages", "max_length": 1024}, tok)
