"""Checks that need one CUDA device (marker ``gpu``; skipped without CUDA). Run by scripts/gpu_check.sh.

Each compares a GPU path with a reference on the same weights: bf16 vs fp32 training step, SDPA and
FlexAttention vs eager (forward and backward; window, padding, packing), flash-attn 2 when installed, the
fused loss's CUDA branches vs full logits, no device sync in a packed forward + backward, FlexAttention
recompiles over bucketed lengths, QLoRA NF4, and greedy generation vs the CPU. A test whose package is
missing is skipped with the reason 'not run: ... is not installed'.
"""

from __future__ import annotations

import pytest
import torch

from conftest import TINY, make_ours
from mistral_ft import MistralForCausalLM
from mistral_ft.data.collate import Collator, pack_examples

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")


def _need(module: str):
    return pytest.importorskip(module, reason=f"not run: {module} is not installed")


def _rows(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(5, TINY["vocab_size"], (n,), generator=g).tolist()
        ids[0] = TINY["bos_token_id"]
        out.append((ids, [-100] * 2 + ids[2:]))
    return out


def _batch(case: str, pad_to: int | None = None) -> dict:
    """window: full rows longer than the window; padding: rows of different lengths; packing: packed documents."""
    if case == "window":
        rows = [{"input_ids": i, "labels": l} for i, l in _rows((24, 24))]
    elif case == "padding":
        rows = [{"input_ids": i, "labels": l} for i, l in _rows((21, 8, 15))]
    else:
        rows = pack_examples(_rows((9, 4, 12, 7, 3, 10)), max_length=26)
    batch = Collator(pad_token_id=0, pad_to_multiple_of=pad_to)(rows)
    return {k: v.to(CUDA) if torch.is_tensor(v) else v for k, v in batch.items()}


def _loss_and_grads(model, batch, **extra):
    model.zero_grad()
    packed = {k: batch[k] for k in ("position_ids", "document_ids") if k in batch}
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
                loss_reduction="sum", **packed, **extra)
    out.loss.backward()
    return out, {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None}


def _close(a: torch.Tensor, b: torch.Tensor, rel: float) -> bool:
    return bool((a - b).abs().max() <= rel * max(1.0, b.abs().max().item()))


def test_bf16_training_step_is_close_to_fp32():
    batch = _batch("packing")
    fp32 = make_ours(MistralForCausalLM).to(CUDA).train()
    bf16 = make_ours(MistralForCausalLM).to(CUDA, torch.bfloat16).train()
    ref, g_ref = _loss_and_grads(fp32, batch, loss_chunk_size=16, target_index=batch["target_index"])
    got, g_got = _loss_and_grads(bf16, batch, loss_chunk_size=16, target_index=batch["target_index"])
    assert abs(got.loss.item() - ref.loss.item()) < 2e-2 * abs(ref.loss.item())
    for name, g in g_ref.items():
        cos = torch.nn.functional.cosine_similarity(g_got[name].flatten(), g.flatten(), dim=0)
        assert g.abs().max() == 0 or cos > 0.99, (name, cos.item())


@pytest.mark.parametrize("impl", ["sdpa", "flex_attention"])
@pytest.mark.parametrize("case", ["window", "padding", "packing"])
def test_attention_backend_matches_eager_forward_and_backward(impl, case):
    if impl == "flex_attention":
        _need("torch.nn.attention.flex_attention")
    batch = _batch(case)
    eager = make_ours(MistralForCausalLM, attn_implementation="eager").to(CUDA).train()
    model = make_ours(MistralForCausalLM, attn_implementation=impl).to(CUDA).train()
    ref, g_ref = _loss_and_grads(eager, batch)
    got, g_got = _loss_and_grads(model, batch)
    real = batch["attention_mask"].bool()
    assert (got.logits - ref.logits)[real].abs().max() < 1e-4
    for name, g in g_ref.items():
        assert _close(g_got[name], g, 1e-4), name


@pytest.mark.parametrize("case", ["window", "padding", "packing"])
def test_flash_attention_2_matches_eager(case):
    """Our varlen mapping on the real kernel (on CPU only a stand-in checks it)."""
    _need("flash_attn")
    batch = _batch(case)
    eager = make_ours(MistralForCausalLM, attn_implementation="eager").to(CUDA, torch.bfloat16).train()
    model = make_ours(MistralForCausalLM, attn_implementation="flash_attention_2").to(CUDA, torch.bfloat16).train()
    ref, g_ref = _loss_and_grads(eager, batch)
    got, g_got = _loss_and_grads(model, batch, cu_seq_lens=batch["cu_seq_lens"], max_seq_len=batch["max_seq_len"])
    real = batch["attention_mask"].bool()
    assert (got.logits.float() - ref.logits.float())[real].abs().max() < 5e-2
    for name, g in g_ref.items():
        cos = torch.nn.functional.cosine_similarity(g_got[name].flatten(), g.flatten(), dim=0)
        assert g.abs().max() == 0 or cos > 0.99, name


@pytest.mark.parametrize("path", ["target_index", "masked_in_chunks"])
def test_fused_loss_on_cuda_equals_full_logits(path):
    batch = _batch("packing")
    model = make_ours(MistralForCausalLM).to(CUDA).train()
    ref, g_ref = _loss_and_grads(model, batch)
    extra = {"target_index": batch["target_index"]} if path == "target_index" else {}
    got, g_got = _loss_and_grads(model, batch, loss_chunk_size=7, return_logits=False, **extra)
    assert abs(got.loss.item() - ref.loss.item()) < 1e-4 * abs(ref.loss.item())
    for name, g in g_ref.items():
        assert _close(g_got[name], g, 1e-5), name


def test_packed_forward_backward_makes_no_device_sync():
    """With the collator's host-side metadata, the whole packed forward + backward runs without a host sync."""
    batch = _batch("packing")
    model = make_ours(MistralForCausalLM, attn_implementation="sdpa").to(CUDA).train()
    _loss_and_grads(model, batch, loss_chunk_size=16, target_index=batch["target_index"])  # warm caches
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _loss_and_grads(model, batch, loss_chunk_size=16, return_logits=False, target_index=batch["target_index"],
                        cu_seq_lens=batch["cu_seq_lens"], max_seq_len=batch["max_seq_len"])
    finally:
        torch.cuda.set_sync_debug_mode(0)


def test_flex_attention_recompiles_stay_bounded_over_bucketed_lengths():
    _need("torch.nn.attention.flex_attention")
    import torch._dynamo

    torch._dynamo.reset()
    from torch._dynamo.utils import counters

    counters.clear()
    model = make_ours(MistralForCausalLM, attn_implementation="flex_attention", max_position_embeddings=1024)
    model = model.to(CUDA).train()
    lengths = [(100, 20), (200, 50), (300, 70), (390, 100), (500, 120), (610, 10)]  # 6 buckets of 128
    for i, (a, b) in enumerate(lengths):
        rows = [{"input_ids": ids, "labels": labels} for ids, labels in _rows((a, b), seed=i)]
        batch = {k: v.to(CUDA) if torch.is_tensor(v) else v for k, v in Collator(0, pad_to_multiple_of=128)(rows).items()}
        _loss_and_grads(model, batch, loss_chunk_size=256, target_index=batch["target_index"])
    graphs = counters["stats"]["unique_graphs"]
    assert graphs <= 3, f"{graphs} FlexAttention graphs compiled for {len(lengths)} lengths: {dict(counters['stats'])}"


def test_qlora_nf4_forward_backward():
    _need("bitsandbytes")
    _need("peft")
    from mistral_ft.adapters.lora import apply_peft
    from mistral_ft.adapters.quantize import count_4bit_layers

    batch = _batch("packing")
    full = make_ours(MistralForCausalLM, hidden_size=64, intermediate_size=128).to(CUDA)
    with torch.no_grad():
        ref = full(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    model = apply_peft(make_ours(MistralForCausalLM, hidden_size=64, intermediate_size=128),
                       {"method": "qlora", "r": 8, "alpha": 16, "compute_dtype": "bfloat16"}, device=CUDA).to(CUDA)
    assert count_4bit_layers(model) >= 7 * TINY["num_hidden_layers"]
    model.train()
    out, grads = _loss_and_grads(model, batch, loss_chunk_size=16, target_index=batch["target_index"])
    assert torch.isfinite(out.loss) and grads and all(torch.isfinite(g).all() for g in grads.values())
    assert all("lora_" in n for n in grads) and any(g.abs().max() > 0 for g in grads.values())
    real = batch["attention_mask"].bool()
    cos = torch.nn.functional.cosine_similarity(out.logits.float()[real].flatten(), ref[real].flatten(), dim=0)
    assert cos > 0.95, cos.item()  # NF4 rounding of every weight, LoRA B = 0 at init


def test_greedy_generation_on_cuda_equals_cpu():
    model = make_ours(MistralForCausalLM)
    prompt = torch.tensor([[TINY["bos_token_id"], 17, 29, 41, 53]])
    on_cpu = model.generate(prompt, max_new_tokens=12, do_sample=False)
    on_gpu = model.to(CUDA).generate(prompt.to(CUDA), max_new_tokens=12, do_sample=False)
    assert torch.equal(on_gpu.cpu(), on_cpu)
