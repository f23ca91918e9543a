"""Training data: load (through `datasets`), validate, format, tokenize, mask, pack, collate, sample.

Public API::

    from mistral_ft.data import MistralDataModule, build_datasets, DataConfig, DataError

    dm = MistralDataModule(cfg.data, tokenizer, task="causal_lm", batch_size=8)   # or "classification"
    dm.setup()                     # runs the pipeline once; dm.info is a DataInfo
    dm.info.to_dict()              # counts, truncated, skipped, tokens, id2label -> save with the run
    dm.info.id2label               # {0: "neg", 1: "pos", ...} for the model config (classification)
    dm.info.num_labels             # len(id2label); 1 for regression
    trainer.fit(module, datamodule=dm)

    train_ds, val_ds, info = build_datasets(cfg.data, tokenizer)   # without Lightning

Data config keys (`DataConfig`, unknown keys are an error, keys starting with "_" are ignored):
    train_file (required: .json/.jsonl/.csv/.parquet/.txt path, a save_to_disk folder, or a hub dataset
    name), format ("text" | "alpaca" | "messages" | "sharegpt" | "classification" | "regression" |
    "preference"), validation_file, val_fraction, split / validation_split / hub_config (hub, saved
    DatasetDict), text_field, instruction_field, input_field, output_field, messages_field,
    conversations_field, tools_field, train_on, txt_document, label_field, labels, prompt_field,
    chosen_field, rejected_field, max_length, pack, group_by_length, skip_invalid, pad_to_multiple_of,
    seed, num_workers. Defaults of a run: conf/data/base/keys.yaml; row shapes: docs/data.md.

Examples (items of the datasets):
    causal:          {"input_ids": list[int], "labels": list[int]}  labels UNSHIFTED: labels[i] is
                     input_ids[i] where token i is a target, else -100; BOS never a target.
    packed (causal): + "position_ids" (restart at 0 per example) + "document_ids" (0, 1, ... per row).
    classification:  {"input_ids": list[int], "label": int}  (regression: float)
    preference:      {"prompt_ids", "chosen_ids", "rejected_ids"}: one whole pair (mistral_ft.data.preference)

Batches (`Collator`, right padding to the batch max, optionally a multiple of N):
    input_ids (B, T) long, pad 0 | attention_mask (B, T) long, 1 = real token
    labels (B, T) long, pad -100 (causal) | labels (B,) long / float (classification / regression)
    packed only: position_ids (B, T) pad 0, document_ids (B, T) pad -1 -> pass both to the model.

Bad data raises `DataError` (a ValueError) "FILE:LINE: field 'x': what is wrong" (CSV / parquet:
"FILE:row N"); with `skip_invalid: true` such rows are skipped and counted in `info.skipped`.
"""

from mistral_ft.data.collate import PAD_DOCUMENT_ID, Collator, pack_examples
from mistral_ft.data.config import CAUSAL_FORMATS, FORMATS, SEQUENCE_FORMATS, DataConfig
from mistral_ft.data.datamodule import MistralDataModule
from mistral_ft.data.dataset import DataInfo, TokenDataset, build_datasets
from mistral_ft.data.errors import DataError, collect_problems
from mistral_ft.data.formats import IGNORE_INDEX, normalize_row, tokenize_causal
from mistral_ft.data.loading import load_split, resolve_data_path
from mistral_ft.data.sampler import ResumableDataLoader, ResumableSampler

__all__ = [
    "CAUSAL_FORMATS",
    "FORMATS",
    "IGNORE_INDEX",
    "PAD_DOCUMENT_ID",
    "SEQUENCE_FORMATS",
    "Collator",
    "DataConfig",
    "DataError",
    "DataInfo",
    "MistralDataModule",
    "ResumableDataLoader",
    "ResumableSampler",
    "TokenDataset",
    "build_datasets",
    "collect_problems",
    "load_split",
    "normalize_row",
    "pack_examples",
    "resolve_data_path",
    "tokenize_causal",
]
