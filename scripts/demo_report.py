"""The demo's "did it learn?" report: exact match on held-out chats before -> after fine-tuning.

    python scripts/demo_report.py --run RUN [--data data/instruct_val.jsonl] [--show 5]

Why a script beside run_demo.sh (not library code): it drives the generate CLI's loader and run resolution
(``generate --run RUN``), so the score is what ``python -m mistral_ft.generate --run RUN --chat`` answers. Why a separate step: the base (without the adapter) and the fine-tuned model (base + the run's adapter) are
scored with the same :func:`~mistral_ft.evaluation.generation_eval.exact_match`, so the "before" number is
measured, not assumed. ``scripts/run_demo.sh`` calls it after training.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mistral_ft.evaluation.generation_eval import exact_match


def read_conversations(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def report(run: Path, data: Path, show: int = 5, max_new_tokens: int = 32) -> dict:
    """Score base and fine-tuned model on ``data``; print a few samples and both scores; return the numbers."""
    from mistral_ft.generate import load, resolve_run

    base_path, adapter = resolve_run(run)
    conversations = read_conversations(data)
    model, tok, _ = load(base_path, None, device="cpu")
    before = exact_match(model, tok, conversations, max_new_tokens)
    model, tok, _ = load(base_path, adapter, device="cpu")
    after = exact_match(model, tok, conversations, max_new_tokens)
    print(f"\nHeld-out samples ({data.name}), before -> after fine-tuning:")
    for b, a in list(zip(before.samples, after.samples))[:show]:
        print(f"  Q: {b['prompt']!r}\n     expected {b['reference']!r}\n     before   {b['generated']!r}\n"
              f"     after    {a['generated']!r}")
    n = len(conversations)
    print(f"Exact match on {n} chats of {data.name}: {before.exact_match:.1%} -> {after.exact_match:.1%} "
          f"(normalised {before.normalised_match:.1%} -> {after.normalised_match:.1%})")
    example = next((a["prompt"] for a in after.samples if a["exact"]), after.samples[0]["prompt"])
    print(f"Ask it yourself: python -m mistral_ft.generate --run {run} --chat   (one message per line, e.g. "
          f"{example!r})")
    return {"n": n, "before": before.exact_match, "after": after.exact_match,
            "before_normalised": before.normalised_match, "after_normalised": after.normalised_match}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="a finished training run folder")
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[1] / "mistral_ft" / "bundled_data" / "instruct_val.jsonl")
    parser.add_argument("--show", type=int, default=5, help="samples to print")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args(argv)
    report(args.run, args.data, args.show, args.max_new_tokens)
    return 0


if __name__ == "__main__":
    sys.exit(main())
