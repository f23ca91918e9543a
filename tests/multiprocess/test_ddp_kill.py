"""SIGKILL a 2-process DDP run (gloo, CPU) mid-training with LoRA dropout on, resume with resume=auto, and
compare every step's loss with an uninterrupted 2-process run (to 1e-6; in practice equal).

Why this is not covered by the single-process kill test (tests/e2e/test_reliability.py): under DDP each
rank draws its own dropout masks from its own generator and reads its own half of each batch, so the
checkpoint must carry every rank's random state (RngStates gathers them) and restore rank r's into rank r.
Kill points are `step:N` only: both ranks reach the hook after the same all-reduce and SIGKILL themselves
(a kill inside rank 0's checkpoint write would leave rank 1 waiting in gloo until its timeout).
Three 2-process runs per kill point (~1-2 min here): `-m slow`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.faults import fault_args

TESTS = Path(__file__).resolve().parents[1]

STEPS = 6
ARGS = ["recipe=instruct_lora", "model=tiny", f"trainer.max_steps={STEPS}", "checkpoint.every_n_train_steps=2",
        "strategy=ddp", "trainer.devices=2", "trainer.accelerator=cpu", "data.batch_size=2", "data.max_length=64",
        "data.validation_file=null", "peft.dropout=0.1", "peft.r=4", "peft.target_modules=[q_proj,v_proj]",
        "checkpoint.save_adapter=false", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]


def _train(run: Path, kill: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_", "LOCAL_RANK", "WORLD_SIZE"))}
    env["OMP_NUM_THREADS"] = "1"  # two ranks on two cores; the same count in every run (CPU sums split by thread)
    # the fault callback lives in tests/helpers/faults.py; rank 1 is started by replaying the command line and
    # inherits this environment, so both ranks import it and SIGKILL themselves after the same step
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS), env.get("PYTHONPATH")]))
    faults = fault_args("KillAfterStep", step=int(kill.split(":")[1])) if kill else []
    return subprocess.run([sys.executable, "-m", "mistral_ft.train", *ARGS, f"hydra.run.dir={run}", "resume=auto",
                           *faults], cwd=run.parent, env=env, capture_output=True, text=True, timeout=500)


def _losses(run: Path) -> list:
    return json.loads((run / "summary.json").read_text())["loss_history"]


@pytest.mark.slow
@pytest.mark.parametrize("kill, resumed_from", [("step:3", 2), ("step:5", 4)])
def test_ddp_sigkill_then_resume_auto_gives_the_uninterrupted_losses(tmp_path_factory, kill, resumed_from):
    from mistral_ft.runs import newest_checkpoint, read_checkpoint

    ref = tmp_path_factory.getbasetemp() / "ddp_kill_reference" / "run"
    if not (ref / "summary.json").is_file():
        ref.parent.mkdir(exist_ok=True)
        proc = _train(ref)
        assert proc.returncode == 0, proc.stderr[-4000:]
    reference = _losses(ref)
    assert [s for s, _ in reference] == list(range(STEPS))

    run = tmp_path_factory.mktemp("ddp_kill") / "run"
    proc = _train(run, kill)
    assert proc.returncode == -9, proc.stderr[-4000:]  # rank 0 (the launching process) was SIGKILLed
    ckpt = newest_checkpoint(run)
    assert ckpt is not None and read_checkpoint(ckpt)["global_step"] == resumed_from
    assert (run / "run.lock").is_file()  # the killed holder could not remove its lock; the resume takes it over
    proc = _train(run)
    assert proc.returncode == 0, proc.stderr[-4000:]
    resumed = _losses(run)
    assert [s for s, _ in resumed] == list(range(STEPS))
    for (s, a), (_, b) in zip(resumed, reference):
        assert abs(a - b) <= 1e-6, (s, a, b)
    assert not (run / "run.lock").exists()
