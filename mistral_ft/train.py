"""`python -m mistral_ft.train recipe=NAME [group=option] [key=value ...]` — fine-tune a Mistral model.

A thin Hydra entry point: compose `conf/` + the recipe, validate, build tokenizer -> data -> model ->
peft -> task module -> Lightning Trainer, fit, and leave a self-describing run folder:

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

import json
import logging
import math
import os
import resource
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

from mistral_ft.config_schema import DATA_LOADER_KEYS, ConfigError, Sources, mask_secret, strip_secrets, validate_config

log = logging.getLogger("mistral_ft.train")

from mistral_ft.cli import DEBUG_ENV
CONFIG_NAME = "config"
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


# ---- locating the config tree ---------------------------------------------------------------------
def config_dir() -> Path:
    """The composed config tree: `mistral_ft/conf/` (groups) with `conf/recipe/` (the recipes).

    In the repository `mistral_ft/conf` links to the top-level `conf/` and `conf/recipe` to
    `recipes/` (Hydra only finds a group named `recipe` in a folder of that name); the wheel
    carries both as real folders inside the package, so an installed copy needs no repository.
    """
    here = Path(__file__).resolve().parent / "conf"
    if not (here / f"{CONFIG_NAME}.yaml").is_file() or not (here / "recipe").is_dir():
        raise RuntimeError(f"mistral_ft's config tree is missing at {here} (broken install?)")
    return here


def available(group: str) -> list[str]:
    """Options of a config group (file stems), for messages and --help."""
    folder = config_dir() / group
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


# ---- entry point ----------------------------------------------------------------------------------
def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the CLI with `argv` (default: sys.argv[1:]); returns the exit status.

    0: done; 1: the run failed inside training; 2: bad input (config, data, model path), reported
    as one paragraph on stderr without a traceback unless `debug=true` or MISTRAL_FT_DEBUG=1.
    """
    from mistral_ft.cli import run_cli

    args = list(sys.argv[1:] if argv is None else argv)
    return run_cli(lambda: _main(args), args, "training", _classify_error,
                   on_failure=lambda: log.exception("training failed"))  # a bug: keep the traceback in train.log


def _classify_error(err: Exception) -> Optional[tuple[str, int]]:
    """(message, exit status) for errors that explain themselves; None for bugs."""
    from mistral_ft.reliability import TrainingStopped

    if isinstance(err, TrainingStopped):  # non-finite step, out of memory: the message says what to do
        return str(err), 1
    user = _user_message(err)
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
    overrides = _trainer_overrides(_resume_overrides(overrides))

    from hydra.core.global_hydra import GlobalHydra
    from hydra.initialize import initialize_config_dir

    conf = config_dir()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(conf), version_base="1.3", job_name="train"):
        hydra = GlobalHydra.instance().hydra
        assert hydra is not None
        points = _sweep_points(overrides) if multirun else [overrides]
        for point in points:  # validate every run before any of them starts
            cfg = _compose(hydra, point)
            if print_cfg:
                from omegaconf import OmegaConf

                print(OmegaConf.to_yaml(_without_hydra(cfg)))
            if multirun:
                _refuse_multiprocess_sweep(cfg)
            if not print_cfg:
                _fetch_hub_model(cfg)
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
                if fresh and isinstance(err, Exception) and _user_message(err) is not None \
                        and not (run_dir / "checkpoints").exists():
                    shutil.rmtree(run_dir, ignore_errors=True)  # bad input (e.g. a data row): leave no folder
                return None

        # Hydra prints "Error executing job with overrides" for a failed job; we report it ourselves.
        hydra.run(config_name=CONFIG_NAME, task_function=task, overrides=overrides)
        if failure:
            raise failure[0]
    return 0


def _just_created(run_dir: Path) -> bool:
    """True when Hydra made `run_dir` for this call: it holds nothing but its own empty train.log.

    Input errors found only inside the run (a bad data row, a corrupt weights file) then remove the
    folder again, so a failed start leaves nothing that `resume=` or `resume=auto` could mistake for a run.
    """
    try:
        entries = list(run_dir.iterdir())
    except OSError:
        return False
    return all(p.name == "train.log" and p.stat().st_size == 0 for p in entries)


def compose_config(overrides: Sequence[str]) -> dict[str, Any]:
    """The validated config that `main(overrides)` would train with, as a plain dict (no run).

    For tests and tools: every recipe / group option can be checked without starting anything.
    """
    from hydra.core.global_hydra import GlobalHydra
    from hydra.initialize import initialize_config_dir

    overrides = _trainer_overrides(_resume_overrides(list(overrides)))
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3", job_name="train"):
        hydra = GlobalHydra.instance().hydra
        cfg = _compose(hydra, overrides)
        plain = _to_plain(cfg)
        plain["_choices"] = dict(cfg.hydra.runtime.choices)
        return plain


def _task(cfg: Any) -> dict[str, Any]:
    """Hydra's task function: one training run in the run folder Hydra made."""
    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    return run_training(cfg, run_dir, overrides=list(hc.overrides.task), choices=dict(hc.runtime.choices))


# ---- composition, validation, resume --------------------------------------------------------------
def _compose(hydra: Any, overrides: list[str]) -> Any:
    """Compose one config (RUN mode) and validate it; Hydra's errors become ConfigError."""
    from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
    from hydra.types import RunMode

    try:
        cfg = hydra.compose_config(CONFIG_NAME, overrides, run_mode=RunMode.RUN, with_log_configuration=False)
    except MissingConfigException as err:
        text = _hydra_text(err).split("\nConfig search path", 1)[0]
        raise ConfigError(text.replace("\n\t", " ").replace("\n", "; ")) from None
    except OverrideParseException as err:
        raise ConfigError(f"cannot parse the command line: {_hydra_text(err)}") from None
    except ConfigCompositionException as err:
        raise ConfigError(_explain_composition_error(hydra, overrides, err)) from None
    choices = dict(cfg.hydra.runtime.choices)
    plain = _to_plain(cfg)
    validate_config(plain, Sources(conf_dir=config_dir(), choices=choices, overrides=overrides))
    if plain["model"].get("path"):
        resolve_model_path(plain["model"])  # a missing folder fails here, before any run folder exists
    from mistral_ft.data import DataConfig

    # the data pipeline's own range checks (DataError), also before any run folder exists
    DataConfig.from_mapping({k: v for k, v in plain["data"].items() if k not in DATA_LOADER_KEYS})
    import torch

    accelerator = str(plain["trainer"].get("accelerator", "auto"))
    resolve_precision(plain["trainer"].get("precision", "auto"),
                      torch.cuda.is_available() and accelerator in ("auto", "gpu", "cuda"))
    from mistral_ft.distributed import check_distributed

    check_distributed(plain, torch.cuda.is_available() and accelerator in ("auto", "gpu", "cuda"))
    return cfg


def _fetch_hub_model(cfg: Any) -> None:
    """A hub id in model.path is fetched (or found in the hub cache) now, before Hydra makes the run
    folder: offline or a wrong id then fails without leaving a folder behind. compose_config skips this
    (it must work without the hub)."""
    path = cfg.model.get("path")
    if path and not Path(str(path)).expanduser().exists():
        from mistral_ft.model.weights import resolve_model_path as local_model_folder

        local_model_folder(str(path))


def _hydra_text(err: BaseException) -> str:
    text = str(err).strip()
    cause = err.__cause__
    if cause is not None and str(cause).strip() and str(cause).strip() not in text:
        text += f" ({str(cause).strip().splitlines()[0]})"
    return text.replace("\n\n", "\n")


def _explain_composition_error(hydra: Any, overrides: list[str], err: BaseException) -> str:
    """Hydra says "Could not override 'optimizer.lrr'"; we add the valid keys and the likely one."""
    import difflib

    from hydra.types import RunMode
    from omegaconf import OmegaConf

    text = _hydra_text(err)
    for ov in overrides:
        key = ov.split("=", 1)[0].lstrip("+~")
        if f"Could not override '{key}'" in text or f"Could not append to config. An item is already at '{key}'" in text:
            parent, _, leaf = key.rpartition(".")
            rest = [o for o in overrides if o != ov]
            try:
                base = hydra.compose_config(CONFIG_NAME, rest, run_mode=RunMode.RUN, with_log_configuration=False)
                node = OmegaConf.select(base, parent) if parent else base
            except Exception:  # noqa: BLE001 - the plain message is still useful
                node = None
            if node is not None and OmegaConf.is_dict(node):
                valid = sorted(str(k) for k in node.keys() if k != "hydra")
                close = difflib.get_close_matches(leaf, valid, n=1)
                hint = f" Did you mean '{(parent + '.') if parent else ''}{close[0]}'?" if close else ""
                return (f"{key}: unknown key (from the command line: {mask_secret(ov)}).{hint} Valid keys under "
                        f"{parent or 'the top level'}: {', '.join(valid)}")
            if node is not None:
                return f"{key}: cannot set a key under {parent}, which is a value ({node!r}), not a group of keys"
    if "You must specify 'recipe'" in text:
        return f"no recipe given: add recipe=NAME, one of {available('recipe')}"
    return text


def _to_plain(cfg: Any) -> dict[str, Any]:
    """The user part of a composed config as plain Python values (interpolations resolved)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import MissingMandatoryValue

    try:
        return OmegaConf.to_container(_without_hydra(cfg), resolve=True, throw_on_missing=True)  # type: ignore[return-value]
    except MissingMandatoryValue as err:
        key = getattr(err, "full_key", "") or "?"
        raise ConfigError(f"{key}: a value is required (pass {key}=...)") from None


def _without_hydra(cfg: Any) -> Any:
    from omegaconf import OmegaConf, open_dict

    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    with open_dict(cfg):
        cfg.pop("hydra", None)
    return cfg


def _sweep_points(overrides: list[str]) -> list[list[str]]:
    """Every combination of a `-m` sweep, as plain override lists (what Hydra's BasicSweeper runs)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except OverrideParseException as err:
        raise ConfigError(f"cannot parse the command line: {err}") from None
    return BasicSweeper.split_arguments(parsed, None)[0]


def _refuse_multiprocess_sweep(cfg: Any) -> None:
    """Lightning launches DDP children by replaying sys.argv: each child would re-run the whole sweep.

    Any multi-device run is refused (strategy=auto on several devices is DDP as well).
    """
    strategy = str(cfg.strategy.name)
    devices = cfg.trainer.get("devices", 1)
    multi = devices == -1 or (isinstance(devices, int) and devices > 1) or (isinstance(devices, str) and devices not in ("1", "auto")) \
        or (not isinstance(devices, (int, str)) and len(devices) > 1)
    if multi:  # strategy=auto with several devices is DDP too
        raise ConfigError(
            f"a -m sweep cannot use strategy={strategy} with trainer.devices={devices}: Lightning starts the "
            "other processes by replaying the command line, so every process would run the whole sweep. "
            "Run the sweep points one by one (e.g. a shell loop or a SLURM array), or sweep with strategy=auto."
        )


def _trainer_overrides(overrides: list[str]) -> list[str]:
    """`trainer.X=V` for any Lightning Trainer argument X, even one the trainer group does not list.

    Hydra refuses new keys without a `+`; users should not need to know which Trainer arguments our
    YAML happens to spell out, so those become `++trainer.X=V` (add or override). Other keys are left
    alone, so a typo still fails (with the valid keys listed).
    """
    import inspect

    from lightning.pytorch import Trainer

    valid = set(inspect.signature(Trainer.__init__).parameters) - {"self"}
    out = []
    for ov in overrides:
        key, sep, value = ov.partition("=")
        if sep and key.startswith("trainer.") and key.count(".") == 1 and key.split(".", 1)[1] in valid:
            ov = f"++{key}={value}"
        out.append(ov)
    return out


def _override_value(overrides: Sequence[str], key: str) -> Optional[str]:
    value = None
    for ov in overrides:
        k, sep, v = ov.lstrip("+").partition("=")
        if sep and k == key:
            value = v.strip("'\"")
    return value


def _quote(path: Path | str) -> str:
    return "'" + str(path).replace("\\", "\\\\").replace("'", "\\'") + "'"


def resolve_resume(path: str) -> tuple[Path, Path]:
    """(checkpoint file, run folder) for `resume=`: a run folder (its checkpoints/last.ckpt) or a .ckpt."""
    p = Path(path).expanduser().resolve()
    if p.is_dir() and (p / "meta.pt").is_file():  # a sharded (strategy=fsdp) checkpoint folder
        return p, p.parent.parent if p.parent.name == "checkpoints" else p.parent
    if p.is_dir():
        ckpt = p / "checkpoints" / "last.ckpt"
        if not ckpt.exists():
            raise ConfigError(f"resume={path}: no checkpoint at {ckpt} (the run saved none yet, or this is not a run folder)")
        if ckpt.is_file():
            from mistral_ft.reliability import read_checkpoint

            read_checkpoint(ckpt, mmap=True)  # torn or foreign: fail before the run folder is touched
        return ckpt, p
    if p.is_file():
        run_dir = p.parent.parent if p.parent.name == "checkpoints" else p.parent
        from mistral_ft.reliability import read_checkpoint

        read_checkpoint(p, mmap=True)  # a torn or foreign file fails here, before the run folder is touched
        return p, run_dir
    raise ConfigError(f"resume={path}: no such run folder or checkpoint file")


def _resume_overrides(overrides: list[str]) -> list[str]:
    """Make `resume=RUN` continue in RUN with RUN's own overrides unless the user gives others.

    The checkpoint path replaces the folder (so every process, DDP children included, loads the same
    file); `hydra.run.dir` points at the old run folder unless set; without a `recipe=` the saved
    `overrides.yaml` of that run comes first, so `resume=RUN trainer.max_steps=200` just works.
    """
    resume = _override_value(overrides, "resume")
    if resume == "auto":  # the newest complete checkpoint of hydra.run.dir, or a fresh start
        from mistral_ft.reliability import newest_checkpoint

        run_dir_text = _override_value(overrides, "hydra.run.dir")
        if not run_dir_text:
            raise ConfigError("resume=auto needs hydra.run.dir=PATH: the run folder to continue (or start) in")
        found = newest_checkpoint(Path(run_dir_text).expanduser())
        overrides = [o for o in overrides if o.lstrip("+").partition("=")[0] != "resume"]
        if found is None:
            return overrides + ["resume=null"]
        log.info("resume=auto: continuing from %s", found)
        resume = str(found)
        overrides.append(f"resume={_quote(found)}")
    if not resume or resume in ("null", "None"):
        return overrides
    ckpt, run_dir = resolve_resume(resume)
    out = [o for o in overrides if o.lstrip("+").partition("=")[0] != "resume"]
    if _override_value(out, "recipe") is None:
        saved = run_dir / "overrides.yaml"
        if not saved.is_file():
            raise ConfigError(f"resume={resume}: {saved} is missing; give the recipe and overrides of that run again")
        import yaml

        previous = [str(o) for o in (yaml.safe_load(saved.read_text()) or [])]
        keys = {o.lstrip("+~").partition("=")[0] for o in out}
        out = [o for o in previous if o.lstrip("+~").partition("=")[0] not in keys] + out
    if _override_value(out, "hydra.run.dir") is None:
        out.append(f"hydra.run.dir={_quote(run_dir)}")
    out.append(f"resume={_quote(ckpt)}")
    return out


# ---- errors ---------------------------------------------------------------------------------------
def _user_message(err: BaseException) -> Optional[str]:
    """The one-paragraph message for errors caused by input; None for bugs (those keep a traceback)."""
    from mistral_ft.reliability import CheckpointReadError

    user_types: list[type] = [ConfigError, FileNotFoundError, CheckpointReadError]
    try:
        from mistral_ft.data import DataError

        user_types.append(DataError)
    except ImportError:  # pragma: no cover - partial installs
        pass
    try:
        from mistral_ft.model import CheckpointError
        from mistral_ft.model import ConfigError as ModelConfigError

        user_types += [CheckpointError, ModelConfigError]
    except ImportError:  # pragma: no cover
        pass
    from mistral_ft.tasks.base import CheckpointMismatchError

    user_types.append(CheckpointMismatchError)
    try:
        from lightning.fabric.utilities.exceptions import MisconfigurationException

        user_types.append(MisconfigurationException)
    except ImportError:  # pragma: no cover
        pass
    if isinstance(err, tuple(user_types)):
        kind = {"DataError": "data", "CheckpointError": "model checkpoint", "MisconfigurationException": "trainer"}.get(
            type(err).__name__, "")
        return (f"{kind}: " if kind else "") + str(err)
    return None


# ---- the run --------------------------------------------------------------------------------------
def run_training(cfg: Any, run_dir: Path, overrides: Sequence[str] = (), choices: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
    """Train as `cfg` says, writing into `run_dir`; returns the summary (rank 0; other ranks get {}).

    `cfg` is the composed config (DictConfig or plain dict, no `hydra` node); `overrides` and
    `choices` are only recorded (overrides.yaml) and used to point error messages at files.
    """
    t_wall = time.perf_counter()
    import lightning as L
    import torch

    c = _to_plain(cfg) if not isinstance(cfg, dict) else cfg
    validate_config(c, Sources(conf_dir=config_dir(), choices=choices or {}, overrides=overrides))
    run_dir = Path(run_dir).resolve()
    ckpt_dir = run_dir / "checkpoints"
    resume_ckpt = c.get("resume")
    rank = int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0")))
    if not resume_ckpt and rank == 0 and ckpt_dir.is_dir() and any(ckpt_dir.glob("*.ckpt")):
        raise ConfigError(f"run folder {run_dir} already holds checkpoints; pass resume={run_dir} to continue it, "
                          "or choose another hydra.run.dir")
    if resume_ckpt:
        resume_ckpt, _ = resolve_resume(str(resume_ckpt))

    L.seed_everything(int(c["seed"]), workers=True, verbose=False)
    accelerator = str(c["trainer"].get("accelerator", "auto"))
    use_cuda = torch.cuda.is_available() and accelerator in ("auto", "gpu", "cuda")
    precision = resolve_precision(c["trainer"].get("precision", "auto"), use_cuda)

    # tokenizer -> data -> model -> peft -> task module
    from mistral_ft.adapters import apply_peft, trainable_parameter_count
    from mistral_ft.data import MistralDataModule
    from mistral_ft.tokenizer import MistralTokenizer

    from mistral_ft.model.weights import resolve_model_path as local_model_folder

    # hub id -> local folder first (fetched once, or found in the hub cache): the tokenizer lives there too
    model_path = str(local_model_folder(resolve_model_path(c["model"])))
    tokenizer = MistralTokenizer.from_pretrained(c["model"].get("tokenizer") or model_path)
    from mistral_ft.validate import check_tokenizer_matches_model

    vocab_problem = check_tokenizer_matches_model(tokenizer, model_path)
    if vocab_problem:  # ids past the embedding would fail (CPU) or read garbage (CUDA) mid-training
        raise ConfigError(vocab_problem)
    data_cfg = dict(c["data"])
    batch_size = int(data_cfg.pop("batch_size"))
    eval_batch_size = data_cfg.pop("eval_batch_size", None)
    task = str(c["task"])
    datamodule = MistralDataModule(data_cfg, tokenizer, task=task, batch_size=batch_size, eval_batch_size=eval_batch_size)
    datamodule.setup("fit")
    info = datamodule.info
    assert info is not None

    device = torch.device("cuda", rank % max(1, torch.cuda.device_count())) if use_cuda else torch.device("cpu")
    # qlora: load on CPU and quantize layer by layer onto `device` (a bf16 7B never sits on the GPU whole)
    from mistral_ft.distributed import meta_model, rank_local_load_applies

    # strategy=fsdp: build on meta; each rank reads only its own shards once sharded (configure_model)
    rank_local = rank_local_load_applies(c)
    model = meta_model(c, model_path) if rank_local else \
        load_model(c, model_path, info, torch.device("cpu") if c["peft"]["method"] == "qlora" else device)
    if c["model"].get("compile"):
        for layer in model.model.layers:  # per layer: one small graph, reused by every layer
            layer.compile()
    if c["model"].get("gradient_checkpointing"):
        model.gradient_checkpointing_enable()
        if c["peft"]["method"] != "none":
            model.enable_input_require_grads()  # a frozen embedding would cut the checkpointed graph
    rng = torch.random.get_rng_state()  # what peft draws the LoRA init from (replayed by a rank-local load)
    from mistral_ft.config_schema import TASK_MODEL

    model = apply_peft(model, c["peft"], task=TASK_MODEL[task], device=device)
    if rank_local:
        model.rank_local_source = (model_path, rng)
    model.train()  # from_pretrained returns eval mode, and Lightning 2.6 keeps submodule modes as it finds them
    trainable, total = trainable_parameter_count(model)
    log.info("model %s: %s trainable of %s parameters (%.3f%%)", model_path, f"{trainable:,}", f"{total:,}",
             100.0 * trainable / max(1, total))
    from mistral_ft.distributed import log_memory_plan, requested_devices

    log_memory_plan(c, model, trainable, total, use_cuda,
                    requested_devices(c["trainer"].get("devices", 1), use_cuda) * int(c["trainer"].get("num_nodes", 1) or 1))

    from mistral_ft.tasks import TASKS

    hparams = strip_secrets(c)
    hparams["data_info"] = info.to_dict()
    module = TASKS[task](model, hparams)

    # the run folder's descriptive files, written only now that data and model loaded
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        _write_yaml(run_dir / "config.yaml", strip_secrets(c))
        from mistral_ft.merge import record_base

        record_base(run_dir, model_path, c["model"])  # base_model.json: export refuses a moved or changed base
        if not resume_ckpt or not (run_dir / "overrides.yaml").is_file():
            kept = [o for o in overrides if not o.lstrip("+").startswith(("resume=", "hydra."))]
            _write_yaml(run_dir / "overrides.yaml", [o for o in kept if strip_secrets({o.partition("=")[0]: 1})])

    trainer = build_trainer(c, run_dir, precision)
    try:
        return _fit_and_report(trainer, module, datamodule, c, run_dir, resume_ckpt, tokenizer, info,
                               choices=choices, trainable=trainable, total=total, t_wall=t_wall)
    except torch.OutOfMemoryError as err:  # torch.cuda.OutOfMemoryError is the same class
        from mistral_ft.reliability import TrainingStopped, oom_advice

        raise TrainingStopped(f"{oom_advice(c)}\n(at optimizer step {trainer.global_step}: "
                              f"{str(err).strip().splitlines()[0][:200]})") from err
    finally:
        if c["logger"]["name"] == "wandb":  # or the next run of a -m sweep would log into this W&B run
            import wandb

            wandb.finish()


def _fit_and_report(trainer: Any, module: Any, datamodule: Any, c: Mapping[str, Any], run_dir: Path,
                    resume_ckpt: Any, tokenizer: Any, info: Any, *, choices: Optional[Mapping[str, Any]],
                    trainable: int, total: int, t_wall: float) -> dict[str, Any]:
    ckpt_dir = run_dir / "checkpoints"
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(resume_ckpt) if resume_ckpt else None)

    # the final checkpoint first: a validate() run would drop the fit loop's data position from it
    last = ckpt_dir / "last.ckpt"
    final = ckpt_dir / f"step-{trainer.global_step:06d}.ckpt"
    # Decide from trainer state, not from the file system: every rank must take the same branch,
    # because save_checkpoint ends in a barrier (rank 0 may already have written the file).
    # ModelCheckpoint wrote step-N.ckpt itself when N is a multiple of every_n_train_steps.
    if trainer.global_step % int(c["checkpoint"]["every_n_train_steps"]) != 0 or not trainer.global_step:
        trainer.save_checkpoint(final)
    # a final validation unless the last one was at the final step
    if datamodule.val_dataset is not None and (not module.val_history or module.val_history[-1]["step"] != trainer.global_step):
        trainer.validate(module, datamodule=datamodule, verbose=False)
    tokens = module.total_tokens_seen()
    from mistral_ft.distributed import gather_trainable, is_sharded

    # strategy=fsdp: the trainable weights as full tensors (a collective: every rank takes part)
    gathered = gather_trainable(module.model) if is_sharded(module.model) else None
    if not trainer.is_global_zero:
        return {}
    if final.is_dir():  # a sharded (DCP) checkpoint is a folder
        shutil.rmtree(last, ignore_errors=True)
        shutil.copytree(final, last)
    else:
        from mistral_ft.reliability import atomic_copy

        atomic_copy(final, last)  # a kill here leaves the previous last.ckpt, never a torn one
    exported = export_weights(module.model, run_dir, c, tokenizer, state_dict=gathered) if c["checkpoint"]["save_adapter"] else None
    summary = write_summary(module, trainer, run_dir, c, info, recipe=(choices or {}).get("recipe"), tokens=tokens, wall_s=time.perf_counter() - t_wall,
                            trainable=trainable, total=total, exported=exported)
    _print_report(summary)
    return summary


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


def resolve_model_path(model_cfg: Mapping[str, Any]) -> str:
    """model.path, or the embedded tiny model's cached folder when it is null."""
    path = model_cfg.get("path")
    if path:
        p = Path(str(path)).expanduser()
        looks_like_hub_id = str(path).count("/") == 1 and not str(path).startswith((".", "/", "~"))
        if not p.exists() and not looks_like_hub_id:
            raise ConfigError(f"model.path: {path} does not exist (give a local HF folder or a hub id like "
                              "mistralai/Mistral-7B-v0.1)")
        return str(p) if p.exists() else str(path)
    from mistral_ft.model.tiny import tiny_model_path

    return str(tiny_model_path())


def resolve_attn_implementation(name: str, device: Any) -> str:
    """`auto`: on CUDA flash-attn 2 (varlen, window) when installed, else FlexAttention (block mask: padding,
    packed documents and the window skip whole blocks), else SDPA; on CPU SDPA (FlexAttention has no CPU
    backward). The GPU choices are unverified on hardware in this repository's CI (see docs/benchmarks.md)."""
    if name != "auto":
        return name
    import importlib.util

    import torch

    if torch.device(device).type != "cuda":
        return "sdpa"
    if importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    try:
        import torch.nn.attention.flex_attention  # noqa: F401
    except ImportError:
        return "sdpa"
    return "flex_attention"


def load_model(c: Mapping[str, Any], model_path: str, info: Any, device: Any) -> Any:
    """Our MistralForCausalLM / MistralForSequenceClassification, the head sized from the data's labels."""
    from mistral_ft.model import MistralForCausalLM, MistralForSequenceClassification

    kwargs: dict[str, Any] = dict(torch_dtype=c["model"]["dtype"], device=device,
                                  attn_implementation=resolve_attn_implementation(c["model"]["attn_implementation"],
                                                                                  device))
    from mistral_ft.config_schema import TASK_MODEL

    if TASK_MODEL[c["task"]] == "causal_lm":
        return MistralForCausalLM.from_pretrained(model_path, **kwargs)
    if c["task"] == "reward":  # one scalar score per sequence
        kwargs.update(num_labels=1, problem_type="regression")
    elif info.format == "regression":
        kwargs.update(num_labels=1, problem_type="regression")
    else:
        id2label = {int(k): str(v) for k, v in (info.id2label or {}).items()}
        kwargs.update(num_labels=len(id2label), id2label=id2label, label2id={v: k for k, v in id2label.items()},
                      problem_type="single_label_classification")
    return MistralForSequenceClassification.from_pretrained(model_path, **kwargs)


def build_trainer(c: Mapping[str, Any], run_dir: Path, precision: Any) -> Any:
    """A Lightning Trainer from `trainer.*` plus the strategy / logger groups and our callbacks."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    trainer_args = dict(c["trainer"])
    trainer_args["precision"] = precision
    checkpoint = ModelCheckpoint(
        dirpath=run_dir / "checkpoints", filename="step-{step:06d}", auto_insert_metric_name=False,
        every_n_train_steps=int(c["checkpoint"]["every_n_train_steps"]), save_top_k=-1, save_last=True,
    )
    from mistral_ft.reliability import AtomicCheckpointIO, hook_callbacks

    # atomic, fsynced checkpoint files read with weights_only=True (fsdp writes sharded folders its own way)
    plugins = [AtomicCheckpointIO()] if c["strategy"]["name"] != "fsdp" else []
    return L.Trainer(**trainer_args, strategy=build_strategy(c["strategy"]), logger=build_logger(c, run_dir),
                     callbacks=[checkpoint, *hook_callbacks()], plugins=plugins, default_root_dir=str(run_dir))


def build_strategy(s: Mapping[str, Any]) -> Any:
    from mistral_ft.distributed import build_strategy as build  # ddp, fsdp (FSDP2), auto

    return build(s)


def build_logger(c: Mapping[str, Any], run_dir: Path) -> Any:
    name = c["logger"]["name"]
    if name == "csv":
        from lightning.pytorch.loggers import CSVLogger

        return CSVLogger(save_dir=str(run_dir), name="logs")
    if name == "tensorboard":
        from lightning.pytorch.loggers import TensorBoardLogger

        return TensorBoardLogger(save_dir=str(run_dir), name="logs")
    from lightning.pytorch.loggers import WandbLogger

    lc = c["logger"]
    offline = bool(lc.get("offline")) or os.environ.get("WANDB_MODE", "") == "offline"
    return WandbLogger(project=lc.get("project"), entity=lc.get("entity"), save_dir=str(run_dir), offline=offline,
                       tags=list(lc.get("tags") or []), name=run_dir.name)


# ---- outputs --------------------------------------------------------------------------------------
def _write_yaml(path: Path, data: Any) -> None:
    import yaml

    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")


def export_weights(model: Any, run_dir: Path, c: Mapping[str, Any], tokenizer: Any,
                   state_dict: Optional[Mapping[str, Any]] = None) -> Optional[str]:
    """adapter/ (peft: adapter_config.json + adapter_model.safetensors, `score` included for
    classification) or model/ (full fine-tuning: HF folder), each with the tokenizer.
    `state_dict`: the gathered weights of a sharded (FSDP2) model, whose own tensors are shards."""
    folder = run_dir / ("model" if c["peft"]["method"] == "none" else "adapter")
    extra = {"state_dict": dict(state_dict)} if state_dict is not None else {}
    if c["peft"]["method"] == "none":
        model.save_pretrained(str(folder), **extra)
    else:
        # LoRA on lm_head would otherwise make peft copy the whole (frozen) output layer into the adapter
        model.save_pretrained(str(folder), save_embedding_layers=False, **extra)
    tokenizer.save_pretrained(str(folder))
    return str(folder)


def _mean(values: Sequence[float]) -> Optional[float]:
    return float(sum(values) / len(values)) if values else None


def peak_memory_mb() -> tuple[float, str]:
    """Peak CUDA memory allocated by tensors, or the process's peak resident memory on CPU."""
    import torch

    if torch.cuda.is_available() and torch.cuda.max_memory_allocated() > 0:
        return torch.cuda.max_memory_allocated() / 2**20, "cuda_max_allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return (rss / 2**20 if sys.platform == "darwin" else rss / 2**10), "cpu_peak_rss"


def write_summary(module: Any, trainer: Any, run_dir: Path, c: Mapping[str, Any], info: Any, *, recipe: Optional[str], tokens: int,
                  wall_s: float, trainable: int, total: int, exported: Optional[str]) -> dict[str, Any]:
    """summary.json + loss_curve.png; train_loss_first/last are means of the first/last 5 logged steps."""
    losses = [v for _, v in module.loss_history]
    val = module.val_history[-1] if module.val_history else {}
    mem, mem_kind = peak_memory_mb()
    ckpts = sorted(str(p) for p in (run_dir / "checkpoints").glob("*.ckpt"))
    logger = trainer.logger
    log_dir = getattr(logger, "log_dir", None) or getattr(logger, "save_dir", None)
    train_time = module.train_time_s
    summary: dict[str, Any] = {
        "recipe": recipe,
        "task": c["task"],
        "model": c["model"].get("path") or "tiny",
        "peft": c["peft"]["method"],
        "global_step": int(trainer.global_step),
        "train_loss_first": _mean(losses[:5]),
        "train_loss_last": _mean(losses[-5:]),
        "val_loss": val.get("val_loss"),
        **{k: v for k, v in val.items() if k not in ("step", "val_loss")},
        "tokens_seen": int(tokens),
        "tokens_per_s": float(tokens / train_time) if train_time > 0 else None,
        "train_time_s": float(train_time),
        "wall_s": float(wall_s),
        "peak_memory_mb": float(mem),
        "peak_memory_kind": mem_kind,
        "trainable_params": int(trainable),
        "total_params": int(total),
        "precision": str(trainer.precision),
        "world_size": int(trainer.world_size),
        "id2label": {str(k): v for k, v in (getattr(module, "id2label", None) or {}).items()} or None,
        "data": info.to_dict(),
        "paths": {
            "run_dir": str(run_dir),
            "config": str(run_dir / "config.yaml"),
            "last_checkpoint": str(run_dir / "checkpoints" / "last.ckpt"),
            "checkpoints": ckpts,
            "logs": str(log_dir) if log_dir else None,
            "metrics_csv": str(Path(log_dir) / "metrics.csv") if log_dir and c["logger"]["name"] == "csv" else None,
            "log_file": str(run_dir / "train.log"),
            "loss_curve": str(run_dir / "loss_curve.png"),
            "exported": exported,
        },
        "nonfinite_skipped": len(module.nonfinite_skips),  # steps dropped with skip_nonfinite=true
        "nonfinite_skips": module.nonfinite_skips,
        "loss_history": [[s, v] for s, v in module.loss_history],
        "val_history": module.val_history,
    }
    summary = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in summary.items()}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    plot_losses(module.loss_history, module.val_history, run_dir / "loss_curve.png")
    return summary


def plot_losses(train: Sequence[tuple[int, float]], val: Sequence[Mapping[str, float]], path: Path) -> None:
    """Loss per optimizer step (and validation points) as a PNG; Agg needs no display."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot([s for s, _ in train], [v for _, v in train], label="train loss (token-weighted)", lw=1)
    pts = [(v["step"], v["val_loss"]) for v in val if "val_loss" in v]
    if pts:
        ax.plot([s for s, _ in pts], [v for _, v in pts], "o-", label="val loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _print_report(s: Mapping[str, Any]) -> None:
    p = s["paths"]
    fmt = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
    metrics = ", ".join(f"{k}={fmt(s[k])}" for k in ("val_accuracy", "val_f1", "val_mse", "val_r2", "val_ppl",
                                                       "val_reward_accuracy", "val_reward_margin", "val_margin")
                        if s.get(k) is not None)
    lines = [
        f"Done: {s['global_step']} steps in {s['wall_s']:.1f}s; train loss {fmt(s['train_loss_first'])} -> "
        f"{fmt(s['train_loss_last'])}, val_loss {fmt(s['val_loss'])}" + (f", {metrics}" if metrics else ""),
        f"Run folder: {p['run_dir']}",
        f"  summary:     {p['run_dir']}/summary.json",
        f"  config:      {p['config']}",
        f"  checkpoint:  {p['last_checkpoint']}",
        f"  metrics:     {p['metrics_csv'] or p['logs']}",
        f"  loss curve:  {p['loss_curve']}",
    ]
    if p["exported"]:
        lines.append(f"  weights:     {p['exported']}")
    lines.append(f"Continue with: python -m mistral_ft.train resume={p['run_dir']} trainer.max_steps=N")
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    sys.exit(main())
