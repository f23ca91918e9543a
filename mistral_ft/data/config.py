"""The `data:` config group as a dataclass.

Hydra hands us a DictConfig; we turn it into a `DataConfig` once so that a typo
(`max_lenght`) fails at start-up with the list of valid keys instead of being
silently ignored, and so that the rest of the package works on plain, typed values.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Optional

from mistral_ft.data.errors import DataError

CAUSAL_FORMATS = ("text", "alpaca", "messages", "sharegpt")
SEQUENCE_FORMATS = ("classification", "regression")
PREFERENCE_FORMATS = ("preference",)  # pairs for DPO and reward models (mistral_ft.data.preference)
FORMATS = CAUSAL_FORMATS + SEQUENCE_FORMATS + PREFERENCE_FORMATS
TRAIN_ON = ("all", "last")
TXT_DOCUMENTS = ("block", "file")  # a .txt file: one document per blank-line block, or the whole file


@dataclasses.dataclass
class DataConfig:
    """Everything the data pipeline needs to know; field names are the YAML keys.

    `train_file` / `validation_file` are local files (.json, .jsonl, .csv, .parquet, .txt, chosen by
    extension), a `datasets` `save_to_disk` folder, or, when no such path exists, a Hugging Face hub
    dataset name (`split` / `validation_split` / `hub_config` select from it). The run's defaults live
    in conf/data/base/keys.yaml (a test keeps them equal to these).
    """

    train_file: str
    format: str = "messages"
    validation_file: Optional[str] = None
    # Without a validation file: hold out this fraction of the train rows (0 = no validation).
    val_fraction: float = 0.0
    split: str = "train"
    validation_split: Optional[str] = None
    hub_config: Optional[str] = None
    text_field: str = "text"
    instruction_field: str = "instruction"
    input_field: str = "input"
    output_field: str = "output"
    messages_field: str = "messages"
    conversations_field: str = "conversations"  # sharegpt: the row key holding [{from, value}, ...]
    tools_field: str = "tools"
    # Which assistant turns of a messages row are trained: "all" (those without weight 0) or "last"
    # (only the final one: mistral-finetune's rule for tool rows, whose earlier turns are context).
    train_on: str = "all"
    # A .txt file (format text): "block" = one document per run of non-blank lines, "file" = the whole file.
    txt_document: str = "block"
    label_field: str = "label"
    prompt_field: str = "prompt"  # preference: optional; without it chosen/rejected are whole conversations
    chosen_field: str = "chosen"
    rejected_field: str = "rejected"
    # Classification label names in id order; None = sorted names found in the train split.
    labels: Optional[list[str]] = None
    max_length: int = 1024
    pack: bool = False
    group_by_length: bool = False
    skip_invalid: bool = False
    pad_to_multiple_of: Optional[int] = None
    seed: int = 42
    num_workers: int = 0

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any] | "DataConfig") -> "DataConfig":
        """Build from a dict / DictConfig; keys starting with "_" (Hydra's `_target_`) are ignored."""
        if isinstance(cfg, DataConfig):
            return cfg
        if not isinstance(cfg, Mapping):
            try:  # OmegaConf DictConfig is a MutableMapping, but be lenient with other config objects
                from omegaconf import OmegaConf

                cfg = OmegaConf.to_container(cfg, resolve=True)  # type: ignore[assignment]
            except Exception as err:
                raise DataError(f"data config: expected a mapping, got {type(cfg).__name__}") from err
        raw = {str(k): v for k, v in dict(cfg).items() if not str(k).startswith("_")}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise DataError(f"data config: unknown key(s) {unknown}; valid keys are {sorted(known)}")
        if "train_file" not in raw or raw["train_file"] in (None, ""):
            raise DataError("data config: 'train_file' is required (a local file or a hub dataset name)")
        if raw.get("labels") is not None:
            raw["labels"] = [str(x) for x in raw["labels"]]
        out = cls(**raw)
        out.validate()
        return out

    def validate(self) -> None:
        """Check value ranges and combinations that would otherwise fail deep inside training."""
        if self.train_on not in TRAIN_ON:
            raise DataError(f"data config: field 'train_on': {self.train_on!r} is not one of {list(TRAIN_ON)}")
        if self.txt_document not in TXT_DOCUMENTS:
            raise DataError(f"data config: field 'txt_document': {self.txt_document!r} is not one of {list(TXT_DOCUMENTS)}")
        if self.format not in FORMATS:
            raise DataError(f"data config: field 'format': {self.format!r} is not one of {list(FORMATS)}")
        if not isinstance(self.max_length, int) or self.max_length < 2:
            raise DataError(f"data config: field 'max_length': must be an int >= 2, got {self.max_length!r}")
        if not 0.0 <= float(self.val_fraction) < 1.0:
            raise DataError(f"data config: field 'val_fraction': must be in [0, 1), got {self.val_fraction!r}")
        if self.validation_file and self.val_fraction:
            raise DataError("data config: give either 'validation_file' or 'val_fraction', not both")
        if self.pack and self.format not in CAUSAL_FORMATS:
            raise DataError(f"data config: field 'pack': packing is only for causal formats {list(CAUSAL_FORMATS)}")
        if self.pad_to_multiple_of is not None and (
            not isinstance(self.pad_to_multiple_of, int) or self.pad_to_multiple_of < 1
        ):
            raise DataError(f"data config: field 'pad_to_multiple_of': must be a positive int, got {self.pad_to_multiple_of!r}")
        if not isinstance(self.num_workers, int) or self.num_workers < 0:
            raise DataError(f"data config: field 'num_workers': must be an int >= 0, got {self.num_workers!r}")
        if self.labels is not None:
            if self.format != "classification":
                raise DataError("data config: field 'labels': only used with format 'classification'")
            if len(self.labels) < 2 or len(set(self.labels)) != len(self.labels):
                raise DataError(f"data config: field 'labels': need >= 2 distinct names, got {self.labels!r}")

    @property
    def is_causal(self) -> bool:
        """True for formats that train a causal LM (text / alpaca / messages / sharegpt)."""
        return self.format in CAUSAL_FORMATS
