"""`python -m mistral_ft.export run=RUN|CKPT output_dir=OUT [key=value ...]` — a training run to Hugging Face folders.

The command line only: a Hydra app over its own primary config (mistral_ft/commands_conf/export.yaml:
the settings, their defaults and the --help text; Hydra's flags as train's), the names of docs/cli.md
(`run_dir=` still works, with a note), the checks of each value and the exit-status policy
(mistral_ft.cli). What is written and why (merged/ + adapter/, shard by shard, self-checked, published
atomically) is in mistral_ft.checkpoints.export.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any, Optional

from mistral_ft.checkpoints.export import DTYPES, export
from mistral_ft.cli import DEBUG_ENV, renamed, run_cli, user_message
from mistral_ft.errors import CheckpointError, ConfigError, ExportError
from mistral_ft.model.weights import parse_size

# the settings of commands_conf/export.yaml (what each means: its --help header)
KEYS = ("run", "output_dir", "base", "dtype", "max_shard_size", "check", "tolerance", "gguf", "debug")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the CLI; 0 done, 2 bad input (one paragraph on stderr, no traceback unless debug), 1 a bug."""
    args = renamed(list(sys.argv[1:] if argv is None else argv), {"run_dir=": "run="}, "export")

    def body() -> int:
        from mistral_ft.training.hydra_app import command_settings

        printed, settings = command_settings(args, __file__, "export")
        if printed is not None:
            return printed
        export(**parse_args(settings))
        return 0

    def classify(err: Exception) -> Optional[tuple[str, int]]:
        return (str(err), 2) if isinstance(err, (ExportError, CheckpointError, ConfigError)) else \
            ((m, 2) if (m := user_message(err)) is not None else None)  # + OS errors on a path, a full disk

    return run_cli(body, args, "export", classify, interrupted="interrupted (nothing was written to the output folder)",
                   failure_hint=f"\n(set debug=true or {DEBUG_ENV}=1 for the full traceback)")


def parse_args(settings: dict[str, Any]) -> dict[str, Any]:
    """The composed settings -> keyword arguments of `export` (a key added with `+key=` is refused)."""
    unknown = sorted(set(settings) - set(KEYS))
    if unknown:
        raise ExportError(f"unknown key {unknown[0]!r}; valid keys: {', '.join(KEYS)}")
    opts = {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in settings.items()}
    for key in ("run", "output_dir"):
        if not opts.get(key):
            raise ExportError(f"{key}=... is required (python -m mistral_ft.export --help lists the settings)")
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
