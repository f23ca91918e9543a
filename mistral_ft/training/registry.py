"""Named builders: config group option -> object. The table keys are the valid choices.

Each table maps the `name:` of a config group (conf/<group>/*.yaml) to a builder taking that group's
typed settings; the schema's list of valid names (`training.schema.CHOICES`), its error messages and
`--help` come from these keys, so adding a built-in is one table entry plus one YAML file.

Room for user classes: a later issue adds `_target_: my.module.Class` next to `name:` (Hydra's
`instantiate`); `build` is the one place that would look for it before the table.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from mistral_ft.errors import ConfigError
from mistral_ft.runs import read_logger_ids, write_logger_ids


def resolve_precision(value: Any, use_cuda: bool) -> Any:
    """`auto` -> bf16-mixed (bf16 GPU), 16-mixed (older GPU), 32-true (CPU); fp16 on CPU is refused."""
    import torch

    text = str(value)
    if text == "auto":
        if use_cuda:
            return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
        return "32-true"
    if not use_cuda and text in ("16", "16-mixed", "16-true"):
        raise ConfigError(f"trainer.precision={text} needs a CUDA GPU; on CPU use 32 (or bf16-true / bf16-mixed)")
    return value


def _strategy(name: str) -> Callable[[Mapping[str, Any], Path], Any]:
    def build(s: Mapping[str, Any], run_dir: Path) -> Any:
        from mistral_ft.distributed.strategy import build_strategy  # ddp, fsdp (FSDP2), auto

        return build_strategy(s)

    return build


def _version(lc: Mapping[str, Any], run_dir: Path) -> Any:
    """The logs/version_N a resume appends to (recorded in loggers.json); None: Lightning picks the next one."""
    return read_logger_ids(run_dir).get("version") if lc.get("continue_history") else None


def _csv_logger(lc: Mapping[str, Any], run_dir: Path) -> Any:
    from lightning.pytorch.loggers import CSVLogger
    from lightning.pytorch.loggers.csv_logs import ExperimentWriter
    from lightning.pytorch.loggers.logger import rank_zero_experiment

    class AppendingWriter(ExperimentWriter):
        """Lightning's writer deletes an existing metrics.csv; on resume we append to it (its header first)."""

        def _check_log_dir_exists(self) -> None:
            if self._fs.isfile(self.metrics_file_path):
                with open(self.metrics_file_path, newline="") as f:
                    self.metrics_keys = next(csv.reader(f), [])

    class ContinuingCSVLogger(CSVLogger):
        @property
        @rank_zero_experiment
        def experiment(self) -> Any:
            if self._experiment is None:
                self._experiment = AppendingWriter(log_dir=self.log_dir)
            return self._experiment

    version = _version(lc, run_dir)
    if version is None:
        return CSVLogger(save_dir=str(run_dir), name="logs")
    return ContinuingCSVLogger(save_dir=str(run_dir), name="logs", version=version)


def _tensorboard_logger(lc: Mapping[str, Any], run_dir: Path) -> Any:
    from lightning.pytorch.loggers import TensorBoardLogger

    return TensorBoardLogger(save_dir=str(run_dir), name="logs", version=_version(lc, run_dir))


def _wandb_logger(lc: Mapping[str, Any], run_dir: Path) -> Any:
    """A resume continues the W&B run whose id the first start recorded in loggers.json (resume="allow")."""
    from lightning.pytorch.loggers import WandbLogger

    offline = bool(lc.get("offline")) or os.environ.get("WANDB_MODE", "") == "offline"
    run_id = read_logger_ids(run_dir).get("wandb_id") if lc.get("continue_history") else None
    return WandbLogger(project=lc.get("project"), entity=lc.get("entity"), save_dir=str(run_dir), offline=offline,
                       tags=list(lc.get("tags") or []), name=run_dir.name,
                       **({"id": run_id, "resume": "allow"} if run_id else {}))


def continue_history_callback(run_dir: Path) -> Any:
    """Records the loggers' ids at the start of a fit (rank 0), and on resume from step N drops what the
    interrupted session logged past N (train rows with step >= N, validation rows with step > N) from the
    CSV, and tells TensorBoard to purge events >= N, so the history reads as one run."""
    import lightning as L
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger

    class ContinueHistory(L.Callback):
        def on_load_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
            step = int(checkpoint.get("global_step", 0))
            for logger in trainer.loggers:
                if isinstance(logger, TensorBoardLogger) and logger._experiment is None:
                    logger._kwargs["purge_step"] = step  # SummaryWriter(purge_step=N): hides events >= N
                if isinstance(logger, CSVLogger) and trainer.is_global_zero:
                    _truncate_csv(Path(logger.log_dir) / "metrics.csv", step)

        def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
            if not trainer.is_global_zero:
                return
            ids: dict[str, Any] = {}
            for logger in trainer.loggers:
                if isinstance(logger, WandbLogger):
                    ids["wandb_id"] = logger.experiment.id
                elif isinstance(logger, (CSVLogger, TensorBoardLogger)):
                    ids["version"] = logger.version
            if ids:
                write_logger_ids(run_dir, ids)

    return ContinueHistory()


def _truncate_csv(path: Path, step: int) -> None:
    if not path.is_file():
        return
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
        header = list(rows[0]) if rows else []
    kept = [r for r in rows if not r.get("step") or int(float(r["step"])) < step
            or (int(float(r["step"])) == step and not r.get("train_loss"))]
    if len(kept) == len(rows):
        return
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=header)
        writer.writeheader()
        writer.writerows(kept)


# group -> {name: builder(group settings, run folder)}; the keys are the valid `name:` values
LOGGERS: dict[str, Callable[[Mapping[str, Any], Path], Any]] = {
    "csv": _csv_logger, "wandb": _wandb_logger, "tensorboard": _tensorboard_logger,
}
STRATEGIES: dict[str, Callable[[Mapping[str, Any], Path], Any]] = {n: _strategy(n) for n in ("auto", "ddp", "fsdp")}
REGISTRIES = {"logger": LOGGERS, "strategy": STRATEGIES}


def build(group: str, settings: Mapping[str, Any], run_dir: Path) -> Any:
    """The object for config group `group` (its `name:` picks the builder). The `_target_` hook goes here."""
    table = REGISTRIES[group]
    name = str(settings["name"])
    if name not in table:
        raise ConfigError(f"{group}.name={name}: expected one of {', '.join(table)}")
    return table[name](settings, run_dir)
