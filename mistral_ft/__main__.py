"""`mistral-ft COMMAND ...` (and `python -m mistral_ft COMMAND ...`): one entry point for every command.

    mistral-ft train recipe=instruct_lora model=tiny      # = python -m mistral_ft.train ...
    mistral-ft validate|evaluate|export key=value ...     # commands that compose a config: key=value
    mistral-ft generate|convert --flag value ...          # one-shot tools: flags, the same names

The command's own `main(argv) -> int` runs with the remaining arguments, so `mistral-ft train --cfg job`
is exactly `python -m mistral_ft.train --cfg job`. Commands are imported by name when chosen: `--help`
here does not load torch, and the CLI modules stay independent of each other (tests/unit/test_layout.py).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence
from typing import Optional

COMMANDS = {
    "train": "fine-tune a model (Hydra: recipe=NAME [group=option] [key=value], --cfg job, -m, ...)",
    "validate": "check a training config and its data, estimate the budget (train's overrides)",
    "evaluate": "loss, perplexity and generation metrics of a run or model over a data file (key=value)",
    "export": "a training run to Hugging Face folders: merged model and adapter (key=value)",
    "generate": "sample from a model, adapter or run (flags: --model, --adapter, --run, --prompt, --chat)",
    "convert": "original Mistral weights to a Hugging Face folder (flags: --input_dir, --output_dir)",
}

USAGE = "usage: mistral-ft COMMAND [arguments]  (COMMAND --help for its own)\n\n" + "\n".join(
    f"  {name:<9} {what}" for name, what in COMMANDS.items()) + "\n\ndocs/cli.md: the one CLI style and its names"


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run `COMMAND` with the rest of `argv` (default: sys.argv[1:]); returns its exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if args else 2
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        print(f"error: unknown command {name!r}; one of: {', '.join(COMMANDS)}\n{USAGE}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"mistral_ft.{name}")
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
