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

Why `main(argv)` drives Hydra's `Hydra.run` / `Hydra.multirun` instead of `@hydra.main`: tests call it
in-process, and errors must reach the user as one paragraph (Hydra's own reporting prints a
traceback of our code for any exception). We compose and validate *before* Hydra creates the run
folder, so a typo leaves nothing behind that `resume=` could mistake for progress.
"""

from __future__ import annotations

import logging
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

from mistral_ft.cli import DEBUG_ENV, run_cli, user_message
from mistral_ft.errors import ConfigError, TrainingStopped
from mistral_ft.training.compose import (
    CONFIG_NAME, available, compose_validated, config_dir, fetch_hub_model, refuse_multiprocess_sweep,
    resume_overrides, sweep_points, trainer_overrides, without_hydra,
)
from mistral_ft.training.run import run_training

log = logging.getLogger("mistral_ft.train")

USAGE = """usage: python -m mistral_ft.train recipe=NAME [group=option ...] [key=value ...] [-m]

  recipe=NAME          a complete recipe: {recipes}
  group=option         model, data, peft, optimizer, scheduler, strategy, trainer, logger
  key=value            any config value, e.g. trainer.max_steps=100 optimizer.lr=1e-4
  trainer.*            Lightning Trainer arguments (devices, precision, accumulate_grad_batches, ...)
  resume=PATH          continue a run folder (or a .ckpt) with its step count and data position
  hydra.run.dir=PATH   where the run folder goes
  debug=true           show tracebacks (also env {env}=1)
  -m / --multirun      sweep comma-separated values, e.g. -m optimizer.lr=1e-4,3e-4
  --cfg                print the composed config and exit
"""


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
    multirun = False
    print_cfg = False
    overrides: list[str] = []
    for a in args:
        if a in ("-m", "--multirun"):
            multirun = True
        elif a in ("-h", "--help"):
            print(USAGE.format(recipes=", ".join(available("recipe")), env=DEBUG_ENV))
            return 0
        elif a in ("--cfg", "--cfg=job"):
            print_cfg = True
        elif a.startswith("-"):
            raise ConfigError(f"unknown flag {a!r}\n{USAGE.format(recipes=', '.join(available('recipe')), env=DEBUG_ENV)}")
        else:
            overrides.append(a)
    overrides = trainer_overrides(resume_overrides(overrides))

    from hydra.core.global_hydra import GlobalHydra
    from hydra.initialize import initialize_config_dir

    conf = config_dir()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(conf), version_base="1.3", job_name="train"):
        hydra = GlobalHydra.instance().hydra
        assert hydra is not None
        points = sweep_points(overrides) if multirun else [overrides]
        for point in points:  # validate every run before any of them starts
            cfg = compose_validated(hydra, point)
            if print_cfg:
                from omegaconf import OmegaConf

                print(OmegaConf.to_yaml(without_hydra(cfg)))
            if multirun:
                refuse_multiprocess_sweep(cfg)
            if not print_cfg:
                fetch_hub_model(cfg)
        if print_cfg:
            return 0
        if multirun:  # a failing point stops the sweep (Hydra re-raises it)
            hydra.multirun(config_name=CONFIG_NAME, task_function=_task, overrides=overrides)
            return 0
        failure: list[BaseException] = []

        def task(cfg: Any) -> Any:
            from hydra.core.hydra_config import HydraConfig

            run_dir = Path(HydraConfig.get().runtime.output_dir)
            fresh = _just_created(run_dir)
            try:
                return _task(cfg)
            except BaseException as err:  # noqa: BLE001 - re-raised below, after Hydra's bookkeeping
                failure.append(err)
                if fresh and isinstance(err, Exception) and user_message(err) is not None \
                        and not (run_dir / "checkpoints").exists():
                    shutil.rmtree(run_dir, ignore_errors=True)  # bad input (e.g. a data row): leave no folder
                return None

        # Hydra prints "Error executing job with overrides" for a failed job; we report it ourselves.
        run_dir = _planned_run_dir(cfg)
        existed = run_dir is None or run_dir.exists()
        try:
            hydra.run(config_name=CONFIG_NAME, task_function=task, overrides=overrides)
        except Exception:  # Hydra's own setup failed (e.g. it could not open train.log: a full disk)
            if not existed and _just_created(run_dir):
                shutil.rmtree(run_dir, ignore_errors=True)
            raise
        if failure:
            raise failure[0]
    return 0


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


def _task(cfg: Any) -> dict[str, Any]:
    """Hydra's task function: one training run in the run folder Hydra made."""
    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    return run_training(cfg, run_dir, overrides=list(hc.overrides.task), choices=dict(hc.runtime.choices))


if __name__ == "__main__":
    sys.exit(main())
