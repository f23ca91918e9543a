"""The training step reads device values back on the host once per optimizer step (issue 15.3), counted on CPU.

Before: a float(reduce(...)) before the first backward, two after the last one, and one reduction per
gradient in the non-finite probe. Now: one read after the last backward (the non-finite stop needs it),
nothing in training_step, and the gradient rescale is one fused multiply.
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from helpers.host_reads import count_host_reads


def _fit(micro_batches: list[dict], accumulate: int, steps: int, grads: dict | None = None):
    import lightning as L

    from mistral_ft.model import MistralConfig, MistralForCausalLM
    from mistral_ft.training.tasks import CausalLMTask
    from mistral_ft.training.tasks.base import TaskSettings

    torch.manual_seed(0)
    model = MistralForCausalLM(MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64))
    cfg = {"optimizer": {"name": "adamw", "lr": 0.0 if grads is not None else 1e-3, "weight_decay": 0.0, "betas": [0.9, 0.999], "eps": 1e-8},
           "scheduler": {"name": "constant", "warmup_steps": 0, "min_lr_ratio": 1.0}, "task": "causal_lm",
           "model": {"loss_chunk_size": 16}}

    class Capture(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            # after the first optimizer step (lr 0 then) its rescaled gradients are still there
            if grads is not None and not grads and batch_idx == accumulate - 1:
                grads.update({n: p.grad.clone() for n, p in pl_module.named_parameters() if p.grad is not None})

    task = CausalLMTask(model, TaskSettings.from_config(cfg), cfg)
    trainer = L.Trainer(max_steps=steps, accumulate_grad_batches=accumulate, accelerator="cpu", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=0, callbacks=[Capture()])
    trainer.fit(task, train_dataloaders=DataLoader(micro_batches, batch_size=None))
    return task


def _micro_batches(n: int) -> list[dict]:
    from mistral_ft.data.collate import Collator

    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        rows = []
        for length in (5 + i, 9):
            ids = torch.randint(3, 64, (length,), generator=g).tolist()
            rows.append({"input_ids": ids, "labels": [-100, -100] + ids[2:]})
        out.append(Collator(pad_token_id=0)(rows))
    return out


def test_one_host_read_per_optimizer_step():
    accumulate, steps = 3, 2
    micro = _micro_batches(accumulate * steps)
    with count_host_reads() as counts:
        task = _fit(micro, accumulate, steps)
    assert task.global_step == steps and len(task.loss_history) == steps
    # the step code's reads (the model's are counted in tests/unit/model/test_hot_path.py); the batch hook
    # counts tokens on host tensors, before the transfer
    step_reads = {k: v for k, v in counts.items()
                  if k[1] in ("base.py", "causal_lm.py", "reliability.py") and k[2] != "on_before_batch_transfer"}
    assert step_reads == {("__float__", "base.py", "on_before_optimizer_step"): steps}, step_reads


def test_fused_rescale_gives_the_token_weighted_gradient():
    """The foreach rescale equals the gradient of (summed token loss of all micro-batches) / (all targets)."""
    from mistral_ft.model import MistralConfig, MistralForCausalLM

    micro = _micro_batches(3)
    grads: dict = {}
    _fit(micro, accumulate=3, steps=1, grads=grads)
    torch.manual_seed(0)
    ref = MistralForCausalLM(MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64))
    total = sum(ref(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"],
                    loss_reduction="sum").loss for b in micro)
    n = sum(int(b["target_index"].numel()) for b in micro)
    (total / n).backward()
    for name, p in ref.named_parameters():
        assert (grads["model." + name] - p.grad).abs().max() < 1e-6 * max(1.0, p.grad.abs().max().item()), name
