"""Preference tuning: DPO losses, log-probs and LoRA gradients against TRL 1.16's DPOTrainer; the reward
model's Bradley-Terry loss by hand; pair data validation and the truncation policy.

TRL runs on transformers' MistralForCausalLM loaded from the tiny model folder, with the same LoRA weights
as ours (copied after DPOTrainer wrapped the model, so its reference is the base with the adapter disabled,
as ours). Both are fed the same pre-tokenized pairs (TRL's own DataCollatorForPreference on our
prompt_ids/chosen_ids/rejected_ids), so no chat template can change a token. We call TRL's
`DPOTrainer._compute_loss` (policy + reference forwards, the loss) and compare its loss and the LoRA
gradients of one backward with ours, in fp32.
"""

from __future__ import annotations

import json
import tempfile
import warnings

import pytest
import torch

from mistral_ft.data import DataError
from mistral_ft.data.preference import PairCollator, build_pair_datasets
from mistral_ft.tasks.preference import DPOTask
from mistral_ft.tasks.preference_loss import answer_logps, bradley_terry_loss, preference_loss, preference_settings

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DATA = {"train_file": "data/preference_train.jsonl", "format": "preference", "max_length": 128}


@pytest.fixture(scope="module")
def tiny():
    from mistral_ft.model.tiny import tiny_model_path
    from mistral_ft.tokenizer import MistralTokenizer

    path = str(tiny_model_path())
    return path, MistralTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def pairs(tiny):
    train, _, _ = build_pair_datasets(DATA, tiny[1])
    return train


@pytest.fixture(scope="module")
def peers(tiny, one_thread):
    """(our LoRA model, a DPOTrainer holding transformers' model with the same LoRA weights)."""
    import datasets
    import peft
    import transformers
    from trl import DPOConfig, DPOTrainer

    from mistral_ft.adapters import apply_peft
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
    task = DPOTask(model, {"preference": settings})
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


def test_policy_equals_reference_at_step_zero_with_lora_dropout(tiny, pairs):
    """LoRA dropout 0.3 in the config: disable_dropout (default) keeps policy == reference, loss ln 2."""
    from mistral_ft.adapters import apply_peft
    from mistral_ft.model import MistralForCausalLM

    model = apply_peft(MistralForCausalLM.from_pretrained(tiny[0]), {"method": "lora", "r": 4, "alpha": 8, "dropout": 0.3})
    task = DPOTask(model, {"preference": {}})
    task.train()
    loss, n, (losses, stats) = task.loss_sum(PairCollator(0)([pairs[i] for i in range(3)]))
    assert n == 3 and torch.allclose(losses, torch.full((3,), 0.6931472), atol=1e-6)
    assert float(stats["reward_margin"].abs().max()) == 0.0


def test_full_finetune_reference_is_a_frozen_copy(tiny, pairs):
    from mistral_ft.model import MistralForCausalLM

    model = MistralForCausalLM.from_pretrained(tiny[0])
    task = DPOTask(model, {"preference": {"beta": 0.1}})
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


# ---- data ---------------------------------------------------------------------------------------------
def _write(tmp_path, rows, name="pairs.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


GOOD = {"prompt": "Greet Ben.", "chosen": "Hello Ben!", "rejected": "Hello Ana!"}


def test_both_row_shapes_give_the_same_tokens(tmp_path, tiny):
    conv = {"chosen": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Greet Ben."},
                       {"role": "assistant", "content": "Hello Ben!"}],
            "rejected": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Greet Ben."},
                         {"role": "assistant", "content": "Hello Ana!"}]}
    explicit = {"prompt": conv["chosen"][:2], "chosen": [{"role": "assistant", "content": "Hello Ben!"}], "rejected": "Hello Ana!"}
    train, _, _ = build_pair_datasets({**DATA, "train_file": _write(tmp_path, [conv, explicit])}, tiny[1])
    assert train[0] == train[1]
    tok = tiny[1]
    prompt_ids, _ = tok.encode_chat(conv["chosen"][:2], add_generation_prompt=True)
    full, mask = tok.encode_chat(conv["chosen"])  # SFT's encoding of the chosen conversation
    assert train[0]["prompt_ids"] == prompt_ids and train[0]["prompt_ids"] + train[0]["chosen_ids"] == full
    assert [bool(m) for m in mask] == [False] * len(prompt_ids) + [True] * len(train[0]["chosen_ids"])
    assert train[0]["chosen_ids"][-1] == tok.eos_token_id


@pytest.mark.parametrize("row, match", [
    ({"prompt": "Hi", "chosen": "Yes", "rejected": "Yes"}, "line 1.*field 'rejected': identical"),
    ({"prompt": "Hi", "chosen": "Yes"}, "line 1.*field 'rejected': missing"),
    ({"prompt": "Hi", "chosen": "  ", "rejected": "No"}, "line 1.*field 'chosen': empty text"),
    ({"prompt": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}], "chosen": "a", "rejected": "b"},
     "line 1.*field 'prompt\\[1\\].role': a prompt must end with a user message"),
    ({"prompt": "Hi", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"}, "field 'chosen\\[0\\].role'"),
    ({"chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "a"}],
      "rejected": [{"role": "user", "content": "Ho"}, {"role": "assistant", "content": "b"}]},
     "field 'rejected\\[0\\]': differs from chosen\\[0\\]"),
])
def test_bad_rows_name_file_line_and_field(tmp_path, tiny, row, match):
    path = _write(tmp_path, [GOOD, row], "bad.jsonl")
    with pytest.raises(DataError, match=match.replace("line 1", "bad.jsonl:2")):
        build_pair_datasets({**DATA, "train_file": path}, tiny[1])


def test_bad_row_is_skipped_and_counted_with_skip_invalid(tmp_path, tiny):
    path = _write(tmp_path, [GOOD, {"prompt": "Hi", "chosen": "Yes", "rejected": "Yes"}, GOOD])
    train, _, info = build_pair_datasets({**DATA, "train_file": path, "skip_invalid": True}, tiny[1])
    assert len(train) == 2 and info.skipped["train"] == 1


def test_truncation_policy(tmp_path, tiny):
    tok = tiny[1]
    prompt_len = len(tok.encode_chat([{"role": "user", "content": GOOD["prompt"]}], add_generation_prompt=True)[0])
    differ_early = {"prompt": GOOD["prompt"], "chosen": "yes one two three four", "rejected": "no one two three four"}
    differ_late = {"prompt": GOOD["prompt"], "chosen": "one two three four five six", "rejected": "one two three four five seven"}
    # answers cut at the end (keep_start), counted
    cfg = {**DATA, "train_file": _write(tmp_path, [differ_early]), "max_length": prompt_len + 3}
    train, _, info = build_pair_datasets(cfg, tok)
    assert info.truncated["train"] == 1 and len(train[0]["chosen_ids"]) == 3 and len(train[0]["rejected_ids"]) == 3
    assert train[0]["chosen_ids"] == tok.encode(differ_early["chosen"], add_bos=False)[:3]
    # cut until identical: refused with the row's location
    with pytest.raises(DataError, match="pairs.jsonl:1: chosen and rejected are identical once cut"):
        build_pair_datasets({**cfg, "train_file": _write(tmp_path, [differ_late])}, tok)
    # a prompt with no room for an answer: refused, or skipped and counted
    cfg = {**DATA, "train_file": _write(tmp_path, [GOOD, {**GOOD, "prompt": "word " * 200}]), "max_length": 64}
    with pytest.raises(DataError, match="pairs.jsonl:2: field 'prompt': the prompt is .* no room"):
        build_pair_datasets(cfg, tok)
    train, _, info = build_pair_datasets({**cfg, "skip_invalid": True}, tok)
    assert len(train) == 1 and info.skipped["train"] == 1


def test_packing_is_refused(tiny):
    with pytest.raises(DataError, match="pack"):
        build_pair_datasets({**DATA, "pack": True}, tiny[1])


def test_collator_keeps_pairs_together_and_the_loader_counts_pairs(pairs):
    from mistral_ft.data.sampler import _batch_len

    batch = PairCollator(0)([pairs[0], pairs[1], pairs[2]])
    assert batch["input_ids"].shape[0] == 6 and _batch_len(batch) == 3
    for i in range(3):
        chosen, rejected = batch["labels"][i], batch["labels"][i + 3]
        n = len(pairs[i]["prompt_ids"])
        assert torch.equal(batch["input_ids"][i, :n], batch["input_ids"][i + 3, :n])  # the same prompt
        assert (chosen[:n] == -100).all() and (rejected[:n] == -100).all()
        assert chosen[chosen != -100].tolist() == pairs[i]["chosen_ids"]
        assert rejected[rejected != -100].tolist() == pairs[i]["rejected_ids"]


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
    from mistral_ft.adapters import apply_peft
    from mistral_ft.model import MistralForSequenceClassification
    from mistral_ft.tasks.preference import RewardTask

    path, tok = tiny
    train, val, _ = build_pair_datasets({**DATA, "validation_file": "data/preference_val.jsonl"}, tok)
    torch.manual_seed(0)
    model = MistralForSequenceClassification.from_pretrained(path, num_labels=1)
    model = apply_peft(model, {"method": "lora", "r": 16, "alpha": 32, "dropout": 0.0}, task="classification")
    task = RewardTask(model, {})
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
    from mistral_ft.adapters import apply_peft
    from mistral_ft.model import MistralForCausalLM

    model = apply_peft(MistralForCausalLM.from_pretrained(tiny[0]), {"method": method, "r": 4, "alpha": 8, "dropout": 0.1},
                       device=torch.device("cpu"))
    task = DPOTask(model, {"preference": {"beta": 0.1}})
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


def test_validate_reports_every_bad_pair(tmp_path, capsys):
    from mistral_ft.validate import main

    path = _write(tmp_path, [GOOD, {"prompt": "Hi", "chosen": "Yes", "rejected": "Yes"}, GOOD, {"prompt": "Hi", "chosen": "a"}])
    rc = main(["recipe=dpo", "model=tiny", f"data.train_file={path}", "data.validation_file=null"])
    err = capsys.readouterr().err
    assert rc == 1 and "pairs.jsonl:2: field 'rejected': identical" in err and "pairs.jsonl:4: field 'rejected': missing" in err
    assert main(["recipe=dpo", "model=tiny"]) == 0
    assert "train examples: 200 valid" in capsys.readouterr().out


def test_cli_bad_pair_exits_2_with_file_line_and_no_run_folder(tmp_path, capsys):
    from mistral_ft.train import main

    path = _write(tmp_path, [GOOD, {"prompt": "Hi", "chosen": "Yes", "rejected": "Yes"}])
    run = tmp_path / "run"
    rc = main(["recipe=dpo", "model=tiny", f"data.train_file={path}", "data.validation_file=null", f"hydra.run.dir={run}"])
    err = capsys.readouterr().err
    assert rc == 2 and "pairs.jsonl:2: field 'rejected': identical" in err and "Traceback" not in err
    assert not run.exists()
