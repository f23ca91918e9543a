"""recipe=dpo on two CPU processes (gloo), DDP and FSDP2 with LoRA, against one process with the same global
batch: each rank gets whole pairs (2 of a step's 4), and the step loss is the mean over all 4 either way."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mistral_ft.train import main

QUIET = ["trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]


def _summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def _two_process_run(run: Path, *overrides: str) -> None:
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_", "LOCAL_RANK", "WORLD_SIZE"))}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run([sys.executable, "-m", "mistral_ft.train", "recipe=dpo", "model=tiny", "trainer.max_steps=3",
                           "trainer.accelerator=cpu", "trainer.devices=2", "data.batch_size=2", "trainer.limit_val_batches=1",
                           *QUIET, f"hydra.run.dir={run}", *overrides], cwd=run.parent, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_ranks_match_one_process_with_the_same_global_batch(strategy, tmp_path):
    """Each rank gets whole pairs (2 of the step's 4); the step loss is the mean over all 4 either way."""
    single = tmp_path / "single"
    assert main(["recipe=dpo", "model=tiny", "trainer.max_steps=3", "trainer.accelerator=cpu", "data.batch_size=4",
                 "trainer.limit_val_batches=1", *QUIET, f"hydra.run.dir={single}"]) == 0
    run = tmp_path / strategy
    _two_process_run(run, f"strategy={strategy}")
    losses = lambda r: torch.tensor([v for _, v in _summary(r)["loss_history"]])  # noqa: E731
    torch.testing.assert_close(losses(run), losses(single), rtol=1e-5, atol=1e-6)
    assert _summary(run)["world_size"] == 2
