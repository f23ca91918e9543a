"""conf/model entries for the current Mistral releases: each composes with every recipe, its architecture numbers
build the model the hub names (parameter counts as published), and the memory plan prints for each, before any
download (the model is built on the meta device from the entry's ``architecture``).
"""

from __future__ import annotations

import logging

import pytest
import torch

from mistral_ft.training.compose import available, compose_config

RELEASES = {  # entry -> (hub id, parameter count of the causal LM as the hub's model card / safetensors say)
    "mistral_7b": ("mistralai/Mistral-7B-v0.1", 7_241_732_096),
    "mistral_7b_v03": ("mistralai/Mistral-7B-v0.3", 7_248_023_552),
    "mistral_7b_v03_instruct": ("mistralai/Mistral-7B-Instruct-v0.3", 7_248_023_552),
    "nemo_12b": ("mistralai/Mistral-Nemo-Base-2407", 12_247_782_400),
    "nemo_12b_instruct": ("mistralai/Mistral-Nemo-Instruct-2407", 12_247_782_400),
    "small_24b": ("mistralai/Mistral-Small-24B-Base-2501", 23_572_403_200),
    "small_24b_instruct": ("mistralai/Mistral-Small-24B-Instruct-2501", 23_572_403_200),
    "codestral_22b": ("mistralai/Codestral-22B-v0.1", 22_247_282_688),
}
RECIPES = ("instruct_lora", "instruct_qlora", "full_finetune", "classify")


def _meta_model(c):
    from mistral_ft import MistralConfig, MistralForCausalLM, MistralForSequenceClassification

    config = MistralConfig(**c["model"]["architecture"], num_labels=3)
    cls = MistralForCausalLM if c["task"] == "causal_lm" else MistralForSequenceClassification
    with torch.device("meta"):
        return cls(config)


def test_every_release_has_an_entry():
    assert set(RELEASES) <= set(available("model"))


@pytest.mark.parametrize("entry", sorted(RELEASES))
def test_entry_names_the_release_and_its_numbers(entry):
    hub, params = RELEASES[entry]
    c = compose_config(["recipe=instruct_lora", f"model={entry}"])
    assert c["model"]["path"] == hub and c["model"]["name"] == entry
    model = _meta_model(c)
    assert model.num_parameters() == params
    cfg = model.config
    if entry.startswith(("nemo", "small")):
        assert cfg.head_dim * cfg.num_attention_heads != cfg.hidden_size and cfg.vocab_size == 131072


# Nemo (head_dim != hidden/heads, vocab 131072) in the default suite; the whole matrix (~1 min) is slow.
@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("entry", [e if e == "nemo_12b" else pytest.param(e, marks=pytest.mark.slow)
                                   for e in sorted(RELEASES)])
def test_entry_composes_with_every_recipe_and_the_memory_plan_prints(entry, recipe, caplog):
    from mistral_ft.adapters.lora import apply_peft
    from mistral_ft.training.memory import GiB, log_memory_plan

    c = compose_config([f"recipe={recipe}", f"model={entry}"])
    assert c["_choices"]["model"] == entry
    model = _meta_model(c)
    total = model.num_parameters()
    lora = dict(c["peft"], method="lora") if c["peft"]["method"] == "qlora" else c["peft"]  # same adapter shapes
    with torch.device("meta"):  # adapters on meta too: shapes only, nothing initialised
        model = apply_peft(model, lora, task=c["task"])
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert 0 < trainable <= total
    with caplog.at_level(logging.INFO, logger="mistral_ft.distributed"):
        plan = log_memory_plan(c, model, trainable, total, use_cuda=False, world=1)
    assert f"memory plan per device (strategy={c['strategy']['name']}, world=1)" in caplog.text
    assert plan["total"] == pytest.approx(sum(v for k, v in plan.items() if k != "total"))
    if c["peft"]["method"] == "none":  # full fine-tuning: fp32 weights + grads are the trainable part
        assert plan["weights"] == 0 and plan["trainable"] == total * 8
    else:
        assert plan["weights"] > total * 0.5
    vocab = _meta_model(c).config.vocab_size
    if c["task"] == "causal_lm":  # the vocab-sized head output is counted, one loss chunk at a time
        chunk = c["model"].get("loss_chunk_size") or 0  # what tasks/causal_lm.py reads
        tokens = c["data"]["batch_size"] * c["data"]["max_length"]
        rows = min(tokens, chunk) if chunk else tokens
        assert plan["logits"] == rows * vocab * (2 + 4)
        if vocab == 131072 and rows >= 2048:
            assert plan["logits"] / GiB >= 1.5
    else:
        assert plan["logits"] == 0


def test_architecture_mismatch_is_a_clear_error(tmp_path):
    from mistral_ft.model import ConfigError
    from conftest import TINY, tiny_config

    c = compose_config(["recipe=instruct_lora", "model=nemo_12b"])
    config = tiny_config()
    with pytest.raises(ConfigError, match=r"model=nemo_12b \(x\): the model's config.json has vocab_size=128, but "
                                          r"the model entry's architecture says 131072"):
        config.check_architecture(c["model"]["architecture"], "model=nemo_12b (x)")
    with pytest.raises(ConfigError, match="architecture key 'hidden' is not a config.json field"):
        config.check_architecture({"hidden": 1}, "here")
    config.check_architecture({"hidden_size": 32, "rope_theta": TINY["rope_theta"], "sliding_window": 5}, "here")  # equal: fine


def test_training_refuses_a_path_that_is_not_the_entry(tmp_path, capsys):
    """model=nemo_12b with model.path pointing at another checkpoint (the tiny one): exit 2, naming the field."""
    from mistral_ft.model.tiny import tiny_model_path
    from mistral_ft.train import main

    run = tmp_path / "run"
    code = main(["recipe=instruct_lora", "model=nemo_12b", f"model.path={tiny_model_path()}", "model.dtype=float32",
                 "data=instruct_tiny", "trainer.max_steps=1", "trainer.accelerator=cpu", f"hydra.run.dir={run}"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "the model's config.json has vocab_size=" in err and "architecture says 131072" in err
