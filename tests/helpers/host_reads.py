"""Count the host reads of device values that our code makes (what is a device sync on CUDA), on CPU.

torch.cuda.set_sync_debug_mode exists on CUDA only. On CPU we count the Python-level calls that would read
a device value back on a GPU: Tensor.item / tolist / __bool__ / __float__ / __int__ / __index__ / nonzero,
torch.nonzero and torch.equal, made from a frame inside the mistral_ft package. Counting calls, never time.
"""

from __future__ import annotations

import os
import sys
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import torch

PACKAGE = str(Path(__file__).resolve().parents[2] / "mistral_ft") + os.sep
METHODS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "nonzero")
FUNCTIONS = ("nonzero", "equal")


@contextmanager
def count_host_reads():
    """Yields a Counter of (what, file name, function) -> calls made from mistral_ft code."""
    counts: Counter = Counter()

    def wrap(name, fn):
        def counted(*args, **kwargs):
            code = sys._getframe(1).f_code
            if code.co_filename.startswith(PACKAGE):
                counts[(name, os.path.basename(code.co_filename), code.co_name)] += 1
            return fn(*args, **kwargs)
        return counted

    methods = {n: torch.Tensor.__dict__.get(n) for n in METHODS}
    functions = {n: getattr(torch, n) for n in FUNCTIONS}
    for n in METHODS:
        setattr(torch.Tensor, n, wrap(n, getattr(torch.Tensor, n)))
    for n, fn in functions.items():
        setattr(torch, n, wrap(f"torch.{n}", fn))
    try:
        yield counts
    finally:
        for n, fn in methods.items():
            if fn is None:
                delattr(torch.Tensor, n)
            else:
                setattr(torch.Tensor, n, fn)
        for n, fn in functions.items():
            setattr(torch, n, fn)
