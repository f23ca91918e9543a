"""Smoke test of scripts/benchmark.py: it runs and reports; it does not time anything.

Speed claims belong in docs/benchmarks.md, measured on a known machine; a timed assertion in CI would only
measure how busy the CI machine is. What this test guards: the two systems still run side by side (our model
with packing + chunked loss, transformers + peft with padding), they see the same data (equal losses), and the
JSON keeps the fields docs/benchmarks.md and any tooling read.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "benchmark.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("mistral_ft_benchmark_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_plan_gives_both_systems_the_same_examples():
    bench = _load_script()
    examples = bench.make_examples(200, 64, 512, 20, seed=0)
    assert all(16 <= len(e["input_ids"]) <= 64 and e["labels"][0] == -100 for e in examples)
    plan = bench.plan_steps(examples, 3, seq_len=64, rows_per_step=2, micro_batch=2)
    for step in plan:
        theirs = sorted(j for micro in step["theirs_micro"] for j in micro)
        assert theirs == sorted(step["examples"])
        for micro in step["theirs_micro"]:  # padded size within the token budget (a lone long example may fill it)
            longest = max(len(examples[j]["input_ids"]) for j in micro)
            assert len(micro) == 1 or len(micro) * longest <= 2 * 64
    used = [j for s in plan for j in s["examples"]]
    assert used == list(range(len(used)))  # consecutive, none skipped or repeated


def test_benchmark_smoke_runs_and_writes_json(tmp_path):
    bench = _load_script()
    out = tmp_path / "bench.json"
    bench.main(["--config", "tiny", "--steps", "2", "--warmup", "0", "--steps-per-round", "1", "--threads", "1",
                "--gen-new-tokens", "4", "--gen-repeats", "1", "--json", str(out)])
    res = json.loads(out.read_text())
    assert res["device"]["type"] in ("cpu", "cuda")
    assert {"torch", "transformers", "peft"} <= set(res["versions"])
    for name in ("mistral_ft", "transformers_peft"):
        s = res["systems"][name]
        assert s["train"]["steps"] == 2 and s["train"]["tokens_per_s"] > 0
        assert s["train"]["step_time_s"]["median"] > 0 and 0 < s["train"]["padding_efficiency"] <= 1
        mem = s["memory"]["peak_allocated_mb" if res["device"]["type"] == "cuda" else "peak_rss_mb"]
        assert mem > 0
        assert s["generate"]["prefill_tokens_per_s"] > 0 and s["generate"]["new_tokens"] == 4
        assert s["generate"]["decode_tokens_per_s"] is None or s["generate"]["decode_tokens_per_s"] > 0
    assert {"train_tokens_per_s", "peak_memory", "prefill_tokens_per_s", "decode_tokens_per_s"} <= set(res["ratios"])
    # same weights, same LoRA init, same examples per step: the two systems compute the same losses
    assert res["checks"]["loss_max_abs_diff"] < 1e-4
    assert res["checks"]["greedy_tokens_equal"] is True


def test_mistral_7b_refused_without_gpu(monkeypatch):
    bench = _load_script()
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        bench.run_benchmark(bench.parse_args(["--config", "mistral-7b"]))
