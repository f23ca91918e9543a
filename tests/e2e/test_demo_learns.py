"""The README's demo (``recipe=instruct_lora model=tiny``) learns its task: exact match on the held-out split.

Slow (a CPU minute or two): run with ``-m slow``. The default suite checks the metric, the frozen split and
the "before" score in tests/unit/evaluation/test_generation_eval.py, the shipped base and its corpus in
tests/unit/model/.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
VAL = ROOT / "mistral_ft" / "bundled_data" / "instruct_val.jsonl"
TARGET = 0.70  # issue 14: >= 70 % exact match on the held-out split


@pytest.mark.slow
def test_demo_reaches_the_exact_match_target(tmp_path):
    """Measured (2026-12-02, the shipped base, one thread of a busy 2-core CPU): 0 % before -> 83.3 % (50/60)
    after the default 60 LoRA steps (32 s of training); the test took 106 s."""
    from mistral_ft.evaluation.generation_eval import exact_match
    from mistral_ft.generate import load, resolve_run

    run = tmp_path / "demo"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "mistral_ft.train", "recipe=instruct_lora", "model=tiny",
                           f"hydra.run.dir={run}"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["eval_before"]["val_exact_match"] <= 0.10  # the base does not answer before fine-tuning
    base, adapter = resolve_run(run)  # what `generate --run RUN --chat` loads
    convs = [json.loads(line) for line in VAL.read_text(encoding="utf-8").splitlines() if line.strip()]
    model, tok, _ = load(base, adapter, device="cpu")
    result = exact_match(model, tok, convs, max_new_tokens=32)
    wrong = [(s["prompt"], s["reference"], s["generated"]) for s in result.samples if not s["exact"]][:5]
    assert result.exact_match >= TARGET, f"exact match {result.exact_match:.1%} < {TARGET:.0%}; e.g. {wrong}"
    assert result.exact_match == summary["val_exact_match"]  # the run's own eval saw the same answers
