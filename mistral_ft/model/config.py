"""MistralConfig: every field of the HF Mistral config, with Mistral-7B-v0.1 defaults.

config.json exists in two spellings in the wild:
  * hub checkpoints (and transformers 4.x) write ``rope_theta`` and ``torch_dtype``;
  * transformers 5 writes ``rope_parameters = {"rope_type": "default", "rope_theta": ...}`` and ``dtype``.
We read both and write the hub spelling, which every transformers version (and vLLM) reads.
Keys we do not know are kept in ``extra`` and written back unchanged, so a round trip loses nothing,
except keys that would change the numbers if another library read them and we did not: those are refused
(``quantization_config``, an unknown RoPE type, ``partial_rotary_factor``...), never carried silently.

Two fields beyond Mistral-7B-v0.1's, computed exactly as transformers 5 computes them:
  * ``layer_types``: a per-layer "sliding_attention" / "full_attention" list (Ministral). transformers builds its
    Ministral classes for it; we write ``model_type: "ministral"`` whenever the list makes a layer differ from
    what plain Mistral would compute, so every reader of an exported folder gets the same numbers.
  * yarn RoPE (``rope_parameters: {rope_type: yarn, ...}`` in 5.x, ``rope_scaling: {type: yarn, ...}`` in 4.x),
    kept normalised in ``rope_scaling`` and written in the 4.x spelling, which transformers 5 also reads.
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
    "layer_types": (None, (list, type(None))),
    "rope_scaling": (None, (dict, type(None))),
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
LAYER_TYPES = ("sliding_attention", "full_attention")
# Written only when set: transformers' MistralConfig warns about a `layer_types` key, even a null one.
_WRITTEN_WHEN_SET = ("layer_types", "rope_scaling")
# The yarn keys transformers 5.24's `_compute_yarn_parameters` reads (besides rope_type/rope_theta).
YARN_KEYS = ("factor", "original_max_position_embeddings", "attention_factor", "beta_fast", "beta_slow",
             "mscale", "mscale_all_dim", "truncate")
# config.json keys that change the numbers and that we do not compute: refused, never carried in `extra`.
_REFUSED_KEYS = {
    "quantization_config": "a quantized (e.g. FP8) checkpoint; mistral_ft loads unquantized weights only "
                           "(dequantize it first, or load the unquantized release)",
    "partial_rotary_factor": "partial rotary embeddings are not part of the Mistral architecture",
    "original_max_position_embeddings": "a top-level original_max_position_embeddings overrides the RoPE "
                                        "parameters in transformers; put it inside rope_parameters",
    "moe": "a mixture-of-experts model (Mixtral) is not this architecture",
    "num_local_experts": "a mixture-of-experts model (Mixtral) is not this architecture",
    "vision_config": "a vision model (Pixtral) is not this architecture",
    "text_config": "a multimodal wrapper config; point model.path at a text-only Mistral checkpoint",
    "attention_bias": "biases on the attention projections are not part of the Mistral architecture",
    "mlp_bias": "biases on the MLP projections are not part of the Mistral architecture",
    "num_experts_per_tok": "a mixture-of-experts model (Mixtral) is not this architecture",
}


def read_json_object(path: Path, error: type[Exception] = ValueError) -> dict[str, Any]:
    """Parse a JSON file that must hold an object; bad JSON raises ``error`` naming the file and line."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{path}: not UTF-8 text (byte {e.start}): not a JSON file") from None
    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        seen: dict[str, Any] = {}
        for key, value in pairs:
            if key in seen:  # json.loads would keep the later value silently
                raise error(f"{path}: duplicate key {key!r} in one JSON object (which value is meant?)")
            seen[key] = value
        return seen

    try:
        d = json.loads(text, object_pairs_hook=no_duplicates)
    except json.JSONDecodeError as e:
        raise error(f"{path}: line {e.lineno}: invalid JSON ({e.msg})") from None
    except RecursionError:  # json recurses per nesting level; a hostile or broken file can exceed the limit
        raise error(f"{path}: line {_too_deep_line(text)}: invalid JSON (nested deeper than the parser's "
                    "recursion limit)") from None
    if not isinstance(d, dict):
        raise error(f"{path}: expected a JSON object, got {type(d).__name__}")
    return d


def _too_deep_line(text: str, limit: int = 500) -> int:
    """The line where `text`'s bracket nesting first passes `limit` (strings skipped), for the error message."""
    depth, line, in_str, esc = 0, 1, False, False
    for ch in text:
        if ch == "\n":
            line += 1
        if in_str:
            esc, in_str = (not esc and ch == "\\"), in_str and (esc or ch != '"')
        elif ch == '"':
            in_str = True
        elif ch in "[{":
            depth += 1
            if depth > limit:
                return line
        elif ch in "]}":
            depth -= 1
    return 1


class MistralConfig:
    """Hyper-parameters of a Mistral model (the fields of transformers' ``MistralConfig``).

    Defaults are Mistral-7B-v0.1. ``head_dim`` defaults to ``hidden_size // num_attention_heads``.
    ``attn_implementation`` is a runtime choice ("sdpa" default, "eager", "flash_attention_2") and is not
    written to config.json. ``sliding_window=None`` means full causal attention.
    """

    model_type = "mistral"
    source_model_type = "mistral"  # "ministral" when read from a transformers Ministral config

    def __init__(self, *, _source: str = "MistralConfig", attn_implementation: str = "sdpa", **kwargs: Any):
        for key, why in _REFUSED_KEYS.items():
            if kwargs.get(key) not in (None, False):  # `"attention_bias": false` is what Mistral computes
                raise ConfigError(f"{_source}: key '{key}' is not supported: {why}")
        kwargs["rope_theta"], kwargs["rope_scaling"] = _read_rope(kwargs, _source)
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

    def check_architecture(self, expected: dict[str, Any] | None, where: str) -> None:
        """Raise unless every field in ``expected`` (a conf/model entry's ``architecture``) equals this config's."""
        for key, value in (expected or {}).items():
            if key not in _FIELDS:
                raise ConfigError(f"{where}: architecture key '{key}' is not a config.json field")
            actual = getattr(self, key)
            if actual != value and not (isinstance(value, (int, float)) and isinstance(actual, (int, float))
                                        and float(actual) == float(value)):
                raise ConfigError(f"{where}: the model's config.json has {key}={actual!r}, but the model entry's "
                                  f"architecture says {value!r}: is model.path the model this entry names?")

    def layer_window(self, layer_idx: int) -> int | None:
        """The sliding window of one layer: ``sliding_window`` unless ``layer_types`` makes it a full layer.

        Without ``layer_types`` every layer uses ``sliding_window`` (Mistral); with it, "sliding_attention"
        layers use ``sliding_window`` and "full_attention" layers none (Ministral's rule in transformers).
        """
        if self.layer_types is not None and self.layer_types[layer_idx] == "full_attention":
            return None
        return self.sliding_window

    @property
    def layer_windows(self) -> list[int | None]:
        return [self.layer_window(i) for i in range(self.num_hidden_layers)]

    @property
    def needs_ministral(self) -> bool:
        """True when ``layer_types`` gives some layer another window than transformers' Mistral would use."""
        return any(w != self.sliding_window for w in self.layer_windows)

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
        if self.layer_types is not None:
            if len(self.layer_types) != self.num_hidden_layers or any(t not in LAYER_TYPES for t in self.layer_types):
                raise ConfigError(f"{source}: key 'layer_types' must list one of {LAYER_TYPES} for each of the "
                                  f"{self.num_hidden_layers} layers, got {self.layer_types!r}")
            if "sliding_attention" in self.layer_types and self.sliding_window is None:
                raise ConfigError(f"{source}: key 'layer_types' has 'sliding_attention' layers but "
                                  f"'sliding_window' is null")
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
        d: dict[str, Any] = dict(self.extra)
        d["model_type"] = "ministral" if self.source_model_type == "ministral" or self.needs_ministral else "mistral"
        for name in _FIELDS:
            if name not in _WRITTEN_WHEN_SET or getattr(self, name) is not None:
                d[name] = getattr(self, name)
        d["id2label"] = {str(k): v for k, v in self.id2label.items()}
        if d["architectures"]:
            d["architectures"] = [_peer_class(d["model_type"], a) for a in d["architectures"]]
        return d

    def architecture_name(self, class_name: str) -> str:
        """The transformers class name for one of ours (``MinistralForCausalLM`` for a Ministral config)."""
        return _peer_class(self.to_dict()["model_type"], class_name)

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, _source: str = "config", **overrides: Any) -> "MistralConfig":
        d = dict(d)
        d.pop("transformers_version", None)
        mt = d.pop("model_type", "mistral")
        if mt not in ("mistral", "ministral"):  # Ministral = Mistral + per-layer `layer_types`
            raise ConfigError(f"{_source}: key 'model_type' is {mt!r}; mistral_ft loads Mistral models only")
        if "num_labels" in overrides and "id2label" not in overrides:
            d.pop("id2label", None)  # a new head size replaces the checkpoint's label names
            d.pop("label2id", None)
        d.update(overrides)
        config = cls(_source=_source, **d)
        config.source_model_type = mt
        return config

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


def _peer_class(model_type: str, name: str) -> str:
    return name.replace("Mistral", "Ministral", 1) if model_type == "ministral" and name.startswith("Mistral") else name


def _read_rope(kwargs: dict[str, Any], source: str) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, normalised yarn parameters or None) from either spelling; pops the RoPE keys from ``kwargs``.

    transformers 5 moves a 4.x ``rope_scaling`` into ``rope_parameters`` and takes ``rope_theta`` from inside the
    dict first, then from the top level. Giving both dicts is ambiguous (transformers silently prefers
    ``rope_scaling``): refused. Any type but default and yarn is refused, naming the field; so is a yarn key that
    transformers 5.24 does not read (it would be ignored there, so we cannot know what the writer meant).
    """
    params = kwargs.pop("rope_parameters", None)
    scaling = kwargs.pop("rope_scaling", None)
    theta = kwargs.pop("rope_theta", 10000.0)
    if params and scaling and params != scaling:
        raise ConfigError(f"{source}: both 'rope_parameters' and 'rope_scaling' are set; keep one")
    key, rope = ("rope_scaling", scaling) if scaling else ("rope_parameters", params)
    if not rope:
        return theta, None
    if not isinstance(rope, dict):
        raise ConfigError(f"{source}: key '{key}' must be an object, got {rope!r}")
    rope = dict(rope)
    kind = rope.pop("rope_type", None) or rope.pop("type", None) or "default"
    rope.pop("type", None)
    theta = rope.pop("rope_theta", theta)
    if kind == "default":
        if rope:
            raise ConfigError(f"{source}: key '{key}': unexpected field(s) {sorted(rope)} for the default RoPE")
        return theta, None
    if kind != "yarn":
        raise ConfigError(f"{source}: key '{key}': RoPE type {kind!r} is not supported (only 'default' and "
                          f"'yarn' are computed exactly)")
    unknown = sorted(set(rope) - set(YARN_KEYS))
    if unknown:
        raise ConfigError(f"{source}: key '{key}': unsupported yarn field(s) {unknown}; known: {list(YARN_KEYS)}")
    if "factor" not in rope:
        raise ConfigError(f"{source}: key '{key}': yarn needs 'factor'")
    for name in YARN_KEYS:
        value = rope.get(name)
        want = (bool,) if name == "truncate" else (int, float)
        if value is not None and (not isinstance(value, want) or (isinstance(value, bool) and bool not in want)):
            raise ConfigError(f"{source}: key '{key}.{name}' must be a number, got {value!r}"
                              if name != "truncate" else f"{source}: key '{key}.truncate' must be true or false")
    return theta, {"rope_type": "yarn", **rope}
