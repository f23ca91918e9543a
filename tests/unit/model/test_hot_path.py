"""The GPU-clean hot path, checked for equality on CPU (issue 15.3): per-document attention, host-side varlen
segments and target positions from the collator, no per-layer host reads."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import TINY, make_ours
from helpers.host_reads import count_host_reads
from mistral_ft import MistralForCausalLM
from mistral_ft.data.collate import Collator, pack_examples
from mistral_ft.model.attention import target_positions, varlen_segments


def _packed_batch(seed: int = 0) -> dict:
    """Two packed rows of 3 documents with prompts (label -100) and padding; documents longer than the
    tiny window (5), so the per-document path needs its window masks too."""
    g = torch.Generator().manual_seed(seed)
    examples = []
    for n in (9, 4, 12, 7, 3, 10):
        ids = torch.randint(5, TINY["vocab_size"], (n,), generator=g).tolist()
        ids[0] = TINY["bos_token_id"]
        labels = [-100] * 2 + ids[2:]
        examples.append((ids, labels))
    rows = pack_examples(examples, max_length=26)
    return Collator(pad_token_id=0, pad_to_multiple_of=8)(rows)


def _padded_batch() -> dict:
    """Rows of different lengths, one example each (right padding, no documents): the dense-mask SDPA path."""
    g = torch.Generator().manual_seed(2)
    rows = []
    for n in (13, 6, 9):
        ids = torch.randint(5, TINY["vocab_size"], (n,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * 2 + ids[2:]})
    return Collator(pad_token_id=0)(rows)


def _forward_backward(model, batch, **extra):
    model.zero_grad()
    packed = {k: batch[k] for k in ("position_ids", "document_ids") if k in batch}
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
                loss_reduction="sum", **packed, **extra)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters()}


def test_collator_computes_segments_and_targets_on_the_host():
    batch = _packed_batch()
    assert batch["attention_mask"].shape[1] % 8 == 0 and not batch["attention_mask"].all()  # padded rows
    assert torch.equal(batch["target_index"], target_positions(batch["labels"]))
    # one segment per (row, document) and per padding run, as the docstring's worked example says
    docs = batch["document_ids"]
    B, T = docs.shape
    expected = [0]
    for b in range(B):
        for t in range(1, T):
            if docs[b, t] != docs[b, t - 1]:
                expected.append(b * T + t)
        expected.append((b + 1) * T)
    assert batch["cu_seq_lens"].tolist() == expected and batch["cu_seq_lens"].dtype == torch.int32
    assert batch["max_seq_len"] == max(b - a for a, b in zip(expected[:-1], expected[1:]))
    one_row = varlen_segments(torch.tensor([[1, 1, 1, 1, 1, 1, 0, 0]]), torch.tensor([[0, 0, 0, 1, 1, 1, -1, -1]]))
    assert one_row[0].tolist() == [0, 3, 6, 8] and one_row[1] == 3


def test_per_document_sdpa_equals_the_dense_mask_forward_and_backward(monkeypatch):
    """Packed rows on CPU run SDPA per document (cost: sum of len^2); eager runs the dense T x T mask."""
    batch = _packed_batch()
    dense = make_ours(MistralForCausalLM, attn_implementation="eager").train()
    per_doc = make_ours(MistralForCausalLM, attn_implementation="sdpa").train()
    ref, g_ref = _forward_backward(dense, batch)

    calls = []
    sdpa = F.scaled_dot_product_attention

    def counted(q, *args, **kwargs):
        calls.append(q.shape[2])
        return sdpa(q, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counted)
    got, g_got = _forward_backward(per_doc, batch)
    segments = len(batch["cu_seq_lens"]) - 1
    # the per-document path ran: one SDPA call per segment and layer, none over the full row
    assert len(calls) == segments * TINY["num_hidden_layers"] and max(calls) < batch["input_ids"].shape[1]
    real = batch["attention_mask"].bool()
    assert (got.logits - ref.logits)[real].abs().max() < 1e-5
    assert abs(got.loss.item() - ref.loss.item()) < 1e-4
    for name, g in g_ref.items():
        assert (g_got[name] - g).abs().max() < 1e-5, name


def test_host_metadata_is_checked_on_cpu():
    batch = _packed_batch()
    model = make_ours(MistralForCausalLM)
    wrong = batch["cu_seq_lens"].clone()
    wrong[1] += 1
    with pytest.raises(ValueError, match="cu_seq_lens"):
        model(batch["input_ids"], attention_mask=batch["attention_mask"], document_ids=batch["document_ids"],
              position_ids=batch["position_ids"], cu_seq_lens=wrong, max_seq_len=batch["max_seq_len"])
    with pytest.raises(ValueError, match="target_index"):
        model(batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
              loss_chunk_size=16, target_index=batch["target_index"][1:])


def test_lm_head_on_collator_targets_equals_the_full_logits_loss():
    """The CUDA path: only the collator's target positions reach the head (index_select, no sync); equal to
    the loss over full (B, T, V) logits, values and gradients."""
    batch = _packed_batch(seed=1)
    model = make_ours(MistralForCausalLM).train()
    full, g_full = _forward_backward(model, batch)
    for chunk in (5, 4096):
        sel, g_sel = _forward_backward(model, batch, loss_chunk_size=chunk, return_logits=False,
                                       target_index=batch["target_index"])
        assert sel.logits is None and abs(sel.loss.item() - full.loss.item()) < 1e-4 * abs(full.loss.item())
        for name, g in g_full.items():
            assert (g_sel[name] - g).abs().max() < 1e-6 * max(1.0, g.abs().max().item()), name


@pytest.mark.parametrize("impl,rows", [("sdpa", "packed"), ("eager", "packed"), ("sdpa", "padded")])
def test_no_host_read_per_layer(impl, rows):
    """Host reads (device syncs on CUDA) in a forward + backward do not grow with the layer count: the masks,
    varlen segments and target positions are made once per batch. Those left are CPU-only checks."""
    batch = _packed_batch() if rows == "packed" else _padded_batch()
    counts = {}
    for layers in (2, 6):
        model = make_ours(MistralForCausalLM, num_hidden_layers=layers, attn_implementation=impl).train()
        with count_host_reads() as c:
            _forward_backward(model, batch, loss_chunk_size=16, return_logits=False, target_index=batch["target_index"],
                              cu_seq_lens=batch["cu_seq_lens"], max_seq_len=batch["max_seq_len"])
        counts[layers] = dict(c)
    assert counts[2] == counts[6], counts
    # each remaining read is one of the checks made only where they are free (CPU tensors)
    # (varlen_segments: recomputed on CPU to check the collator's segments; given ones are trusted on a GPU)
    cpu_only = {"check_token_ids", "_attention_inputs", "varlen_segments", "chunked_causal_lm_loss"}
    assert {fn for (_, _, fn) in counts[2]} <= cpu_only, counts[2]
    assert sum(counts[2].values()) <= 8, counts[2]
