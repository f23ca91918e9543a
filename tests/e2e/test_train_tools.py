"""End-to-end: a tiny v0.3-shaped model (vocab 32768) with the v3 tokenizer trains on tool-call rows; the run
folder keeps the tokenizer as it came; a v3 tokenizer on a Nemo-sized model is refused (exit 2)."""

from __future__ import annotations

import importlib.resources
import json
from pathlib import Path

import pytest

from mistral_ft.model.tiny import build_tiny
from mistral_ft.tokenizer import MistralTokenizer
from mistral_ft.train import main

DATA = Path(str(importlib.resources.files("mistral_common") / "data"))
QUIET = ["trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
CITIES = ["Paris", "Rome", "Oslo", "Lima", "Kyiv", "Doha", "Bern", "Rabat"]


def _model(tmp_path: Path, vocab_size: int) -> Path:
    folder = build_tiny(tmp_path / f"tiny_{vocab_size}", overrides={"vocab_size": vocab_size})
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        (folder / name).unlink(missing_ok=True)
    MistralTokenizer.from_pretrained(DATA / "mistral_instruct_tokenizer_240323.model.v3").save_pretrained(folder)
    return folder


def _rows(path: Path) -> Path:
    rows = []
    for i, city in enumerate(CITIES * 2):
        call_id = f"call{i:05d}"
        rows.append({"tools": [WEATHER], "messages": [
            {"role": "user", "content": f"Weather in {city}?"},
            {"role": "assistant", "tool_calls": [{"id": call_id, "type": "function",
                                                  "function": {"name": "get_weather", "arguments": {"city": city}}}]},
            {"role": "tool", "tool_call_id": call_id, "content": f"{10 + i}C"},
            {"role": "assistant", "content": f"It is {10 + i}C in {city}."}]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.slow
def test_v3_tool_rows_train_and_loss_falls(tmp_path: Path) -> None:
    folder = _model(tmp_path, 32768)
    run = tmp_path / "run"
    rc = main(["recipe=instruct_lora", "model=tiny", f"model.path={folder}", "data=jsonl",
               f"data.train_file={_rows(tmp_path / 'tools.jsonl')}", "data.max_length=512", "data.batch_size=4",
               "trainer.max_steps=12", "optimizer.lr=3e-3", f"hydra.run.dir={run}", *QUIET])
    assert rc == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["train_loss_last"] <= 0.9 * summary["train_loss_first"], summary
    saved = sorted(p.relative_to(run).as_posix() for p in run.rglob("tokenizer.model*"))
    assert saved and all(p.endswith("tokenizer.model.v3") for p in saved), saved


def test_v3_tokenizer_on_a_nemo_sized_model_exits_2(tmp_path: Path, capsys) -> None:
    folder = _model(tmp_path, 131072)
    run = tmp_path / "run"
    rc = main(["recipe=instruct_lora", "model=tiny", f"model.path={folder}", "data=jsonl",
               f"data.train_file={_rows(tmp_path / 'tools.jsonl')}", "trainer.max_steps=1", f"hydra.run.dir={run}",
               *QUIET])
    err = capsys.readouterr().err
    assert rc == 2 and "allow_vocab_mismatch" in err and "Traceback" not in err
    assert not (run / "checkpoints").exists()
