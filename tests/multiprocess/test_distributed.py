"""Multi-process training on CPU (gloo): FSDP2 and DDP against one process with the same global batch.

Why subprocesses: Lightning starts rank 1 by replaying the command line, so a real 2-process run needs
`python -m mistral_ft.train ... trainer.devices=2` from a shell. The single-process reference runs
in-process (`main(argv)`) with `data.batch_size` doubled: our sampler shards one seeded global order
`rank::world`, so the two ranks' batches of 2 together are the single process's batch of 4, and the
token-weighted loss of a step is the same number either way (fp32, dropout 0). Multi-node (2 nodes x 1
process on localhost, `-m slow`): torchrun, and scripts/slurm/multi_node.sbatch under a stand-in srun.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mistral_ft.distributed.checkpoint import read_sharded_checkpoint
from mistral_ft.training.memory import GiB, estimate_memory
from mistral_ft.train import main

STEPS = 4
COMMON = ["recipe=instruct_lora", "model=tiny", f"trainer.max_steps={STEPS}", "checkpoint.every_n_train_steps=2",
          "peft.dropout=0", "trainer.accelerator=cpu", "trainer.limit_val_batches=1",
          # Adam with a large eps is ~SGD (update ~ lr * g / eps), so the losses see the gradient's SCALE: with the
          # default eps=1e-8 the first steps are sign-like and a missing world_size factor passes by a hair
          "optimizer.eps=10.0", "optimizer.lr=0.05",
          "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]


def _summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def _two_processes(run_dir: Path, *overrides: str, cwd: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_", "LOCAL_RANK", "WORLD_SIZE"))}
    env["OMP_NUM_THREADS"] = "1"  # two ranks on two cores
    proc = subprocess.run([sys.executable, "-m", "mistral_ft.train", *COMMON, "trainer.devices=2", "data.batch_size=2",
                           f"hydra.run.dir={run_dir}", *overrides], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (run_dir.parent / "launch.log").write_text(proc.stdout + proc.stderr)  # both ranks' log lines


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("fsdp") / "run"
    _two_processes(run, "strategy=fsdp", cwd=run.parent)
    return run


@pytest.fixture(scope="module")
def single_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("single") / "run"
    assert main([*COMMON, "trainer.devices=1", "data.batch_size=4", f"hydra.run.dir={run}"]) == 0
    return run


def _losses(run: Path) -> list[float]:
    return [v for _, v in _summary(run)["loss_history"]]


def test_fsdp_two_ranks_match_one_process_with_the_same_global_batch(fsdp_run, single_run):
    fsdp, single = _summary(fsdp_run), _summary(single_run)
    assert fsdp["world_size"] == 2 and single["world_size"] == 1 and fsdp["global_step"] == STEPS
    assert len(_losses(fsdp_run)) == STEPS
    torch.testing.assert_close(torch.tensor(_losses(fsdp_run)), torch.tensor(_losses(single_run)), rtol=1e-5, atol=0)
    # every rank trained on its own half: the two ranks' tokens add up to the single process's
    assert fsdp["tokens_seen"] == single["tokens_seen"]
    # both ranks built the model on meta and read only their own rows (mistral_ft.distributed.materialize_rank_local)
    log = (fsdp_run.parent / "launch.log").read_text()
    assert "rank 0: model sharded (rank-local load)" in log and "rank 1: model sharded (rank-local load)" in log


def test_fsdp_checkpoint_holds_each_ranks_half_of_every_sharded_weight(fsdp_run):
    from torch.distributed.checkpoint import FileSystemReader

    ckpt = fsdp_run / "checkpoints" / "last.ckpt"
    assert ckpt.is_dir() and (ckpt / "__0_0.distcp").is_file() and (ckpt / "__1_0.distcp").is_file()
    from mistral_ft.runs import newest_checkpoint

    assert newest_checkpoint(fsdp_run) == fsdp_run / "checkpoints" / f"step-{STEPS:06d}.ckpt"  # resume=auto finds folders
    meta = FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata
    weights = {k: m for k, m in meta.items() if k.startswith("state_dict.") and len(m.size) == 2}
    assert weights and not any(".base_layer." in k for k in weights)  # trainable weights only, no frozen base
    for key, m in weights.items():
        rows = m.size[0]
        assert [tuple(c.sizes) for c in m.chunks] == [(rows // 2, m.size[1])] * 2, key  # FSDP2: dim 0, 1/world each
        assert [c.offsets[0] for c in m.chunks] == [0, rows // 2], key
        # the optimizer state is sharded the same way
        opt = [v for k, v in meta.items() if k.startswith("optimizer_0.state.") and k.endswith(key[len("state_dict."):] + ".exp_avg")]
        assert opt and [tuple(c.sizes) for c in opt[0].chunks] == [(rows // 2, m.size[1])] * 2, key


def test_export_from_the_sharded_run_equals_export_of_the_same_weights_saved_whole(fsdp_run, tmp_path):
    from safetensors.torch import load_file

    from mistral_ft.checkpoints.export import export

    # the same run with its last checkpoint rewritten as one plain file (what a single process saves)
    plain = tmp_path / "plain"
    shutil.copytree(fsdp_run, plain, ignore=shutil.ignore_patterns("*.ckpt", "adapter"))
    (plain / "checkpoints").mkdir(exist_ok=True)
    torch.save(read_sharded_checkpoint(fsdp_run / "checkpoints" / "last.ckpt"), plain / "checkpoints" / "last.ckpt")
    export(fsdp_run / "checkpoints" / "last.ckpt", tmp_path / "from_sharded", check=False)
    export(plain / "checkpoints" / "last.ckpt", tmp_path / "from_plain", check=False)
    for part in ("adapter/adapter_model.safetensors", "merged/model.safetensors"):
        a, b = load_file(tmp_path / "from_sharded" / part), load_file(tmp_path / "from_plain" / part)
        assert a.keys() == b.keys() and a
        for k in a:
            assert torch.equal(a[k], b[k]), (part, k)
    # and the adapter the run wrote at its end (weights gathered from both ranks) holds the same numbers
    trained = load_file(fsdp_run / "adapter" / "adapter_model.safetensors")
    exported = load_file(tmp_path / "from_sharded" / "adapter" / "adapter_model.safetensors")
    assert trained.keys() == exported.keys()
    for k in trained:
        torch.testing.assert_close(trained[k].float(), exported[k].float(), rtol=0, atol=0)


def test_sharded_checkpoint_resumes_on_two_processes_with_identical_weights(fsdp_run, tmp_path):
    """Resume at step 2 of the 4-step run: steps 3-4 give the same losses and the same final adapter."""
    from safetensors.torch import load_file

    run = tmp_path / "resumed"
    shutil.copytree(fsdp_run, run, ignore=shutil.ignore_patterns("last.ckpt", "step-000004.ckpt", "adapter", "summary.json"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_"))}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run([sys.executable, "-m", "mistral_ft.train", f"resume={run / 'checkpoints' / 'step-000002.ckpt'}",
                           "trainer.enable_progress_bar=false"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert _summary(run)["global_step"] == STEPS
    torch.testing.assert_close(torch.tensor(_losses(run)), torch.tensor(_losses(fsdp_run)), rtol=1e-6, atol=0)
    a, b = load_file(run / "adapter" / "adapter_model.safetensors"), load_file(fsdp_run / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-7)


@pytest.mark.slow
def test_ddp_two_ranks_match_one_process_with_the_same_global_batch(single_run, tmp_path):
    run = tmp_path / "ddp"
    _two_processes(run, "strategy=ddp", cwd=tmp_path)
    torch.testing.assert_close(torch.tensor(_losses(run)), torch.tensor(_losses(single_run)), rtol=1e-5, atol=0)


# ---- refusals, before anything starts ---------------------------------------------------------
@pytest.mark.parametrize("overrides, says", [
    (["peft=qlora", "strategy=fsdp"], "peft=qlora with strategy=ddp"),
    (["trainer.num_nodes=2", "strategy=ddp"], "scripts/slurm/multi_node.sbatch"),
    (["strategy=fsdp1"], "fsdp"),
    (["strategy=fsdp", "optimizer=adamw8bit"], "optimizer=adamw with strategy=fsdp"),
    (["strategy=fsdp", "strategy.sharded_checkpoint=false"], "Leave it true"),
    (["strategy=fsdp", "strategy.cpu_offload=true"], "strategy.cpu_offload=false"),
])
def test_bad_distributed_input_is_refused_with_what_to_use(overrides, says, tmp_path, capsys, monkeypatch):
    for k in list(os.environ):
        if k.startswith("SLURM_") or k in ("MASTER_ADDR", "WORLD_SIZE", "RANK", "LOCAL_RANK"):
            monkeypatch.delenv(k)
    run = tmp_path / "run"
    assert main(["recipe=instruct_lora", "model=tiny", *overrides, f"hydra.run.dir={run}"]) == 2
    err = capsys.readouterr().err
    assert says in err, err
    assert not run.exists()  # refused before the run folder exists


@pytest.mark.parametrize("env, ranks", [
    ({}, (0, 0)),                                                               # one process
    ({"LOCAL_RANK": "1"}, (1, 1)),                                              # Lightning's own child on one node
    ({"MASTER_ADDR": "h", "WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1"}, (3, 1)),  # torchrun, second node
    ({"SLURM_NTASKS": "4", "SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_JOB_NAME": "j"}, (3, 1)),  # srun
])
def test_launcher_ranks_are_global_and_local_before_lightning_starts(env, ranks, monkeypatch):
    """Under srun no RANK/LOCAL_RANK exists yet: without SLURM_PROCID every task would write the run folder's
    files and load onto cuda:0."""
    from mistral_ft.distributed.checks import launcher_ranks

    for k in list(os.environ):
        if k.startswith("SLURM_") or k in ("MASTER_ADDR", "WORLD_SIZE", "RANK", "LOCAL_RANK"):
            monkeypatch.delenv(k)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert launcher_ranks() == ranks


# ---- memory plan ------------------------------------------------------------------------------
SEVEN_B = dict(total_params=7_241_732_096, hidden_size=4096, num_layers=32)


def test_memory_plan_weights_for_7b():
    full = estimate_memory(**SEVEN_B, trainable_params=0, batch_size=1, seq_len=1, dtype="bfloat16")
    assert full["weights"] / GiB == pytest.approx(13.49, abs=0.01)  # 7.24e9 x 2 bytes
    sharded = estimate_memory(**SEVEN_B, trainable_params=0, batch_size=1, seq_len=1, strategy="fsdp", world=8)
    assert sharded["weights"] / GiB == pytest.approx(13.49 / 8, abs=0.01)  # ~1.69 GiB per device
    ddp = estimate_memory(**SEVEN_B, trainable_params=0, batch_size=1, seq_len=1, strategy="ddp", world=8)
    assert ddp["weights"] == full["weights"]  # DDP replicates
    qlora = estimate_memory(**SEVEN_B, trainable_params=0, batch_size=1, seq_len=1, method="qlora")
    assert 3.5 < qlora["weights"] / GiB < 4.5  # NF4 + double-quantized scales, embeddings in bf16


def test_memory_plan_optimizer_and_activations():
    lora = 41_943_040  # r=16 on all seven linear layers of Mistral-7B
    plan = estimate_memory(**SEVEN_B, trainable_params=lora, batch_size=4, seq_len=2048)
    assert plan["optimizer"] == lora * 8 and plan["trainable"] == lora * 8
    assert estimate_memory(**SEVEN_B, trainable_params=lora, batch_size=4, seq_len=2048, optimizer="adamw8bit")["optimizer"] == lora * 2
    # 34 bytes per token, hidden unit and layer: 4 x 2048 x 4096 x 34 x 32 = 34 GiB; checkpointing keeps ~2 GiB
    assert plan["activations"] / GiB == pytest.approx(34.0, rel=1e-6)
    ckpt = estimate_memory(**SEVEN_B, trainable_params=lora, batch_size=4, seq_len=2048, gradient_checkpointing=True)
    assert ckpt["activations"] / GiB == pytest.approx(2 + 34 / 32, rel=1e-6)
    assert plan["total"] == pytest.approx(sum(v for k, v in plan.items() if k != "total"))


def test_memory_plan_warns_when_it_cannot_fit(caplog):
    """On CPU the plan is checked against the host's RAM: a 5-trillion-parameter model does not fit."""
    import logging
    from types import SimpleNamespace

    from torch import nn

    from mistral_ft.training.memory import log_memory_plan

    model = nn.Module()
    model.config = SimpleNamespace(hidden_size=4096, num_hidden_layers=32)
    c = {"data": {"batch_size": 1, "max_length": 16}, "model": {"dtype": "bfloat16"}, "peft": {"method": "lora"},
         "strategy": {"name": "fsdp"}, "optimizer": {"name": "adamw"}}
    with caplog.at_level(logging.INFO, logger="mistral_ft.distributed"):
        plan = log_memory_plan(c, model, trainable=0, total=5 * 10**12, use_cuda=False, world=2)
    assert plan["weights"] == 5 * 10**12 * 2 / 2  # bf16, sharded over 2
    assert "memory plan per device (strategy=fsdp, world=2)" in caplog.text
    assert "will not fit this host's" in caplog.text and "strategy=fsdp on more devices" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="mistral_ft.distributed"):
        log_memory_plan(c, model, trainable=0, total=10**6, use_cuda=False, world=2)
    assert "will not fit" not in caplog.text


@pytest.mark.slow
@pytest.mark.parametrize("method", ["dora", "none"])
def test_fsdp_dora_and_full_finetuning_match_one_process(method, tmp_path):
    """DoRA (loads whole, then shards) and full fine-tuning (rank-local load) under FSDP2 vs one process."""
    extra = [f"peft={method}"] + (["optimizer.lr=1e-3"] if method == "none" else [])
    fsdp = tmp_path / "fsdp"
    _two_processes(fsdp, "strategy=fsdp", "checkpoint.save_adapter=false", *extra, cwd=tmp_path)
    single = tmp_path / "single"
    assert main([*COMMON, "trainer.devices=1", "data.batch_size=4", "checkpoint.save_adapter=false", *extra,
                 f"hydra.run.dir={single}"]) == 0
    torch.testing.assert_close(torch.tensor(_losses(fsdp)), torch.tensor(_losses(single)), rtol=1e-5, atol=0)


# ---- two nodes of one process each, on localhost ---------------------------------------------------
REPO = Path(__file__).resolve().parents[2]
NODE_ARGS = [*COMMON, "strategy=ddp", "data.batch_size=2"]  # 2 nodes x 1 process x 2 rows = the single run's 4


def _free_port(lo: int = 1024, hi: int = 65535) -> int:
    import random
    import socket

    for port in random.sample(range(lo, hi), 200):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {lo}..{hi}")


def _launcher_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "MASTER_", "LOCAL_RANK", "WORLD_SIZE", "RANK", "GROUP_RANK", "TORCHELASTIC"))}
    env["OMP_NUM_THREADS"] = "1"
    return env


def _wait_all(procs: list[subprocess.Popen]) -> list[str]:
    """Both "nodes" run at once (each blocks in the rendezvous until the other joins); every one must succeed."""
    try:
        outs = [p.communicate(timeout=400)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-4000:]
    return outs


def _assert_matches_one_process(run: Path, single_run: Path) -> None:
    summary = _summary(run)
    assert summary["world_size"] == 2 and summary["global_step"] == STEPS
    assert summary["tokens_seen"] == _summary(single_run)["tokens_seen"]  # each node trained on its own half
    torch.testing.assert_close(torch.tensor(_losses(run)), torch.tensor(_losses(single_run)), rtol=1e-6, atol=0)


@pytest.mark.slow
def test_torchrun_two_nodes_match_one_process_with_the_same_global_batch(single_run, tmp_path):
    """torchrun --nnodes 2 --nproc-per-node 1 --node-rank 0/1 on localhost: Lightning's TorchElasticEnvironment, gloo."""
    port, run = str(_free_port()), tmp_path / "run"
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                               f"--node-rank={r}", "--master-addr", "127.0.0.1", "--master-port", port,
                               "-m", "mistral_ft.train", *NODE_ARGS, "trainer.num_nodes=2", "trainer.devices=1",
                               f"hydra.run.dir={run}"], cwd=tmp_path, env=_launcher_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in range(2)]
    outs = _wait_all(procs)
    for r, out in enumerate(outs):  # node r held global rank r (a wrong node rank would hang or clash, not pass)
        assert f"rank {r} of 2 (node {r}, local rank 0): TorchElasticEnvironment" in out, out[-3000:]
    _assert_matches_one_process(run, single_run)


# stands in for srun inside an allocation of SLURM_NNODES x SLURM_NTASKS_PER_NODE: one task per slot, each with
# the per-task variables srun sets (sbatch already set SLURM_JOB_ID, SLURM_NNODES, SLURM_NODELIST, ...)
FAKE_SRUN = """#!/bin/bash
n=$((SLURM_NNODES * SLURM_NTASKS_PER_NODE)); pids=()
for ((r = 0; r < n; r++)); do
  SLURM_NTASKS=$n SLURM_PROCID=$r SLURM_LOCALID=$((r % SLURM_NTASKS_PER_NODE)) \\
  SLURM_NODEID=$((r / SLURM_NTASKS_PER_NODE)) SLURM_STEP_ID=0 "$@" &
  pids+=($!)
done
rc=0; for p in "${pids[@]}"; do wait "$p" || rc=1; done; exit $rc
"""


@pytest.mark.slow
def test_slurm_two_nodes_through_the_sbatch_script_match_one_process(single_run, tmp_path):
    """scripts/slurm/multi_node.sbatch itself, under the variables sbatch + srun set for --nodes=2 --ntasks-per-node=1.

    No MASTER_ADDR/MASTER_PORT (srun sets neither): Lightning's SLURMEnvironment takes the address from
    SLURM_NODELIST and the port from the job id (15000 + its last 4 digits), so the job id picks a free port.
    """
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(FAKE_SRUN)
    (bin_dir / "srun").chmod(0o755)
    port, run = _free_port(15000, 25000), tmp_path / "run"
    env = {**_launcher_env(), "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "VENV": str(Path(sys.executable).parents[1]),
           "RUN_DIR": str(run), "SLURM_JOB_ID": f"77{port - 15000:04d}", "SLURM_JOB_NAME": "mistral_ft",
           "SLURM_NNODES": "2", "SLURM_NTASKS_PER_NODE": "1", "SLURM_NODELIST": "127.0.0.1", "SLURM_CPUS_PER_TASK": "1"}
    out = _wait_all([subprocess.Popen(["bash", str(REPO / "scripts" / "slurm" / "multi_node.sbatch"), *NODE_ARGS],
                                      cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)])[0]
    for r in range(2):
        assert f"rank {r} of 2 (node {r}, local rank 0): SLURMEnvironment" in out, out[-3000:]
    _assert_matches_one_process(run, single_run)
