"""End-to-end: tiny v0.3-shaped (v3 tokenizer) and Nemo-shaped (Tekken) models train on tool-call rows, export,
and transformers reproduces the training ids; a v3 tokenizer on a Nemo-sized model is refused (exit 2)."""

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


V3 = "mistral_instruct_tokenizer_240323.model.v3"
TEKKEN = "tekken_240718.json"


def _model(tmp_path: Path, vocab_size: int, tokenizer_file: str = V3) -> Path:
    folder = build_tiny(tmp_path / f"tiny_{vocab_size}", overrides={"vocab_size": vocab_size})
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        (folder / name).unlink(missing_ok=True)
    MistralTokenizer.from_pretrained(DATA / tokenizer_file).save_pretrained(folder)
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
@pytest.mark.parametrize("tokenizer_file, vocab_size, saved_name", [(V3, 32768, "tokenizer.model.v3"),
                                                                    (TEKKEN, 131072, "tekken.json")])
def test_tool_rows_train_export_and_transformers_ids(tmp_path: Path, tokenizer_file, vocab_size, saved_name) -> None:
    """v0.3-shaped model + v3 tokenizer, Nemo-shaped (vocab 131072) + Tekken: train, export, reload."""
    folder = _model(tmp_path, vocab_size, tokenizer_file)
    run = tmp_path / "run"
    rc = main(["recipe=instruct_lora", "model=tiny", f"model.path={folder}", "data=jsonl",
               f"data.train_file={_rows(tmp_path / 'tools.jsonl')}", "data.max_length=512", "data.batch_size=4",
               "trainer.max_steps=12", "optimizer.lr=3e-3", f"hydra.run.dir={run}", *QUIET])
    assert rc == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["train_loss_last"] <= 0.9 * summary["train_loss_first"], summary
    saved = sorted(p.relative_to(run).as_posix() for p in run.rglob(saved_name))
    assert saved and not list(run.rglob("tokenizer.model")), saved

    # Export: the merged folder carries the tokenizer as it came, and transformers' AutoTokenizer gives the
    # ids we trained on (its mistral_common-backed tokenizer in finetuning mode).
    from transformers import AutoTokenizer

    from mistral_ft.export import main as export_main

    out = tmp_path / "export"
    assert export_main([f"run_dir={run}", f"output_dir={out}"]) == 0
    merged = next(p.parent for p in out.rglob("config.json") if (p.parent / "model.safetensors").is_file()
                  or any(p.parent.glob("model*.safetensors")))
    assert (merged / saved_name).read_bytes() == (DATA / tokenizer_file).read_bytes()
    hf = AutoTokenizer.from_pretrained(str(merged), mode="finetuning")
    assert type(hf).__name__ == "MistralCommonBackend"
    row = json.loads((tmp_path / "tools.jsonl").read_text().splitlines()[0])
    ours, _ = MistralTokenizer.from_pretrained(merged).encode_chat(row["messages"], tools=row["tools"])
    theirs = hf.apply_chat_template(row["messages"], tools=row["tools"], tokenize=True)
    assert list(theirs["input_ids"] if hasattr(theirs, "keys") else theirs) == ours


def test_v3_tokenizer_on_a_nemo_sized_model_exits_2(tmp_path: Path, capsys) -> None:
    folder = _model(tmp_path, 131072)
    run = tmp_path / "run"
    rc = main(["recipe=instruct_lora", "model=tiny", f"model.path={folder}", "data=jsonl",
               f"data.train_file={_rows(tmp_path / 'tools.jsonl')}", "trainer.max_steps=1", f"hydra.run.dir={run}",
               *QUIET])
    err = capsys.readouterr().err
    assert rc == 2 and "allow_vocab_mismatch" in err and "Traceback" not in err
    assert not (run / "checkpoints").exists()
