"""Smoke tests of the benchmarks/ harness (scripts/benchmark.py): it runs and reports; nothing is timed here.

Speed claims belong in docs/benchmarks.md, measured on a known machine; a timed assertion in CI would only
measure how busy the CI machine is. What these guard: every system is handed the same examples per optimizer
step (the CLI's own loader decides them), our CLI and transformers + peft still run side by side on them (equal
first-step losses: same weights, same examples, LoRA's B starts at zero), the CLI's per-step clock
(summary.json's step_times_s) covers every step, and the JSON keeps the fields docs/benchmarks.md reads. Peer
environments (torchtune, litgpt) are never built here.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # benchmarks/ sits beside mistral_ft/ (not an installed package)

from benchmarks import harness  # noqa: E402
from benchmarks.systems import HFFlat, HFPadded, OursModel  # noqa: E402
from benchmarks.workload import PRESETS, count_targets, prepare  # noqa: E402

SCRIPT = ROOT / "scripts" / "benchmark.py"


def test_every_system_gets_the_steps_examples(tmp_path):
    preset = PRESETS["tiny"]
    plan = prepare(tmp_path, preset, 3)
    spec = {"workdir": str(tmp_path), "threads": 1, "seed": 0, "seq_len": preset["seq_len"], "loss_chunk_size": 64}
    flat, padded, ours = HFFlat(spec), HFPadded(spec), OursModel(spec)
    for step in plan["steps"]:
        assert step["rows"] == preset["micro_batch"] and len(step["examples"]) >= step["rows"]
        # the examples cut from the packed rows are the rows' real tokens, in order
        packed = [t for row, docs in zip(step["ours"]["input_ids"], step["ours"]["document_ids"])
                  for t, d in zip(row, docs) if d >= 0]
        assert packed == [t for e in step["examples"] for t in e["input_ids"]]
        (f,) = flat.layout(step)
        assert f["input_ids"][0].tolist() == packed
        # positions restart per example: transformers then attends within each example only
        assert f["position_ids"][0].tolist() == [i for e in step["examples"] for i in range(len(e["input_ids"]))]
        assert int((f["labels"][0, 1:] != -100).sum()) == step["targets"]  # same targets, no cross-example ones
        micros = padded.layout(step)
        assert sum(m["input_ids"].shape[0] for m in micros) == len(step["examples"])
        assert sum(count_targets(row) for m in micros for row in m["labels"].tolist()) == step["targets"]
        for m in micros:  # within our micro-batch's token budget (a lone long example may fill it)
            assert m["input_ids"].shape[0] == 1 or m["input_ids"].numel() <= step["rows"] * preset["seq_len"]
        (o,) = ours.layout(step)
        assert o["input_ids"].tolist() == step["ours"]["input_ids"]


def test_smoke_cli_vs_transformers(tmp_path):
    res = harness.run("tiny", systems=("ours_cli", "hf_flat"), rounds=1, steps=2, warmup=1, log=lambda m: None)
    assert set(res["systems"]) == {"ours_cli", "hf_flat"}
    for s in res["systems"].values():
        assert len(s["tokens_per_s"]["rounds"]) == 1 and s["tokens_per_s"]["min"] > 0
        assert s["step_time_s"]["median"] > 0 and s["peak_rss_mb"] > 0
    assert res["systems"]["ours_cli"]["startup_s"]["median"] > 0
    assert {"median", "worst", "peak_rss"} <= set(res["ratios"]["ours_cli/hf_flat"])
    assert [x["when"] for x in res["load_avg"]] == ["start", "after round 1"]
    # the CLI and transformers start from the same weights on the same examples: the same first loss
    assert res["checks"]["first_step_loss_spread"] < 1e-4
    assert set(res["targets"]) >= {"cli_vs_hf_flat_median >= 1.25", "cli_vs_hf_flat_peak_rss <= 1.0"}


def test_pair_refuses_7b_shapes_without_gpu(monkeypatch):
    spec = importlib.util.spec_from_file_location("mistral_ft_benchmark_script", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        script.main(["pair", "--config", "mistral-7b", "--no-generate"])


def test_setup_peers_installs_our_torch_before_each_peer(tmp_path):
    """--setup-peers (dry run: nothing is built here) puts each peer in its own venv, installs our torch first
    and the peer only under a `torch==<ours>` constraint, so pip can never swap in another (CUDA) torch."""
    import torch

    from benchmarks import peers

    lines: list[str] = []
    res = peers.setup(tmp_path, ["torchtune", "litgpt"], dry_run=True, log=lines.append)
    assert res == {"torchtune": "dry run: nothing installed", "litgpt": "dry run: nothing installed"}
    assert not any(tmp_path.iterdir())  # a dry run creates nothing
    ours = torch.__version__.split("+")[0]
    for peer in ("torchtune", "litgpt"):
        steps = peers.commands(tmp_path, peer, ours)
        py = str(peers.venv_python(tmp_path, peer))
        assert steps[0][-1] == str(tmp_path / peer)  # its own venv
        assert steps[1][0] == py and steps[1][-1] == f"torch=={ours}"  # torch alone, first
        assert steps[2][1:] == [str(tmp_path / peer / "constraints.txt"), f"torch=={ours}\n"]
        assert steps[3][0] == py and steps[3][5:7] == ["-c", steps[2][1]]  # the peer under the constraint
        assert any(peer in a for a in steps[3][7:])
    with pytest.raises(SystemExit, match="unknown peer"):
        peers.setup(tmp_path, ["nope"], dry_run=True, log=lines.append)


def test_a_peer_worker_runs_on_its_own_venv_or_is_refused(monkeypatch):
    from benchmarks.systems import TorchtuneLoRA, system_python

    assert system_python("hf_flat") == sys.executable  # ours and transformers: this environment
    assert not {"torchtune", "litgpt"} & set(harness.DEFAULT_SYSTEMS)  # a peer runs only when named
    monkeypatch.setattr(TorchtuneLoRA, "venv", "no_such_venv")
    with pytest.raises(SystemExit, match="--setup-peers no_such_venv"):
        system_python("torchtune")
