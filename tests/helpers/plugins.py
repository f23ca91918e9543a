"""A user's own classes, as a user would write them in their project, for the `_target_` tests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L


class StepLog(L.Callback):
    """Appends every optimizer step's learning rate to a JSON-lines file (`path`), tagged with `tag`."""

    def __init__(self, path: str, tag: str = "") -> None:
        self.path, self.tag = Path(path), tag

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        lr = trainer.optimizers[0].param_groups[0]["lr"]
        with self.path.open("a") as fh:
            fh.write(json.dumps({"step": trainer.global_step, "lr": lr, "tag": self.tag}) + "\n")
