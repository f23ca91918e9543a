"""MistralConfig: every field of the HF Mistral config, with Mistral-7B-v0.1 defaults.

config.json exists in two spellings in the wild:
  * hub checkpoints (and transformers 4.x) write ``rope_theta`` and ``torch_dtype``;
  * transformers 5 writes ``rope_parameters = {"rope_type": "default", "rope_theta": ...}`` and ``dtype``.
We read both and write the hub spelling, which every transformers version (and vLLM) reads.
Keys we do not know are kept in ``extra`` and written back unchanged, so a round trip loses nothing.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from mistral_ft.errors import ConfigError

# name -> (default, accepted python types). Types are checked when a config is built, so a config.json
# with `"hidden_size": "4096"` fails with the file, key and value instead of deep inside a matmul.
_FIELDS: dict[str, tuple[Any, tuple[type, ...]]] = {
    "vocab_size": (32000, (int,)),
    "hidden_size": (4096, (int,)),
    "intermediate_size": (14336, (int,)),
    "num_hidden_layers": (32, (int,)),
    "num_attention_heads": (32, (int,)),
    "num_key_value_heads": (8, (int,)),
    "head_dim": (None, (int, type(None))),
    "hidden_act": ("silu", (str,)),
    "max_position_embeddings": (4096 * 32, (int,)),
    "initializer_range": (0.02, (float, int)),
    "rms_norm_eps": (1e-6, (float, int)),
    "use_cache": (True, (bool,)),
    "pad_token_id": (None, (int, type(None))),
    "bos_token_id": (1, (int, type(None))),
    "eos_token_id": (2, (int, list, type(None))),
    "tie_word_embeddings": (False, (bool,)),
    "rope_theta": (10000.0, (float, int)),
    "sliding_window": (4096, (int, type(None))),
    "attention_dropout": (0.0, (float, int)),
    # sequence classification
    "num_labels": (2, (int,)),
    "id2label": (None, (dict, type(None))),
    "label2id": (None, (dict, type(None))),
    "problem_type": (None, (str, type(None))),
    # bookkeeping
    "torch_dtype": (None, (str, type(None))),
    "architectures": (None, (list, type(None))),
}
_PROBLEM_TYPES = (None, "regression", "single_label_classification", "multi_label_classification")
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2", "flex_attention")


def read_json_object(path: Path, error: type[Exception] = ValueError) -> dict[str, Any]:
    """Parse a JSON file that must hold an object; bad JSON raises ``error`` naming the file and line."""
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise error(f"{path}: line {e.lineno}: invalid JSON ({e.msg})") from None
    if not isinstance(d, dict):
        raise error(f"{path}: expected a JSON object, got {type(d).__name__}")
    return d


class MistralConfig:
    """Hyper-parameters of a Mistral model (the fields of transformers' ``MistralConfig``).

    Defaults are Mistral-7B-v0.1. ``head_dim`` defaults to ``hidden_size // num_attention_heads``.
    ``attn_implementation`` is a runtime choice ("sdpa" default, "eager", "flash_attention_2") and is not
    written to config.json. ``sliding_window=None`` means full causal attention.
    """

    model_type = "mistral"

    def __init__(self, *, _source: str = "MistralConfig", attn_implementation: str = "sdpa", **kwargs: Any):
        rope = kwargs.pop("rope_parameters", None)
        if rope is not None:
            if not isinstance(rope, dict) or rope.get("rope_type", "default") != "default":
                raise ConfigError(f"{_source}: key 'rope_parameters': only the default RoPE is supported, got {rope!r}")
            kwargs.setdefault("rope_theta", rope.get("rope_theta", 10000.0))
        if "dtype" in kwargs:  # transformers-5 spelling
            dtype = kwargs.pop("dtype")
            kwargs.setdefault("torch_dtype", dtype)
        for name, (default, _) in _FIELDS.items():
            setattr(self, name, kwargs.pop(name, default))
        self.extra: dict[str, Any] = kwargs  # unknown keys survive a round trip
        self.attn_implementation = attn_implementation
        self._validate(_source)
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.id2label is None:
            self.id2label = {i: f"LABEL_{i}" for i in range(self.num_labels)}
        else:  # JSON object keys are strings
            self.id2label = {int(k): v for k, v in self.id2label.items()}
            self.num_labels = len(self.id2label)
        if self.label2id is None:
            self.label2id = {v: k for k, v in self.id2label.items()}
        self.rope_theta = float(self.rope_theta)

    def _validate(self, source: str) -> None:
        for name, (_, types) in _FIELDS.items():
            value = getattr(self, name)
            ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
            if not ok:
                names = " or ".join("null" if t is type(None) else t.__name__ for t in types)
                raise ConfigError(f"{source}: key '{name}' must be {names}, got {value!r} ({type(value).__name__})")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "num_labels"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{source}: key '{name}' must be >= 1, got {getattr(self, name)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"{source}: key 'num_key_value_heads' ({self.num_key_value_heads}) must divide "
                f"num_attention_heads ({self.num_attention_heads})")
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"{source}: key 'hidden_size' ({self.hidden_size}) is not divisible by "
                              f"num_attention_heads ({self.num_attention_heads}); set head_dim")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ConfigError(f"{source}: key 'sliding_window' must be >= 1 or null, got {self.sliding_window}")
        if self.hidden_act != "silu":
            raise ConfigError(f"{source}: key 'hidden_act': only 'silu' is supported, got {self.hidden_act!r}")
        if self.problem_type not in _PROBLEM_TYPES:
            raise ConfigError(f"{source}: key 'problem_type' must be one of {_PROBLEM_TYPES}, got {self.problem_type!r}")
        if self.attn_implementation not in ATTN_IMPLEMENTATIONS:
            raise ConfigError(f"{source}: attn_implementation must be one of {ATTN_IMPLEMENTATIONS}, "
                              f"got {self.attn_implementation!r}")

    # ----------------------------------------------------------------------------------------- I/O
    def to_dict(self) -> dict[str, Any]:
        """The hub spelling of config.json (``rope_theta``, ``torch_dtype``), unknown keys included."""
        d: dict[str, Any] = {"model_type": "mistral"}
        d.update(self.extra)
        d.pop("model_type", None)
        d["model_type"] = "mistral"
        for name in _FIELDS:
            d[name] = getattr(self, name)
        d["id2label"] = {str(k): v for k, v in self.id2label.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, _source: str = "config", **overrides: Any) -> "MistralConfig":
        d = dict(d)
        d.pop("transformers_version", None)
        mt = d.pop("model_type", "mistral")
        if mt != "mistral":
            raise ConfigError(f"{_source}: key 'model_type' is {mt!r}; mistral_ft loads Mistral models only")
        if "num_labels" in overrides and "id2label" not in overrides:
            d.pop("id2label", None)  # a new head size replaces the checkpoint's label names
            d.pop("label2id", None)
        d.update(overrides)
        return cls(_source=_source, **d)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **overrides: Any) -> "MistralConfig":
        """Read ``config.json`` from a folder (or the file itself)."""
        p = Path(path)
        if p.is_dir():
            p = p / "config.json"
        if not p.is_file():
            raise FileNotFoundError(f"{p}: no config.json found")
        return cls.from_dict(read_json_object(p, ConfigError), _source=str(p), **overrides)

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / "config.json").write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def __repr__(self) -> str:
        return f"MistralConfig({self.to_json_string()})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, MistralConfig) and self.to_dict() == other.to_dict()

    def get(self, key: str, default: Any = None) -> Any:
        return getattr(self, key, self.extra.get(key, default))
