"""One history per run and a quiet console: resume continues the CSV and TensorBoard version and the W&B
run; a clean tiny run prints none of the third-party notices that cannot be acted on; fast_dev_run writes
nothing."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest

from mistral_ft.train import main as train_main

QUIET = ["trainer.enable_model_summary=false", "data.batch_size=2", "data.validation_file=null",
         "scheduler.warmup_steps=0", "eval.enabled=false", "checkpoint.every_n_train_steps=2"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    yield


def _train_steps(metrics: Path) -> list[int]:
    with open(metrics, newline="") as f:
        return [int(r["step"]) for r in csv.DictReader(f) if r["train_loss"]]


def test_resume_continues_one_csv_history(tmp_path):
    """4 steps, then a resume from the step-2 checkpoint (what a SIGKILL after step 3 leaves) to step 6: one
    logs/version_0 whose train rows are steps 0..5 once each (the interrupted session's 2, 3 replaced)."""
    run = tmp_path / "run"
    base = ["recipe=instruct_lora", "model=tiny", "trainer.enable_progress_bar=false", *QUIET]
    assert train_main([*base, "trainer.max_steps=4", f"hydra.run.dir={run}"]) == 0
    assert _train_steps(run / "logs" / "version_0" / "metrics.csv") == [0, 1, 2, 3]
    assert json.loads((run / "loggers.json").read_text()) == {"version": 0}
    assert train_main([f"resume={run / 'checkpoints' / 'step-000002.ckpt'}", "trainer.max_steps=6",
                       "trainer.enable_progress_bar=false"]) == 0
    assert sorted(p.name for p in (run / "logs").iterdir()) == ["version_0"]
    assert _train_steps(run / "logs" / "version_0" / "metrics.csv") == [0, 1, 2, 3, 4, 5]


def _tensorboard_steps(version: Path, tag: str = "train_loss") -> list[int]:
    """The steps of `tag` as TensorBoard shows them: its own reader, which drops what a resume's session START purges."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(version), size_guidance={"scalars": 0})
    acc.Reload()
    return [e.step for e in acc.Scalars(tag)]


def test_resume_continues_one_tensorboard_history(tmp_path):
    """The CSV case with logger=tensorboard: the resume writes into the same logs/version_0, and events the
    interrupted session wrote past the checkpoint's step are purged, so each step is there once."""
    run = tmp_path / "run"
    base = ["recipe=instruct_lora", "model=tiny", "trainer.enable_progress_bar=false", *QUIET, "logger=tensorboard"]
    assert train_main([*base, "trainer.max_steps=4", f"hydra.run.dir={run}"]) == 0
    assert json.loads((run / "loggers.json").read_text()) == {"version": 0}
    assert _tensorboard_steps(run / "logs" / "version_0") == [0, 1, 2, 3]
    assert train_main([f"resume={run / 'checkpoints' / 'step-000002.ckpt'}", "trainer.max_steps=6",
                       "trainer.enable_progress_bar=false"]) == 0
    assert sorted(p.name for p in (run / "logs").iterdir()) == ["version_0"]
    assert len(list((run / "logs" / "version_0").glob("events.out.tfevents.*"))) == 2  # one file per session
    assert _tensorboard_steps(run / "logs" / "version_0") == [0, 1, 2, 3, 4, 5]


@pytest.mark.slow  # wandb's import and offline run files: ~12 s
def test_resume_continues_the_wandb_run(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "run"
    base = ["recipe=instruct_lora", "model=tiny", "trainer.enable_progress_bar=false", *QUIET, "logger=wandb",
            "logger.offline=true"]
    assert train_main([*base, "trainer.max_steps=2", f"hydra.run.dir={run}"]) == 0
    first = json.loads((run / "loggers.json").read_text())["wandb_id"]
    assert train_main([f"resume={run}", "trainer.max_steps=3", "trainer.enable_progress_bar=false"]) == 0
    assert json.loads((run / "loggers.json").read_text())["wandb_id"] == first
    ids = {p.name.rsplit("-", 1)[-1] for p in (run / "wandb").glob("offline-run-*")}
    assert ids == {first}, ids  # both sessions logged into the one run


# Third-party lines a clean run printed before (issue 17): none can be acted on by a user of mistral_ft.
NOISE = ["pip install kernels", "litlogger", "limit_val_batches=1.0", "on_before_batch_transfer",
         "isinstance(treespec, LeafSpec)", "weights_only", "v_num", "/-2"]


@pytest.mark.slow  # two subprocess runs: ~90 s; test_the_filters_drop_only_their_message is the default check
def test_a_clean_tiny_run_prints_none_of_the_known_noise(tmp_path):
    """In a subprocess (a fresh interpreter: warnings and log filters as a user gets them), with the progress
    bar on; then a resume, which is where Lightning's `weights_only` notice came from."""
    import subprocess

    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "mistral_ft.train", "recipe=instruct_lora", "model=tiny", "trainer.max_steps=2",
           *QUIET, f"hydra.run.dir={run}"]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-2000:]
    second = subprocess.run([sys.executable, "-m", "mistral_ft.train", f"resume={run}", "trainer.max_steps=3"],
                            capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-2000:]
    for out in (first, second):
        text = out.stdout + out.stderr
        assert not [n for n in NOISE if n in text], [line for line in text.splitlines() if any(n in line for n in NOISE)]
    assert "epoch 1" in first.stdout + first.stderr  # the bar was on, with its corrected header


def test_fast_dev_run_writes_no_checkpoint_adapter_or_logs(tmp_path):
    run = tmp_path / "run"
    assert train_main(["recipe=instruct_lora", "model=tiny", "trainer.enable_progress_bar=false", *QUIET,
                       "trainer.fast_dev_run=true", f"hydra.run.dir={run}"]) == 0
    left = sorted(str(p.relative_to(run)) for p in run.rglob("*")) if run.exists() else []
    assert left == ["train.log"], left  # Hydra's log of the console, nothing of ours


def test_the_filters_drop_only_their_message(caplog):
    """The filters hold only the listed third-party lines: the same loggers' other records, and ours, pass."""
    import logging
    import warnings

    from mistral_ft.quiet import quiet_third_party

    quiet_third_party()
    bnb, pl = logging.getLogger("bitsandbytes.backends.cpu.ops"), logging.getLogger("lightning.pytorch.utilities.rank_zero")
    with caplog.at_level(logging.INFO):
        bnb.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please ... `pip install kernels`", "x")
        pl.info("💡 Tip: For seamless cloud logging and experiment tracking, try installing litlogger")
        bnb.warning("some other bitsandbytes warning")
        pl.info("GPU available: False, used: False")
        logging.getLogger("mistral_ft.train").warning("our own warning")
    assert [r.getMessage() for r in caplog.records] == ["some other bitsandbytes warning",
                                                        "GPU available: False, used: False", "our own warning"]
    with warnings.catch_warnings(record=True) as seen:
        quiet_third_party()  # inside catch_warnings, as the CLI's filters are at process level
        warnings.warn("You have overridden `on_before_batch_transfer` in `LightningModule` but have passed in a"
                      " `LightningDataModule`. It will use the implementation from `LightningModule` instance.")
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use ...", FutureWarning)
        warnings.warn("You have overridden `training_step` somewhere else")
    assert [str(w.message) for w in seen] == ["You have overridden `training_step` somewhere else"]
