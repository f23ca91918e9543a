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

evaluate and export are Hydra apps too, over a primary config of their own with no groups
(mistral_ft/commands_conf/<command>.yaml): `command_settings` gives them the same flags.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from collections.abc import Sequence
from typing import Any, Optional

from mistral_ft.errors import ConfigError
from mistral_ft.training.compose import (
    CONFIG_NAME, RecipeFiles, _explain_composition_error, compose_validated, make_hydra,
    own_group_values, resume_overrides, to_plain,
)

# The flags that print something and exit; Hydra runs the job only without any of them.
PRINT_FLAGS = ("help", "hydra_help", "cfg", "info", "shell_completion")
# --help composes the config to show it; without a recipe= it shows this one.
HELP_RECIPE = "instruct_lora"
# The primary configs of evaluate and export, relative to mistral_ft/ (as `@hydra.main(config_path=...)`).
COMMANDS_CONFIG_PATH = "commands_conf"


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


def print_flags(ns: argparse.Namespace, calling_file: str, task_name: str) -> Optional[int]:
    """The exit status of a print-and-exit flag (--help, --cfg, --info, ...), or None when none is given.

    `--cfg` validates first, so a typo is the same one paragraph as for a run."""
    if not _printing(ns):
        return None
    recipes = RecipeFiles()
    try:
        overrides = recipes.rewrite(resume_overrides(list(ns.overrides)))
        hydra = make_hydra(ns, calling_file, task_name, recipes)
        config_name = ns.config_name or CONFIG_NAME
        if ns.cfg is not None:
            pinned = own_group_values(hydra, overrides, config_name)
            compose_validated(hydra, overrides + pinned, config_name, typed=overrides)
            overrides += pinned
        return show(hydra, ns, config_name, overrides)
    finally:
        recipes.close()


def _printing(ns: argparse.Namespace) -> bool:
    if ns.resolve and ns.cfg is None and not ns.help:
        raise ConfigError("--resolve can only be used with --cfg or --help (as in Hydra)")
    return any(getattr(ns, flag) not in (None, False) for flag in PRINT_FLAGS)


def command_settings(argv: Sequence[str], calling_file: str, command: str) -> tuple[Optional[int], dict[str, Any]]:
    """Hydra's flags for a command that runs once over settings of its own (evaluate, export).

    Its primary config is `commands_conf/<command>.yaml`: every setting declared with its default
    (`???`: required, null: unset), so `--cfg job` prints what the command will use and a typo is Hydra's
    "Could not override" with the valid keys. Returns (the exit status of a print-and-exit flag, {}) or
    (None, the composed settings as flat `a.b` keys, the unset ones left out). `-m` is refused: one run.
    """
    from hydra.errors import HydraException
    from hydra.types import RunMode

    ns = parse_args(argv)
    if ns.multirun:
        raise ConfigError(f"{command} runs once: -m/--multirun sweeps are train's (run {command} once per value)")
    ns.config_path = ns.config_path or COMMANDS_CONFIG_PATH
    config_name = ns.config_name or command
    hydra = make_hydra(ns, calling_file, command, RecipeFiles())
    overrides = list(ns.overrides)
    printing = _printing(ns)
    if printing and ns.cfg is None:
        return show(hydra, ns, config_name, overrides, help_recipe=None), {}
    try:  # --cfg composes first too, so a typo is the same one paragraph as for a run
        cfg = hydra.compose_config(config_name, overrides, run_mode=RunMode.RUN, with_log_configuration=False)
    except HydraException as err:
        raise ConfigError(f"{command}: {_explain_composition_error(hydra, overrides, err, config_name)}") from None
    if printing:
        return show(hydra, ns, config_name, overrides, help_recipe=None), {}
    flat: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            elif value is not None:
                flat[f"{prefix}{key}"] = value

    walk(to_plain(cfg), "")
    return None, flat


def show(hydra: Any, args: argparse.Namespace, config_name: str, overrides: list[str],
         help_recipe: Optional[str] = HELP_RECIPE) -> int:
    """The print-and-exit flags, through the very `Hydra` methods `@hydra.main` calls for them.

    `help_recipe`: the recipe --help composes when none is given (None: the config needs none)."""
    from hydra._internal.utils import get_args_parser

    import logging

    has_recipe = any(o.lstrip("+").startswith("recipe=") for o in overrides)
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level  # Hydra adds a handler per call: one process, one command
    try:
        if args.help or args.hydra_help:
            # --help shows the composed config, which needs a recipe; --hydra-help composes Hydra's node alone
            args.overrides = overrides if has_recipe or args.hydra_help or help_recipe is None else \
                [*overrides, f"recipe={help_recipe}"]
            method = hydra.app_help if args.help else hydra.hydra_help
            method(config_name=config_name, args_parser=get_args_parser(), args=args)
            return 0
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
