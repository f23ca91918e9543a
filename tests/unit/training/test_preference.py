"""DPO and reward task modules: losses by hand, settings, the reference model (frozen copy, LoRA / DoRA /
QLoRA with the adapter disabled), dropout off at step 0, the reward model's loss by hand and its learning."""

from __future__ import annotations


import pytest
import torch

from mistral_ft.data.preference import PairCollator, build_pair_datasets
from mistral_ft.training.tasks import TaskSettings
from mistral_ft.training.tasks.preference import DPOTask
from mistral_ft.training.tasks.preference_loss import answer_logps, bradley_terry_loss, preference_loss, preference_settings

from helpers.preference import DATA, pairs, tiny  # noqa: F401 (shared fixtures)


def test_policy_equals_reference_at_step_zero_with_lora_dropout(tiny, pairs):
    """LoRA dropout 0.3 in the config: disable_dropout (default) keeps policy == reference, loss ln 2."""
    from mistral_ft.adapters.lora import apply_peft
    from mistral_ft.model import MistralForCausalLM

    model = apply_peft(MistralForCausalLM.from_pretrained(tiny[0]), {"method": "lora", "r": 4, "alpha": 8, "dropout": 0.3})
    task = DPOTask(model, TaskSettings.from_config({"preference": {}}))
    task.train()
    loss, n, (losses, stats) = task.loss_sum(PairCollator(0)([pairs[i] for i in range(3)]))
    assert n == 3 and torch.allclose(losses, torch.full((3,), 0.6931472), atol=1e-6)
    assert float(stats["reward_margin"].abs().max()) == 0.0


def test_full_finetune_reference_is_a_frozen_copy(tiny, pairs):
    from mistral_ft.model import MistralForCausalLM

    model = MistralForCausalLM.from_pretrained(tiny[0])
    task = DPOTask(model, TaskSettings.from_config({"preference": {"beta": 0.1}}))
    assert all(not p.requires_grad for p in task.ref_model.parameters())
    assert task.trainable_names() == {f"model.{n}" for n, _ in model.named_parameters()}
    with torch.no_grad():
        model.lm_head.weight.mul_(1.5)
    batch = PairCollator(0)([pairs[0], pairs[1]])
    ref = task.reference_logps(batch)
    expect = answer_logps(task.ref_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                          batch["labels"]).sum
    assert torch.equal(ref, expect)
    policy = answer_logps(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, batch["labels"]).sum
    assert not torch.allclose(ref, policy)


def test_losses_by_hand():
    c, r = torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -4.0])
    rc, rr = torch.tensor([-3.5, -5.0]), torch.tensor([-3.5, -4.5])
    nc, nr = torch.tensor([2.0, 4.0]), torch.tensor([3.0, 1.0])
    h = (c - rc) - (r - rr)  # [1.0, -0.5]
    sig = lambda x: torch.log(torch.sigmoid(x))  # noqa: E731
    loss, stats = preference_loss(c, r, rc, rr, chosen_count=nc, rejected_count=nr, beta=0.5, label_smoothing=0.1)
    assert torch.allclose(loss, -0.9 * sig(0.5 * h) - 0.1 * sig(-0.5 * h))
    assert torch.equal(stats["accuracy"], torch.tensor([1.0, 0.0]))
    assert torch.allclose(stats["margin"], 0.5 * h)
    ipo, _ = preference_loss(c, r, rc, rr, chosen_count=nc, rejected_count=nr, loss_type="ipo", beta=0.5)
    h_avg = (c - rc) / nc - (r - rr) / nr
    assert torch.allclose(ipo, (h_avg - 1.0) ** 2)
    rpo, stats = preference_loss(c, r, rc, rr, chosen_count=nc, rejected_count=nr, beta=0.5, rpo_alpha=2.0)
    assert torch.allclose(rpo, -sig(0.5 * h) + 2.0 * (-c / nc))
    bt, s = bradley_terry_loss(torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0]))
    assert torch.allclose(bt, torch.tensor([-torch.log(torch.sigmoid(torch.tensor(1.0))), -torch.log(torch.sigmoid(torch.tensor(-1.0)))]))
    assert torch.equal(s["accuracy"], torch.tensor([1.0, 0.0])) and torch.equal(s["margin"], torch.tensor([1.0, -1.0]))


def test_settings_are_checked():
    assert preference_settings({})["loss_type"] == "sigmoid"
    for bad, key in [({"loss_type": "kto"}, "loss_type"), ({"beta": 0}, "beta"), ({"label_smoothing": 0.5}, "label_smoothing"),
                     ({"loss_type": "ipo", "label_smoothing": 0.1}, "label_smoothing"), ({"betta": 1}, "unknown")]:
        with pytest.raises(ValueError, match=key):
            preference_settings({"preference": bad})


# ---- the reward model and QLoRA -------------------------------------------------------------------------
def _train(task, pairs, steps, lr, batch=8, seed=0):
    opt = torch.optim.AdamW([p for p in task.parameters() if p.requires_grad], lr=lr)
    g = torch.Generator().manual_seed(seed)
    task.train()
    for _ in range(steps):
        idx = torch.randint(len(pairs), (batch,), generator=g).tolist()
        loss_sum, n, _ = task.loss_sum(PairCollator(0)([pairs[i] for i in idx]))
        opt.zero_grad()
        (loss_sum / n).backward()
        opt.step()


def _accuracy(task, ds, key):
    task.eval()
    with torch.no_grad():
        _, _, (_, stats) = task.loss_sum(PairCollator(0)([ds[i] for i in range(len(ds))]))
    return float(stats[key].mean())


def test_reward_model_loss_by_hand_and_accuracy_rises(tiny, one_thread):
    from mistral_ft.adapters.lora import apply_peft
    from mistral_ft.model import MistralForSequenceClassification
    from mistral_ft.training.tasks.preference import RewardTask

    path, tok = tiny
    train, val, _ = build_pair_datasets({**DATA, "validation_file": "data/preference_val.jsonl"}, tok)
    torch.manual_seed(0)
    model = MistralForSequenceClassification.from_pretrained(path, num_labels=1)
    model = apply_peft(model, {"method": "lora", "r": 16, "alpha": 32, "dropout": 0.0}, task="classification")
    task = RewardTask(model, TaskSettings.from_config({"task": "reward"}))
    batch = PairCollator(0)([train[0], train[1], train[2]])
    loss_sum, n, (losses, stats) = task.loss_sum(batch)
    with torch.no_grad():  # the score of each row alone, at its last token (EOS), without padding
        scores = [float(model(input_ids=batch["input_ids"][i: i + 1, : int(batch["attention_mask"][i].sum())]).logits)
                  for i in range(6)]
    by_hand = sum(-torch.nn.functional.logsigmoid(torch.tensor(scores[i] - scores[i + 3])) for i in range(3))
    assert n == 3 and abs(float(loss_sum) - float(by_hand)) < 1e-5
    before = _accuracy(task, val, "accuracy")
    _train(task, train, steps=30, lr=1e-3)
    after = _accuracy(task, val, "accuracy")
    assert after >= before + 0.15 and after >= 0.7, (before, after)


@pytest.mark.parametrize("method", ["qlora", "dora"])
def test_dpo_reference_is_the_base_without_the_adapter(method, tiny, pairs, one_thread):
    """QLoRA: the reference is the NF4 base; DoRA: the base without magnitude or LoRA."""
    from mistral_ft.adapters.lora import apply_peft
    from mistral_ft.model import MistralForCausalLM

    model = apply_peft(MistralForCausalLM.from_pretrained(tiny[0]), {"method": method, "r": 4, "alpha": 8, "dropout": 0.1},
                       device=torch.device("cpu"))
    task = DPOTask(model, TaskSettings.from_config({"preference": {"beta": 0.1}}))
    batch = PairCollator(0)([pairs[i] for i in range(3)])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    ref = task.reference_logps(batch)
    with torch.no_grad(), model.disable_adapter():
        base = answer_logps(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, batch["labels"]).sum
    assert torch.equal(ref, base)
    task.train()
    loss_sum, n, (losses, stats) = task.loss_sum(batch)
    (loss_sum / n).backward()
    grads = [p.grad for name, p in model.named_parameters() if "lora_" in name]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert float(stats["reward_margin"].abs().max()) > 0  # the adapter moved the policy off the reference
