"""What every `python -m mistral_ft.X` entry point does with an exception: one exit-status policy.

0 done; 2 bad input (one paragraph on stderr, no traceback); 1 a failure that is not the input's fault
(the message names the exception); 130 interrupted. `debug=true` or MISTRAL_FT_DEBUG=1 re-raises instead,
so the full traceback is there when it is wanted.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from typing import Optional

from mistral_ft.errors import UserError
from mistral_ft.masking import mask_text

DEBUG_ENV = "MISTRAL_FT_DEBUG"


def debug_requested(args: Sequence[str]) -> bool:
    """`debug=true` (or `+debug=true`) among the arguments, or MISTRAL_FT_DEBUG=1 in the environment."""
    if os.environ.get(DEBUG_ENV, "").lower() in ("1", "true", "yes"):
        return True
    return any(a.lstrip("+") in ("debug=true", "debug=True", "debug=1") for a in args)


def run_cli(body: Callable[[], int], args: Sequence[str], what: str,
            classify: Callable[[Exception], Optional[tuple[str, int]]],
            interrupted: str = "interrupted", on_failure: Optional[Callable[[], None]] = None,
            failure_hint: str = "", raise_unknown: bool = False) -> int:
    """Run `body()` and turn its exceptions into an exit status.

    `classify(err)` returns (message, status) for errors with a message of their own (bad input: status 2),
    or None for anything else: a bug, re-raised with its traceback (exit 1) with `raise_unknown` (generate
    and the converter), else reported as "`what` failed: Type: text" with status 1 after `on_failure()`
    (e.g. logging the traceback to the run's log file). Every CLI's `classify` uses `user_message`, so what
    counts as bad input is decided in one place.
    """
    from mistral_ft.quiet import quiet_third_party

    quiet_third_party()
    debug = debug_requested(args)
    try:
        return body()
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)  # "" prints an empty line (generate)
        return 130
    except Exception as err:  # noqa: BLE001 - the one place that turns errors into exit codes
        if debug:
            raise
        known = classify(err)
        if known is not None:
            message, status = known
            print(f"error: {mask_text(message)}", file=sys.stderr)  # secrets masked in every message
            return status
        if raise_unknown:
            raise
        if on_failure is not None:
            on_failure()
        print(f"error: {what} failed: {type(err).__name__}: {mask_text(str(err))}{failure_hint}", file=sys.stderr)
        return 1


def user_message(err: BaseException) -> Optional[str]:
    """The one-paragraph message for errors caused by input; None for bugs (those keep a traceback)."""
    user_types: list[type] = [UserError, FileNotFoundError]
    try:
        from mistral_ft.data import DataError

        user_types.append(DataError)
    except ImportError:  # pragma: no cover - partial installs
        pass
    try:
        from lightning.fabric.utilities.exceptions import MisconfigurationException

        user_types.append(MisconfigurationException)
    except ImportError:  # pragma: no cover
        pass
    from mistral_ft.fs import is_out_of_space, out_of_space

    cause: Optional[BaseException] = err
    seen: set[int] = set()
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))  # a full disk: the path and the free space, whoever wrote (and whoever wrapped it:
        if is_out_of_space(cause):  # logging.config reports a log file it could not open as a ValueError)
            return str(out_of_space(cause))  # type: ignore[arg-type]
        cause = cause.__cause__ or cause.__context__
    if isinstance(err, OSError) and not isinstance(err, FileNotFoundError) and err.filename:
        # an OS error on a path the user gave (a folder below a regular file, no permission, a read-only
        # file system): the path and the reason are the whole story
        other = f" -> {err.filename2}" if err.filename2 else ""
        return f"{err.filename}{other}: {err.strerror or err}"
    if isinstance(err, tuple(user_types)):
        kind = {"DataError": "data", "CheckpointError": "model checkpoint", "MisconfigurationException": "trainer"}.get(
            type(err).__name__, "")
        return (f"{kind}: " if kind else "") + str(err)
    return None


def renamed(args: Sequence[str], old_to_new: dict[str, str], command: str) -> list[str]:
    """Old spellings of a setting keep working, with a note on stderr naming the new one.

    `old_to_new` maps an old `key=` or `--flag=` prefix to the new one: the one CLI style (docs/cli.md) is
    `key=value` for commands that compose a config and the same names (`run`, `model`, `adapter`,
    `output_dir`, `data`) as flags in generate and convert.
    """
    out = []
    for arg in args:
        for old, new in old_to_new.items():
            if arg.startswith(old):
                print(f"note: {command}: {old}... is deprecated and will be removed; use {new}... "
                      f"(same meaning)", file=sys.stderr)
                arg = new + arg[len(old):]
                break
        out.append(arg)
    return out

