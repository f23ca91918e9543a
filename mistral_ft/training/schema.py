"""The schema of the training config, and the checks that turn a typo into a clear message.

Hydra composes YAML freely; without a schema `optimizer.lrr: 1e-3` in a recipe would be ignored and
`trainer.max_steps=1e3` would crash deep inside Lightning. Each group's keys are a dataclass here
(the data group's are `mistral_ft.data.DataConfig` plus the loader sizes), Trainer keys are checked
against `lightning.Trainer`'s signature, and every error names the key, where it was set (file:line
or the command line), what was expected and the valid keys.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import math
import re
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional, Union


from mistral_ft.errors import ConfigError
from mistral_ft.masking import MASK, is_secret_key
from mistral_ft.training.registry import HEADS, LOGGERS, OPTIMIZERS, SCHEDULERS, STRATEGIES, TARGET_GROUPS, check_target


@dataclasses.dataclass
class ModelSchema:
    name: str
    path: Optional[str] = None
    tokenizer: Optional[str] = None
    allow_vocab_mismatch: bool = False  # accept a tokenizer >= 1024 tokens smaller than the model's vocab_size
    dtype: str = "float32"
    attn_implementation: str = "auto"
    gradient_checkpointing: bool = False
    loss_chunk_size: int = 2048     # causal LM: tokens per chunk of the fused linear + cross-entropy (0 = plain)
    compile: bool = False           # torch.compile each decoder layer
    # The config.json numbers of the model the entry names (conf/model/*.yaml): checked against the loaded
    # config.json (a wrong model.path is an error, not a surprise), and what a memory plan needs before a download.
    architecture: Optional[dict] = None


@dataclasses.dataclass
class PeftSchema:
    method: str
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    target_modules: list[str] = dataclasses.field(default_factory=list)
    modules_to_save: list[str] = dataclasses.field(default_factory=list)
    use_dora: bool = False          # with method qlora: QDoRA (method dora sets it itself)
    quant_type: str = "nf4"         # qlora: bitsandbytes 4-bit data type
    double_quant: bool = True       # qlora: quantize the quantization scales too
    compute_dtype: str = "auto"     # qlora: auto = bf16 on GPU, fp32 on CPU


# optimizer, scheduler, logger: a built-in `name:` (training/registry.py), or `_target_: my.module.Class`
# whose other keys are its keyword arguments (checked against its signature, not against these fields).
@dataclasses.dataclass
class OptimizerSchema:
    name: str
    lr: float
    weight_decay: float = 0.0
    betas: list[float] = dataclasses.field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    _target_: Optional[str] = None


@dataclasses.dataclass
class SchedulerSchema:
    name: str
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    _target_: Optional[str] = None


@dataclasses.dataclass
class StrategySchema:
    name: str
    find_unused_parameters: bool = False  # ddp
    activation_checkpointing: bool = False  # fsdp (see mistral_ft/distributed.py)
    cpu_offload: bool = False  # fsdp
    reshard_after_forward: bool = True  # fsdp
    sharded_checkpoint: bool = True  # fsdp
    rank_local_load: bool = True  # fsdp: build on meta, each rank reads only its shards


@dataclasses.dataclass
class LoggerSchema:
    name: str
    project: Optional[str] = None
    entity: Optional[str] = None
    offline: bool = False
    tags: list[str] = dataclasses.field(default_factory=list)
    _target_: Optional[str] = None


@dataclasses.dataclass
class CheckpointSchema:
    every_n_train_steps: int = 50
    save_adapter: bool = True


GENERATION_METRICS = ("exact_match", "normalised_match", "mean_generated_tokens")


@dataclasses.dataclass
class EvalSchema:
    """Generation-based evaluation (conf/eval/, mistral_ft.training.evaluation): off unless a recipe asks."""

    enabled: bool = False
    num_samples: int = 32        # validation conversations scored (the first N of the validation set)
    max_new_tokens: int = 64
    batch_size: int = 16         # prompts per left-padded generate() call
    metrics: list[str] = dataclasses.field(default_factory=lambda: list(GENERATION_METRICS))

    @classmethod
    def from_config(cls, node: Optional[Mapping[str, Any]]) -> "EvalSchema":
        return cls(**dict(node or {}))


@dataclasses.dataclass
class RunSchema:
    task: str
    model: ModelSchema
    data: dict
    peft: PeftSchema
    optimizer: OptimizerSchema
    scheduler: SchedulerSchema
    strategy: StrategySchema
    trainer: dict
    logger: LoggerSchema
    checkpoint: CheckpointSchema
    seed: int = 42
    debug: bool = False
    resume: Optional[str] = None
    eval: EvalSchema = dataclasses.field(default_factory=EvalSchema)
    lock: Optional[dict] = None  # {break: bool}: take over another host's run.lock (mistral_ft/lock.py)
    skip_nonfinite: bool = False  # NaN/inf step: false = stop (keep the last good checkpoint), true = skip it
    preference: Optional[dict] = None  # task=dpo: loss_type, beta, ... (checked by tasks.preference.preference_settings)
    callbacks: dict = dataclasses.field(default_factory=dict)  # NAME: {_target_: a Lightning Callback, its kwargs}


CHOICES = {
    "task": tuple(HEADS),
    "model.dtype": ("float32", "bfloat16", "float16", "auto"),
    "model.attn_implementation": ("auto", "sdpa", "eager", "flash_attention_2", "flex_attention"),
    "peft.method": ("lora", "dora", "qlora", "none"),
    "peft.quant_type": ("nf4", "fp4"),
    "peft.compute_dtype": ("auto", "float32", "bfloat16", "float16"),
    "optimizer.name": tuple(OPTIMIZERS),
    "scheduler.name": tuple(SCHEDULERS),
    "strategy.name": tuple(STRATEGIES),
    "logger.name": tuple(LOGGERS),
}
# Trainer arguments that mistral_ft builds itself (from the logger / strategy groups and the run folder).
MANAGED_TRAINER_KEYS = ("logger", "callbacks", "strategy", "default_root_dir", "enable_checkpointing", "plugins")
# Loader sizes live in the data group next to the pipeline's own keys.
DATA_LOADER_KEYS = {"batch_size": int, "eval_batch_size": Optional[int]}


# ---- locating where a key was set ---------------------------------------------------------------
@dataclasses.dataclass
class Sources:
    """Where config values can come from, to point the user at the line to fix."""

    conf_dir: Optional[Path] = None
    choices: Mapping[str, Optional[str]] = dataclasses.field(default_factory=dict)
    overrides: Sequence[str] = ()

    def files(self, dotted: str) -> list[Path]:
        """Candidate files for `dotted`, the last applied first: specialization, recipe, group, primary."""
        out: list[Path] = []
        if self.conf_dir is None:
            return out
        special = self.choices.get("specialize")  # applied after the recipe, so searched first
        if special:
            out.append(self.conf_dir / "specialize" / f"{special}.yaml")
        recipe = self.choices.get("recipe")
        if recipe:
            out.append(self.conf_dir / "recipe" / f"{recipe}.yaml")
        group = dotted.split(".", 1)[0]
        option = self.choices.get(group)
        if option:
            out.append(self.conf_dir / group / f"{option}.yaml")
        out.append(self.conf_dir / "config.yaml")
        return out

    def locate(self, dotted: str) -> str:
        """'the command line (optimizer.lrr=1e-3)' or 'FILE:LINE', or '' when not found."""
        for ov in self.overrides:
            key = ov.lstrip("+~").split("=", 1)[0]
            if key == dotted:
                return f"the command line: {mask_secret(ov)}"
        parts = dotted.split(".")
        for path in self.files(dotted):
            line = _find_key_line(path, parts)
            if line:
                return f"{_display(path)}:{line}"
        return ""


def _display(path: Path) -> str:
    """Show recipe files under their repository name (recipes/X.yaml) when conf/recipe links there."""
    try:
        real = path.resolve()
        return str(real.relative_to(Path.cwd())) if real.is_relative_to(Path.cwd()) else str(real)
    except OSError:
        return str(path)


def _find_key_line(path: Path, parts: list[str]) -> int:
    """Line number of `a.b.c` in a YAML file, by indentation (good enough for our flat configs)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return 0
    group_file = path.parent.name == parts[0]  # conf/optimizer/adamw.yaml holds optimizer.* unprefixed
    wanted = parts[1:] if group_file else parts
    depth, indent_stack = 0, [-1]
    for i, raw in enumerate(lines, 1):
        text = raw.split("#", 1)[0].rstrip()
        if not text.strip() or text.lstrip().startswith("-"):
            continue
        indent = len(text) - len(text.lstrip())
        while len(indent_stack) > 1 and indent <= indent_stack[-1]:
            indent_stack.pop()
            depth -= 1
        key = text.strip().split(":", 1)[0].strip()
        if depth < len(wanted) and key == wanted[depth]:
            if depth == len(wanted) - 1:
                return i
            indent_stack.append(indent)
            depth += 1
        elif depth == 0 and key == ".".join(wanted):  # dotted key written inline
            return i
    return 0


# ---- validation ---------------------------------------------------------------------------------
def validate_config(cfg: Mapping[str, Any], sources: Optional[Sources] = None) -> None:
    """Check a resolved config (plain dict) against the schema; raise ConfigError listing all problems."""
    sources = sources or Sources()
    errors: list[str] = []
    _check_dataclass(RunSchema, cfg, "", errors, sources)
    if "trainer" in cfg and isinstance(cfg["trainer"], Mapping):
        _check_trainer(cfg["trainer"], errors, sources)
    if "data" in cfg and isinstance(cfg["data"], Mapping):
        _check_data(cfg["data"], errors, sources)
    for dotted, allowed in CHOICES.items():
        value = _get(cfg, dotted)
        if dotted.endswith(".name") and _get(cfg, dotted.rsplit(".", 1)[0] + "._target_") not in (_MISSING, None):
            continue  # a user's class: its name is not ours to check
        if value is not _MISSING and value not in allowed:
            errors.append(_msg(dotted, f"{value!r} is not one of {list(allowed)}", sources))
    for dotted, value in _numbers(cfg, ""):  # NaN passes every `<`/`>` range check (False both ways)
        if not math.isfinite(value):
            errors.append(_msg(dotted, f"{value!r} is not a finite number", sources))
    if not errors:
        _check_targets(cfg, errors, sources)
    if not errors:
        _check_values(cfg, errors, sources)
    if errors:
        head = "invalid config" if len(errors) == 1 else f"invalid config ({len(errors)} problems)"
        raise ConfigError(head + ":\n  " + "\n  ".join(errors))


_MISSING = object()


def _numbers(node: Any, prefix: str) -> list[tuple[str, float]]:
    """(dotted key, value) of every float in the config (no config value is legitimately NaN or inf)."""
    if isinstance(node, Mapping):
        return [kv for k, v in node.items() for kv in _numbers(v, f"{prefix}{k}.")]
    if isinstance(node, list):
        return [kv for i, v in enumerate(node) for kv in _numbers(v, f"{prefix}{i}.")]
    return [(prefix.rstrip("."), node)] if isinstance(node, float) else []


def _get(cfg: Mapping[str, Any], dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return _MISSING
        node = node[part]
    return node


def _msg(dotted: str, problem: str, sources: Sources) -> str:
    where = sources.locate(dotted)
    return f"{dotted}: {problem}" + (f" (from {where})" if where else "")


def _unknown(dotted: str, key: str, valid: Sequence[str], sources: Sources) -> str:
    close = difflib.get_close_matches(key, list(valid), n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return _msg(dotted, f"unknown key{hint}. Valid keys here: {', '.join(sorted(valid))}", sources)


def _check_dataclass(schema: type, node: Any, prefix: str, errors: list[str], sources: Sources) -> None:
    if not isinstance(node, Mapping):
        errors.append(_msg(prefix.rstrip(".") or "<root>", f"expected a mapping, got {node!r}", sources))
        return
    fields = {f.name: f for f in dataclasses.fields(schema)}
    hints = typing.get_type_hints(schema)
    user_class = "_target_" in fields and node.get("_target_") is not None  # its keys: checked by _check_targets
    for key in node:
        if key not in fields and key != "hydra" and not user_class:
            errors.append(_unknown(prefix + str(key), str(key), list(fields), sources))
    for name, field in fields.items():
        dotted = prefix + name
        has_default = field.default is not dataclasses.MISSING or field.default_factory is not dataclasses.MISSING
        if name not in node:
            if not has_default:
                errors.append(_msg(dotted, "required key is missing", sources))
            continue
        _check_type(hints[name], node[name], dotted, errors, sources)


def _check_type(tp: Any, value: Any, dotted: str, errors: list[str], sources: Sources) -> None:
    if dataclasses.is_dataclass(tp):
        _check_dataclass(tp, value, dotted + ".", errors, sources)
        return
    if not _type_ok(tp, value):
        errors.append(_msg(dotted, f"expected {_type_name(tp)}, got {value!r} ({type(value).__name__})", sources))


def _type_ok(tp: Any, value: Any) -> bool:
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if origin in (Union, types.UnionType):
        return any(_type_ok(t, value) for t in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if origin is list or tp is list:
        args = typing.get_args(tp)
        return isinstance(value, list) and (not args or all(_type_ok(args[0], v) for v in value))
    if tp is dict:
        return isinstance(value, Mapping)
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    return isinstance(value, tp)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(t) for t in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    return {int: "an int", float: "a number", str: "a string", bool: "true/false", dict: "a mapping"}.get(tp, str(tp))


def _check_trainer(trainer: Mapping[str, Any], errors: list[str], sources: Sources) -> None:
    """Trainer keys are Lightning's own arguments; the few we manage are refused with the reason."""
    from lightning.pytorch import Trainer

    params = inspect.signature(Trainer.__init__).parameters
    valid = [p for p in params if p != "self" and p not in MANAGED_TRAINER_KEYS]
    for key, value in trainer.items():
        dotted = f"trainer.{key}"
        if key in MANAGED_TRAINER_KEYS:
            errors.append(_msg(dotted, "is set by mistral_ft (use the logger / strategy / callbacks groups, e.g. "
                                       "callbacks=[early_stopping,lr_monitor] or +callbacks.NAME._target_=CLASS; "
                                       "the run folder is hydra.run.dir)", sources))
        elif key not in params:
            errors.append(_unknown(dotted, key, valid, sources))
    for key in ("max_steps", "accumulate_grad_batches", "log_every_n_steps"):
        value = trainer.get(key)
        if key in trainer and not _type_ok(int, value):
            errors.append(_msg(f"trainer.{key}", f"expected an int, got {value!r} ({type(value).__name__})", sources))
    if _type_ok(int, trainer.get("max_steps")) and trainer["max_steps"] < 1:
        errors.append(_msg("trainer.max_steps", "must be >= 1 (the schedule is defined in optimizer steps)", sources))
    if _type_ok(int, trainer.get("accumulate_grad_batches")) and trainer["accumulate_grad_batches"] < 1:
        errors.append(_msg("trainer.accumulate_grad_batches", "must be >= 1", sources))
    clip = trainer.get("gradient_clip_val")
    if clip is not None and not _type_ok(float, clip):
        errors.append(_msg("trainer.gradient_clip_val", f"expected a number or null, got {clip!r}", sources))
    elif clip is not None and clip < 0:  # Lightning accepts it and then clips nothing
        errors.append(_msg("trainer.gradient_clip_val", f"must be >= 0 (0 or null: no clipping), got {clip}", sources))


def _check_data(data: Mapping[str, Any], errors: list[str], sources: Sources) -> None:
    from mistral_ft.data import DataConfig

    fields = {f.name: f for f in dataclasses.fields(DataConfig)}
    hints = typing.get_type_hints(DataConfig)
    valid = list(fields) + list(DATA_LOADER_KEYS)
    for key, value in data.items():
        dotted = f"data.{key}"
        if str(key).startswith("_"):
            continue
        if key in DATA_LOADER_KEYS:
            tp = DATA_LOADER_KEYS[key]
        elif key in fields:
            tp = hints[key]
        else:
            errors.append(_unknown(dotted, str(key), valid, sources))
            continue
        if not _type_ok(tp, value):
            errors.append(_msg(dotted, f"expected {_type_name(tp)}, got {value!r} ({type(value).__name__})", sources))
    if "batch_size" not in data:
        errors.append(_msg("data.batch_size", "required key is missing", sources))


def _check_targets(cfg: Mapping[str, Any], errors: list[str], sources: Sources) -> None:
    """Each `_target_` (optimizer, scheduler, logger, callbacks.NAME) imports and takes its config's keys."""
    nodes = [(g, g, cfg.get(g)) for g in TARGET_GROUPS if g != "callbacks"]
    for name, node in (cfg.get("callbacks") or {}).items():
        if not isinstance(node, Mapping) or not node.get("_target_"):
            errors.append(_msg(f"callbacks.{name}", f"expected a mapping with _target_: a Lightning Callback class, "
                                                   f"got {node!r}", sources))
            continue
        nodes.append(("callbacks", f"callbacks.{name}", node))
    for group, dotted, node in nodes:
        if isinstance(node, Mapping) and node.get("_target_") is not None:
            problem = check_target(dotted, node, group)
            if problem:
                errors.append(_msg(f"{dotted}._target_", problem, sources))


def _check_values(cfg: Mapping[str, Any], errors: list[str], sources: Sources) -> None:
    """Ranges and combinations, once the types are right."""
    if cfg["optimizer"]["lr"] <= 0:
        errors.append(_msg("optimizer.lr", f"must be > 0, got {cfg['optimizer']['lr']}", sources))
    if len(cfg["optimizer"]["betas"]) != 2:
        errors.append(_msg("optimizer.betas", f"expected two numbers, got {cfg['optimizer']['betas']}", sources))
    if cfg["peft"]["method"] != "none" and cfg["peft"]["r"] < 1:
        errors.append(_msg("peft.r", f"the LoRA rank must be >= 1, got {cfg['peft']['r']}", sources))
    if not 0.0 <= cfg["peft"].get("dropout", 0.0) < 1.0:
        errors.append(_msg("peft.dropout", f"must be in [0, 1), got {cfg['peft']['dropout']}", sources))
    if cfg["scheduler"]["warmup_steps"] < 0:
        errors.append(_msg("scheduler.warmup_steps", "must be >= 0", sources))
    if cfg["data"].get("batch_size", 1) < 1:
        errors.append(_msg("data.batch_size", f"must be >= 1, got {cfg['data']['batch_size']}", sources))
    if cfg["checkpoint"]["every_n_train_steps"] < 1:
        errors.append(_msg("checkpoint.every_n_train_steps", "must be >= 1", sources))
    ev = EvalSchema.from_config(cfg.get("eval"))
    if ev.max_new_tokens <= 0:
        errors.append(_msg("eval.max_new_tokens", f"must be > 0, got {ev.max_new_tokens}", sources))
    for key in ("num_samples", "batch_size"):
        if getattr(ev, key) <= 0:
            errors.append(_msg(f"eval.{key}", f"must be > 0, got {getattr(ev, key)}", sources))
    unknown = [m for m in ev.metrics if m not in GENERATION_METRICS]
    if unknown:
        errors.append(_msg("eval.metrics", f"unknown metric(s) {unknown} (known: {list(GENERATION_METRICS)})", sources))
    if ev.enabled and cfg["task"] != "causal_lm":
        errors.append(_msg("eval.enabled", f"generation metrics need task causal_lm, not {cfg['task']!r}", sources))
    from mistral_ft.data.config import CAUSAL_FORMATS, PREFERENCE_FORMATS, SEQUENCE_FORMATS

    data_format = cfg["data"].get("format", "messages")
    takes = {"causal_lm": CAUSAL_FORMATS, "classification": SEQUENCE_FORMATS,
             "dpo": PREFERENCE_FORMATS, "reward": PREFERENCE_FORMATS}
    if data_format not in takes.get(cfg["task"], (data_format,)):
        errors.append(_msg("data.format", f"{data_format!r} does not fit task {cfg['task']!r} (causal_lm takes "
                                          f"{'/'.join(CAUSAL_FORMATS)}, classification takes {'/'.join(SEQUENCE_FORMATS)}, "
                                          f"dpo and reward take {'/'.join(PREFERENCE_FORMATS)})", sources))
    if cfg.get("preference") is not None and cfg["task"] == "dpo":
        from mistral_ft.training.tasks.preference_loss import preference_settings

        try:
            preference_settings(cfg)
        except ValueError as err:
            errors.append(_msg(str(err).split(":", 1)[0], str(err).split(":", 1)[1].strip(), sources))


# ---- secrets ------------------------------------------------------------------------------------
def mask_secret(override: str) -> str:
    """`logger.api_key=abc` -> `logger.api_key=***`: error messages end up in logs and CI output."""
    key, sep, _ = override.partition("=")
    return f"{key}={MASK}" if sep and is_secret_key(key) else override


def strip_secrets(node: Any) -> Any:
    """A copy without keys that hold secrets (`masking.is_secret_key`: whole words, so token counts stay)."""
    if isinstance(node, Mapping):
        return {key: strip_secrets(value) for key, value in node.items() if not is_secret_key(str(key))}
    if isinstance(node, list):
        return [strip_secrets(v) for v in node]
    return node
