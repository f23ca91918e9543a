"""A run folder and what reads it: the one place train (resume), export and generate learn its layout.

    <run folder>/
      config.yaml  overrides.yaml  base_model.json  summary.json  train.log
      checkpoints/  step-NNNNNN.ckpt, last.ckpt (files; folders of per-rank shards with strategy=fsdp)
      adapter/ | model/   what training exported (peft adapter / full weights)

Here: which model a run config names (`resolve_model_path`, `model_folder`), `resume=` resolution,
checkpoint reading (`weights_only=True`, one-line errors for torn files), the newest complete
checkpoint (`resume=auto`), and the base fingerprint that export checks before merging.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional

import torch

from mistral_ft.errors import ConfigError, ExportError, GenerateError, UserError
from mistral_ft.fs import TMP_MARK
from mistral_ft.model.config import read_json_object
from mistral_ft.model.hub import is_hub_id, local_model_folder
from mistral_ft.model.tiny import tiny_model_path

log = logging.getLogger("mistral_ft.runs")

# Which model a run's `task` trains (what training builds and export writes): dpo is a causal LM, a reward
# model a one-label sequence classifier.
TASK_MODEL = {"causal_lm": "causal_lm", "classification": "classification", "dpo": "causal_lm", "reward": "classification"}


# ---- which model a run config names ---------------------------------------------------------------
def resolve_model_path(model_cfg: Mapping[str, Any]) -> str:
    """model.path, or the embedded tiny model's cached folder when it is null."""
    path = model_cfg.get("path")
    if path:
        p = Path(str(path)).expanduser()
        if not p.exists() and not is_hub_id(path):
            raise ConfigError(f"model.path: {path} does not exist (give a local HF folder or a hub id like "
                              "mistralai/Mistral-7B-v0.1)")
        return str(p) if p.exists() else str(path)
    return str(tiny_model_path())


def model_folder(model_cfg: Mapping[str, Any]) -> str:
    """The local folder of the run config's model: a hub id is fetched (or found in the hub cache) first."""
    return str(local_model_folder(resolve_model_path(model_cfg)))


# ---- resume= and checkpoints ----------------------------------------------------------------------
def resolve_resume(path: str) -> tuple[Path, Path]:
    """(checkpoint file, run folder) for `resume=`: a run folder (its checkpoints/last.ckpt) or a .ckpt."""
    p = Path(path).expanduser().resolve()
    if p.is_dir() and (p / "meta.pt").is_file():  # a sharded (strategy=fsdp) checkpoint folder
        return p, p.parent.parent if p.parent.name == "checkpoints" else p.parent
    if p.is_dir():
        if (p / BASE_RECORD).is_file():  # corrupt: refused now, before the run folder is touched
            read_json_object(p / BASE_RECORD, ConfigError)
        ckpt = p / "checkpoints" / "last.ckpt"
        if not ckpt.exists():
            raise ConfigError(f"resume={path}: no checkpoint at {ckpt} (the run saved none yet, or this is not a run folder)")
        if ckpt.is_file():
            read_checkpoint(ckpt, mmap=True)  # torn or foreign: fail before the run folder is touched
        return ckpt, p
    if p.is_file():
        run_dir = p.parent.parent if p.parent.name == "checkpoints" else p.parent
        read_checkpoint(p, mmap=True)  # a torn or foreign file fails here, before the run folder is touched
        return p, run_dir
    raise ConfigError(f"resume={path}: no such run folder or checkpoint file")


class CheckpointReadError(UserError):
    """A checkpoint file that cannot be read (truncated, corrupt, or not a checkpoint)."""


def read_checkpoint(path: Path, map_location: Any = "cpu", mmap: bool = False) -> dict[str, Any]:
    """`torch.load(weights_only=True)` with a one-line error for a truncated or foreign file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointReadError(f"{path}: checkpoint file not found")
    try:
        ckpt = torch.load(path, map_location=map_location or "cpu", weights_only=True, mmap=mmap)
    except Exception as err:  # noqa: BLE001 - zip, pickle and unpickler errors all mean "unusable file"
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointReadError(f"{path}: not a readable checkpoint (truncated, corrupt, or it holds code "
                                  f"that weights_only=True refuses): {first[:200]}") from None
    if not isinstance(ckpt, dict):
        raise CheckpointReadError(f"{path}: not a Lightning checkpoint (a {type(ckpt).__name__}, not a dict)")
    return ckpt


def newest_checkpoint(run_dir: Path) -> Optional[Path]:
    """The complete checkpoint of `run_dir/checkpoints` with the highest global step, or None.

    Complete = `torch.load(weights_only=True, mmap=True)` opens it (mmap: tensors are not read, so this
    is cheap even for a full 7B checkpoint) and it has a `global_step`. Temporary files of a killed
    write (`.NAME.tmp-PID`) are never candidates. On a tie, step-N.ckpt wins over last.ckpt (same state).
    """
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return None
    best: Optional[tuple[int, int, Path]] = None
    for path in folder.glob("*.ckpt"):
        if path.name.startswith(".") or TMP_MARK in path.name:
            continue
        try:
            # strategy=fsdp: a folder of per-rank shards; rank 0 writes meta.pt (with the step) after all shards
            step = read_checkpoint(path / "meta.pt" if path.is_dir() else path, mmap=True).get("global_step")
        except CheckpointReadError as err:
            log.warning("resume=auto: skipping %s", err)
            continue
        if not isinstance(step, int):
            continue
        key = (step, 0 if path.name == "last.ckpt" else 1, path)
        if best is None or key[:2] > best[:2]:
            best = key
    return best[2] if best else None
BASE_RECORD = "base_model.json"
_SAMPLES = 16  # blocks hashed per file: a cheap fingerprint that any re-save or fine-tune changes
_BLOCK = 1 << 16


def fingerprint(folder: str | os.PathLike) -> dict[str, Any]:
    """{file: {size, sha256}} for config.json and each *.safetensors of a model folder.

    The hash covers the whole safetensors header (names, dtypes, shapes) and 16 evenly spaced 64 KiB
    blocks of the data, not every byte: hashing 14.5 GB would add a minute to every training start,
    while any re-save, conversion or fine-tune of the weights changes the sampled blocks.
    """
    folder = Path(folder)
    out: dict[str, Any] = {}
    for path in sorted([folder / "config.json", *folder.glob("*.safetensors")]):
        if not path.is_file():
            continue
        size = path.stat().st_size
        h = hashlib.sha256()
        with open(path, "rb") as f:
            if path.suffix == ".safetensors":
                n = int.from_bytes(f.read(8), "little")
                h.update(f.read(min(n, size)))
                for i in range(_SAMPLES):
                    f.seek(8 + n + (size - 8 - n) * i // _SAMPLES)
                    h.update(f.read(_BLOCK))
            else:
                h.update(f.read())
        out[path.name] = {"size": size, "sha256": h.hexdigest()}
    return out


def record_base(run_dir: str | os.PathLike, model_path: str | os.PathLike, model_cfg: Mapping[str, Any]) -> None:
    """Write `<run>/base_model.json`: where the base weights were and their fingerprint.

    Export reads it to refuse a base that moved or changed since training (the adapter would merge into
    other weights). On resume an existing record is kept: it describes the weights the run started from.
    """
    path = Path(run_dir) / BASE_RECORD
    if path.is_file():
        old = read_json_object(path, ConfigError)  # a corrupt record names its file and line
        if old.get("fingerprint") != fingerprint(model_path):
            log.warning("the base weights at %s differ from the ones this run started from (%s)", model_path, path)
        return
    record = {"path": str(Path(model_path).resolve()), "source": model_cfg.get("path"),
              "fingerprint": fingerprint(model_path)}
    path.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


def adapter_base_name(source: Any, folder: str | os.PathLike) -> str:
    """An adapter's `base_model_name_or_path`: the hub id when the run's base came from the hub (any machine
    resolves it, llama.cpp's LoRA converter and peft included), else the absolute local folder it was read
    from, which `base_model.json` beside the adapter fingerprints so a copy elsewhere can be checked."""
    if isinstance(source, str) and is_hub_id(source) and not Path(source).expanduser().exists():
        return source
    return str(Path(folder).expanduser().resolve())


LOGGER_RECORD = "loggers.json"


def read_logger_ids(run_dir: str | os.PathLike) -> dict[str, Any]:
    """`<run>/loggers.json`: what a resume continues (the CSV / TensorBoard `version`, the W&B run `wandb_id`)."""
    path = Path(run_dir) / LOGGER_RECORD
    return read_json_object(path, ConfigError) if path.is_file() else {}


def write_logger_ids(run_dir: str | os.PathLike, ids: Mapping[str, Any]) -> None:
    from mistral_ft.fs import atomic_write_bytes

    atomic_write_bytes(Path(run_dir) / LOGGER_RECORD, (json.dumps(dict(ids), indent=2, sort_keys=True) + "\n").encode())


def check_base(record: Mapping[str, Any], folder: Path, where: Path) -> None:
    """Raise ExportError when `folder`'s weights are not the ones `record` (from `where`) describes."""
    want = record.get("fingerprint") or {}
    have = fingerprint(folder)
    if set(want) != set(have):
        raise ExportError(f"base weights at {folder} have files {sorted(have)}, but the run trained on "
                          f"{sorted(want)} ({where}); pass base=PATH to the original weights")
    for name in want:
        if want[name] != have[name]:
            raise ExportError(
                f"base weights changed since training: {folder / name} has size {have[name]['size']} and "
                f"fingerprint {have[name]['sha256'][:12]}, the run recorded size {want[name]['size']} and "
                f"{want[name]['sha256'][:12]} ({where}); the adapter would merge into other weights. "
                "Pass base=PATH to the weights the run trained on.")


# ---- reading a finished (or interrupted) run --------------------------------------------------------
# The checkpoint's hyper-parameters that must equal the run folder's config.yaml: a checkpoint copied in
# from another run would otherwise export (or load) onto the wrong base or adapter layout.
RUN_IDENTITY = (("", ("task",)), ("model", ("name", "path")),
                ("peft", ("method", "r", "alpha", "target_modules", "modules_to_save", "use_dora")))


def read_run_config(run_dir: Path) -> Optional[dict[str, Any]]:
    """`<run>/config.yaml` (what training wrote: resolved, secrets stripped) as a dict; None when absent."""
    cfg_file = Path(run_dir) / "config.yaml"
    if not cfg_file.is_file():
        return None
    import yaml

    try:
        config = yaml.safe_load(cfg_file.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:  # a corrupt run folder: name the file
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{cfg_file}: not readable YAML ({first})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{cfg_file}: expected a mapping of config sections, got {type(config).__name__}")
    return config


class RunFolder:
    """A training run folder, or a checkpoint inside one, as training left it (the layout above).

    `path` is the folder or a `.ckpt` (a file, or a sharded strategy=fsdp folder holding meta.pt); errors
    are `error` (the caller's UserError class) and name `what=path`. Without a `.ckpt`, `checkpoint` is
    None when the run exported its weights (adapter/ or model/), else checkpoints/last.ckpt.
    """

    def __init__(self, path: str | os.PathLike, error: type[UserError] = ExportError, what: str = "run_dir") -> None:
        p = Path(path).expanduser().resolve()
        self.checkpoint: Optional[Path] = None
        if p.is_file() or (p / "meta.pt").is_file():
            if p.suffix != ".ckpt":
                raise error(f"{what}={path}: a file, but not a checkpoint (*.ckpt)")
            self.checkpoint = p
            p = p.parent.parent if p.parent.name == "checkpoints" else p.parent
        elif not p.is_dir():
            raise error(f"{what}={path}: no such run folder or checkpoint")
        self.dir = p
        config = read_run_config(p)
        if config is None:
            raise error(f"{what}={path}: {p / 'config.yaml'} is missing (not a mistral_ft run folder)")
        self.config: dict[str, Any] = config
        self.method = str(config.get("peft", {}).get("method", "lora"))
        self.task = TASK_MODEL.get(str(config.get("task", "causal_lm")), "causal_lm")  # the model it trained
        if self.checkpoint is None and not self.exported_folder.is_dir():
            last = p / "checkpoints" / "last.ckpt"
            if not last.exists():
                raise error(f"{what}={path}: neither {self.exported_folder} nor {last} exists "
                            "(has the run saved anything yet?)")
            self.checkpoint = last  # the run ended without writing adapter/ (save_adapter=false, or interrupted)

    @property
    def exported_folder(self) -> Path:
        """What training exported: adapter/ (peft) or model/ (full fine-tuning)."""
        return self.dir / ("model" if self.method == "none" else "adapter")

    def identity_mismatches(self, hparams: Mapping[str, Any]) -> list[str]:
        """How a checkpoint's hyper-parameters differ from config.yaml on the keys of RUN_IDENTITY."""
        diffs = []
        for section, keys in RUN_IDENTITY:
            for key in keys:
                ours = self.config.get(section, {}).get(key) if section else self.config.get(key)
                theirs = hparams.get(section, {}).get(key) if section else hparams.get(key)
                if ours != theirs:
                    diffs.append(f"{section + '.' if section else ''}{key}: {theirs!r} in the checkpoint, {ours!r} in "
                                 f"{self.dir / 'config.yaml'}")
        return diffs


def resolve_run(run: Path) -> tuple[Path, Path | None]:
    """A training run folder -> (model folder, adapter folder or None), from the layout train.py writes.

    ``model/`` (full fine-tuning) is a complete HF folder; ``adapter/`` is a peft adapter whose base is its
    ``base_model_name_or_path``, else the run's ``config.yaml`` ``model.path`` (null: the embedded tiny model).
    """
    if not run.is_dir():
        raise GenerateError(f"--run {run}: no such folder")
    if (run / "model" / "config.json").is_file():
        return run / "model", None
    adapter = run / "adapter"
    if (adapter / ADAPTER_CONFIG).is_file():
        base = read_adapter_config(adapter).get("base_model_name_or_path")
        if base and Path(base).expanduser().is_dir():
            return Path(base).expanduser(), adapter
        config = read_run_config(run)
        if config is not None:
            path = (config.get("model") or {}).get("path")
            if path:
                return Path(model_folder({"path": path})), adapter
            return tiny_model_path(), adapter
        raise GenerateError(f"--run {run}: the adapter's base {base!r} is not a local folder and the run has no "
                            f"config.yaml; pass the base with --model")
    raise GenerateError(f"--run {run}: no model/ or adapter/ folder (they are written when training ends; "
                        f"is this run finished?)")


ADAPTER_CONFIG = "adapter_config.json"


def read_adapter_config(adapter: Path) -> dict[str, Any]:
    if not adapter.is_dir():
        raise GenerateError(f"--adapter {adapter}: no such folder")
    path = adapter / ADAPTER_CONFIG
    if not path.is_file():
        raise GenerateError(f"--adapter {adapter}: no {ADAPTER_CONFIG} (not a peft adapter folder)")
    return read_json_object(path, GenerateError)
