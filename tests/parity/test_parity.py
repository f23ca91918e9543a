"""Numerical parity with transformers 5.x on tiny random configs (CPU, fp32).

Our model is saved with our ``save_pretrained`` and loaded by transformers, so every test here also checks the
checkpoint format. Tolerance: max abs diff 1e-5 on logits (fp32 reductions in a different order).
"""

from __future__ import annotations

import pytest
import torch

from conftest import TINY, hf_pair, make_ours

ATOL = 1e-5


def _ids(B, T, vocab=TINY["vocab_size"], seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, vocab, (B, T), generator=g)  # 0 is the pad id


def _maxdiff(a, b):
    return (a - b).abs().max().item()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_causal_lm_no_padding_longer_than_window(tmp_path, attn):
    ours, theirs, _ = hf_pair(tmp_path, "MistralForCausalLM", attn)
    x = _ids(2, 13)  # window is 5: most queries see a truncated window
    labels = x.clone()
    labels[:, :3] = -100
    a = ours(x, labels=labels, output_hidden_states=True)
    b = theirs(x, labels=labels, output_hidden_states=True)
    assert _maxdiff(a.logits, b.logits) < ATOL
    assert abs(a.loss.item() - b.loss.item()) < ATOL
    assert len(a.hidden_states) == len(b.hidden_states) == TINY["num_hidden_layers"] + 1
    for ha, hb in zip(a.hidden_states, b.hidden_states):
        assert _maxdiff(ha, hb) < ATOL


def test_right_padding(tmp_path):
    ours, theirs, _ = hf_pair(tmp_path, "MistralForCausalLM")
    x = _ids(3, 11)
    mask = torch.ones_like(x)
    for row, n in enumerate([11, 7, 2]):
        mask[row, n:] = 0
        x[row, n:] = 0
    labels = x.masked_fill(mask == 0, -100)
    a, b = ours(x, attention_mask=mask, labels=labels), theirs(x, attention_mask=mask, labels=labels)
    valid = mask.bool()
    assert _maxdiff(a.logits[valid], b.logits[valid]) < ATOL
    assert abs(a.loss.item() - b.loss.item()) < ATOL
    assert torch.isfinite(a.logits).all()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_left_padding_with_position_ids(tmp_path, attn):
    ours, theirs, _ = hf_pair(tmp_path, "MistralForCausalLM", attn)
    x = _ids(3, 12)
    mask = torch.ones_like(x)
    for row, n in enumerate([0, 4, 9]):  # number of pad tokens on the left
        mask[row, :n] = 0
        x[row, :n] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    a = ours(x, attention_mask=mask, position_ids=pos, output_hidden_states=True)
    b = theirs(x, attention_mask=mask, position_ids=pos, output_hidden_states=True)
    valid = mask.bool()
    assert torch.isfinite(a.logits).all(), "fully masked pad rows must not turn into NaN"
    assert _maxdiff(a.logits[valid], b.logits[valid]) < ATOL
    for ha, hb in zip(a.hidden_states, b.hidden_states):
        assert _maxdiff(ha[valid], hb[valid]) < ATOL


def test_eager_attentions_match(tmp_path):
    ours, theirs, _ = hf_pair(tmp_path, "MistralForCausalLM", "eager")
    x = _ids(2, 9)
    a, b = ours(x, output_attentions=True), theirs(x, output_attentions=True)
    assert len(a.attentions) == len(b.attentions) == TINY["num_hidden_layers"]
    for wa, wb in zip(a.attentions, b.attentions):
        assert wa.shape == wb.shape == (2, TINY["num_attention_heads"], 9, 9)
        assert _maxdiff(wa, wb) < ATOL
        # the window edge (W=5, rule i-W < j <= i): query 5 sees keys 1..5 but not key 0, query 4 still sees key 0
        assert (wa[..., 5:, 0] == 0).all() and (wa[..., 5, 1] > 0).all() and (wa[..., 4, 0] > 0).all()
        assert (wa[..., 8, 3] == 0).all() and (wa[..., 8, 4] > 0).all()


def test_no_sliding_window(tmp_path):
    ours, theirs, _ = hf_pair(tmp_path, "MistralForCausalLM", sliding_window=None)
    x = _ids(2, 10)
    assert _maxdiff(ours(x).logits, theirs(x).logits) < ATOL


def test_eager_equals_sdpa():
    from mistral_ft import MistralForCausalLM

    m = make_ours(MistralForCausalLM)
    x = _ids(2, 12)
    mask = torch.ones_like(x)
    mask[1, :3] = 0
    out = {}
    for impl in ("sdpa", "eager"):
        m.config.attn_implementation = impl
        out[impl] = m(x, attention_mask=mask).logits
    assert _maxdiff(out["sdpa"][mask.bool()], out["eager"][mask.bool()]) < ATOL


def test_mha_and_mqa(tmp_path):
    for kv in (4, 1):  # the two ends of GQA
        ours, theirs, _ = hf_pair(tmp_path, "MistralForCausalLM", num_key_value_heads=kv, seed=kv)
        x = _ids(2, 8)
        assert _maxdiff(ours(x).logits, theirs(x).logits) < ATOL


@pytest.mark.parametrize("case", ["single", "regression", "multi_label"])
def test_sequence_classification(tmp_path, case):
    kw = {"single": dict(num_labels=3), "regression": dict(num_labels=1),
          "multi_label": dict(num_labels=3, problem_type="multi_label_classification")}[case]
    ours, theirs, _ = hf_pair(tmp_path, "MistralForSequenceClassification", **kw)
    x = _ids(3, 10)
    mask = torch.ones_like(x)
    x[1, 6:] = 0  # right padding
    mask[1, 6:] = 0
    x[2, :4] = 0  # left padding
    mask[2, :4] = 0
    if case == "single":
        labels = torch.tensor([0, 2, -100])
    elif case == "regression":
        labels = torch.tensor([0.5, -1.0, 2.0])
    else:
        labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0], [1.0, 1.0, 0.0]])
    a = ours(x, attention_mask=mask, labels=labels)
    b = theirs(x, attention_mask=mask, labels=labels)
    assert a.logits.shape == b.logits.shape == (3, kw["num_labels"])
    assert _maxdiff(a.logits, b.logits) < ATOL
    assert abs(a.loss.item() - b.loss.item()) < ATOL


def test_classification_inputs_embeds_pools_last_position():
    from mistral_ft import MistralForSequenceClassification

    m = make_ours(MistralForSequenceClassification, num_labels=2)
    x = _ids(2, 6)
    emb = m.model.embed_tokens(x)
    full = m(inputs_embeds=emb).logits
    assert _maxdiff(full, m(x).logits) < ATOL  # no pad in x: last non-pad == last position


def test_classification_without_pad_id_refuses_batches():
    from mistral_ft import MistralForSequenceClassification

    m = make_ours(MistralForSequenceClassification, pad_token_id=None)
    with pytest.raises(ValueError, match="pad_token_id"):
        m(_ids(2, 5))
    assert m(_ids(1, 5)).logits.shape == (1, 2)


def test_transformers_save_loads_in_ours(tmp_path):
    import transformers

    from mistral_ft import MistralForCausalLM

    torch.manual_seed(3)
    theirs = transformers.MistralForCausalLM(transformers.MistralConfig(**TINY)).eval()
    theirs.save_pretrained(tmp_path / "hf", max_shard_size="100KB")  # several shards + index
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    ours = MistralForCausalLM.from_pretrained(tmp_path / "hf")
    x = _ids(2, 9)
    assert _maxdiff(ours(x).logits, theirs(x).logits) < ATOL


def test_hidden_states_and_return_tuple(tmp_path):
    """MistralModel (no head): last_hidden_state, every hidden state and the tuple form equal transformers'."""
    import transformers

    from mistral_ft import MistralModel

    m = make_ours(MistralModel)
    m.save_pretrained(tmp_path / "base")
    theirs = transformers.MistralModel.from_pretrained(tmp_path / "base", dtype=torch.float32).eval()
    x = _ids(2, 11)
    a, b = m(x, output_hidden_states=True), theirs(x, output_hidden_states=True)
    assert _maxdiff(a.last_hidden_state, b.last_hidden_state) < ATOL
    assert len(a.hidden_states) == len(b.hidden_states) == TINY["num_hidden_layers"] + 1
    for ha, hb in zip(a.hidden_states, b.hidden_states):
        assert _maxdiff(ha, hb) < ATOL
    ta = m(x, return_dict=False, output_hidden_states=True)
    tb = theirs(x, return_dict=False, output_hidden_states=True)
    assert isinstance(ta, tuple) and ta[0].shape == (2, 11, TINY["hidden_size"])
    assert _maxdiff(ta[0], tb[0]) < ATOL
    assert _maxdiff(ta[-1][1], tb[-1][1]) < ATOL  # the hidden-states tuple sits last in both


def test_auto_classes_load_our_folders_with_labels(tmp_path):
    import transformers

    from mistral_ft import MistralForSequenceClassification

    m = make_ours(MistralForSequenceClassification, num_labels=3, id2label={0: "neg", 1: "neu", 2: "pos"})
    m.save_pretrained(tmp_path / "clf")
    theirs = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "clf", dtype=torch.float32)
    assert type(theirs).__name__ == "MistralForSequenceClassification"
    assert theirs.config.id2label == {0: "neg", 1: "neu", 2: "pos"}
    x = _ids(2, 7)
    assert _maxdiff(m(x).logits, theirs(x).logits) < ATOL


def test_peft_lora_adapter_from_ours_loads_on_transformers(tmp_path):
    """Our module names are HF's: a LoRA adapter trained on our model loads with peft onto transformers' model."""
    import peft
    import transformers

    ours, _, folder = hf_pair(tmp_path, "MistralForCausalLM")
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                             "up_proj", "down_proj"], lora_dropout=0.0)
    x = _ids(2, 8)
    before = ours(x).logits
    pm = peft.get_peft_model(ours, cfg)
    assert _maxdiff(pm(input_ids=x).logits, before) == 0  # B = 0 at init: outputs unchanged
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.1)
    ours_lora = pm(input_ids=x).logits
    assert _maxdiff(ours_lora, before) > 1e-3
    pm.save_pretrained(tmp_path / "adapter")
    base = transformers.MistralForCausalLM.from_pretrained(folder, dtype=torch.float32)
    theirs = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    assert _maxdiff(theirs(input_ids=x).logits, ours_lora) < ATOL
