"""Hydra's own command line for the commands that compose a training config (train, validate).

`@hydra.main` would give us Hydra's flags, but it reports every exception with a traceback and exit
status 1, and makes the run folder before our task could check anything. So the CLIs do what
`@hydra.main` does, in the same order and with the same objects (Hydra's argument parser, search path
and `Hydra` methods), and add two steps of their own: every run is composed and validated before
Hydra makes a folder, and errors become one paragraph with exit status 2 (mistral_ft.cli).

What that keeps from Hydra, as its documentation describes it: `--help`, `--hydra-help`,
`--cfg job|hydra|all` with `--package` and `--resolve`, `--info [all|config|defaults|...]`,
`--shell-completion`, `-cp/-cn/-cd`, `-m/--multirun` (or `hydra.mode=MULTIRUN`) with whichever
sweeper and launcher plugin the config selects, and the override grammar (`key=v`, `+key=v`,
`++key=v`, `~key`). Ours on top: `recipe=PATH.yaml` (a recipe file of the user's own, anywhere).
"""

from __future__ import annotations

import argparse
import itertools
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

from mistral_ft.errors import ConfigError

# The flags that print something and exit; Hydra runs the job only without any of them.
PRINT_FLAGS = ("help", "hydra_help", "cfg", "info", "shell_completion")
# --help and --hydra-help compose a config to show it; without a recipe= they show this one.
HELP_RECIPE = "instruct_lora"


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Hydra's own argument parser (the one `@hydra.main` uses); its errors are ours (exit 2, one paragraph)."""
    from hydra._internal.utils import get_args_parser

    parser = get_args_parser()
    flags = ("--help, --hydra-help, --cfg job|hydra|all, --package, --resolve, --info, --shell-completion, "
             "-cp, -cn, -cd, -m")

    def error(message: str) -> None:
        raise ConfigError(f"{message} (Hydra's flags: {flags})")

    parser.error = error  # type: ignore[method-assign]
    # intermixed: flags may come before, between or after the overrides
    ns, extra = parser.parse_known_intermixed_args(list(argv))
    if extra:
        raise ConfigError(f"unknown flag {extra[0]!r} (Hydra's flags: {flags}; a setting is key=value)")
    return ns


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


def make_hydra(args: argparse.Namespace, calling_file: str, task_name: str, recipes: RecipeFiles) -> Any:
    """The `Hydra` object `@hydra.main(config_path="conf")` in `calling_file` would make, honouring
    -cp (config_path), -cd (an extra config folder, searched first) and our recipe files."""
    from hydra._internal.hydra import Hydra
    from hydra._internal.utils import create_automatic_config_search_path
    from hydra.core.config_search_path import SearchPathQuery
    from hydra.core.global_hydra import GlobalHydra

    search_path = create_automatic_config_search_path(calling_file, None, args.config_path or "conf")
    if args.config_dir is not None:
        conf_dir = os.path.abspath(args.config_dir)
        if not os.path.isdir(conf_dir):
            raise ConfigError(f"-cd/--config-dir {args.config_dir}: no such folder ({conf_dir})")
        search_path.prepend(provider="command-line", path=f"file://{conf_dir}", anchor=SearchPathQuery(provider="schema"))
    if recipes.folder is not None:
        search_path.prepend(provider="mistral_ft-recipe-file", path=f"file://{recipes.folder}",
                            anchor=SearchPathQuery(provider="main"))
    GlobalHydra.instance().clear()
    return Hydra.create_main_hydra2(task_name=task_name, config_search_path=search_path)


def show(hydra: Any, args: argparse.Namespace, config_name: str, overrides: list[str]) -> int:
    """The print-and-exit flags, through the very `Hydra` methods `@hydra.main` calls for them."""
    from hydra._internal.utils import get_args_parser

    import logging

    has_recipe = any(o.lstrip("+").startswith("recipe=") for o in overrides)
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level  # Hydra adds a handler per call: one process, one command
    try:
        if args.help or args.hydra_help:
            args.overrides = overrides if has_recipe else [*overrides, f"recipe={HELP_RECIPE}"]
            method = hydra.app_help if args.help else hydra.hydra_help
            method(config_name=config_name, args_parser=get_args_parser(), args=args)
            return 0
        if args.resolve and args.cfg is None:
            raise ConfigError("--resolve can only be used with --cfg or --help (as in Hydra)")
        if sum([args.cfg is not None, bool(args.shell_completion), args.info is not None, bool(args.multirun)]) > 1:
            raise ConfigError("only one of --multirun, --cfg, --info and --shell-completion can be given (as in Hydra)")
        if args.cfg is not None:
            hydra.show_cfg(config_name=config_name, overrides=overrides, cfg_type=args.cfg, package=args.package,
                           resolve=args.resolve)
        elif args.shell_completion:
            hydra.shell_completion(config_name=config_name, overrides=overrides)
        else:
            hydra.show_info(args.info, config_name=config_name, overrides=overrides)
    except SystemExit as done:  # Hydra exits itself for e.g. `--package` naming no node
        return int(done.code or 0)
    finally:
        sys.stdout.flush()
        root.handlers[:], root.level = handlers, level
    return 0


def sweep_points(overrides: list[str], hydra: Any = None) -> list[list[str]]:
    """Every run of a `-m` sweep that can be listed up front, as plain override lists.

    Choice (`a,b`, `choice(a,b)`) and `range(...)` sweeps are expanded into their cartesian product,
    as Hydra's basic sweeper runs them, and `glob(...)` over a group's options with `hydra`'s config
    loader; sweeps only a sweeper plugin can draw from (`interval(...)`) are left out here: each of
    those runs is validated in its own job instead.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except OverrideParseException as err:
        raise ConfigError(f"cannot parse the command line: {err}") from None
    axes: list[list[str]] = []
    for ov in parsed:
        if not ov.is_sweep_override():
            axes.append([ov.input_line])
            continue
        ov.config_loader = getattr(hydra, "config_loader", None)
        try:
            values = list(ov.sweep_string_iterator())
        except Exception:  # noqa: BLE001 - a sweep only its sweeper can draw from (interval)
            continue
        key = ov.get_key_element()
        axes.append([f"{key}={v}" for v in values])
    return [list(point) for point in itertools.product(*axes)]
