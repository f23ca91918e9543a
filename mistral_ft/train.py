"""`python -m mistral_ft.train recipe=NAME [group=option] [key=value ...]` — fine-tune a Mistral model.

The command line only: parse flags, compose and validate every run (mistral_ft.training.compose)
before Hydra makes a run folder, hand each to `training.run.run_training`, and turn errors into an
exit status (mistral_ft.cli). The run folder it leaves:

    <run folder>/            Hydra's run directory (hydra.run.dir=PATH moves it)
      config.yaml            the resolved config, secrets stripped
      overrides.yaml         the command-line overrides (what `resume=` replays)
      checkpoints/           step-NNNNNN.ckpt + last.ckpt: trainable weights, optimizer, scheduler, data position
      logs/version_N/        metrics.csv (logger=csv), TensorBoard events or W&B files
      adapter/ | model/      peft adapter folder (LoRA) or full HF weights (peft=none)
      loss_curve.png  summary.json  train.log

It is a Hydra app (mistral_ft.training.hydra_app): Hydra's flags (`--help`, `--cfg job`, `--info`,
`-m` with sweeper / launcher plugins, `-cd`, ...) and override grammar (`+key=v`, `~scheduler`) work as
Hydra documents them. Why not `@hydra.main` itself: tests call `main(argv)` in-process, every run is
composed and validated *before* Hydra creates its run folder (a typo leaves nothing behind that
`resume=` could mistake for progress), and errors reach the user as one paragraph with exit status 2.
"""

from __future__ import annotations

import logging
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

from mistral_ft.cli import run_cli, user_message
from mistral_ft.errors import TrainingStopped
from mistral_ft.training.compose import (
    CONFIG_NAME, RecipeFiles, compose_validated, fetch_hub_model, fill_removed_groups, make_hydra, own_group_values,
    refuse_multiprocess_sweep, resume_overrides, to_plain,
)
from mistral_ft.training.hydra_app import parse_args, print_flags, sweep_points
from mistral_ft.training.run import run_training

log = logging.getLogger("mistral_ft.train")

# ---- entry point ----------------------------------------------------------------------------------
def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the CLI with `argv` (default: sys.argv[1:]); returns the exit status.

    0: done; 1: the run failed inside training; 2: bad input (config, data, model path), reported
    as one paragraph on stderr without a traceback unless `debug=true` or MISTRAL_FT_DEBUG=1.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    return run_cli(lambda: _main(args), args, "training", _classify_error,
                   on_failure=lambda: log.exception("training failed"))  # a bug: keep the traceback in train.log


def _classify_error(err: Exception) -> Optional[tuple[str, int]]:
    """(message, exit status) for errors that explain themselves; None for bugs."""
    if isinstance(err, TrainingStopped):  # non-finite step, out of memory: the message says what to do
        return str(err), 1
    user = user_message(err)
    return (user, 2) if user is not None else None


def _main(args: list[str]) -> int:
    from hydra.types import RunMode

    ns = parse_args(args)
    printed = print_flags(ns, __file__, "train")
    if printed is not None:
        return printed
    recipes = RecipeFiles()
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        typed = resume_overrides(list(ns.overrides))  # what the user wrote (and what resume= replays)
        overrides = recipes.rewrite(typed)
        hydra = make_hydra(ns, __file__, "train", recipes)
        config_name = ns.config_name or CONFIG_NAME
        multirun = ns.multirun or hydra.get_mode(config_name=config_name, overrides=overrides) == RunMode.MULTIRUN
        points = sweep_points(overrides, hydra) if multirun else [overrides]
        pinned = own_group_values(hydra, points[0], config_name)  # the user's own group option wins
        for point in points:  # validate every run before any of them starts
            cfg = compose_validated(hydra, point + pinned, config_name, typed=point)
            if multirun:
                refuse_multiprocess_sweep(cfg)
            fetch_hub_model(cfg)
        task = _Task(recipes.typed, pinned, multirun)
        if multirun:  # Hydra's sweeper and launcher (hydra/sweeper=..., hydra/launcher=...); a failing job stops it
            hydra.multirun(config_name=config_name, task_function=task, overrides=overrides + pinned)
            return 0
        # Hydra prints "Error executing job with overrides" for a failed job; we report it ourselves.
        run_dir = _planned_run_dir(cfg)
        existed = run_dir is None or run_dir.exists()
        try:
            hydra.run(config_name=config_name, task_function=task, overrides=overrides + pinned)
        except Exception:  # Hydra's own setup failed (e.g. it could not open train.log: a full disk)
            if not existed and _just_created(run_dir):
                shutil.rmtree(run_dir, ignore_errors=True)
            raise
        if task.failure:
            raise task.failure[0]
        return 0
    finally:
        recipes.close()
        # Hydra's job logging adds a console and a train.log handler to the root logger for each run: a
        # second main() in this process (tests, the bad-input corpus) must not log into the last run folder
        for handler in set(root.handlers) - set(handlers):
            handler.close()
        root.handlers[:], root.level = handlers, level


class _Task:
    """Hydra's task function: one training run in the run folder Hydra made (picklable, for launchers
    that run jobs in other processes).

    overrides.yaml records what the user typed: `recipe=<stem>` goes back to the recipe file's path and
    the values pinned for the user's own group option are left out (the next composition pins them again).
    """

    def __init__(self, typed: dict[str, str], pinned: list[str], multirun: bool):
        self.typed, self.pinned, self.multirun = typed, set(pinned), multirun
        self.failure: list[BaseException] = []

    def __call__(self, cfg: Any) -> Any:
        from hydra.core.hydra_config import HydraConfig

        hc = HydraConfig.get()
        run_dir = Path(hc.runtime.output_dir)
        fresh = _just_created(run_dir)
        try:
            overrides = [self.typed.get(o, o) for o in hc.overrides.task if o not in self.pinned]
            choices = dict(hc.runtime.choices)
            return run_training(fill_removed_groups(to_plain(cfg), choices), run_dir, overrides=overrides,
                                choices=choices)
        except BaseException as err:  # noqa: BLE001 - re-raised below, after Hydra's bookkeeping
            if fresh and isinstance(err, Exception) and user_message(err) is not None \
                    and not (run_dir / "checkpoints").exists():
                shutil.rmtree(run_dir, ignore_errors=True)  # bad input (e.g. a data row): leave no folder
            if self.multirun:  # the sweeper re-raises it in this process: main() reports it
                raise
            self.failure.append(err)
            return None


def _planned_run_dir(cfg: Any) -> Optional[Path]:
    """hydra.run.dir as Hydra will make it, when it can be known beforehand (None when it cannot)."""
    from omegaconf import OmegaConf

    try:
        value = OmegaConf.select(cfg, "hydra.run.dir")
    except Exception:  # noqa: BLE001 - an interpolation only Hydra resolves (${now:...}): not known here
        return None
    return Path(str(value)).expanduser().absolute() if value else None


def _just_created(run_dir: Path) -> bool:
    """True when Hydra made `run_dir` for this call: it holds nothing but its own empty train.log.

    Input errors found only inside the run (a bad data row, a corrupt weights file) then remove the
    folder again, so a failed start leaves nothing that `resume=` or `resume=auto` could mistake for a run.
    """
    try:
        entries = list(run_dir.iterdir())
    except OSError:
        return False
    return all(p.name == "train.log" and p.stat().st_size == 0 for p in entries)  # (an empty folder: True)


if __name__ == "__main__":
    sys.exit(main())
