#!/usr/bin/env python
"""Benchmarks of mistral_ft beside its peers (the code is the `benchmarks` package; docs/benchmarks.md has numbers).

    python scripts/benchmark.py                         # the headline table (cpu-small, 5 rounds; <= 10 min on 2 cores)
    python scripts/benchmark.py --systems ours_cli,hf_flat --rounds 7 --json out.json
    python scripts/benchmark.py pair --config mistral-7b --json bench-7b.json    # GPU: 7B shapes, MFU, generation
    python scripts/benchmark.py --setup-peers [--dry-run] [torchtune,litgpt]     # peers' own venvs, .bench_venvs/

Systems (`--systems`, comma-separated, default all): ours_cli (``python -m mistral_ft.train ... data.pack=true``),
ours_model (our model-level step on the CLI's batches), hf_flat (transformers + peft, DataCollatorWithFlattening),
hf_padded (transformers + peft, padded), trl_bfd (TRL's bfd packing + padding-free collator); only when asked:
torchtune (its LoRA recipe components with packed data), litgpt (its LoRA finetune step, padded), each in its
.bench_venvs/<peer>/ made by --setup-peers. The method is in `benchmarks.harness`'s docstring.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository's benchmarks/ and mistral_ft/


def main(argv: list[str] | None = None) -> dict | None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["pair"] or "mistral-7b" in argv:  # the model-level pair (its own flags); 7B shapes live there
        from benchmarks import pair

        return pair.main(argv[1:] if argv[:1] == ["pair"] else argv)
    if "--setup-peers" in argv:  # build the peers' venvs (benchmarks.peers); never run by tests or CI
        from benchmarks import peers

        rest = [a for a in argv if a not in ("--setup-peers", "--dry-run")]
        names = rest[0].split(",") if rest else list(peers.PEERS)
        root = Path(__file__).resolve().parents[1] / ".bench_venvs"
        res = peers.setup(root, names, dry_run="--dry-run" in argv, log=lambda m: print(m, file=sys.stderr, flush=True))
        print(json.dumps(res, indent=2))
        return res
    from benchmarks import harness
    from benchmarks.workload import PRESETS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", choices=sorted(PRESETS), default="cpu-small")
    p.add_argument("--systems", default=",".join(harness.DEFAULT_SYSTEMS), help="comma-separated, see above")
    p.add_argument("--rounds", type=int, help="interleaved rounds (ABBA order); default from --config")
    p.add_argument("--steps", type=int, help="timed optimizer steps per round; default from --config")
    p.add_argument("--warmup", type=int, help="untimed steps first (the CLI: steps 0..warmup-1 of each run)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per system (default 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cli-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="an extra override for the CLI runs (repeatable), e.g. trainer.enable_progress_bar=false")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    for key in ("rounds", "steps"):
        if getattr(args, key) is not None and getattr(args, key) < 1:
            p.error(f"--{key} must be >= 1")
    if args.warmup is not None and args.warmup < 1:
        p.error("--warmup must be >= 1 (step 0 gives the first-step loss check)")
    res = harness.run(args.config, tuple(s for s in args.systems.split(",") if s), rounds=args.rounds,
                      steps=args.steps, warmup=args.warmup, threads=args.threads, seed=args.seed, cli_args=tuple(args.cli_arg),
                      log=lambda m: print(m, file=sys.stderr, flush=True))
    harness.print_table(res)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
        print(f"\nwrote {args.json}")
    return res


if __name__ == "__main__":
    main()
