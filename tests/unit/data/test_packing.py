"""Packing changes no numbers: per-token losses, the token-weighted loss and the LoRA gradients of packed rows
equal those of the examples run one by one (our model, peft LoRA, the data package's packer and collator)."""

from __future__ import annotations

import peft
import pytest
import torch
import torch.nn.functional as F

from conftest import make_ours
from mistral_ft import MistralForCausalLM
from mistral_ft.data import Collator, pack_examples


def _examples(seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n, prompt in ((7, 3), (12, 5), (4, 2), (9, 4), (15, 6)):  # some longer than the window (5)
        ids = [1] + torch.randint(3, 128, (n - 1,), generator=g).tolist()
        labels = [-100] * prompt + ids[prompt:]
        out.append((ids, labels))
    return out


def _lora_model():
    model = make_ours(MistralForCausalLM).train()
    cfg = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,
                          target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    torch.manual_seed(1)
    return peft.get_peft_model(model, cfg)


def _token_losses(logits, labels):
    shift = F.pad(labels, (0, 1), value=-100)[..., 1:]
    return F.cross_entropy(logits.float().transpose(1, 2), shift, ignore_index=-100, reduction="none")


def test_packed_losses_and_lora_gradients_equal_unpacked():
    examples = _examples()
    model = _lora_model()
    lora = [p for n, p in model.named_parameters() if p.requires_grad]
    # unpacked: one example at a time, summed token losses, divided by all targets
    per_token_ref, total = [], torch.zeros(())
    n_targets = sum(sum(1 for x in lab[1:] if x != -100) for _, lab in examples)
    for ids, labels in examples:
        x, y = torch.tensor([ids]), torch.tensor([labels])
        out = model(input_ids=x, labels=y, loss_reduction="sum")
        per_token_ref.append(_token_losses(out.logits, y)[0][torch.tensor(labels[1:] + [-100]) != -100])
        total = total + out.loss
    (total / n_targets).backward()
    ref_grads = [p.grad.clone() for p in lora]
    model.zero_grad()

    rows = pack_examples(examples, 24, strategy="best_fit")
    assert len(rows) < len(examples)
    batch = Collator()(rows)
    for chunk in (None, 7):  # plain and chunked (fused) loss
        model.zero_grad()
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    position_ids=batch["position_ids"], document_ids=batch["document_ids"], labels=batch["labels"],
                    loss_reduction="sum", loss_chunk_size=chunk, return_logits=True)
        assert abs(out.loss.item() - total.item()) < 1e-4
        (out.loss / n_targets).backward()
        for a, b in zip(ref_grads, [p.grad for p in lora]):
            assert (a - b).abs().max() < 1e-5
    # per-token losses: every target token of every example, packed vs alone
    packed = _token_losses(out.logits, batch["labels"])
    shifted = F.pad(batch["labels"], (0, 1), value=-100)[..., 1:]
    got = sorted(packed[shifted != -100].tolist())
    want = sorted(torch.cat(per_token_ref).tolist())
    assert len(got) == len(want) == n_targets
    assert max(abs(a - b) for a, b in zip(got, want)) < 1e-5


def test_attention_auto_picks_sdpa_on_cpu():
    from mistral_ft.model.attention import resolve_attn_implementation

    assert resolve_attn_implementation("auto", "cpu") == "sdpa"
    assert resolve_attn_implementation("eager", "cpu") == "eager"
    # on CUDA without flash-attn installed: FlexAttention (decided without touching a GPU)
    assert resolve_attn_implementation("auto", "cuda") in ("flex_attention", "flash_attention_2")


@pytest.mark.slow
def test_compiled_layers_give_the_same_loss_and_gradients():
    """model.compile=true compiles each decoder layer; numbers must not move (CPU inductor, slow to build)."""
    model = make_ours(MistralForCausalLM).train()
    x = torch.randint(1, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    ref = model(x, labels=x)
    ref.loss.backward()
    ref_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    for layer in model.model.layers:
        layer.compile()
    out = model(x, labels=x)
    out.loss.backward()
    assert abs(out.loss.item() - ref.loss.item()) < 1e-5
    for a, p in zip(ref_grads, model.parameters()):
        assert (a - p.grad).abs().max() < 1e-5
