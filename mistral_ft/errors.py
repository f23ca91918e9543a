"""The two kinds of error a command reports without a traceback; every package error subclasses one.

* `UserError` (exit 2): the input is at fault (a config value, a data row, a model folder, a
  checkpoint). The message names the file, row or key and says what to do; `cli.run_cli` prints it as
  one paragraph. It subclasses ValueError, so `except ValueError` in callers keeps working.
* `TrainingStopped` (exit 1): training stopped for a reason the message explains (a non-finite step,
  out of memory); not the input's fault, but no traceback either.

This module imports nothing from the package: every layer may raise these.
"""

from __future__ import annotations


class UserError(ValueError):
    """Bad input: the message names the file, row or key at fault (exit 2, no traceback)."""


class ConfigError(UserError):
    """A config that cannot run: unknown key, wrong type, bad value or combination (run config or model config)."""


class CheckpointError(UserError):
    """A checkpoint that cannot be loaded as asked; the message names the file and key."""


class ExportError(UserError):
    """Input that cannot be exported as asked; the message names the file, key and value at fault."""


class TrainingStopped(RuntimeError):
    """Training stopped for a reason the message explains (exit 1, no traceback): see subclasses."""


class GenerateError(UserError):
    """A problem with the command line or its inputs; printed as one line, without a traceback."""


class ConversionError(UserError):
    """Input the converter cannot use; the message names the file, key and value at fault."""
