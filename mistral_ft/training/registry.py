"""Named builders: config group option -> object. The table keys are the valid choices.

Each table maps the `name:` of a config group (conf/<group>/*.yaml) to a builder taking that group's
settings; the schema's list of valid names (`training.schema.CHOICES`), its error messages and `--help`
come from these keys, so adding a built-in is one table entry plus one YAML file.

A user's own class: `_target_: my.module.Class` in the optimizer, scheduler or logger group (or any
entry of the `callbacks` group) is built with Hydra's `instantiate` instead of the table, the objects
only we have passed in (`_our_args`: the parameter groups, the optimizer, the run folder). It is
Hydra's normal instantiate: it imports the module the config names and calls the class with the
config's keys, as `python -c` would; nothing beyond that is loaded, and a config is code you trust.
`check_target` runs during validation, before the run folder exists, so a misspelt class is exit 2.
"""

from __future__ import annotations

import csv
import importlib
import inspect
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

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


# ---- strategy, logger: builder(settings, run folder) ------------------------------------------------
def _strategy(s: Mapping[str, Any], run_dir: Path) -> Any:
    from mistral_ft.distributed.strategy import build_strategy  # ddp, fsdp (FSDP2), auto

    return build_strategy(s)


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


def _purge_tensorboard(writer: Any, step: int) -> None:
    """What `SummaryWriter(purge_step=N)` writes first: a session START at step N, after which TensorBoard's
    reader drops the events >= N of the earlier files. Written into the open writer, because Lightning
    opens it in its setup hook, before the restore that tells us N (a purge_step set then is never read)."""
    from tensorboard.compat.proto.event_pb2 import Event, SessionLog

    writer.file_writer.add_event(Event(step=step, session_log=SessionLog(status=SessionLog.START)))
    writer.flush()


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
                if isinstance(logger, TensorBoardLogger) and trainer.is_global_zero:
                    _purge_tensorboard(logger.experiment, step)
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


# ---- optimizer: builder(settings, parameter groups) ---------------------------------------------------
def _adamw(s: Mapping[str, Any], groups: list[dict[str, Any]]) -> Any:
    import torch

    return torch.optim.AdamW(groups, lr=float(s["lr"]), betas=tuple(s["betas"]), eps=float(s["eps"]))


def _adamw8bit(s: Mapping[str, Any], groups: list[dict[str, Any]]) -> Any:
    """bitsandbytes' block-wise 8-bit Adam states (Dettmers et al. 2022), 2 bytes per parameter instead of 8;
    runs on CPU too (checked with bitsandbytes 0.50)."""
    import bitsandbytes as bnb

    return bnb.optim.AdamW8bit(groups, lr=float(s["lr"]), betas=tuple(s["betas"]), eps=float(s["eps"]))


# ---- scheduler: the learning-rate factor of an optimizer step ----------------------------------------
def _warmup(step: int, warmup_steps: int) -> Optional[float]:
    """Linear warmup reaching 1 at step `warmup_steps - 1` (so step 0 already moves the weights)."""
    return (step + 1) / warmup_steps if warmup_steps > 0 and step < warmup_steps else None


def _cosine(step: int, *, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """Warmup, then cosine decay to `min_lr_ratio` at `total_steps`."""
    w = _warmup(step, warmup_steps)
    if w is not None:
        return w
    progress = min(1.0, max(0.0, (step - warmup_steps) / max(1, total_steps - warmup_steps)))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _constant(step: int, *, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """Warmup, then 1."""
    w = _warmup(step, warmup_steps)
    return 1.0 if w is None else w


def _lambda_schedule(s: Mapping[str, Any], optimizer: Any, total_steps: int) -> Any:
    """A per-step `LambdaLR` of `SCHEDULES[name]` (Lightning steps it once per optimizer step)."""
    import torch

    warmup, kind, min_ratio = int(s["warmup_steps"]), str(s["name"]), float(s["min_lr_ratio"])

    def factor(step: int) -> float:
        return lr_factor(step, warmup_steps=warmup, total_steps=total_steps, kind=kind, min_lr_ratio=min_ratio)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def lr_factor(step: int, *, warmup_steps: int, total_steps: int, kind: str, min_lr_ratio: float) -> float:
    """Multiplier of the base learning rate at optimizer step `step` (0-based) for schedule `kind`."""
    return SCHEDULES[kind](step, warmup_steps=warmup_steps, total_steps=total_steps, min_lr_ratio=min_lr_ratio)


# group -> {name: builder}; the keys are the valid `name:` values
LOGGERS: dict[str, Callable[[Mapping[str, Any], Path], Any]] = {
    "csv": _csv_logger, "wandb": _wandb_logger, "tensorboard": _tensorboard_logger,
}
STRATEGIES: dict[str, Callable[[Mapping[str, Any], Path], Any]] = {n: _strategy for n in ("auto", "ddp", "fsdp")}
OPTIMIZERS: dict[str, Callable[[Mapping[str, Any], list[dict[str, Any]]], Any]] = {
    "adamw": _adamw, "adamw8bit": _adamw8bit,
}
SCHEDULES: dict[str, Callable[..., float]] = {"cosine": _cosine, "constant": _constant}  # name -> lr factor
SCHEDULERS: dict[str, Callable[[Mapping[str, Any], Any, int], Any]] = {n: _lambda_schedule for n in SCHEDULES}
REGISTRIES: dict[str, Mapping[str, Callable[..., Any]]] = {
    "logger": LOGGERS, "strategy": STRATEGIES, "optimizer": OPTIMIZERS, "scheduler": SCHEDULERS,
}
# Keys of our own group files that mean nothing to a user's class: dropped unless its signature takes them.
_OWN_KEYS: dict[str, tuple[str, ...]] = {
    "optimizer": ("name", "lr", "weight_decay", "betas", "eps"),
    "scheduler": ("name", "warmup_steps", "min_lr_ratio"),
    "logger": ("name", "project", "entity", "offline", "tags"),
}
TARGET_GROUPS = ("optimizer", "scheduler", "logger", "callbacks")  # the groups that take a `_target_`


def build(group: str, settings: Mapping[str, Any], *args: Any) -> Any:
    """The object for config group `group`: its `_target_` class if it names one, else the table's `name:`.

    `args` are what we pass in: the run folder (logger, strategy), the parameter groups (optimizer),
    the optimizer and the total step count (scheduler).
    """
    if settings.get("_target_"):
        return instantiate(group, settings, *args)
    table = REGISTRIES[group]
    name = str(settings["name"])
    if name not in table:
        raise ConfigError(f"{group}.name={name}: expected one of {', '.join(table)}")
    return table[name](settings, *args)


# ---- _target_: a user's own class -------------------------------------------------------------------
def _accepts(target: Any) -> Callable[[str], bool]:
    """key -> whether `target(...)` names that keyword (everything, when it takes **kwargs or has no signature)."""
    try:
        params = inspect.signature(target).parameters
    except (TypeError, ValueError):
        return lambda key: True
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return lambda key: True
    return lambda key: key in params


def target_kwargs(group: str, settings: Mapping[str, Any], target: Any) -> dict[str, Any]:
    """The keyword arguments a `_target_` class gets from the config: every key the user added, and our
    group file's own keys (`lr`, `betas`, ...) only where its signature names them (SGD has no betas);
    `name` when it still names one of our built-ins (the group file's selector), never."""
    own, accepts = _OWN_KEYS.get(group, ()), _accepts(target)
    leftover = {"name"} if settings.get("name") in REGISTRIES.get(group, {}) else set()  # `name: csv` of our file
    return {k: v for k, v in settings.items()
            if k != "_target_" and k not in leftover and (k not in own or accepts(k))}


def _our_args(group: str, target: Any, settings: Mapping[str, Any], args: Sequence[Any]) -> tuple[list[Any], dict[str, Any]]:
    """What we pass ourselves: optimizer(param groups), scheduler(optimizer), logger(save_dir=run folder
    when it takes one and the config sets none); callbacks get only their config."""
    if group in ("optimizer", "scheduler"):
        return [args[0]], {}
    if group == "logger" and "save_dir" not in settings and _accepts(target)("save_dir"):
        return [], {"save_dir": str(args[0])}
    return [], {}


def locate(path: str) -> Any:
    """The object a dotted path names (`torch.optim.SGD`): the longest importable module, then attributes.
    What Hydra's `instantiate` does to find `_target_`, with our own message instead of its log lines."""
    parts = path.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ModuleNotFoundError as err:
            if err.name and not ".".join(parts[:i]).startswith(err.name):
                raise  # the module exists but imports something missing: that is the message to show
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ModuleNotFoundError(f"no module named {parts[0]!r}")


def check_target(dotted: str, settings: Mapping[str, Any], group: str) -> Optional[str]:
    """A problem string when `dotted._target_` cannot be imported, is not callable, or does not take the
    config's keys plus what we pass; None when it looks buildable. Imports the module it names."""
    path = settings.get("_target_")
    if not isinstance(path, str) or "." not in path:
        return f"{path!r} is not a dotted import path such as torch.optim.SGD"
    try:
        target = locate(path)
    except Exception as err:  # noqa: BLE001 - ImportError, AttributeError, or the module's own import error
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        return f"cannot import {path} ({type(err).__name__}: {first[:200]})"
    if not callable(target):
        return f"{path} is not a class or function"
    kwargs = {k: v for k, v in target_kwargs(group, settings, target).items() if not k.startswith("_")}
    pos, ours = _our_args(group, target, settings, [None])
    try:
        inspect.signature(target).bind(*pos, **ours, **kwargs)
    except TypeError as err:
        return f"{path} does not take the keys of {dotted}: {err} (keys given: {sorted(kwargs)})"
    except ValueError:  # no signature to check against
        pass
    return None


def instantiate(group: str, settings: Mapping[str, Any], *args: Any) -> Any:
    """Hydra's `instantiate` of `settings._target_`, with what we pass ourselves (`_our_args`).

    `_partial_` first, then the call: Hydra would otherwise turn parameter groups (tensors) into a
    ListConfig on the way in. `_convert_: all` unless the config says otherwise: plain lists and dicts.
    """
    from hydra.utils import instantiate as hydra_instantiate

    target = locate(str(settings["_target_"]))
    node = {"_convert_": "all", **target_kwargs(group, settings, target), "_target_": settings["_target_"],
            "_partial_": True}
    pos, ours = _our_args(group, target, settings, args)
    return hydra_instantiate(node)(*pos, **ours)


def build_callbacks(settings: Optional[Mapping[str, Mapping[str, Any]]]) -> list[Any]:
    """The `callbacks` group (conf/callbacks/*.yaml and `+callbacks.NAME._target_=...`), in config order."""
    return [instantiate("callbacks", node) for node in (settings or {}).values()]


# ---- the model head: task -> (model class, from_pretrained arguments) ---------------------------------
def _lm_head(info: Any) -> tuple[str, dict[str, Any]]:
    return "causal_lm", {}


def _score_head(info: Any) -> tuple[str, dict[str, Any]]:
    """One scalar score per sequence (reward models)."""
    return "classification", {"num_labels": 1, "problem_type": "regression"}


def _label_head(info: Any) -> tuple[str, dict[str, Any]]:
    """One logit per label of the data (classification), or one value (regression)."""
    if info.format == "regression":
        return _score_head(info)
    id2label = {int(k): str(v) for k, v in (info.id2label or {}).items()}
    return "classification", {"num_labels": len(id2label), "id2label": id2label,
                              "label2id": {v: k for k, v in id2label.items()},
                              "problem_type": "single_label_classification"}


HEADS: dict[str, Callable[[Any], tuple[str, dict[str, Any]]]] = {
    "causal_lm": _lm_head, "classification": _label_head, "dpo": _lm_head, "reward": _score_head,
}


