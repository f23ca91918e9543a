"""The pre-training corpus of the shipped tiny base (scripts/build_tiny_base.py) cannot leak the demo's answers.

Issue 14's rules: the plain text contains neither the chat format nor the validation rows, so the held-out
exact match measures what the chat fine-tune taught, not what pre-training memorised. The corpus is rebuilt
here with the seed and size the shipped base records in build_info.json, so this is the text it was trained on.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from mistral_ft.model.tiny import TINY_BASE_DIR

ROOT = Path(__file__).resolve().parents[3]
VAL = ROOT / "mistral_ft" / "bundled_data" / "instruct_val.jsonl"


@pytest.fixture(scope="module")
def corpus():
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        spec = importlib.util.spec_from_file_location("build_tiny_base", ROOT / "scripts" / "build_tiny_base.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    info = json.loads((TINY_BASE_DIR / "build_info.json").read_text(encoding="utf-8"))
    return mod.corpus(info["docs"], info["seed"])


def test_corpus_has_no_chat_format(corpus):
    markers = ["[INST]", "[/INST]", "INST]", "<s>", "</s>", "<unk>", "[TOOL", "[AVAILABLE", "<<SYS>>"]
    hits = [(m, d) for d in corpus for m in markers if m in d]
    assert hits == []
    assert len(corpus) >= 10_000 and all(d.strip() for d in corpus)


def test_corpus_has_no_validation_prompt_or_answer(corpus):
    text = "\n".join(corpus)
    rows = [json.loads(line) for line in VAL.read_text(encoding="utf-8").splitlines() if line.strip()]
    turns = {m["content"] for r in rows for m in r["messages"] if m["role"] in ("user", "assistant")}
    assert len(turns) > 60
    leaked = sorted(t for t in turns if t in text)
    assert leaked == []
    # the content the held-out answers copy is in the corpus (a piece it never saw could not be copied) ...
    held_names = {r["messages"][-2]["content"].removeprefix("Greet ").rstrip(".") for r in rows
                  if r["messages"][-2]["content"].startswith("Greet ")}
    assert held_names and all(f" {n}" in text for n in held_names)
    # ... but never in the answer's template
    assert not any(f"Hello {n}," in text for n in held_names)
