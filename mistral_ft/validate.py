"""`python -m mistral_ft.validate recipe=NAME [overrides ...] [tokens_per_s=N | run=RUN]`

Check a training config and its data *before* spending GPU hours: the same composition, schema and
data pipeline as `mistral_ft.train` (so a row that would stop training is reported here with the same
"FILE:LINE: field 'x': ..." message), but every bad row is reported, not only the first. Then the
numbers that decide max_length and the budget:

    token lengths (before truncation): min / median / p95 / max
    examples truncated at data.max_length
    tokens per epoch (non-pad, after truncation), optimizer steps per epoch, epochs in max_steps
    estimated time per epoch and for max_steps, from a tokens/s that is either *configured*
    (tokens_per_s=N) or *measured* (run=RUN: that run's summary.json tokens_per_s)

The command line is train's: Hydra's flags (`--cfg job`, `--help`, `-cd`, ...) and overrides, plus
`run=` and `tokens_per_s=` (the old `--from-run=` / `--tokens-per-s=` still work, with a note).

Exit status: 0 no problems, 1 data problems found (listed on stderr), 2 bad config or arguments.
Nothing is written: no run folder, no cache beyond the tiny model's and `datasets`' own.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

from mistral_ft.cli import renamed, run_cli, user_message
from mistral_ft.errors import UserError
from mistral_ft.model.config import read_json_object
from mistral_ft.runs import model_folder
from mistral_ft.training.compose import compose_config
from mistral_ft.training.run import check_tokenizer_matches_model

OWN_KEYS = ("run=", "tokens_per_s=")  # validate's own settings; everything else is train's config
OLD_SPELLINGS = {"--from-run=": "run=", "--tokens-per-s=": "tokens_per_s="}


class ValidateUsageError(UserError):
    """Bad command-line arguments of the validate CLI."""


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the validator; returns the exit status (see the module docstring)."""
    def classify(err: Exception) -> Optional[tuple[str, int]]:
        message = str(err) if isinstance(err, ValidateUsageError) else user_message(err)
        return (message, 2) if message is not None else None

    args = list(sys.argv[1:] if argv is None else argv)
    return run_cli(lambda: _main(args), args, "validation", classify)


def _parse(args: list[str]) -> tuple[list[str], Optional[float], Optional[Path]]:
    overrides: list[str] = []
    tokens_per_s: Optional[float] = None
    from_run: Optional[Path] = None
    for a in args:
        if a.startswith("tokens_per_s="):
            try:
                tokens_per_s = float(a.split("=", 1)[1])
            except ValueError:
                raise ValidateUsageError(f"tokens_per_s: expected a number, got {a.split('=', 1)[1]!r}") from None
            if not tokens_per_s > 0 or not math.isfinite(tokens_per_s):
                raise ValidateUsageError(f"tokens_per_s: must be > 0, got {tokens_per_s}")
        elif a.startswith("run="):
            from_run = Path(a.split("=", 1)[1]).expanduser()
        elif a.lstrip("+").startswith(("resume=", "hydra.run.", "hydra.sweep.")):
            continue  # run-folder settings mean nothing here
        else:
            overrides.append(a)
    return overrides, tokens_per_s, from_run


def measured_tokens_per_s(run: Path) -> float:
    """tokens_per_s from a finished run's summary.json."""
    summary = run / "summary.json"
    if not summary.is_file():
        raise ValidateUsageError(f"run={run}: {summary} not found (a finished training run has one)")
    value = read_json_object(summary, ValidateUsageError).get("tokens_per_s")  # names file:line, deep nesting too
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
        raise ValidateUsageError(f"run={run}: {summary} has no tokens_per_s (a finite number > 0), got {value!r}")
    return float(value)


def _percentile(sorted_values: list[int], q: float) -> int:
    """Nearest-rank percentile of an already sorted list."""
    k = max(0, min(len(sorted_values) - 1, math.ceil(q / 100 * len(sorted_values)) - 1))
    return sorted_values[k]


def _fmt_time(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _main(args: list[str]) -> int:
    from mistral_ft.training.hydra_app import parse_args, print_flags

    args = renamed(args, OLD_SPELLINGS, "validate")
    own = [a for a in args if a.startswith(OWN_KEYS)]
    ns = parse_args([a for a in args if not a.startswith(OWN_KEYS)])  # Hydra's flags, as train takes them
    printed = print_flags(ns, __file__, "validate")
    if printed is not None:
        return printed
    if ns.multirun:
        raise ValidateUsageError("validate checks one config: -m sweeps are train's (validate each point)")
    overrides, tokens_per_s, from_run = _parse(ns.overrides + own)
    rate_source = "configured (tokens_per_s)" if tokens_per_s else None
    if from_run is not None:
        tokens_per_s, rate_source = measured_tokens_per_s(from_run), f"measured (run={from_run})"

    c = compose_config(overrides, ns)  # schema, model path and data config checks, as training does
    from mistral_ft.data import DataError, build_datasets, collect_problems
    from mistral_ft.data.preference import build_pair_datasets
    from mistral_ft.tokenizer import MistralTokenizer

    model_path = model_folder(c["model"])
    tokenizer = MistralTokenizer.from_pretrained(c["model"].get("tokenizer") or model_path)
    problems: list[str] = []
    vocab_problem = check_tokenizer_matches_model(tokenizer, model_path, bool(c["model"].get("allow_vocab_mismatch")))
    if vocab_problem:
        problems.append(vocab_problem)

    data_cfg = {k: v for k, v in c["data"].items() if k not in ("batch_size", "eval_batch_size")}
    import logging

    import datasets

    # quiet for the check only (restored after: main() may run in-process, before a training): no bars,
    # and no "skipped N rows" warnings, since this report lists the rows themselves
    bars, data_log = datasets.is_progress_bar_enabled(), logging.getLogger("mistral_ft.data.dataset")
    level = data_log.level
    datasets.disable_progress_bars()
    data_log.setLevel(logging.ERROR)
    # pairs: examples are pairs, a length is the longer row (prompt + answer) of a pair
    build = build_pair_datasets if data_cfg.get("format") == "preference" else build_datasets
    info = None
    with collect_problems() as rows:
        try:
            _, _, info = build(dict(data_cfg, pack=False), tokenizer)
        except DataError as err:  # a file-level problem (missing, empty, no valid rows): nothing more to learn
            rows.append(str(err))
        finally:
            data_log.setLevel(level)
            if bars:
                datasets.enable_progress_bars()
    problems += rows
    lengths: list[int] = []
    if info is not None:  # raw lengths: the same rows without truncation (bad rows skipped, already reported)
        with collect_problems():
            raw_ds, _, _ = build(dict(data_cfg, pack=False, max_length=2**31 - 1, skip_invalid=True), tokenizer)
        lengths = sorted(raw_ds.lengths)

    out = [f"config: recipe={c['_choices'].get('recipe')} model={c['model'].get('path') or c['model']['name']} "
           f"data={c['data']['train_file']} format={c['data'].get('format')} max_length={c['data'].get('max_length')}"]
    if info is not None and lengths:
        max_length = int(c["data"].get("max_length", 1024))
        out.append(f"train examples: {info.train_examples} valid, {info.skipped['train']} skipped; "
                   f"validation examples: {info.val_examples}")
        out.append(f"token lengths (before truncation): min {lengths[0]}, median {_percentile(lengths, 50)}, "
                   f"p95 {_percentile(lengths, 95)}, max {lengths[-1]}")
        truncated = sum(1 for n in lengths if n > max_length)
        out.append(f"truncated at data.max_length={max_length}: {truncated} of {len(lengths)} examples "
                   f"({100.0 * truncated / len(lengths):.1f}%)")
        out += _budget(c, info, tokens_per_s, rate_source)
    print("\n".join(out), flush=True)
    for p in problems:
        print(f"error: {p}", file=sys.stderr)
    if problems:
        print(f"{len(problems)} problem(s) found", file=sys.stderr)
        return 1
    print("no problems found")
    return 0


def _budget(c: Mapping[str, Any], info: Any, tokens_per_s: Optional[float], rate_source: Optional[str]) -> list[str]:
    """Tokens and steps per epoch, epochs in max_steps, and time estimates."""
    trainer = c["trainer"]
    devices = trainer.get("devices", 1)
    world = devices if isinstance(devices, int) and devices > 0 else 1
    acc = int(trainer.get("accumulate_grad_batches", 1) or 1)
    per_step = int(c["data"]["batch_size"]) * world * acc  # examples (or packed rows) per optimizer step
    rows = info.train_examples
    steps_per_epoch = max(1, math.ceil(rows / per_step))
    max_steps = int(trainer.get("max_steps", 0) or 0)
    tokens = int(info.train_tokens)
    lines = [f"tokens per epoch: {tokens:,} (non-pad, after truncation; {info.train_target_tokens:,} loss targets)",
             f"optimizer steps per epoch: {steps_per_epoch} ({per_step} examples per step = data.batch_size "
             f"{c['data']['batch_size']} x {world} device(s) x accumulate {acc})"]
    run_tokens = None
    if max_steps > 0:
        epochs = max_steps / steps_per_epoch
        run_tokens = tokens * epochs
        lines.append(f"trainer.max_steps={max_steps}: {epochs:.2f} epoch(s), ~{int(run_tokens):,} tokens")
    if tokens_per_s:
        est = f"estimated time at {tokens_per_s:,.0f} tokens/s [{rate_source}]: {_fmt_time(tokens / tokens_per_s)} per epoch"
        if run_tokens is not None:
            est += f", {_fmt_time(run_tokens / tokens_per_s)} for max_steps"
        lines.append(est)
    else:
        lines.append("estimated time: pass tokens_per_s=N (configured) or run=RUN (measured by a run)")
    return lines


if __name__ == "__main__":
    sys.exit(main())
