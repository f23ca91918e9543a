"""Instruction tuning / continued pre-training of a causal LM.

Prompt masking happens in the data pipeline (prompt tokens carry label -100); this module sums the
token losses (the model's `loss_reduction="sum"`) so that `FineTuneTask` can weight an optimizer
step by its target tokens, and reports validation loss and perplexity over all validation tokens.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from mistral_ft.training.tasks.base import IGNORE_INDEX, FineTuneTask


def count_targets(labels: torch.Tensor) -> int:
    """Targets the model's shifted loss counts: position t predicts labels[t + 1] unless it is -100."""
    return int((labels[..., 1:] != IGNORE_INDEX).sum())


class CausalLMTask(FineTuneTask):
    """Holds a `MistralForCausalLM` (or its peft wrapper); batches come from the data collator."""

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Count targets and tokens on the host, before the batch moves to the GPU: no device sync later."""
        if isinstance(batch, dict) and "labels" in batch:
            batch["num_targets"] = (int(batch["target_index"].numel()) if "target_index" in batch
                                    else count_targets(batch["labels"]))
        return super().on_before_batch_transfer(batch, dataloader_idx)

    def loss_sum(self, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, int, Any]:
        labels = batch["labels"]
        # packed rows; and what the collator computed on the host (varlen segments, target positions), so
        # the forward needs no device sync to find them
        extra = {k: batch[k] for k in ("position_ids", "document_ids", "cu_seq_lens", "max_seq_len") if k in batch}
        chunk = self.settings.loss_chunk_size
        if chunk and "target_index" in batch:
            extra["target_index"] = batch["target_index"]
        out = self.model(
            input_ids=batch["input_ids"],
            attention_mask=batch.get("attention_mask"),
            labels=labels,
            loss_reduction="sum",
            # fused linear + cross-entropy, chunk by chunk: (B, T, V) fp32 logits never exist
            loss_chunk_size=chunk or None,
            return_logits=not chunk,
            **extra,
        )
        n = batch["num_targets"] if "num_targets" in batch else count_targets(labels)
        return out.loss, int(n), out

    # Set by the run (mistral_ft.training.run) when eval.enabled: a GenerationEval over the validation chats.
    generation_eval: Any = None

    def val_metrics(self, val_loss: float) -> dict[str, float]:
        # exp of the token-weighted mean NLL; capped so a diverged run logs a number, not inf
        metrics = {"val_ppl": math.exp(min(val_loss, 50.0))}
        if self.generation_eval is not None and not self.trainer.sanity_checking:
            metrics.update({f"val_{k}": v for k, v in self.run_generation_eval().items()})
        return metrics

    def on_train_start(self) -> None:
        # the baseline: what the model answers before the first optimizer step (not on resume)
        # (not under FSDP2: the sharded root is initialised lazily by its first forward, which has not run yet)
        from torch.distributed.fsdp import FSDPModule

        if self.generation_eval is not None and self.global_step == 0 and self.generation_eval.before is None \
                and not isinstance(self.model, FSDPModule):
            self.run_generation_eval(before=True)
        super().on_train_start()  # starts the training clock after the baseline

    def run_generation_eval(self, before: bool = False) -> dict[str, float]:
        """Greedy answers to the validation chats, scored (every rank takes part: see training.evaluation)."""
        strategy = self.trainer.strategy
        world = int(self.trainer.world_size)

        def reduce_sum(value: float) -> float:
            return float(strategy.reduce(torch.tensor(value, device=self.device, dtype=torch.float64), reduce_op="sum"))

        def gather(rows: list) -> list:
            if world == 1 or not torch.distributed.is_initialized():
                return rows
            everyone: list = [None] * world
            torch.distributed.all_gather_object(everyone, rows)
            return [r for part in everyone for r in part]

        run = self.generation_eval.run_before if before else self.generation_eval.run
        # FSDP2: generate() calls the inner model, not the sharded root (the peft wrapper), so the root's
        # pre-forward hook that gathers embeddings / norm / lm_head never fires; gather them for the whole
        # evaluation instead (the decoder layers gather themselves as they run)
        from torch.distributed.fsdp import FSDPModule

        sharded_root = isinstance(self.model, FSDPModule)
        if sharded_root:
            self.model.unshard()
        try:
            metrics = run(self.model, rank=int(self.global_rank), world=world, reduce_sum=reduce_sum, gather=gather)
        finally:
            if sharded_root:
                self.model.reshard()
        if self.global_rank == 0:  # the sample table to TensorBoard / W&B where those loggers are on
            self.generation_eval.log_table(self.trainer.loggers, int(self.global_step))
        return metrics
