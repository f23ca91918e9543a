"""What we write loads in the clients users bring: peft's AutoPeftModel, TRL's SFTTrainer, transformers'
pipeline, llama.cpp's GGUF format (read back with the gguf package).

Two tiny runs (2 steps, CPU fp32), trained and exported once per module: the embedded default
`recipe=instruct_lora model=tiny` (exported with gguf=true) and `recipe=classify model=tiny`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mistral_ft.checkpoints.export import CHECK_TEXT
from mistral_ft.export import main as export_main
from mistral_ft.train import main as train_main

QUIET = ["trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "trainer.max_steps=2",
         "data.batch_size=2", "data.validation_file=null", "scheduler.warmup_steps=0", "eval.enabled=false"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    yield


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("client_runs")
    out = {}
    for kind, argv in {"instruct": ["recipe=instruct_lora"], "classify": ["recipe=classify"]}.items():
        assert train_main([*argv, "model=tiny", *QUIET, f"hydra.run.dir={root / kind}"]) == 0, kind
        out[kind] = root / kind
    return out


@pytest.fixture(scope="module")
def exported(runs, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("client_exports")
    assert export_main([f"run={runs['instruct']}", f"output_dir={root / 'instruct'}", "gguf=true"]) == 0
    assert export_main([f"run={runs['classify']}", f"output_dir={root / 'classify'}"]) == 0
    return {"instruct": root / "instruct", "classify": root / "classify"}


def _ids() -> torch.Tensor:
    from mistral_ft.tokenizer import MistralTokenizer

    return torch.tensor([MistralTokenizer.from_pretrained(None).encode(CHECK_TEXT)])


def test_auto_peft_classification_loads_the_adapter_with_its_labels(runs, exported):
    """AutoPeftModelForSequenceClassification needs the head's size: labels.json in the adapter folder gives it
    (without it transformers builds a 2-label head and peft fails on the 3-label `score`)."""
    import transformers
    from peft import AutoPeftModelForSequenceClassification

    ids = _ids()
    with torch.no_grad():
        merged = transformers.AutoModelForSequenceClassification.from_pretrained(
            exported["classify"] / "merged", dtype=torch.float32)(input_ids=ids).logits
    for folder in (exported["classify"] / "adapter", runs["classify"] / "adapter"):
        labels = json.loads((folder / "labels.json").read_text())
        assert labels["num_labels"] == 3 and labels["id2label"] == {"0": "food", "1": "sports", "2": "weather"}
        labels["id2label"] = {int(k): v for k, v in labels["id2label"].items()}  # JSON keys are strings
        model = AutoPeftModelForSequenceClassification.from_pretrained(folder, dtype=torch.float32, **labels).eval()
        assert model.config.id2label == {0: "food", 1: "sports", 2: "weather"}
        with torch.no_grad():
            got = model(input_ids=ids).logits
        assert got.shape == (1, 3) and (got - merged).abs().max() < 1e-5, folder


def test_pipeline_classifies_with_our_label_names(exported):
    import transformers

    clf = transformers.pipeline("text-classification", model=str(exported["classify"] / "merged"), device="cpu")
    assert clf("sunny with a light breeze")[0]["label"] in {"food", "sports", "weather"}


@pytest.mark.slow  # TRL's import and one SFT step: ~7 s (the adapter's shape is checked in the default suite below)
def test_trl_sft_trainer_accepts_the_default_adapter(runs, tmp_path):
    """TRL refuses an adapter whose lm_head is a LoRA layer; the tiny recipe has none (decoder targets only)."""
    import transformers
    from datasets import Dataset
    from peft import AutoPeftModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    folder = runs["instruct"] / "adapter"
    cfg = json.loads((folder / "adapter_config.json").read_text())
    assert "lm_head" not in cfg["target_modules"]
    model = AutoPeftModelForCausalLM.from_pretrained(folder, is_trainable=True, dtype=torch.float32)
    args = SFTConfig(output_dir=str(tmp_path / "trl"), max_steps=1, per_device_train_batch_size=2, report_to=[],
                     use_cpu=True, save_strategy="no", max_length=32)
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list([{"text": "hello world"}] * 2),
                         processing_class=transformers.AutoTokenizer.from_pretrained(folder))
    assert torch.isfinite(torch.tensor(trainer.train().training_loss))


def test_the_default_adapter_has_no_lora_on_lm_head(runs):
    """What TRL's SFTTrainer checks (`isinstance(model.get_output_embeddings(), BaseTunerLayer)` refuses)."""
    from peft import AutoPeftModelForCausalLM
    from peft.tuners.tuners_utils import BaseTunerLayer

    model = AutoPeftModelForCausalLM.from_pretrained(runs["instruct"] / "adapter", is_trainable=True, dtype=torch.float32)
    assert not isinstance(model.get_output_embeddings(), BaseTunerLayer)


def test_adapter_names_its_base_and_carries_its_fingerprint(runs, exported):
    """A local base: base_model_name_or_path is its absolute folder (not some cache path of another name), and
    base_model.json beside the adapter fingerprints it; a hub base: the hub id."""
    from mistral_ft.model.tiny import tiny_model_path
    from mistral_ft.runs import adapter_base_name, fingerprint

    base = str(Path(tiny_model_path()).resolve())
    for folder in (runs["instruct"] / "adapter", exported["instruct"] / "adapter"):
        assert json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"] == base
        record = json.loads((folder / "base_model.json").read_text())
        assert record["path"] == base and record["fingerprint"] == fingerprint(base)
    assert adapter_base_name("mistralai/Mistral-7B-v0.1", "/cache/models--x/snapshots/abc") == "mistralai/Mistral-7B-v0.1"
    assert adapter_base_name(None, base) == base


def test_gguf_file_matches_the_merged_folder(exported, capsys):
    import gguf
    from safetensors.torch import load_file

    from mistral_ft.checkpoints.gguf import permute_for_ggml

    folder = exported["instruct"] / "merged"
    hf = load_file(str(folder / "model.safetensors"))
    config = json.loads((folder / "config.json").read_text())
    reader = gguf.GGUFReader(str(exported["instruct"] / "model.gguf"))
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config["num_hidden_layers"])
    tensors = {t.name: t for t in reader.tensors}
    assert set(tensors) == {names.get_name(k, try_suffixes=(".weight",)) for k in hf}
    assert {"token_embd.weight", "output.weight", "output_norm.weight", "blk.1.attn_q.weight"} <= set(tensors)
    for key, t in hf.items():
        g = tensors[names.get_name(key, try_suffixes=(".weight",))]
        assert tuple(reversed(g.shape.tolist())) == tuple(t.shape), key  # GGML lists dims fastest first
        data = torch.from_numpy(g.data.copy()).reshape(t.shape)
        if key.endswith("q_proj.weight"):
            t = permute_for_ggml(t, config["num_attention_heads"])
        elif key.endswith("k_proj.weight"):
            t = permute_for_ggml(t, config["num_key_value_heads"])
        assert torch.equal(data, t), key
    # the permutation is the rotate-half -> interleaved one: one head of 4 rows (a0 a1 b0 b1) -> (a0 b0 a1 b1)
    assert permute_for_ggml(torch.arange(4.0).reshape(4, 1), 1).flatten().tolist() == [0, 2, 1, 3]
    field = lambda k: reader.fields[k].contents()  # noqa: E731
    assert field("general.architecture") == "llama" and field("general.name") == "instruct"
    assert field("llama.context_length") == config["max_position_embeddings"]
    assert field("llama.embedding_length") == config["hidden_size"]
    assert field("llama.block_count") == config["num_hidden_layers"]
    assert field("llama.attention.head_count_kv") == config["num_key_value_heads"]
    assert field("llama.rope.freq_base") == pytest.approx(config["rope_theta"])
    assert field("tokenizer.ggml.model") == "llama" and len(field("tokenizer.ggml.tokens")) == config["vocab_size"]
    assert field("tokenizer.ggml.tokens")[1:3] == ["<s>", "</s>"] and field("tokenizer.ggml.bos_token_id") == 1


def test_gguf_export_warns_about_the_sliding_window(runs, tmp_path, capsys, caplog):
    """The tiny model's window (32) is shorter than its context (4096): llama.cpp would not apply it."""
    import logging

    with caplog.at_level(logging.WARNING, logger="mistral_ft.export"):
        assert export_main([f"run={runs['instruct']}", f"output_dir={tmp_path / 'out'}", "gguf=true",
                            "check=false"]) == 0
    assert any("sliding attention window of 32 tokens" in r.getMessage() for r in caplog.records)
    assert (tmp_path / "out" / "model.gguf").is_file()


def test_gguf_of_a_classifier_is_refused_before_anything_is_written(runs, tmp_path, capsys):
    assert export_main([f"run={runs['classify']}", f"output_dir={tmp_path / 'out'}", "gguf=true"]) == 2
    assert "causal LMs" in capsys.readouterr().err and not (tmp_path / "out").exists()


def _ggml_llama_logits(path: Path, ids: torch.Tensor) -> torch.Tensor:
    """llama.cpp's `llama` forward written out from the GGUF alone: its tensors, its metadata, and GGML's NORM
    rope, which rotates adjacent pairs (x[2i], x[2i+1]); full causal attention (no sliding window)."""
    import gguf
    import numpy as np

    r = gguf.GGUFReader(str(path))
    f = lambda k: r.fields[k].contents()  # noqa: E731
    w = {t.name: torch.from_numpy(np.array(t.data)).reshape(tuple(reversed(t.shape.tolist()))).float() for t in r.tensors}
    n_head, n_kv, eps, theta = (f("llama.attention.head_count"), f("llama.attention.head_count_kv"),
                                f("llama.attention.layer_norm_rms_epsilon"), f("llama.rope.freq_base"))
    t_len = len(ids)

    def rms(x, weight):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight

    def rope(x):  # (T, heads, d)
        d = x.shape[-1]
        ang = torch.arange(t_len).float()[:, None] * theta ** (-torch.arange(0, d, 2).float() / d)[None]
        c, s = ang.cos()[:, None], ang.sin()[:, None]
        out = torch.empty_like(x)
        out[..., 0::2] = x[..., 0::2] * c - x[..., 1::2] * s
        out[..., 1::2] = x[..., 0::2] * s + x[..., 1::2] * c
        return out

    h = w["token_embd.weight"][ids]
    for i in range(f("llama.block_count")):
        p = f"blk.{i}."
        x = rms(h, w[p + "attn_norm.weight"])
        q = rope((x @ w[p + "attn_q.weight"].T).view(t_len, n_head, -1))
        k = rope((x @ w[p + "attn_k.weight"].T).view(t_len, n_kv, -1)).repeat_interleave(n_head // n_kv, 1)
        v = (x @ w[p + "attn_v.weight"].T).view(t_len, n_kv, -1).repeat_interleave(n_head // n_kv, 1)
        a = torch.nn.functional.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                                             is_causal=True)
        h = h + a.transpose(0, 1).reshape(t_len, -1) @ w[p + "attn_output.weight"].T
        x = rms(h, w[p + "ffn_norm.weight"])
        h = h + (torch.nn.functional.silu(x @ w[p + "ffn_gate.weight"].T) * (x @ w[p + "ffn_up.weight"].T)) \
            @ w[p + "ffn_down.weight"].T
    return rms(h, w["output_norm.weight"]) @ w["output.weight"].T


def test_gguf_computed_the_llama_cpp_way_gives_our_logits_within_the_window(exported):
    """Within the sliding window (32 tokens on the tiny model) the GGUF, read as llama.cpp reads it, is our model."""
    from mistral_ft import MistralForCausalLM

    ids = _ids()[0, :24]
    assert len(ids) <= 32
    with torch.no_grad():
        ours = MistralForCausalLM.from_pretrained(exported["instruct"] / "merged")(input_ids=ids[None]).logits[0]
        theirs = _ggml_llama_logits(exported["instruct"] / "model.gguf", ids)
    assert (theirs - ours).abs().max() < 1e-4
