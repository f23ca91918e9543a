"""`python -m mistral_ft.export run=RUN|CKPT output_dir=OUT [key=value ...]` — a training run to Hugging Face folders.

The command line only: key=value parsing (the names of docs/cli.md; `run_dir=` still works, with a
note) and the exit-status policy (mistral_ft.cli). What is written
and why (merged/ + adapter/, shard by shard, self-checked, published atomically) is in
mistral_ft.checkpoints.export.
"""

from __future__ import annotations

import difflib
import sys
from collections.abc import Sequence
from typing import Any, Optional

from mistral_ft.checkpoints.export import DTYPES, export
from mistral_ft.cli import DEBUG_ENV, renamed, run_cli, user_message
from mistral_ft.errors import CheckpointError, ConfigError, ExportError
from mistral_ft.model.weights import parse_size

KEYS = {
    "run": "a training run folder (uses adapter/ or model/) or one of its checkpoints (*.ckpt)",
    "output_dir": "the folder to create (must not exist, or be empty)",
    "base": "the base weights, when they moved since training (checked against the run's fingerprint)",
    "dtype": "auto (the base's dtype) | float32 | bfloat16 | float16",
    "max_shard_size": "largest output shard, e.g. 2GB (default) or 500MB: bounds the merge's memory",
    "check": "true (default) | false: reload the merged model and compare logits",
    "tolerance": "self-check tolerance on max|logit diff| / max(1, max|logit|) (default by dtype)",
    "gguf": "true: also write OUT/model.gguf for llama.cpp (needs the gguf extra; see docs/export.md)",
    "debug": "true: show tracebacks (also env MISTRAL_FT_DEBUG=1)",
}


USAGE = "usage: python -m mistral_ft.export run=RUN_OR_CKPT output_dir=FOLDER [key=value ...]\n" + "\n".join(
    f"  {k:<15} {v}" for k, v in KEYS.items())


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the CLI; 0 done, 2 bad input (one paragraph on stderr, no traceback unless debug), 1 a bug."""
    args = renamed(list(sys.argv[1:] if argv is None else argv), {"run_dir=": "run="}, "export")
    if any(a in ("-h", "--help") for a in args):
        print(USAGE)
        return 0

    def body() -> int:
        export(**parse_args(args))
        return 0

    def classify(err: Exception) -> Optional[tuple[str, int]]:
        return (str(err), 2) if isinstance(err, (ExportError, CheckpointError, ConfigError)) else \
            ((m, 2) if (m := user_message(err)) is not None else None)  # + OS errors on a path, a full disk

    return run_cli(body, args, "export", classify, interrupted="interrupted (nothing was written to the output folder)",
                   failure_hint=f"\n(set debug=true or {DEBUG_ENV}=1 for the full traceback)")


def parse_args(args: Sequence[str]) -> dict[str, Any]:
    """key=value arguments -> keyword arguments of `export` (unknown keys name the valid ones)."""
    opts: dict[str, Any] = {}
    for a in args:
        key, sep, value = a.partition("=")
        if not sep:
            raise ExportError(f"expected key=value, got {a!r}\n{USAGE}")
        if key not in KEYS:
            close = difflib.get_close_matches(key, list(KEYS), n=1)
            raise ExportError(f"unknown key {key!r}" + (f" (did you mean {close[0]!r}?)" if close else "") +
                              f"; valid keys: {', '.join(KEYS)}")
        opts[key] = value
    for key in ("run", "output_dir"):
        if not opts.get(key):
            raise ExportError(f"{key}=... is required\n{USAGE}")
    out: dict[str, Any] = {"run_dir": opts["run"], "output_dir": opts["output_dir"], "base": opts.get("base") or None}
    dtype = opts.get("dtype", "auto")
    if dtype != "auto" and dtype not in DTYPES:
        raise ExportError(f"dtype={dtype}: expected one of auto, {', '.join(DTYPES)}")
    out["dtype"] = dtype
    if "max_shard_size" in opts:
        try:
            out["max_shard_size"] = parse_size(opts["max_shard_size"])
        except (ValueError, OverflowError):
            raise ExportError(f"max_shard_size={opts['max_shard_size']}: expected a size like 2GB or 500MB") from None
        if out["max_shard_size"] < 1:
            raise ExportError(f"max_shard_size={opts['max_shard_size']}: must be positive")
    check = opts.get("check", "true").lower()
    if check not in ("true", "false", "1", "0"):
        raise ExportError(f"check={opts['check']}: expected true or false")
    out["check"] = check in ("true", "1")
    gguf = opts.get("gguf", "false").lower()
    if gguf not in ("true", "false", "1", "0"):
        raise ExportError(f"gguf={opts['gguf']}: expected true or false")
    out["gguf"] = gguf in ("true", "1")
    if "tolerance" in opts:
        try:
            out["tolerance"] = float(opts["tolerance"])
        except ValueError:
            raise ExportError(f"tolerance={opts['tolerance']}: expected a number") from None
    return out


if __name__ == "__main__":
    sys.exit(main())
