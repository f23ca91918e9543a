"""scripts/gpu_check.sh and scripts/gpu_bench.py on CPU: argument handling and the CPU fallbacks (issue 15.4).

The GPU stages themselves need a CUDA device (tests/gpu/); here the benchmark runs at tiny size on CPU, where
its first-step losses of ours and transformers+peft must agree (same weights, LoRA init and packed rows).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"


def _bench():
    spec = importlib.util.spec_from_file_location("gpu_bench", ROOT / "scripts" / "gpu_bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _sh(*args: str, timeout: int = 60) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), "--python", sys.executable, *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def test_bench_cpu_fallback_writes_json_and_table_with_equal_losses(tmp_path):
    out, md = tmp_path / "b.json", tmp_path / "b.md"
    _bench().main(["--device", "cpu", "--steps", "1", "--warmup", "0", "--out", str(out), "--md", str(md)])
    result = json.loads(out.read_text())
    assert result["setup"]["size"] == "tiny" and result["setup"]["bf16"] is False
    ours, hf = result["systems"]
    assert (ours["system"], hf["system"]) == ("ours", "transformers+peft")
    for r in (ours, hf):
        assert r["tokens_per_s"] > 0 and r["target_tokens_per_s"] <= r["tokens_per_s"] and r["mfu_4n"] is None
    # the same step on the same weights: a broken comparison (documents attending across boundaries) differs
    assert abs(ours["first_step_loss"] - hf["first_step_loss"]) < 1e-5
    table = md.read_text().splitlines()
    assert table[2].startswith("| system | tokens/s") and len(table) == 6 and "| ours |" in table[4]


@pytest.mark.parametrize("argv,message", [
    (["--device", "tpu"], "--device"), (["--device", "cuda"], "no CUDA device"), (["--systems", "ours,vllm"], "vllm"),
    (["--steps", "0", "--device", "cpu"], "--steps"), (["--size", "13b"], "invalid choice")])
def test_bench_refuses_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        _bench().parse_args(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_gpu_check_dry_run_and_bad_arguments(tmp_path):
    dry = _sh("--dry-run", "--layers", "8", "--out", str(tmp_path / "o"))
    assert dry.returncode == 0, dry.stderr
    assert "-m pytest -q -m gpu tests/gpu" in dry.stdout and "--device cuda --layers 8" in dry.stdout
    assert not (tmp_path / "o").exists()  # a dry run writes nothing
    cpu = _sh("--dry-run", "--cpu", "--skip-tests")
    assert "--device cpu" in cpu.stdout and "pytest" not in cpu.stdout
    for argv, message in ((["--bogus"], "unknown argument '--bogus'"), (["--layers", "0"], "--layers must be"),
                          (["--out"], "--out needs a value")):
        bad = _sh(*argv)
        assert bad.returncode == 2 and message in bad.stderr, (argv, bad.stderr)
    assert "Usage" not in _sh("--help").stdout and _sh("--help").returncode == 0


def test_gpu_check_refuses_to_run_without_cuda(tmp_path):
    plain = _sh("--out", str(tmp_path / "o"))
    assert plain.returncode == 1 and "no CUDA device" in plain.stderr and not (tmp_path / "o").exists()


@pytest.mark.slow
def test_gpu_check_fetch_pins_the_local_versions():
    fetch = _sh("--fetch-wheels", "--dry-run")
    assert fetch.returncode == 0
    import bitsandbytes

    assert f"bitsandbytes=={bitsandbytes.__version__}" in fetch.stdout and "--python-version 3.12" in fetch.stdout
    assert "antlr4-python3-runtime" in fetch.stdout and "hydra-core" in fetch.stdout


@pytest.mark.slow
def test_gpu_check_cpu_flow_end_to_end(tmp_path):
    run = _sh("--cpu", "--out", str(tmp_path), timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "not run:" in run.stdout and "needs a CUDA device" in run.stdout
    assert json.loads((tmp_path / "gpu_bench.json").read_text())["systems"]
    assert "present" in (tmp_path / "packages.txt").read_text()
