"""Third-party console lines a mistral_ft user cannot act on, dropped where they are emitted (issue 17).

Each filter matches one message of one library, by its text, so everything else those libraries say (and
every warning of ours) still shows. What is dropped and why:

- bitsandbytes (logger `bitsandbytes.backends.cpu.ops`, at import on a machine without CUDA): "Failed to load
  CPU gemm_4bit_forward from kernels-community ... pip install kernels": an optional CPU kernel for 4-bit
  matmuls; bitsandbytes falls back to its own path, and a CPU QLoRA run is a test, not a workload.
- Lightning's "Tip: ... try installing litlogger" (`lightning.pytorch.utilities.rank_zero`, every fit): an
  advertisement for a hosted service.
- Lightning's "You have overridden `on_before_batch_transfer` in `LightningModule` but have passed in a
  `LightningDataModule`": our design (training/tasks/base.py counts tokens on the host in the module's hook,
  the data module has none); the notice describes what we intend.
- Lightning's `_pytree.py` "`isinstance(treespec, LeafSpec)` is deprecated" (torch >= 2.9 deprecates the check
  Lightning 2.6 still makes): nothing a user can change but their Lightning version.

Fixed at their source instead (not filtered): Lightning's "`limit_val_batches=1.0` was configured ..." (our
conf/trainer/default.yaml now leaves it null, Lightning's default), "`weights_only` was not set" (the final
checkpoint is saved with weights_only=False explicitly), the progress bar's `Epoch 0/-2` and `v_num`
(training/progress.py).
"""

from __future__ import annotations

import logging
import warnings

_LOG_NOISE = {
    "bitsandbytes.backends.cpu.ops": ("Failed to load CPU gemm_4bit_forward from kernels-community",),
    "lightning.pytorch.utilities.rank_zero": ("💡 Tip: For seamless cloud logging",),
}
_WARNING_NOISE = (
    r"You have overridden `on_before_batch_transfer` in `LightningModule` but have passed in a `LightningDataModule`",
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
)


class _Drop(logging.Filter):
    def __init__(self, starts: tuple[str, ...]):
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.starts)


def quiet_third_party() -> None:
    """Install the filters above (idempotent); every CLI calls it first (cli.run_cli)."""
    for name, starts in _LOG_NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _Drop) for f in logger.filters):
            logger.addFilter(_Drop(starts))
    for message in _WARNING_NOISE:
        warnings.filterwarnings("ignore", message=message)
