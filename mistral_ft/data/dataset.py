"""From a data config to tokenized train / validation datasets and a `DataInfo` summary.

Pipeline (each step a plain function call, in this order):
    load_split (validate local rows, load through `datasets`)
    -> normalize_row on every loaded row (errors name file:line, or count a skip)
    -> validation: `validation_file`, a hub `validation_split`, or a seeded `val_fraction` hold-out
    -> classification: label names from the train split (or the config's `labels`), names -> ids
    -> tokenize, truncate to `max_length`, reject rows whose every target got cut
    -> optional packing (causal only; example order shuffled with the seed first)
    -> `TokenDataset` (columns stored as arrow int32 via `datasets.Dataset.from_dict`)

Tokenizing and packing show a tqdm bar on global rank 0 when stderr is a terminal and `datasets`' own
progress bars are on (`datasets.disable_progress_bars()` / HF_DATASETS_DISABLE_PROGRESS_BARS=1 turn
both off); other ranks, logs and CI output stay quiet.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Optional

import datasets
from torch.utils.data import Dataset

from mistral_ft.data.collate import pack_examples
from mistral_ft.data.config import DataConfig
from mistral_ft.data.errors import DataError, RowError, tolerate
from mistral_ft.data.formats import (
    IGNORE_INDEX,
    ChatTokenizer,
    build_label_map,
    format_hint,
    normalize_row,
    resolve_label,
    tokenize_causal,
    tokenize_sequence,
)
from mistral_ft.data.loading import LoadedSplit, load_split

log = logging.getLogger(__name__)


@dataclasses.dataclass
class DataInfo:
    """What the data turned into; logged and saved with the run (`to_dict` is JSON-ready).

    `id2label` (classification) is what the model config's `id2label` must be; `num_labels` is 1
    for regression. Token counts are input tokens (`*_tokens`) and loss-bearing tokens
    (`*_target_tokens`) after truncation.
    """

    format: str
    task: str  # "causal_lm" | "classification"
    train_source: str
    validation_source: Optional[str]
    train_examples: int = 0
    val_examples: int = 0
    train_rows: int = 0  # = examples, or packed rows when packing
    val_rows: int = 0
    truncated: dict[str, int] = dataclasses.field(default_factory=lambda: {"train": 0, "validation": 0})
    skipped: dict[str, int] = dataclasses.field(default_factory=lambda: {"train": 0, "validation": 0})
    train_tokens: int = 0
    val_tokens: int = 0
    train_target_tokens: int = 0
    val_target_tokens: int = 0
    max_length: int = 0
    packed: bool = False
    id2label: Optional[dict[int, str]] = None
    num_labels: Optional[int] = None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (id2label keys become strings, as in HF config.json)."""
        out = dataclasses.asdict(self)
        if self.id2label is not None:
            out["id2label"] = {str(k): v for k, v in self.id2label.items()}
        return out

    def save(self, path: str | Path) -> None:
        """Write `to_dict()` as JSON (e.g. `<run>/data_info.json`)."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")

    @property
    def label2id(self) -> Optional[dict[str, int]]:
        """Inverse of `id2label`, for the model config."""
        return None if self.id2label is None else {v: k for k, v in self.id2label.items()}


class TokenDataset(Dataset):
    """Tokenized examples (or packed rows); `ds[i]` is a dict of python lists / scalars.

    `lengths[i]` is the token count of item i (for the length-grouped sampler).
    """

    def __init__(self, columns: dict[str, list[Any]]) -> None:
        features = {}
        for key, values in columns.items():
            if key == "label":
                is_float = any(isinstance(v, float) for v in values)
                features[key] = datasets.Value("float64" if is_float else "int64")
            else:
                features[key] = datasets.Sequence(datasets.Value("int32"))
        self.lengths = [len(x) for x in columns["input_ids"]]
        self.data = datasets.Dataset.from_dict(columns, features=datasets.Features(features))

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, idx: int) -> dict[str, Any]:
        return self.data[int(idx)]


@dataclasses.dataclass
class _Rows:
    locs: list[str]
    rows: list[dict[str, Any]]
    skipped: int


def progress(items: Iterable[Any], total: int, desc: str) -> Iterator[Any]:
    """`items` with a tqdm bar where one helps: global rank 0, stderr a terminal, `datasets`' bars enabled."""
    from datasets.utils.logging import is_progress_bar_enabled
    from lightning.fabric.utilities.rank_zero import rank_zero_only
    from tqdm.auto import tqdm

    quiet = getattr(rank_zero_only, "rank", 0) != 0 or not sys.stderr.isatty() or not is_progress_bar_enabled()
    return iter(tqdm(items, total=total, desc=desc, unit="ex", disable=quiet, leave=False, file=sys.stderr))


def _normalize(split: LoadedSplit, cfg: DataConfig) -> _Rows:
    locs, rows = [], []
    skipped = split.skipped
    for i, (loc, raw) in enumerate(zip(split.locs, split.dataset)):
        try:
            rows.append(normalize_row(raw, cfg, from_csv=split.from_csv))
            locs.append(loc)
        except RowError as err:
            hint = format_hint(raw, cfg) if i == 0 and not split.validated else None
            if hint is not None:  # the first row has another format's shape: refuse the split, not the row
                raise DataError(f"{loc}: {err}; {hint}") from None
            tolerate(DataError(f"{loc}: {err}"), cfg.skip_invalid)  # raises unless skipping or collecting
            skipped += 1
    if not rows:
        raise DataError(f"{split.source}: no valid rows ({skipped} skipped as invalid)")
    return _Rows(locs, rows, skipped)


def _hold_out(rows: _Rows, fraction: float, seed: int) -> tuple[_Rows, _Rows]:
    n = len(rows.rows)
    n_val = max(1, round(n * fraction))
    if n_val >= n:
        raise DataError(f"val_fraction={fraction} leaves no training rows out of {n}")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    val_idx, train_idx = sorted(order[:n_val]), sorted(order[n_val:])
    pick = lambda idx: _Rows([rows.locs[i] for i in idx], [rows.rows[i] for i in idx], 0)  # noqa: E731
    train, val = pick(train_idx), pick(val_idx)
    train.skipped = rows.skipped
    return train, val


def _tokenize(
    rows: _Rows, cfg: DataConfig, tokenizer: ChatTokenizer, names: Optional[list[str]], from_ids: bool
) -> tuple[dict[str, list[Any]], int, int]:
    """Rows -> columns; returns (columns, truncated, skipped here)."""
    ids_col: list[list[int]] = []
    other: list[Any] = []
    truncated = skipped = 0
    limit = cfg.max_length
    for loc, row in progress(zip(rows.locs, rows.rows), len(rows.rows), "tokenizing"):
        try:
            if cfg.is_causal:
                try:
                    ids, labels = tokenize_causal(row, tokenizer)
                except RowError as err:
                    raise DataError(f"{loc}: {err}") from None
                _check_ids(ids, tokenizer.vocab_size, loc)
                if len(ids) > limit and _has_tools(row):
                    raise DataError(
                        f"{loc}: a tool conversation of {len(ids)} tokens exceeds max_length={limit}; tool rows are "
                        "never truncated (the cut could remove the tool definitions or split a tool call; see "
                        "docs/tokenizers.md): raise max_length or shorten the row"
                    )
                if len(ids) > limit:
                    ids, labels = ids[:limit], labels[:limit]
                    truncated += 1
                    if all(x == IGNORE_INDEX for x in labels):
                        raise DataError(
                            f"{loc}: every target token was cut by truncation to max_length={limit} "
                            f"(raise max_length or shorten the prompt)"
                        )
                elif all(x == IGNORE_INDEX for x in labels):
                    raise DataError(f"{loc}: no target tokens (nothing to learn from this row)")
                other.append(labels)
            else:
                ids = tokenize_sequence(row, tokenizer)
                _check_ids(ids, tokenizer.vocab_size, loc)
                if len(ids) > limit:
                    ids = ids[:limit]
                    truncated += 1
                if cfg.format == "regression":
                    other.append(float(row["label"]))
                else:
                    assert names is not None
                    try:
                        other.append(resolve_label(row["label"], names, cfg.label_field, from_ids))
                    except RowError as err:
                        raise DataError(f"{loc}: {err}") from None
        except DataError as err:
            tolerate(err, cfg.skip_invalid)  # raises unless skipping or collecting
            skipped += 1
            continue
        ids_col.append(ids)
    key = "labels" if cfg.is_causal else "label"
    return {"input_ids": ids_col, key: other}, truncated, skipped


def _has_tools(row: dict[str, Any]) -> bool:
    return "tools" in row or any(m["role"] == "tool" or "tool_calls" in m for m in row.get("messages", ()))


def _check_ids(ids: list[int], vocab_size: int, loc: str) -> None:
    """Every id must have an embedding row: on CUDA an out-of-range id is a device assert that kills the job.

    The tokenizer's vocabulary is checked against the model's ``vocab_size`` when the model loads (it may
    not be larger), so ids below the tokenizer's size are safe for the model too.
    """
    top = max(ids, default=0)
    if top >= vocab_size or min(ids, default=0) < 0:
        bad = next(i for i in ids if not 0 <= i < vocab_size)
        raise DataError(f"{loc}: token id {bad} is outside the vocabulary [0, {vocab_size})")


def _finish(columns: dict[str, list[Any]], cfg: DataConfig, seed: int) -> dict[str, list[Any]]:
    if not cfg.pack:
        return columns
    pairs = list(zip(columns["input_ids"], columns["labels"]))
    random.Random(seed).shuffle(pairs)  # mix lengths and sources across rows, reproducibly
    packed = pack_examples(pairs, cfg.max_length, strategy="best_fit",
                           progress=lambda items: progress(items, len(pairs), "packing"))  # fuller rows; the sampler shuffles rows
    return {k: [row[k] for row in packed] for k in ("input_ids", "labels", "position_ids", "document_ids")}


def choose_splits(cfg: DataConfig) -> tuple[LoadedSplit, _Rows, Optional[_Rows], Optional[str]]:
    """(train split as loaded, train rows, validation rows or None, validation source): which rows validate."""
    train_split = load_split(cfg.train_file, cfg, cfg.split)
    train = _normalize(train_split, cfg)
    val: Optional[_Rows] = None
    val_source: Optional[str] = None
    if cfg.validation_file:
        val_split = load_split(cfg.validation_file, cfg, cfg.validation_split or "validation")
        val, val_source = _normalize(val_split, cfg), val_split.source
    elif cfg.validation_split:
        if train_split.one_split:
            raise DataError(f"{train_split.source}: a saved Dataset folder is one split, so it has no "
                            f"validation_split {cfg.validation_split!r}; use data.validation_file or data.val_fraction")
        val_split = load_split(cfg.train_file, cfg, cfg.validation_split)
        val, val_source = _normalize(val_split, cfg), val_split.source
    elif cfg.val_fraction:
        train, val = _hold_out(train, cfg.val_fraction, cfg.seed)
        val_source = f"{train_split.source} (val_fraction={cfg.val_fraction}, seed={cfg.seed})"
    return train_split, train, val, val_source


def validation_rows(data_cfg: Any) -> tuple[list[str], list[dict[str, Any]], Optional[str]]:
    """(locations, canonical rows, source) of the validation split exactly as `build_datasets` picks it
    (file, hub split or `val_fraction` hold-out); empty lists when there is no validation split."""
    cfg = DataConfig.from_mapping(data_cfg)
    _, _, val, source = choose_splits(cfg)
    return (val.locs, val.rows, source) if val is not None else ([], [], None)


def build_datasets(
    data_cfg: Any, tokenizer: ChatTokenizer
) -> tuple[TokenDataset, Optional[TokenDataset], DataInfo]:
    """The whole pipeline: returns (train, validation or None, info). See the module docstring."""
    cfg = DataConfig.from_mapping(data_cfg)
    train_split, train, val, val_source = choose_splits(cfg)

    names: Optional[list[str]] = None
    from_ids = False
    if cfg.format == "classification":
        names, from_ids = build_label_map([r["label"] for r in train.rows], cfg.labels)
    task = "causal_lm" if cfg.is_causal else "classification"
    info = DataInfo(cfg.format, task, train_split.source, val_source, max_length=cfg.max_length, packed=cfg.pack)
    if names is not None:
        info.id2label = dict(enumerate(names))
        info.num_labels = len(names)
    elif cfg.format == "regression":
        info.num_labels = 1

    cols, trunc, skip = _tokenize(train, cfg, tokenizer, names, from_ids)
    if not cols["input_ids"]:
        raise DataError(f"{train_split.source}: no usable examples ({train.skipped + skip} skipped)")
    info.train_examples, info.truncated["train"], info.skipped["train"] = len(cols["input_ids"]), trunc, train.skipped + skip
    info.train_tokens = sum(map(len, cols["input_ids"]))
    if cfg.is_causal:
        info.train_target_tokens = sum(sum(1 for x in lab if x != IGNORE_INDEX) for lab in cols["labels"])
    cols = _finish(cols, cfg, cfg.seed)
    train_ds = TokenDataset(cols)
    info.train_rows = len(train_ds)

    val_ds: Optional[TokenDataset] = None
    if val is not None:
        vcols, vtrunc, vskip = _tokenize(val, cfg, tokenizer, names, from_ids)
        if not vcols["input_ids"]:
            raise DataError(f"{val_source}: no usable validation examples ({val.skipped + vskip} skipped)")
        info.val_examples, info.truncated["validation"] = len(vcols["input_ids"]), vtrunc
        info.skipped["validation"] = val.skipped + vskip
        info.val_tokens = sum(map(len, vcols["input_ids"]))
        if cfg.is_causal:
            info.val_target_tokens = sum(sum(1 for x in lab if x != IGNORE_INDEX) for lab in vcols["labels"])
        vcols = _finish(vcols, cfg, cfg.seed + 1)
        val_ds = TokenDataset(vcols)
        info.val_rows = len(val_ds)
    for split in ("train", "validation"):
        if info.skipped[split]:
            source = info.train_source if split == "train" else info.validation_source
            log.warning("%s: skipped %d invalid %s rows (skip_invalid=true)", source, info.skipped[split], split)
        if info.truncated[split]:
            log.warning("truncated %d %s examples to max_length=%d", info.truncated[split], split, cfg.max_length)
    log.info(
        "data: %d train examples (%d rows, %d tokens), %d validation examples",
        info.train_examples, info.train_rows, info.train_tokens, info.val_examples,
    )
    return train_ds, val_ds, info
