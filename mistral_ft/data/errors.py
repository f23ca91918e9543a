"""The one exception type of the data pipeline."""

from __future__ import annotations


class DataError(ValueError):
    """Bad training data or data config.

    Row-level messages read "FILE:LINE: field 'x': what is wrong" (CSV and parquet: "FILE:row N"),
    so a user can open the file at the right place. A ValueError subclass so callers that
    already catch ValueError for bad input keep working.
    """


class RowError(Exception):
    """A problem with one row, before we know which file/line it came from.

    Raised by the per-format validators; the reader turns it into a `DataError` with the location
    (or counts it as skipped when `skip_invalid` is on).
    """

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"field '{field}': {problem}")
        self.field = field
        self.problem = problem


# ---- collect mode (python -m mistral_ft.validate) -------------------------------------------------
import contextlib
import contextvars
from collections.abc import Iterator
from typing import Optional

_PROBLEMS: contextvars.ContextVar[Optional[list[str]]] = contextvars.ContextVar("mistral_ft_data_problems", default=None)


@contextlib.contextmanager
def collect_problems() -> Iterator[list[str]]:
    """Inside the block every row problem is appended to the yielded list and the row skipped.

    Training stops at the first bad row (or counts skips with `skip_invalid`); a validation tool
    wants all of them in one pass, with the same checks and messages as training.
    """
    problems: list[str] = []
    token = _PROBLEMS.set(problems)
    try:
        yield problems
    finally:
        _PROBLEMS.reset(token)


def tolerate(err: DataError, skip_invalid: bool) -> None:
    """At a bad row: record it (collect mode), or skip it (`skip_invalid`), else raise `err`."""
    problems = _PROBLEMS.get()
    if problems is not None:
        problems.append(str(err))
        return
    if not skip_invalid:
        raise err
