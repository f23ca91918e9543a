"""A user's own classes through `_target_` and the callbacks group, end to end through `python -m mistral_ft.train`
(in-process `main(argv)`, a few steps of model=tiny)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from mistral_ft.runs import read_checkpoint
from mistral_ft.train import main

BASE = ["recipe=instruct_lora", "model=tiny", "data.batch_size=2", "data.max_length=64", "peft.r=4",
        "checkpoint.save_adapter=false", "eval.enabled=false", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]


def test_target_optimizer_scheduler_and_callbacks_train_and_early_stopping_stops(tmp_path):
    """One run (CPU is scarce): SGD + StepLR by `_target_`, the callbacks group's lr_monitor and early_stopping,
    and a user's callback with its own arguments."""
    run, steps_file = tmp_path / "run", tmp_path / "steps.jsonl"
    rc = main(BASE + [f"hydra.run.dir={run}", "trainer.max_steps=30", "trainer.val_check_interval=4",
                      "trainer.limit_val_batches=1",
                      "optimizer._target_=torch.optim.SGD", "optimizer.lr=0.2", "+optimizer.momentum=0.9",
                      "scheduler._target_=torch.optim.lr_scheduler.StepLR", "+scheduler.step_size=2",
                      "+scheduler.gamma=0.5", "callbacks=[early_stopping,lr_monitor]",
                      "+callbacks.early_stopping.stopping_threshold=1000.0",  # any finite val_loss stops the run
                      "+callbacks.mine._target_=helpers.plugins.StepLog", f"+callbacks.mine.path={steps_file}",
                      "+callbacks.mine.tag=hello"])
    assert rc == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["global_step"] == 4  # the first validation (after 4 micro-batches) stopped it, not max_steps=30
    ckpt = read_checkpoint(run / "checkpoints" / "last.ckpt")
    group = ckpt["optimizer_states"][0]["param_groups"][0]
    assert group["momentum"] == 0.9 and "betas" not in group  # SGD's state, not AdamW's
    assert ckpt["lr_schedulers"][0]["step_size"] == 2 and ckpt["lr_schedulers"][0]["gamma"] == 0.5
    # the user's callback ran with its arguments; the lr is StepLR's (read after each step: 0.2, 0.1, 0.1, 0.05)
    rows = [json.loads(line) for line in steps_file.read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and {r["tag"] for r in rows} == {"hello"}
    assert [r["lr"] for r in rows] == pytest.approx([0.2, 0.1, 0.1, 0.05])
    # Lightning's LearningRateMonitor wrote its own column into the CSV logger
    (metrics,) = (run / "logs").glob("version_*/metrics.csv")
    header = next(csv.reader(metrics.open()))
    assert any(h.startswith("lr-SGD") for h in header), header


def test_bad_target_exits_2_before_the_run_folder(tmp_path, capsys):
    run = tmp_path / "run"
    rc = main(BASE + [f"hydra.run.dir={run}", "optimizer._target_=torch.optim.NoSuchOptimizer"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and not run.exists()
    assert "optimizer._target_: cannot import torch.optim.NoSuchOptimizer" in err, err
    rc = main(BASE + [f"hydra.run.dir={run}", "+callbacks.x._target_=helpers.plugins.StepLog"])  # no path
    err = capsys.readouterr().err
    assert rc == 2 and "callbacks.x._target_: helpers.plugins.StepLog does not take" in err and not run.exists(), err


def test_trainer_callbacks_points_at_the_callbacks_group(capsys):
    assert main(BASE + ["trainer.callbacks=[]"]) == 2
    assert "callbacks=[early_stopping,lr_monitor]" in capsys.readouterr().err
