"""A deterministic, distributed, optionally length-grouped sampler, and a DataLoader that resumes mid-epoch.

How Lightning 2.6 restores data position (read in lightning/pytorch/loops/fit_loop.py and
utilities/combined_loader.py): when saving, `FitLoop.on_save_checkpoint` stores
`[loader.state_dict() for loader in combined_loader.flattened if isinstance(loader, _Stateful)]`
— the check is on the *DataLoader* object (anything with `state_dict` and `load_state_dict`), not on
its sampler. On resume, `FitLoop.setup_data` calls `loader.load_state_dict(state)` (only when
restarting) and then `iter()`; `set_epoch(epoch)` follows at the start of the epoch on the sampler.
Lightning does not fast-forward a plain DataLoader: it only warns that resuming mid-epoch "can cause
unreliable results". `torchdata`'s StatefulDataLoader is not installed here, so we implement the
small part we need:

- `ResumableDataLoader` counts the batches it has handed out in the current epoch (counted in the
  main process, as batches leave the iterator, so worker prefetching does not inflate the count;
  Lightning itself does not prefetch a sized loader) and saves {epoch, samples consumed per rank}.
- `ResumableSampler` skips that many indices of the same seeded permutation on the next `__iter__`.

Worked example: 10 samples, batch 2, one rank, checkpoint after 3 batches of epoch 0
-> state {"epoch": 0, "samples": 6, ...}; after restore, the first batch is the permutation's
entries 6-7, exactly the 4th batch of the uninterrupted run.

The sampler subclasses `DistributedSampler`, so Lightning does not replace it with its own under
DDP/FSDP (it only injects one when the sampler is not a DistributedSampler); we shard ourselves
the way DistributedSampler does (pad by repeating the start, then rank::world).

Random streams: a DataLoader draws its workers' base seed at every `iter()`, from the global torch
generator unless it has its own. That draw would shift the global stream (dropout masks) by one at each
epoch start in an uninterrupted run but not in one resumed mid-epoch, so `ResumableDataLoader` owns a
generator reseeded with `seed + epoch` at each `iter()`: worker seeds are a function of (seed, epoch)
(Lightning's worker_init_fn adds worker id and rank), and training's global streams are only drawn by
the model. `loader_generator` gives the evaluation loaders the same independence.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


class ResumableSampler(DistributedSampler):
    """Seeded per-epoch order, sharded across ranks, with an optional length grouping.

    shuffle=True: a permutation from `random.Random(seed + epoch)`. With `lengths` (group by
    length): the permutation is cut into mega-batches of `batch_size * world * megabatch_mult`
    indices, each sorted longest first, so a batch holds similar lengths (less padding) while
    mega-batch contents stay random across epochs. The longest batches come first in each
    mega-batch, which also surfaces out-of-memory early.
    """

    def __init__(
        self,
        dataset: Dataset,
        *,
        shuffle: bool = True,
        seed: int = 0,
        lengths: Optional[Sequence[int]] = None,
        batch_size: int = 1,
        megabatch_mult: int = 50,
        num_replicas: Optional[int] = None,
        rank: Optional[int] = None,
    ) -> None:
        world, this_rank = _world()
        num_replicas = world if num_replicas is None else num_replicas
        rank = this_rank if rank is None else rank
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=False)
        n = len(dataset)  # type: ignore[arg-type]
        if lengths is not None and len(lengths) != n:
            raise ValueError(f"lengths has {len(lengths)} entries for a dataset of {n}")
        self.lengths = list(lengths) if lengths is not None else None
        self.batch_size = batch_size
        self.megabatch_mult = megabatch_mult
        self._skip: Optional[tuple[int, int]] = None  # (epoch, samples of this rank to skip)

    def global_order(self, epoch: int) -> list[int]:
        """All indices of one epoch, before sharding (deterministic in seed and epoch)."""
        n = len(self.dataset)  # type: ignore[arg-type]
        order = list(range(n))
        if self.shuffle:
            random.Random(self.seed + epoch).shuffle(order)
        if self.lengths is not None:
            lengths = self.lengths
            mega = max(1, self.batch_size * self.num_replicas * self.megabatch_mult)
            grouped: list[int] = []
            for start in range(0, n, mega):
                chunk = order[start : start + mega]
                grouped.extend(sorted(chunk, key=lambda i: -lengths[i]))
            order = grouped
        return order

    def __iter__(self) -> Iterator[int]:
        order = self.global_order(self.epoch)
        total = self.num_samples * self.num_replicas
        if len(order) < total:  # pad so every rank gets the same count (as DistributedSampler does)
            order += (order * math.ceil((total - len(order)) / max(1, len(order))))[: total - len(order)]
        mine = order[self.rank : total : self.num_replicas]
        if self._skip is not None:
            epoch, skip = self._skip
            self._skip = None
            if epoch == self.epoch:
                mine = mine[skip:]
        return iter(mine)

    def skip_next(self, epoch: int, samples: int) -> None:
        """Make the next iteration of `epoch` start after `samples` indices of this rank."""
        self._skip = (epoch, samples)


class ResumableDataLoader(DataLoader):
    """A DataLoader whose position within an epoch survives a checkpoint (see the module docstring).

    Build it with a `ResumableSampler` as `sampler`. With any other sampler (Lightning swaps in a
    sequential one for `overfit_batches`) it is a plain DataLoader and saves an empty state.
    """

    def __init__(self, dataset: Dataset, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("generator", torch.Generator())
        super().__init__(dataset, *args, **kwargs)
        self._yielded = 0  # samples of this rank handed out in the current epoch
        self._epoch_of_count = 0

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        sampler = self.sampler
        if not isinstance(sampler, ResumableSampler):
            yield from super().__iter__()
            return
        start = sampler._skip[1] if sampler._skip is not None and sampler._skip[0] == sampler.epoch else 0
        self._epoch_of_count = sampler.epoch
        self._yielded = start
        if self.generator is not None:  # worker seeds from (seed, epoch), never from the global stream
            self.generator.manual_seed(sampler.seed + sampler.epoch)
        for batch in super().__iter__():
            self._yielded += _batch_len(batch)
            yield batch

    def state_dict(self) -> dict[str, Any]:
        """Position in the epoch; saved by Lightning inside the checkpoint's loop state."""
        sampler = self.sampler
        if not isinstance(sampler, ResumableSampler):
            return {}
        return {
            "epoch": self._epoch_of_count,
            "samples": self._yielded,
            "seed": sampler.seed,
            "dataset_len": len(sampler.dataset),  # type: ignore[arg-type]
            "num_replicas": sampler.num_replicas,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume after the samples already consumed in `state["epoch"]`."""
        sampler = self.sampler
        if not state or not isinstance(sampler, ResumableSampler):
            return
        expected = {"seed": sampler.seed, "dataset_len": len(sampler.dataset), "num_replicas": sampler.num_replicas}  # type: ignore[arg-type]
        for key, value in expected.items():
            if state.get(key) != value:
                raise ValueError(
                    f"cannot resume the data position: checkpoint has {key}={state.get(key)!r}, this run has "
                    f"{value!r} (same data, seed and number of ranks are needed to resume mid-epoch)"
                )
        sampler.set_epoch(int(state["epoch"]))
        sampler.skip_next(int(state["epoch"]), int(state["samples"]))
        self._epoch_of_count = int(state["epoch"])
        self._yielded = int(state["samples"])


def loader_generator(seed: int) -> torch.Generator:
    """A generator for an evaluation DataLoader, so its `iter()` does not draw from the global stream."""
    return torch.Generator().manual_seed(int(seed))


def _batch_len(batch: Any) -> int:
    if isinstance(batch, dict) and "num_pairs" in batch:  # preference batches: 2 rows per sample
        return int(batch["num_pairs"])
    if isinstance(batch, dict):
        batch = batch.get("input_ids", next(iter(batch.values())))
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0])
    return len(batch)
