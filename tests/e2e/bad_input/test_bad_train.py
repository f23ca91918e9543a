"""Bad input for `python -m mistral_ft.train` beyond tests/e2e/test_bad_input.py: numeric settings out of
range, run folders below a file, a full disk, corrupt files inside a run folder given to resume=."""

from __future__ import annotations

import shutil

import pytest

from helpers.bad_input import QUIET, Case, case_params, check_case, deep_json, enospc_open
from mistral_ft import train

INSTRUCT = ["recipe=instruct_lora", "model=tiny", "data.validation_file=null", *QUIET]


def _cfg(*overrides, expect=None):
    def make(tmp, ctx, monkeypatch):
        return Case([*INSTRUCT, *overrides, f"hydra.run.dir={tmp / 'run'}"], expect or overrides[0].split("=", 1))
    return make


def _run_below_file(tmp, ctx, monkeypatch):
    (tmp / "afile").write_text("x")
    return Case([*INSTRUCT, f"hydra.run.dir={tmp / 'afile' / 'run'}"], [str(tmp / "afile")])


def _disk_full(tmp, ctx, monkeypatch):
    (tmp / "disk").mkdir()
    enospc_open(monkeypatch, tmp / "disk")
    return Case([*INSTRUCT, f"hydra.run.dir={tmp / 'disk' / 'run'}"], [str(tmp / "disk"), "no space left", "B free of"])


def _resume_corrupt(rel, data, expect=()):
    def make(tmp, ctx, monkeypatch):
        run = tmp / "run"
        shutil.copytree(ctx["run"], run)
        (run / rel).write_bytes(data)
        return Case([f"resume={run}", "trainer.max_steps=3", *QUIET], [str(run / rel), *expect])
    return make


CASES = {
    "max_steps_negative": _cfg("trainer.max_steps=-5"),
    "batch_size_zero": _cfg("data.batch_size=0"),
    "accumulate_zero": _cfg("trainer.accumulate_grad_batches=0"),
    "lr_inf": _cfg("optimizer.lr=inf", expect=["optimizer.lr", "finite"]),
    "lora_rank_zero": _cfg("peft.r=0"),
    "lora_alpha_nan": _cfg("peft.alpha=nan", expect=["peft.alpha", "finite"]),
    "devices_zero": _cfg("trainer.devices=0", expect=["devices"]),
    "max_length_negative": _cfg("data.max_length=-1", expect=["max_length", "-1"]),
    "gradient_clip_negative": _cfg("trainer.gradient_clip_val=-1", expect=["gradient_clip_val", "-1"]),
    "target_modules_match_nothing": _cfg("peft.target_modules=[qq_proj]", expect=["qq_proj", "target_modules"]),
    "run_dir_below_a_file": _run_below_file,
    "disk_full": _disk_full,
    "resume_base_model_json_malformed": _resume_corrupt("base_model.json", b'{"path": ', ["line 1"]),
    "resume_base_model_json_too_deep": _resume_corrupt("base_model.json", deep_json().encode(), ["line 2", "nested"]),
}


@pytest.mark.parametrize("name", case_params(CASES,
    {"disk_full", "resume_base_model_json_malformed", "run_dir_below_a_file", "target_modules_match_nothing"}))
def test_train_bad_input(name, tmp_path, bad_run, capsys, monkeypatch):
    check_case(train.main, CASES[name](tmp_path, {"run": bad_run}, monkeypatch), tmp_path, capsys)
