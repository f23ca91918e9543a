"""Fixtures of the bad-input corpus: one finished tiny LoRA run shared by every module (read-only: a case
that changes it works on its own copy)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from helpers.bad_input import QUIET


@pytest.fixture(scope="session")
def bad_run(tmp_path_factory) -> Path:
    """A finished 2-step LoRA run (adapter/, checkpoints/, base_model.json, config.yaml)."""
    from mistral_ft import train

    run = tmp_path_factory.mktemp("bad_input_run") / "run"
    rc = train.main(["recipe=instruct_lora", "model=tiny", "trainer.max_steps=2", "data.batch_size=2",
                     "data.validation_file=null", "peft.target_modules=[q_proj,v_proj]", "peft.r=2",
                     f"hydra.run.dir={run}", *QUIET])
    assert rc == 0
    import logging

    root = logging.getLogger()
    for h in list(root.handlers):  # Hydra's job logging keeps appending to run/train.log after an in-process run
        if str(getattr(h, "baseFilename", "")).startswith(str(run)):
            root.removeHandler(h)
            h.close()
    return run


@pytest.fixture(scope="session")
def tiny_folder() -> Path:
    from mistral_ft.model.tiny import tiny_model_path

    return Path(tiny_model_path())


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", os.environ.get("HF_HUB_OFFLINE", "1"))
