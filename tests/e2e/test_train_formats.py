"""The data formats users bring, end to end: `python -m mistral_ft.train ... model=tiny trainer.max_steps=2`
in-process through `main(argv)` on ShareGPT rows, OpenAI content parts, a .txt file and a save_to_disk
folder; and the one-paragraph exit 2 for alpaca rows under the default format.
"""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest

from mistral_ft.train import main

QUIET = ["trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]
BASE = ["recipe=instruct_lora", "model=tiny", "data=jsonl", "trainer.max_steps=2", "data.batch_size=2",
        "eval.enabled=false", "peft.target_modules=[q_proj,v_proj]", "peft.r=2", "checkpoint.save_adapter=false", *QUIET]
CONV = [{"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "Hi!"}]
PARTS = [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
         {"role": "user", "content": [{"type": "text", "text": "Say"}, {"type": "text", "text": "hi."}]},
         {"role": "assistant", "content": "Hi!"}]


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _sharegpt(tmp: Path) -> tuple[Path, list[str]]:
    return _jsonl(tmp / "sharegpt.jsonl", [{"conversations": CONV}] * 4), ["data.format=sharegpt"]


def _parts(tmp: Path) -> tuple[Path, list[str]]:
    return _jsonl(tmp / "parts.jsonl", [{"messages": PARTS}] * 4), []


def _txt(tmp: Path) -> tuple[Path, list[str]]:
    (tmp / "book.txt").write_text("One short paragraph.\n\nAnother one,\nover two lines.\n\nA third.\n\nAnd a fourth.\n")
    return tmp / "book.txt", ["data.format=text"]


def _saved(tmp: Path) -> tuple[Path, list[str]]:
    datasets.Dataset.from_list([{"conversations": CONV}] * 4).save_to_disk(str(tmp / "saved"))
    return tmp / "saved", ["data.format=sharegpt"]


@pytest.mark.parametrize("make", [_sharegpt, _parts, _txt, _saved], ids=lambda f: f.__name__.strip("_"))
def test_train_runs_on_each_user_format(make, tmp_path):
    source, extra = make(tmp_path)
    run = tmp_path / "run"
    assert main([*BASE, f"data.train_file={source}", *extra, f"hydra.run.dir={run}"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["data"]["train_source"] == str(source) and summary["data"]["train_examples"] == 4, summary["data"]
    assert summary["global_step"] == 2 and summary["data"]["train_target_tokens"] > 0


def test_alpaca_rows_under_the_default_format_exit_2_with_one_paragraph(tmp_path, capsys):
    rows = _jsonl(tmp_path / "alpaca.jsonl", [{"instruction": "Say hi.", "input": "", "output": "Hi!"}] * 6)
    run = tmp_path / "run"
    capsys.readouterr()
    assert main([*BASE, f"data.train_file={rows}", "data.skip_invalid=true", f"hydra.run.dir={run}"]) == 2
    err = capsys.readouterr().err
    assert f"{rows}:1: field 'messages': missing" in err and "set data.format=alpaca" in err, err
    assert "Traceback" not in err and err.count(str(rows)) == 1 and not run.exists()
