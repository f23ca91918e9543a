"""The README's demo (``recipe=instruct_lora model=tiny``) learns its task: exact match on the held-out split.

Slow (minutes of CPU training): run with ``-m slow``. The default suite checks the metric, the frozen split and
the "before" score in tests/unit/evaluation/test_generation_eval.py.
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
@pytest.mark.xfail(strict=True, reason="not reached yet: the random tiny base + LoRA (200 steps) scored 0 % on the "
                   "held-out split and 5 % on training prompts (2026-12-01); needs a pre-trained tiny base (issue 14.4)")
def test_demo_reaches_the_exact_match_target(tmp_path):
    from mistral_ft.evaluation.generation_eval import exact_match
    from mistral_ft.generate import load, resolve_run

    run = tmp_path / "demo"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "mistral_ft.train", "recipe=instruct_lora", "model=tiny",
                           f"hydra.run.dir={run}"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    base, adapter = resolve_run(run)
    convs = [json.loads(line) for line in VAL.read_text(encoding="utf-8").splitlines() if line.strip()]
    model, tok, _ = load(base, adapter, device="cpu")
    result = exact_match(model, tok, convs, max_new_tokens=32)
    wrong = [(s["prompt"], s["reference"], s["generated"]) for s in result.samples if not s["exact"]][:5]
    assert result.exact_match >= TARGET, f"exact match {result.exact_match:.1%} < {TARGET:.0%}; e.g. {wrong}"
