"""`python -m mistral_ft.validate`: every bad row reported with file:line and field, statistics, exit codes."""

from __future__ import annotations

import json
from pathlib import Path

from mistral_ft.data import DataError, build_datasets, collect_problems
from mistral_ft.validate import main

GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
ARGS = ["recipe=instruct_lora", "model=tiny", "data.validation_file=null"]


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_every_bad_row_is_reported_and_the_exit_is_non_zero(tmp_path, capsys):
    bad = _write(tmp_path / "chats.jsonl", [
        json.dumps(GOOD),
        json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]}),
        '{"messages": [',
        json.dumps({"msgs": []}),
        json.dumps(GOOD),
    ])
    rc = main([*ARGS, f"data.train_file={bad}"])
    out, err = capsys.readouterr()
    assert rc == 1
    assert f"{bad}:2: field 'messages[1].content': empty text" in err
    assert f"{bad}:3: malformed JSON" in err
    assert f"{bad}:4: field 'messages': missing" in err
    assert "3 problem(s) found" in err and "Traceback" not in err
    assert "train examples: 2 valid, 3 skipped" in out


def test_statistics_truncation_and_time_estimate(tmp_path, capsys):
    long_answer = " ".join(["word"] * 60)
    rows = [json.dumps(GOOD)] * 3 + [json.dumps({"messages": [{"role": "user", "content": "q"},
                                                              {"role": "assistant", "content": long_answer}]})]
    data = _write(tmp_path / "chats.jsonl", rows)
    rc = main([*ARGS, f"data.train_file={data}", "data.max_length=32", "data.batch_size=2",
               "trainer.accumulate_grad_batches=2", "trainer.max_steps=10", "tokens_per_s=100"])
    out = capsys.readouterr().out
    assert rc == 0, out
    line = next(x for x in out.splitlines() if x.startswith("token lengths"))
    lengths = [int(w.rstrip(",")) for w in line.split() if w.rstrip(",").isdigit()]
    assert lengths[0] == lengths[1] < 32 < lengths[3]  # min == median (three short), max over the limit
    assert "truncated at data.max_length=32: 1 of 4 examples (25.0%)" in out
    assert "optimizer steps per epoch: 1 (4 examples per step" in out
    assert "trainer.max_steps=10: 10.00 epoch(s)" in out
    assert "tokens/s [configured (tokens_per_s)]" in out and "no problems found" in out


def test_measured_rate_from_a_run(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").write_text(json.dumps({"tokens_per_s": 1234.0}))
    assert main(["recipe=instruct_lora", "model=tiny", f"run={run}"]) == 0
    assert "1,234 tokens/s [measured (run=" in capsys.readouterr().out


def test_collect_mode_keeps_training_strict(tmp_path):
    """Outside `collect_problems()` the first bad row still stops the pipeline (training behaviour)."""
    from mistral_ft.model.tiny import tiny_model_path
    from mistral_ft.tokenizer import MistralTokenizer

    tok = MistralTokenizer.from_pretrained(tiny_model_path())
    bad = _write(tmp_path / "c.jsonl", [json.dumps(GOOD), json.dumps({"msgs": 1}), json.dumps({"msgs": 2})])
    cfg = {"train_file": str(bad), "format": "messages"}
    try:
        build_datasets(cfg, tok)
        raise AssertionError("no DataError")
    except DataError as err:
        assert f"{bad}:2" in str(err)
    with collect_problems() as problems:
        _, _, info = build_datasets(cfg, tok)
    assert [p.split(":")[1] for p in problems] == ["2", "3"] and info.train_examples == 1
