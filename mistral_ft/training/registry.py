"""Named builders: config group option -> object. The table keys are the valid choices.

Each table maps the `name:` of a config group (conf/<group>/*.yaml) to a builder taking that group's
typed settings; the schema's list of valid names (`training.schema.CHOICES`), its error messages and
`--help` come from these keys, so adding a built-in is one table entry plus one YAML file.

Room for user classes: a later issue adds `_target_: my.module.Class` next to `name:` (Hydra's
`instantiate`); `build` is the one place that would look for it before the table.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from mistral_ft.errors import ConfigError


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


def _csv_logger(lc: Mapping[str, Any], run_dir: Path) -> Any:
    from lightning.pytorch.loggers import CSVLogger

    return CSVLogger(save_dir=str(run_dir), name="logs")


def _tensorboard_logger(lc: Mapping[str, Any], run_dir: Path) -> Any:
    from lightning.pytorch.loggers import TensorBoardLogger

    return TensorBoardLogger(save_dir=str(run_dir), name="logs")


def _wandb_logger(lc: Mapping[str, Any], run_dir: Path) -> Any:
    from lightning.pytorch.loggers import WandbLogger

    offline = bool(lc.get("offline")) or os.environ.get("WANDB_MODE", "") == "offline"
    return WandbLogger(project=lc.get("project"), entity=lc.get("entity"), save_dir=str(run_dir), offline=offline,
                       tags=list(lc.get("tags") or []), name=run_dir.name)


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
