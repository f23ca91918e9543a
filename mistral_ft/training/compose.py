"""From a command line to one validated run config: Hydra composition, overrides, `resume=`.

Everything here runs before a run folder exists, so a typo, a missing model folder or a bad data
setting fails without leaving anything behind. `compose_config` is the same path as a plain dict, for
tests and tools (`validate`).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

from mistral_ft.data import DataConfig
from mistral_ft.distributed.checks import check_distributed
from mistral_ft.errors import ConfigError
from mistral_ft.model.hub import local_model_folder
from mistral_ft.runs import newest_checkpoint, resolve_model_path, resolve_resume
from mistral_ft.training.registry import resolve_precision
from mistral_ft.training.schema import DATA_LOADER_KEYS, MANAGED_TRAINER_KEYS, Sources, mask_secret, validate_config

log = logging.getLogger("mistral_ft.train")

CONFIG_NAME = "config"


def register_trainer_arguments() -> None:
    """The config `trainer/lightning`: every Lightning Trainer argument at Lightning's own default.

    conf/trainer/default.yaml starts from it (`defaults: [lightning, _self_]`), so `trainer.X=V` is a
    plain Hydra override of a declared key for any argument of the installed Lightning, and `--cfg job`
    lists them all, as LightningCLI's `--print_config` does. Read from Trainer's signature rather than
    written out, so it matches whichever Lightning is installed. Registered when this module is imported
    (Hydra's ConfigStore is filled at import time); the arguments we build ourselves are left out.
    """
    import inspect

    from hydra.core.config_store import ConfigStore
    from lightning.pytorch import Trainer

    node = {name: p.default for name, p in inspect.signature(Trainer.__init__).parameters.items()
            if name != "self" and name not in MANAGED_TRAINER_KEYS
            and (p.default is None or isinstance(p.default, (bool, int, float, str)))}
    ConfigStore.instance().store(group="trainer", name="lightning", node=node,
                                 provider="mistral_ft (lightning.pytorch.Trainer's arguments)")


register_trainer_arguments()


def config_dir() -> Path:
    """The composed config tree: `mistral_ft/conf/` (groups) with `conf/recipe/` (the recipes).

    In the repository `mistral_ft/conf` links to the top-level `conf/` and `conf/recipe` to
    `recipes/` (Hydra only finds a group named `recipe` in a folder of that name); the wheel
    carries both as real folders inside the package, so an installed copy needs no repository.
    """
    here = Path(__file__).resolve().parent.parent / "conf"
    if not (here / f"{CONFIG_NAME}.yaml").is_file() or not (here / "recipe").is_dir():
        raise RuntimeError(f"mistral_ft's config tree is missing at {here} (broken install?)")
    return here


def available(group: str) -> list[str]:
    """Options of a config group (file stems), for messages and --help."""
    folder = config_dir() / group
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def compose_config(overrides: Sequence[str], hydra_args: Any = None) -> dict[str, Any]:
    """The validated config that `main(overrides)` would train with, as a plain dict (no run).

    For tests and tools (validate): every recipe / group option can be checked without starting anything.
    `hydra_args`: Hydra's parsed flags (-cp, -cn, -cd), as a CLI got them.
    """
    recipes = RecipeFiles()
    try:
        typed = resume_overrides(list(overrides))
        internal = recipes.rewrite(typed)
        hydra = make_hydra(hydra_args, str(config_dir().parent / "train.py"), "train", recipes)
        name = getattr(hydra_args, "config_name", None) or CONFIG_NAME
        cfg = compose_validated(hydra, internal + own_group_values(hydra, internal, name), name, typed)
        plain = fill_removed_groups(to_plain(cfg), cfg.hydra.runtime.choices)
        plain["_choices"] = dict(cfg.hydra.runtime.choices)
        return plain
    finally:
        recipes.close()


class RecipeFiles:
    """`recipe=/path/my_sft.yaml` (or a relative path): a recipe file outside our tree.

    Hydra finds a group option only as `<search path>/recipe/<name>.yaml`, so the file is linked into a
    temporary search-path folder as `recipe/<stem>.yaml`, ahead of ours (a file named like one of our
    recipes is the one the user meant). `typed` maps the internal `recipe=<stem>` back to what the user
    wrote, with the path made absolute, so overrides.yaml (what `resume=` replays) works from any folder.
    """

    def __init__(self) -> None:
        self.folder: Optional[Path] = None
        self.typed: dict[str, str] = {}

    def rewrite(self, overrides: list[str]) -> list[str]:
        out = []
        for ov in overrides:
            key, sep, value = ov.partition("=")
            if key.lstrip("+") == "recipe" and sep and _is_path(value):
                ov = self._link(key, value)
            out.append(ov)
        return out

    def _link(self, key: str, value: str) -> str:
        path = Path(value.strip("'\"")).expanduser().resolve()
        if not path.is_file():
            raise ConfigError(f"recipe={value}: no such file ({path}); a recipe is a name from recipes/ or a .yaml file")
        if self.folder is None:
            self.folder = Path(tempfile.mkdtemp(prefix="mistral_ft_recipe_"))
            (self.folder / "recipe").mkdir()
        link = self.folder / "recipe" / f"{path.stem}.yaml"
        if link.exists() and link.resolve() != path:
            raise ConfigError(f"recipe={value}: two recipe files named {path.name} on one command line")
        if not link.exists():
            link.symlink_to(path)
        internal = f"{key}={path.stem}"
        self.typed[internal] = f"{key}={path}"
        return internal

    def close(self) -> None:
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)


def _is_path(value: str) -> bool:
    value = value.strip("'\"")
    return value.endswith((".yaml", ".yml")) or os.sep in value or value.startswith(("~", "."))


def make_hydra(args: Any, calling_file: str, task_name: str, recipes: RecipeFiles) -> Any:
    """The `Hydra` object `@hydra.main(config_path="conf")` in `calling_file` would make, honouring
    -cp (config_path), -cd (an extra config folder, searched first) and our recipe files."""
    from hydra._internal.hydra import Hydra
    from hydra._internal.utils import create_automatic_config_search_path
    from hydra.core.config_search_path import SearchPathQuery
    from hydra.core.global_hydra import GlobalHydra

    search_path = create_automatic_config_search_path(calling_file, None, getattr(args, "config_path", None) or "conf")
    if getattr(args, "config_dir", None) is not None:
        conf_dir = os.path.abspath(args.config_dir)
        if not os.path.isdir(conf_dir):
            raise ConfigError(f"-cd/--config-dir {args.config_dir}: no such folder ({conf_dir})")
        search_path.prepend(provider="command-line", path=f"file://{conf_dir}", anchor=SearchPathQuery(provider="schema"))
    if recipes.folder is not None:
        search_path.prepend(provider="mistral_ft-recipe-file", path=f"file://{recipes.folder}",
                            anchor=SearchPathQuery(provider="main"))
    GlobalHydra.instance().clear()
    return Hydra.create_main_hydra2(task_name=task_name, config_search_path=search_path)


def compose_validated(hydra: Any, overrides: list[str], config_name: str = CONFIG_NAME,
                      typed: Optional[Sequence[str]] = None) -> Any:
    """Compose one config (RUN mode) and validate it; Hydra's errors become ConfigError.

    `typed`: the overrides as the user wrote them (without pinned values), for messages."""
    from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
    from hydra.types import RunMode

    try:
        cfg = hydra.compose_config(config_name, overrides, run_mode=RunMode.RUN, with_log_configuration=False)
    except MissingConfigException as err:
        text = _hydra_text(err).split("\nConfig search path", 1)[0]
        raise ConfigError(text.replace("\n\t", " ").replace("\n", "; ")) from None
    except OverrideParseException as err:
        raise ConfigError(f"cannot parse the command line: {_hydra_text(err)}") from None
    except ConfigCompositionException as err:
        # trainer.logger / trainer.callbacks / ...: not declared (we build them), so Hydra calls them unknown;
        # composed anyway, the schema refuses them naming the group to use instead
        managed = {f"trainer.{k}" for k in MANAGED_TRAINER_KEYS}
        if any(o.partition("=")[0] in managed for o in overrides):
            forced = [f"++{o}" if o.partition("=")[0] in managed else o for o in overrides]
            return compose_validated(hydra, forced, config_name, overrides if typed is None else typed)
        raise ConfigError(_explain_composition_error(hydra, overrides, err)) from None
    choices = dict(cfg.hydra.runtime.choices)
    plain = fill_removed_groups(to_plain(cfg), choices)
    validate_config(plain, Sources(conf_dir=config_dir(), choices=choices,
                                      overrides=overrides if typed is None else typed))
    if plain["model"].get("path"):
        resolve_model_path(plain["model"])  # a missing folder fails here, before any run folder exists
    # the data pipeline's own range checks (DataError), also before any run folder exists
    DataConfig.from_mapping({k: v for k, v in plain["data"].items() if k not in DATA_LOADER_KEYS})
    import torch

    accelerator = str(plain["trainer"].get("accelerator", "auto"))
    resolve_precision(plain["trainer"].get("precision", "auto"),
                      torch.cuda.is_available() and accelerator in ("auto", "gpu", "cuda"))
    check_distributed(plain, torch.cuda.is_available() and accelerator in ("auto", "gpu", "cuda"))
    return cfg


def fetch_hub_model(cfg: Any) -> None:
    """A hub id in model.path is fetched (or found in the hub cache) now, before Hydra makes the run
    folder: offline or a wrong id then fails without leaving a folder behind. compose_config skips this
    (it must work without the hub)."""
    path = cfg.model.get("path")
    if path and not Path(str(path)).expanduser().exists():
        local_model_folder(str(path))


def _hydra_text(err: BaseException) -> str:
    text = str(err).strip()
    cause = err.__cause__
    if cause is not None and str(cause).strip() and str(cause).strip() not in text:
        text += f" ({str(cause).strip().splitlines()[0]})"
    return text.replace("\n\n", "\n")


def _explain_composition_error(hydra: Any, overrides: list[str], err: BaseException,
                               config_name: str = CONFIG_NAME) -> str:
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
                base = hydra.compose_config(config_name, rest, run_mode=RunMode.RUN, with_log_configuration=False)
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


def to_plain(cfg: Any) -> dict[str, Any]:
    """The user part of a composed config as plain Python values (interpolations resolved)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import MissingMandatoryValue

    try:
        return OmegaConf.to_container(without_hydra(cfg), resolve=True, throw_on_missing=True)  # type: ignore[return-value]
    except MissingMandatoryValue as err:
        key = getattr(err, "full_key", "") or "?"
        raise ConfigError(f"{key}: a value is required (pass {key}=...)") from None


def without_hydra(cfg: Any) -> Any:
    from omegaconf import OmegaConf, open_dict

    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    with open_dict(cfg):
        cfg.pop("hydra", None)
    return cfg


def refuse_multiprocess_sweep(cfg: Any) -> None:
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


def fill_removed_groups(plain: dict[str, Any], choices: Any) -> dict[str, Any]:
    """`~scheduler` (Hydra's delete): no schedule, the learning rate stays optimizer.lr.

    Exactly what scheduler=constant with warmup_steps=0 does; the values a recipe sets for the removed
    group (warmup_steps, ...) go with it, and the log says so.
    """
    if choices.get("scheduler") is None and "name" not in (plain.get("scheduler") or {}):
        dropped = sorted(k for k in (plain.get("scheduler") or {}) if k != "name")
        plain["scheduler"] = {"name": "constant", "warmup_steps": 0, "min_lr_ratio": 1.0, "_target_": None}
        log.info("~scheduler: no learning-rate schedule (a constant optimizer.lr)%s",
                 f"; the recipe's scheduler.{{{','.join(dropped)}}} is not used" if dropped else "")
    return plain


def own_group_values(hydra: Any, overrides: Sequence[str], config_name: str = CONFIG_NAME) -> list[str]:
    """The values of a group option of the user's own (found through hydra.searchpath or -cd, not in our
    conf/) as overrides, so they win over what our recipe and specialize/ layers set for the same keys.

    Hydra applies the primary config's later entries (recipe, then specialize/<recipe>_<model>) over any
    group option: `data=my_data` with `max_length: 64` would silently train at the recipe's 2048 (or the
    tiny model's 128). Each value that changes because of this is logged; a key the user also sets on the
    command line is left to the command line.
    """
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    typed = {o.lstrip("+~").partition("=")[0] for o in overrides}
    user_choices = [(k, v) for k, sep, v in (o.partition("=") for o in overrides)
                    if sep and "." not in k and "/" not in k and not k.startswith(("~", "+"))
                    and k not in ("recipe", "specialize") and "," not in v
                    and not (config_dir() / k / f"{v}.yaml").is_file()]  # ours keep Hydra's order
    if not user_choices:
        return []
    try:
        final = hydra.compose_config(config_name, list(overrides), run_mode=RunMode.RUN, with_log_configuration=False)
    except Exception:  # noqa: BLE001 - compose_validated reports the composition error itself
        return []
    choices = dict(final.hydra.runtime.choices)
    special = choices.get("specialize")
    special_cfg = hydra.compose_config(f"specialize/{special}", [], run_mode=RunMode.RUN,
                                       with_log_configuration=False) \
        if special and (config_dir() / "specialize" / f"{special}.yaml").is_file() else None
    pinned: list[str] = []
    for group, option in user_choices:
        if choices.get(group) != option:
            continue  # not a group
        own_file = _find_option_file(hydra, list(final.hydra.searchpath), group, option)
        if own_file is None:
            continue
        node = OmegaConf.to_container(OmegaConf.load(own_file), resolve=False)
        if not isinstance(node, dict):
            continue
        node.pop("defaults", None)
        for key, value in _leaves(node, group):
            if key in typed or (isinstance(value, str) and ("${" in value or value == "???")):
                continue
            now = OmegaConf.select(final, key, throw_on_missing=False)
            if now != value:
                layer = f"specialize/{special}.yaml" if special_cfg is not None and \
                    OmegaConf.select(special_cfg, key, default=None) is not None else f"recipe={choices.get('recipe')}"
                log.warning("%s: keeping %r from your %s=%s over %r from %s (a value on the command line wins "
                            "over both)", key, value, group, option, now, layer)
            pinned.append(f"{key}={_override_text(value)}")
    return pinned


def _find_option_file(hydra: Any, searchpath: list[str], group: str, option: str) -> Optional[Path]:
    """`<folder>/<group>/<option>.yaml` in a file:// folder of the search path (-cd, hydra.searchpath)."""
    entries = [e.path for e in hydra.config_loader.get_search_path().get_path()] + [str(p) for p in searchpath]
    for entry in entries:
        if "://" in entry and not entry.startswith("file://"):
            continue  # pkg:// and structured:// hold our own or Hydra's configs
        path = Path(entry.removeprefix("file://")) / group / f"{option}.yaml"
        if path.is_file():
            return path
    return None


def _leaves(node: Any, prefix: str) -> list[tuple[str, Any]]:
    if isinstance(node, dict):
        return [leaf for k, v in node.items() for leaf in _leaves(v, f"{prefix}.{k}")]
    return [(prefix, node)]


def _override_text(value: Any) -> str:
    """A value as Hydra's override grammar reads it back (strings quoted, lists as JSON-like lists)."""
    import json

    if isinstance(value, str):
        return _quote(value)
    return json.dumps(value)


def _override_value(overrides: Sequence[str], key: str) -> Optional[str]:
    value = None
    for ov in overrides:
        k, sep, v = ov.lstrip("+").partition("=")
        if sep and k == key:
            value = v.strip("'\"")
    return value


def _quote(path: Path | str) -> str:
    return "'" + str(path).replace("\\", "\\\\").replace("'", "\\'") + "'"


def resume_overrides(overrides: list[str]) -> list[str]:
    """Make `resume=RUN` continue in RUN with RUN's own overrides unless the user gives others.

    The checkpoint path replaces the folder (so every process, DDP children included, loads the same
    file); `hydra.run.dir` points at the old run folder unless set; without a `recipe=` the saved
    `overrides.yaml` of that run comes first, so `resume=RUN trainer.max_steps=200` just works.
    """
    resume = _override_value(overrides, "resume")
    if resume == "auto":  # the newest complete checkpoint of hydra.run.dir, or a fresh start
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
