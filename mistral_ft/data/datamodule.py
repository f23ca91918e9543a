"""The LightningDataModule that the training tasks use.

`setup()` runs the whole pipeline (`build_datasets`) once per process; there is nothing to download
(hub datasets are fetched by `datasets` itself, cached), so `prepare_data` is empty. The train loader
is a `ResumableDataLoader`: a checkpoint taken mid-epoch resumes at the next unseen batch (see
`mistral_ft.data.sampler` for how Lightning 2.6 saves and restores it).
"""

from __future__ import annotations

from typing import Any, Optional

import lightning as L
from torch.utils.data import DataLoader

from mistral_ft.data.collate import Collator
from mistral_ft.data.config import PREFERENCE_FORMATS, DataConfig
from mistral_ft.data.dataset import DataInfo, TokenDataset, build_datasets
from mistral_ft.data.errors import DataError
from mistral_ft.data.formats import ChatTokenizer
from mistral_ft.data.preference import PairCollator, PairDataset, build_pair_datasets
from mistral_ft.data.sampler import ResumableDataLoader, ResumableSampler, loader_generator

TASKS = ("causal_lm", "classification", "dpo", "reward")  # dpo / reward take format "preference"


class MistralDataModule(L.LightningDataModule):
    """Train / validation loaders for one data config.

    Args:
        data_cfg: the `data:` config (dict, DictConfig or `DataConfig`); keys in `DataConfig`.
        tokenizer: a `MistralTokenizer` (or anything with its `encode` / `encode_chat`).
        task: "causal_lm" (formats text / alpaca / messages) or "classification"
            (formats classification / regression); checked against the data format.
        batch_size: per-device micro-batch size for training.
        eval_batch_size: for validation (default: `batch_size`).
        num_workers: DataLoader workers (default: the config's `num_workers`, itself 0).
    """

    def __init__(
        self,
        data_cfg: Any,
        tokenizer: ChatTokenizer,
        task: str,
        batch_size: int,
        eval_batch_size: Optional[int] = None,
        num_workers: Optional[int] = None,
    ) -> None:
        super().__init__()
        self.cfg = DataConfig.from_mapping(data_cfg)
        if task not in TASKS:
            raise DataError(f"task must be one of {list(TASKS)}, got {task!r}")
        preference = self.cfg.format in PREFERENCE_FORMATS
        if (task in ("dpo", "reward")) != preference or (not preference and (task == "causal_lm") != self.cfg.is_causal):
            raise DataError(f"data format {self.cfg.format!r} does not fit task {task!r}")
        if batch_size < 1:
            raise DataError(f"batch_size must be >= 1, got {batch_size}")
        self.tokenizer = tokenizer
        self.task = task
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = self.cfg.num_workers if num_workers is None else num_workers
        self.collator: Any = (PairCollator if preference else Collator)(
            pad_token_id=tokenizer.pad_token_id, pad_to_multiple_of=self.cfg.pad_to_multiple_of)
        self.train_dataset: Optional[TokenDataset | PairDataset] = None
        self.val_dataset: Optional[TokenDataset | PairDataset] = None
        self.info: Optional[DataInfo] = None

    def setup(self, stage: Optional[str] = None) -> None:
        """Build the datasets (once; later calls are no-ops)."""
        if self.train_dataset is None:
            build = build_pair_datasets if self.cfg.format in PREFERENCE_FORMATS else build_datasets
            self.train_dataset, self.val_dataset, self.info = build(self.cfg, self.tokenizer)

    def state_dict(self) -> dict[str, Any]:
        """Saved in every Lightning checkpoint: the data summary, so the label mapping travels with it."""
        return {"data_info": self.info.to_dict()} if self.info is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """On resume: refuse data whose label mapping differs from the one the checkpoint was trained with."""
        saved = state_dict.get("data_info", {}).get("id2label")
        if saved is None:
            return
        self.setup()
        assert self.info is not None
        now = self.info.to_dict()["id2label"]
        if now != saved:
            raise DataError(
                f"the checkpoint was trained with labels {saved}, but the data now gives {now}; "
                f"set 'labels: {list(saved.values())}' in the data config to keep the checkpoint's ids"
            )

    def train_dataloader(self) -> ResumableDataLoader:
        """Seeded, resumable, sharded over ranks; length-grouped when `group_by_length`."""
        self.setup()
        assert self.train_dataset is not None
        sampler = ResumableSampler(
            self.train_dataset,
            shuffle=True,
            seed=self.cfg.seed,
            lengths=self.train_dataset.lengths if self.cfg.group_by_length else None,
            batch_size=self.batch_size,
        )
        return ResumableDataLoader(
            self.train_dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            collate_fn=self.collator,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader | list:
        """In dataset order; an empty list (Lightning: no validation) when there is no validation set."""
        self.setup()
        if self.val_dataset is None:
            return []
        return DataLoader(
            self.val_dataset,
            batch_size=self.eval_batch_size,
            shuffle=False,
            generator=loader_generator(self.cfg.seed),
            collate_fn=self.collator,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )
