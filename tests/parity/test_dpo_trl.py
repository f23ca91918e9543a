"""DPO against TRL 1.16's DPOTrainer: loss, per-token log-probs and LoRA gradients, for each loss type.

TRL runs on transformers' MistralForCausalLM loaded from the tiny model folder, with the same LoRA weights
as ours (copied after DPOTrainer wrapped the model, so its reference is the base with the adapter disabled,
as ours). Both are fed the same pre-tokenized pairs (TRL's own DataCollatorForPreference on our
prompt_ids/chosen_ids/rejected_ids), so no chat template can change a token. We call TRL's
`DPOTrainer._compute_loss` (policy + reference forwards, the loss) and compare its loss and the LoRA
gradients of one backward with ours, in fp32.
"""

from __future__ import annotations

import tempfile
import warnings

import pytest
import torch

from mistral_ft.data.preference import PairCollator
from mistral_ft.training.tasks import TaskSettings
from mistral_ft.training.tasks.preference import DPOTask
from mistral_ft.training.tasks.preference_loss import answer_logps

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
from helpers.preference import DATA, pairs, tiny  # noqa: F401 (shared fixtures)


@pytest.fixture(scope="module")
def peers(tiny, one_thread):
    """(our LoRA model, a DPOTrainer holding transformers' model with the same LoRA weights)."""
    import datasets
    import peft
    import transformers
    from trl import DPOConfig, DPOTrainer

    from mistral_ft.adapters.lora import apply_peft
    from mistral_ft.model import MistralForCausalLM

    path, _ = tiny
    torch.manual_seed(0)
    ours = apply_peft(MistralForCausalLM.from_pretrained(path), {"method": "lora", "r": 4, "alpha": 8, "dropout": 0.0,
                                                                "target_modules": TARGETS})
    with torch.no_grad():  # B != 0: the policy differs from the reference
        for name, p in ours.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    theirs = transformers.MistralForCausalLM.from_pretrained(path, dtype=torch.float32)
    args = DPOConfig(output_dir=tempfile.mkdtemp(), report_to=[], use_cpu=True, per_device_train_batch_size=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = DPOTrainer(
            model=theirs, args=args, processing_class=transformers.AutoTokenizer.from_pretrained(path),
            train_dataset=datasets.Dataset.from_dict({"prompt": ["a"], "chosen": ["b"], "rejected": ["c"]}),
            peft_config=peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM"),
        )
    lora = {k: v for k, v in ours.state_dict().items() if "lora_" in k}
    result = trainer.model.load_state_dict(lora, strict=False)
    assert not result.unexpected_keys and all("lora_" not in k for k in result.missing_keys)
    return ours, trainer


def _trl_batch(items):
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    return DataCollatorForPreference(pad_token_id=0)([{k: list(v) for k, v in it.items()} for it in items])


def _trl_loss_and_grads(trainer, batches, loss_types, weights, beta, eps):
    trainer.loss_types, trainer.loss_weights, trainer.beta, trainer.label_smoothing = loss_types, weights, beta, eps
    trainer.model.train()
    trainer.model.zero_grad()
    total = 0.0
    for batch in batches:  # the mean over batches of equal size = the mean over their pairs
        loss = trainer._compute_loss(trainer.model, batch, False) / len(batches)
        loss.backward()
        total += float(loss)
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    return total, grads


def _our_loss_and_grads(model, items, settings):
    task = DPOTask(model, TaskSettings.from_config({"preference": settings}))
    task.train()
    model.zero_grad()
    loss_sum, n, _ = task.loss_sum(PairCollator(0)(items))
    (loss_sum / n).backward()
    return float(loss_sum / n), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _same_chosen_length(pairs, k):
    by_len: dict[int, list] = {}
    for i in range(len(pairs)):
        by_len.setdefault(len(pairs[i]["chosen_ids"]), []).append(pairs[i])
    return next(v[:k] for v in by_len.values() if len(v) >= k)


# (our settings, TRL loss types, TRL weights, TRL label smoothing, one TRL call per pair?)
CASES = {
    "sigmoid": ({"loss_type": "sigmoid", "beta": 0.1}, ["sigmoid"], [1.0], 0.0, False),
    "ipo": ({"loss_type": "ipo", "beta": 0.5}, ["ipo"], [1.0], 0.0, False),
    # RPO: TRL averages the NLL over the micro-batch's chosen tokens, we per pair: equal on equal chosen lengths
    "sigmoid+rpo": ({"loss_type": "sigmoid", "beta": 0.1, "rpo_alpha": 0.7}, ["sigmoid", "sft"], [1.0, 0.7], 0.0, False),
    # cDPO: TRL 1.16's sigmoid has no smoothing; its aot_unpaired is the cDPO formula once sorting is the identity
    "sigmoid+label_smoothing": ({"loss_type": "sigmoid", "beta": 0.2, "label_smoothing": 0.1}, ["aot_unpaired"], [1.0], 0.1, True),
    "robust": ({"loss_type": "robust", "beta": 0.1, "label_smoothing": 0.2}, ["robust"], [1.0], 0.2, False),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_loss_and_lora_gradients_match_trl(case, peers, pairs):
    ours, trainer = peers
    settings, loss_types, weights, eps, per_pair = CASES[case]
    items = _same_chosen_length(pairs, 3) if case == "sigmoid+rpo" else [pairs[i] for i in range(4)]
    batches = [_trl_batch([it]) for it in items] if per_pair else [_trl_batch(items)]
    their_loss, their_grads = _trl_loss_and_grads(trainer, batches, loss_types, weights, settings["beta"], eps)
    our_loss, our_grads = _our_loss_and_grads(ours, items, settings)
    assert abs(our_loss - their_loss) < 1e-5, (our_loss, their_loss)
    assert our_loss != pytest.approx(0.6931, abs=1e-3) or case == "ipo"  # the policy is not the reference
    assert set(our_grads) == set(their_grads) and len(our_grads) == 2 * len(TARGETS) * 2
    worst = max(float((our_grads[k] - their_grads[k]).abs().max()) for k in our_grads)
    scale = max(float(g.abs().max()) for g in our_grads.values())
    assert worst < 1e-5 and scale > 1e-4, (worst, scale)


def test_per_token_log_probs_match_trl(peers, pairs):
    ours, trainer = peers
    items = [pairs[i] for i in range(4)]
    batch, ob = _trl_batch(items), PairCollator(0)(items)
    assert torch.equal(batch["input_ids"], ob["input_ids"])
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    mask = batch["completion_mask"][:, 1:].bool()
    with torch.no_grad():
        theirs = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels,
                               fused_lm_head=True).log_probs
        mine = answer_logps(ours(input_ids=ob["input_ids"], attention_mask=ob["attention_mask"]).logits, ob["labels"])
    assert torch.equal(mine.count, mask.sum(1).float())
    assert float((mine.per_token[mask] - theirs[mask]).abs().max()) < 1e-5
    assert float((mine.sum - (theirs * mask).sum(1)).abs().max()) < 1e-5
