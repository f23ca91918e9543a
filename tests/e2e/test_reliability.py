"""Crash safety: SIGKILL a training process at chosen points, resume with resume=auto, compare losses.

The killed runs are real processes: children of a multiprocessing forkserver that imported torch,
Lightning and mistral_ft once (saves ~10 s per kill on this machine; a plain fork of the test process
can deadlock in torch's thread pool) in the default suite, and fresh
`python -m mistral_ft.train` subprocesses in the slow test. The kill point is made deterministic by
a fault callback from tests/helpers/faults.py added through the callbacks group (production code holds no
test hooks): "step:N" after optimizer step N, before its checkpoint; "ckpt_write:K" with half of the K-th
checkpoint file written.

Each resumed run must log exactly the per-step losses of one uninterrupted run with the same seed
(fp32 on CPU) with the recipe's LoRA dropout 0.05 on: dropout masks after the resume come from the random
states the checkpoint carries (training/reliability.py RngStates), so a missing state changes the losses.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mistral_ft.fs import atomic_write_bytes
from mistral_ft.runs import CheckpointReadError, newest_checkpoint, read_checkpoint
from mistral_ft.training.reliability import AtomicCheckpointIO
from mistral_ft.train import main

from helpers.faults import fault_args

STEPS = 8
EVERY = 3
RUN_ARGS = ["recipe=instruct_lora", "model=tiny", f"trainer.max_steps={STEPS}", f"checkpoint.every_n_train_steps={EVERY}",
            "data.validation_file=null", "data.batch_size=2", "data.max_length=64", "peft.dropout=0.05",
            "peft.target_modules=[q_proj,v_proj,lm_head]", "peft.r=4", "checkpoint.save_adapter=false",
            "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]


def _summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def _child(argv: list[str], env: dict[str, str], threads: int) -> None:
    os.environ.update(env)
    # the parent's intra-op thread count: CPU reductions split their sums by thread, so a different count
    # changes the last bits of the loss (seen: 9.584959847 vs 9.584958757 after a resume at step 3 when
    # another test module had set 1 thread in the parent and the fresh child used the default 2)
    torch.set_num_threads(threads)
    os._exit(main(argv))


def _kill_args(kill: str) -> list[str]:
    """"step:N" / "ckpt_write:K" -> the overrides adding that fault callback."""
    kind, _, n = kill.partition(":")
    return fault_args("KillAfterStep", step=n) if kind == "step" else fault_args("KillDuringWrite", write=n)


def _killed_fork(run: Path, kill: str) -> int:
    """Run training in a forkserver child with a kill fault; returns its exit code (-9 when killed)."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "lightning", "peft", "mistral_ft.train"])
    proc = ctx.Process(target=_child, args=(RUN_ARGS + [f"hydra.run.dir={run}", "resume=auto", *_kill_args(kill)],
                                            {}, torch.get_num_threads()))
    proc.start()
    proc.join(timeout=300)
    return proc.exitcode


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> list:
    run = tmp_path_factory.mktemp("ref") / "run"
    assert main(RUN_ARGS + [f"hydra.run.dir={run}", "resume=auto"]) == 0  # auto on an empty folder: fresh
    history = _summary(run)["loss_history"]
    assert [s for s, _ in history] == list(range(STEPS))
    return history


def _resume_and_compare(run: Path, reference: list) -> dict:
    assert main(RUN_ARGS + [f"hydra.run.dir={run}", "resume=auto"]) == 0
    s = _summary(run)
    assert s["global_step"] == STEPS
    assert s["loss_history"] == reference  # exact: same seed, fp32 CPU, same dropout masks
    # no torn file anywhere: every checkpoint left in the folder loads
    for ckpt in (run / "checkpoints").glob("*.ckpt"):
        read_checkpoint(ckpt)
    return s


# (kill point, checkpoint resume=auto must pick after the kill: None = fresh start)
# writes of this run: 1 step-3, 2 last(3), 3 step-6, 4 last(6), 5 step-8, 6 last(8)
DEFAULT_KILLS = [("step:4", 3), ("ckpt_write:1", None), ("ckpt_write:4", 6)]


@pytest.mark.parametrize("kill, expected_step", DEFAULT_KILLS, ids=[k for k, _ in DEFAULT_KILLS])
def test_kill_and_resume_gives_the_uninterrupted_losses(tmp_path, reference, kill, expected_step):
    run = tmp_path / "run"
    assert _killed_fork(run, kill) == -9
    found = newest_checkpoint(run)
    if expected_step is None:
        assert found is None
    else:
        assert read_checkpoint(found)["global_step"] == expected_step
    if kill.startswith("ckpt_write"):  # the half-written temporary file is there, and never a candidate
        assert list((run / "checkpoints").glob(".*.tmp-*"))
    _resume_and_compare(run, reference)


SLOW_KILLS = ["step:1", "step:2", "step:3", "step:5", "step:7", "ckpt_write:2", "ckpt_write:3", "ckpt_write:5",
              "ckpt_write:6", "step:6"]


@pytest.mark.slow
def test_ten_kills_in_fresh_subprocesses(tmp_path, reference):
    """Ten kill points, each a fresh `python -m mistral_ft.train` subprocess, each resumed and compared."""
    assert len(SLOW_KILLS) == 10
    for kill in SLOW_KILLS:
        run = tmp_path / kill.replace(":", "_")
        tests = str(Path(__file__).resolve().parents[1])  # helpers.faults
        env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()),
               "PYTHONPATH": os.pathsep.join(filter(None, [tests, os.environ.get("PYTHONPATH")]))}
        proc = subprocess.run([sys.executable, "-m", "mistral_ft.train", *RUN_ARGS, f"hydra.run.dir={run}", "resume=auto",
                               *_kill_args(kill)],
                              env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == -9, (kill, proc.stderr[-2000:])
        _resume_and_compare(run, reference)


# ---- the pieces ---------------------------------------------------------------------------------------
def test_atomic_write_keeps_the_old_file_when_the_write_fails(tmp_path, monkeypatch):
    target = tmp_path / "a.ckpt"
    atomic_write_bytes(target, b"old")

    def boom(fd):  # fails after the new bytes went into the temporary file, before the rename
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_bytes(target, b"new")
    monkeypatch.undo()
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.ckpt"]  # the temporary file was removed


def test_checkpoint_io_reads_weights_only_and_names_a_torn_file(tmp_path):
    io = AtomicCheckpointIO()
    good = tmp_path / "good.ckpt"
    io.save_checkpoint({"global_step": 3, "state_dict": {"w": torch.ones(2)}}, good)
    assert io.load_checkpoint(good)["global_step"] == 3
    torn = tmp_path / "torn.ckpt"
    torn.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointReadError, match="torn.ckpt: not a readable checkpoint"):
        io.load_checkpoint(torn)

    class Evil:  # a pickle that would run code: weights_only=True refuses it
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    evil = tmp_path / "evil.ckpt"
    torch.save({"global_step": 1, "x": Evil()}, evil)
    with pytest.raises(CheckpointReadError, match="evil.ckpt"):
        io.load_checkpoint(evil)


def test_newest_checkpoint_skips_torn_and_temporary_files(tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    assert newest_checkpoint(tmp_path) is None
    for step in (3, 6):
        torch.save({"global_step": step}, folder / f"step-{step:06d}.ckpt")
    torch.save({"global_step": 6}, folder / "last.ckpt")
    data = (folder / "step-000006.ckpt").read_bytes()
    (folder / "step-000009.ckpt").write_bytes(data[: len(data) // 2])  # torn (no atomic writer)
    (folder / ".step-000012.ckpt.tmp-123").write_bytes(data)  # a complete but uncommitted temporary file
    assert newest_checkpoint(tmp_path) == folder / "step-000006.ckpt"


def test_resume_auto_needs_a_run_folder(capsys):
    assert main(["recipe=instruct_lora", "model=tiny", "resume=auto"]) == 2
    err = capsys.readouterr().err
    assert "resume=auto needs hydra.run.dir" in err and "Traceback" not in err


# ---- non-finite steps, out of memory -----------------------------------------------------------------
NAN_ARGS = [a for a in RUN_ARGS if not a.startswith(("trainer.max_steps", "checkpoint.every"))] + [
    "trainer.max_steps=6", "checkpoint.every_n_train_steps=2"]


def test_nonfinite_gradient_stops_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    run = tmp_path / "run"
    rc = main(NAN_ARGS + [f"hydra.run.dir={run}", *fault_args("NonFinite", kind="grad", step=3)])
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err
    assert "non-finite training step at optimizer step 3 (batch index 3, epoch 0)" in err
    assert "non-finite gradients in 1 tensor(s)" in err and "skip_nonfinite=true" in err
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["last.ckpt", "step-000002.ckpt"]  # nothing after the bad step
    assert read_checkpoint(run / "checkpoints" / "last.ckpt")["global_step"] == 2
    assert not (run / "summary.json").exists()


def test_nonfinite_loss_is_skipped_and_counted_when_configured(tmp_path):
    run = tmp_path / "run"
    assert main(NAN_ARGS + [f"hydra.run.dir={run}", "skip_nonfinite=true", *fault_args("NonFinite", kind="loss", step=3)]) == 0
    s = _summary(run)
    assert s["global_step"] == 6 and s["nonfinite_skipped"] == 1 and s["nonfinite_skips"][0]["step"] == 3
    assert [step for step, _ in s["loss_history"]] == [0, 1, 2, 4, 5]
    # a short run: first/last are means over min(5, steps // 2) = 2 steps each, never the same window
    losses = [v for _, v in s["loss_history"]]
    assert s["train_loss_first"] == pytest.approx(sum(losses[:2]) / 2, rel=1e-12)
    assert s["train_loss_last"] == pytest.approx(sum(losses[-2:]) / 2, rel=1e-12)
    assert s["train_loss_first"] != s["train_loss_last"]
    # input tokens (prompt + answer, no padding) and the useful ones (with a loss) are both counted
    assert 0 < s["target_tokens_seen"] < s["tokens_seen"]
    assert s["target_tokens_per_s"] / s["tokens_per_s"] == pytest.approx(s["target_tokens_seen"] / s["tokens_seen"])
    weights = read_checkpoint(run / "checkpoints" / "last.ckpt")["state_dict"]
    assert all(torch.isfinite(v).all() for v in weights.values())


def test_out_of_memory_prints_the_settings_that_reduce_memory(tmp_path, capsys):
    run = tmp_path / "run"
    rc = main(NAN_ARGS + [f"hydra.run.dir={run}", *fault_args("OutOfMemory", step=1)])
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err
    for piece in ("out of memory", "data.batch_size=1 trainer.accumulate_grad_batches=2", "data.max_length=32",
                  "model.gradient_checkpointing=true", "peft=qlora", "at optimizer step 1"):
        assert piece in err, (piece, err)


# ---- secrets -------------------------------------------------------------------------------------------
def test_secrets_never_reach_the_run_folder(tmp_path, monkeypatch, capsys):
    secret = "sk-test-5ecr3t-value-123"
    monkeypatch.setenv("WANDB_API_KEY", secret)
    monkeypatch.setenv("WANDB_MODE", "offline")
    run = tmp_path / "run"
    # a secret-looking override is refused by the schema, and the message masks its value
    rc = main(NAN_ARGS + [f"hydra.run.dir={run}", f"+logger.api_key={secret}"])
    err = capsys.readouterr().err
    assert rc == 2 and "logger.api_key" in err and secret not in err and not run.exists()
    for key in ("+logger.access_key", "+logger.credentials", "+data.hf_auth"):  # outside the old key pattern
        rc = main(NAN_ARGS + [f"hydra.run.dir={run}", f"{key}={secret}"])
        err = capsys.readouterr().err
        assert rc == 2 and key.lstrip("+") in err and secret not in err and not run.exists(), err
    rc = main(NAN_ARGS + [f"hydra.run.dir={run}", "logger=wandb", "trainer.max_steps=2"])
    assert rc == 0
    files = [p for p in run.rglob("*") if p.is_file()]
    assert any(p.name == "summary.json" for p in files) and any("wandb" in p.parts for p in files)
    for p in files:
        assert secret.encode() not in p.read_bytes(), p


def test_no_unsafe_loading_in_the_code_base():
    """Every torch.load reads weights only; nothing asks for remote code; no pickle.load of files."""
    import re

    repo = Path(__file__).resolve().parents[2]
    for path in [*repo.glob("mistral_ft/**/*.py"), *repo.glob("scripts/**/*.py")]:
        text = path.read_text(encoding="utf-8")
        for m in re.finditer(r"torch\.load\((?:[^()]|\([^()]*\))*\)", text):
            assert "weights_only=True" in m.group(0), (path, m.group(0))
        assert "trust_remote_code=True" not in text, path
        assert "pickle.load(" not in text, path


# ---- the run-folder lock -------------------------------------------------------------------------------
def test_a_second_training_into_a_live_run_folder_exits_2_naming_the_holder(tmp_path, capsys):
    import socket

    from mistral_ft.lock import LOCK_NAME

    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        run = tmp_path / "run"
        run.mkdir()
        lock = {"host": socket.gethostname(), "pid": holder.pid, "started": 0, "heartbeat": 1e12, "what": "training"}
        (run / LOCK_NAME).write_text(json.dumps(lock))
        before = sorted(p.name for p in run.iterdir())
        assert main(NAN_ARGS + [f"hydra.run.dir={run}", "resume=auto"]) == 2
        err = capsys.readouterr().err
        assert f"pid {holder.pid} on host {socket.gethostname()}" in err and "Traceback" not in err
        # nothing of ours written (Hydra's own train.log aside), the holder's lock untouched
        assert sorted(p.name for p in run.iterdir() if p.name != "train.log") == before
        assert json.loads((run / LOCK_NAME).read_text())["pid"] == holder.pid
    finally:
        holder.kill()
        holder.wait()
    # the holder is SIGKILLed (its lock stays behind): the next training takes it over and removes it at exit
    assert main(NAN_ARGS + [f"hydra.run.dir={run}", "trainer.max_steps=1", "checkpoint.every_n_train_steps=1"]) == 0
    assert not (run / LOCK_NAME).exists() and (run / "summary.json").exists()


@pytest.mark.parametrize("override, culprit", [
    ("optimizer.lr=nan", "optimizer.lr"), ("optimizer.weight_decay=inf", "optimizer.weight_decay"),
    ("trainer.accelerator=warp_drive", "warp_drive"), ("trainer.precision=13-mixed", "13-mixed"),
])
def test_values_only_libraries_check_exit_2_and_leave_no_folder(tmp_path, capsys, override, culprit):
    run = tmp_path / "run"
    assert main(NAN_ARGS + [f"hydra.run.dir={run}", override]) == 2
    err = capsys.readouterr().err
    assert culprit in err and "Traceback" not in err and "training failed" not in err, err
    assert not run.exists()
