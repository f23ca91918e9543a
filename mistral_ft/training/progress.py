"""Lightning's progress bar with an honest header: `Epoch 1/-2` and `v_num: 0.000` were what a step-bounded run
showed (Lightning prints `max_epochs - 1`, which is -2 when `max_steps` bounds the run and max_epochs is -1, and
the logger's version number formatted as a metric)."""

from __future__ import annotations

from typing import Any


def progress_bar() -> Any:
    """Lightning's own bar (Rich when installed, else tqdm, as Lightning picks) with epochs counted from 1, the
    epoch total only when epochs bound the run, and the optimizer step of `max_steps` beside it."""
    from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
    from lightning.pytorch.utilities.imports import _RICH_AVAILABLE

    base = RichProgressBar if _RICH_AVAILABLE else TQDMProgressBar

    class ProgressBar(base):  # type: ignore[misc, valid-type]
        def _get_train_description(self, current_epoch: int) -> str:  # RichProgressBar's hook
            return describe_epoch(self.trainer, current_epoch)

        def on_train_epoch_start(self, trainer: Any, *args: Any) -> None:
            super().on_train_epoch_start(trainer, *args)
            if isinstance(self, TQDMProgressBar) and self.train_progress_bar is not None:
                self.train_progress_bar.set_description(describe_epoch(trainer, trainer.current_epoch))

        def get_metrics(self, trainer: Any, pl_module: Any) -> dict[str, Any]:
            items = super().get_metrics(trainer, pl_module)
            items.pop("v_num", None)  # the logger's version, not a metric (Lightning's documented way to drop it)
            return items

    return ProgressBar()


def describe_epoch(trainer: Any, current_epoch: int) -> str:
    """`epoch 1` / `epoch 2/3` (1-based; a total only when max_epochs bounds the run)."""
    max_epochs = trainer.max_epochs
    text = f"epoch {current_epoch + 1}"
    if max_epochs is not None and max_epochs > 0 and not (trainer.max_steps and trainer.max_steps > 0):
        text += f"/{max_epochs}"
    return text
