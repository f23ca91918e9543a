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
