"""The Hydra config tree: every option composes, recipes win over group defaults, typos are caught.

Nothing here trains; the CLI is run in-process through `main(argv)` where the exit code matters.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from mistral_ft.train import main
from mistral_ft.training.compose import available, compose_config, config_dir
from mistral_ft.training.schema import ConfigError, Sources, strip_secrets, validate_config

REPO = Path(__file__).resolve().parents[3]
GROUPS = ("model", "data", "peft", "optimizer", "scheduler", "strategy", "trainer", "logger")
RECIPE_DATA = {"instruct_lora": ("instruct_tiny", "jsonl"), "classify": ("classify_tiny", "jsonl")}


def test_recipes_and_groups_exist():
    assert set(available("recipe")) >= {"instruct_lora", "classify", "instruct_qlora", "full_finetune"}
    assert set(available("model")) >= {"tiny", "mistral_7b", "mistral_7b_instruct"}
    assert set(available("data")) >= {"instruct_tiny", "classify_tiny", "jsonl"}
    assert set(available("peft")) == {"lora", "dora", "qlora", "none"}
    assert set(available("scheduler")) == {"cosine", "constant"}
    assert set(available("strategy")) == {"auto", "ddp", "fsdp"}
    assert set(available("logger")) == {"csv", "wandb", "tensorboard"}
    # the recipe group is the repository's recipes/ folder (symlinked for Hydra, copied into the wheel)
    assert (config_dir() / "recipe" / "instruct_lora.yaml").resolve() == (REPO / "recipes" / "instruct_lora.yaml").resolve()


@pytest.mark.parametrize("recipe", sorted(RECIPE_DATA))
def test_every_option_composes_with_every_recipe(recipe):
    for group in GROUPS:
        for option in available(group):
            if group == "data" and option not in RECIPE_DATA[recipe]:
                continue
            overrides = [f"recipe={recipe}", f"{group}={option}"]
            if group == "data" and option == "jsonl":
                fmt = "messages" if recipe == "instruct_lora" else "classification"
                overrides += ["data.train_file=/data/train.jsonl", f"data.format={fmt}"]
            cfg = compose_config(overrides)
            assert cfg["_choices"][group] == option, overrides
            assert cfg["task"] == ("causal_lm" if recipe == "instruct_lora" else "classification")


def test_recipe_values_beat_group_defaults():
    adamw = yaml.safe_load((config_dir() / "optimizer" / "adamw.yaml").read_text())
    trainer_default = yaml.safe_load((config_dir() / "trainer" / "default.yaml").read_text())
    recipe = yaml.safe_load((REPO / "recipes" / "classify.yaml").read_text())
    cfg = compose_config(["recipe=classify"])
    # the recipe sets these and the groups it composes set other values: the recipe must win
    assert recipe["optimizer"]["lr"] != adamw["lr"]
    assert cfg["optimizer"]["lr"] == recipe["optimizer"]["lr"]
    assert cfg["optimizer"]["weight_decay"] == recipe["optimizer"]["weight_decay"] != adamw["weight_decay"]
    assert cfg["trainer"]["max_steps"] == recipe["trainer"]["max_steps"] != trainer_default["max_steps"]
    # group choices made by the recipe (over the primary config's defaults) ...
    assert cfg["_choices"]["model"] == "mistral_7b" and cfg["_choices"]["data"] == "classify_tiny"
    # ... and values not in the recipe still come from the group
    assert cfg["optimizer"]["eps"] == adamw["eps"]
    # the command line beats the recipe, for values and for group choices
    cfg = compose_config(["recipe=classify", "optimizer.lr=0.5", "model=tiny"])
    assert cfg["optimizer"]["lr"] == 0.5 and cfg["model"]["name"] == "tiny"


def test_tiny_specialization_applies_only_on_tiny():
    seven_b = compose_config(["recipe=instruct_lora"])
    tiny = compose_config(["recipe=instruct_lora", "model=tiny"])
    assert "lm_head" not in seven_b["peft"]["target_modules"]
    assert tiny["eval"]["enabled"] and not seven_b["eval"]["enabled"]
    assert "lm_head" not in tiny["peft"]["target_modules"]  # TRL refuses LoRA on lm_head; the pre-trained base needs none
    assert tiny["trainer"]["max_steps"] < seven_b["trainer"]["max_steps"]
    assert compose_config(["recipe=instruct_lora", "model=tiny", "trainer.max_steps=7"])["trainer"]["max_steps"] == 7


def test_recipes_open_with_launch_command():
    for recipe in available("recipe"):
        text = (REPO / "recipes" / f"{recipe}.yaml").read_text()
        assert text.startswith("# @package _global_\n")
        header = text.split("defaults:")[0]
        assert f"python -m mistral_ft.train recipe={recipe}" in header
        assert "Example overrides" in header


def _run(capsys, *argv):
    rc = main(list(argv))
    err = capsys.readouterr().err
    return rc, err


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["recipe=classify", "optimizer.lrr=1e-3"], ["optimizer.lrr", "Did you mean 'optimizer.lr'", "Valid keys"]),
        (["recipe=classify", "+optimizer.lrr=1e-3"], ["optimizer.lrr", "did you mean 'lr'", "command line"]),
        (["recipe=classify", "trainer.max_steps=abc"], ["trainer.max_steps", "expected an int", "'abc'"]),
        (["recipe=classify", "optimizer.lr=fast"], ["optimizer.lr", "expected a number"]),
        (["recipe=classify", "trainer.max_stepz=3"], ["trainer.max_stepz", "max_steps"]),
        (["recipe=classify", "+trainer.max_stepz=3"], ["trainer.max_stepz", "did you mean 'max_steps'"]),
        (["recipe=classify", "+trainer.logger=false"], ["trainer.logger", "set by mistral_ft"]),
        (["recipe=classify", "peft.method=qlorra"], ["peft.method", "'qlorra'", "qlora"]),
        (["recipe=nope"], ["recipe/nope", "classify", "instruct_lora"]),
        (["recipe=classify", "model=llama"], ["model/llama", "mistral_7b", "tiny"]),
        (["model=tiny"], ["no recipe given", "instruct_lora"]),
        (["recipe=classify", "data=instruct_tiny"], ["data.format", "does not fit task"]),
        (["recipe=classify", "data.max_length=1"], ["max_length", ">= 2"]),
        (["recipe=classify", "model.path=/no/such/folder"], ["model.path", "/no/such/folder", "does not exist"]),
        pytest.param(["recipe=classify", "model=tiny", "trainer.precision=16-mixed"], ["16-mixed", "CUDA"],
                     marks=pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 is refused on CPU only")),
        (["recipe=instruct_lora", "data=jsonl"], ["data.train_file", "required"]),
        (["recipe=classify", "--bogus"], ["unknown flag"]),
        (["resume=/nonexistent/run"], ["resume=/nonexistent/run", "no such run folder"]),
    ],
)
def test_bad_input_is_one_clear_paragraph(capsys, tmp_path, argv, expected):
    rc, err = _run(capsys, *argv, f"hydra.run.dir={tmp_path / 'run'}")
    assert rc == 2, err
    assert err.startswith("error: ")
    assert "Traceback" not in err
    for piece in expected:
        assert piece in err, (piece, err)
    assert not (tmp_path / "run").exists()  # composition errors stop before the run folder exists


def test_debug_flag_shows_the_exception(tmp_path):
    with pytest.raises(ConfigError):
        main(["recipe=classify", "optimizer.lr=fast", "debug=true", f"hydra.run.dir={tmp_path}"])


def test_typo_in_a_yaml_file_names_file_and_line(tmp_path):
    conf = tmp_path / "conf"
    shutil.copytree(config_dir(), conf, symlinks=False)
    bad = conf / "recipe" / "bad.yaml"
    bad.write_text("# @package _global_\ndefaults:\n  - _self_\ntask: classification\noptimizer:\n  lrr: 1.0e-3\n")
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(conf), version_base="1.3"):
        cfg = compose("config", ["recipe=bad", "data=classify_tiny"], return_hydra_config=True)
    choices = dict(cfg.hydra.runtime.choices)
    plain = OmegaConf.to_container(cfg, resolve=False)
    plain.pop("hydra")
    with pytest.raises(ConfigError) as info:
        validate_config(plain, Sources(conf_dir=conf, choices=choices))
    msg = str(info.value)
    assert "optimizer.lrr" in msg and "bad.yaml:6" in msg and "did you mean 'lr'" in msg
    assert "Valid keys here: _target_, betas, eps, lr, name, weight_decay" in msg


def test_multirun_refuses_multiprocess_strategy(capsys, tmp_path):
    rc, err = _run(capsys, "-m", "recipe=classify", "model=tiny", "strategy=ddp", "trainer.devices=2",
                   "trainer.accelerator=cpu", "optimizer.lr=1e-3,2e-3", f"hydra.sweep.dir={tmp_path / 'sweep'}")
    assert rc == 2
    assert "sweep" in err and "strategy=ddp" in err and "replaying the command line" in err
    assert not (tmp_path / "sweep").exists()


def test_cfg_flag_prints_config(capsys):
    assert main(["recipe=instruct_lora", "model=tiny", "--cfg", "job"]) == 0
    out = yaml.safe_load(capsys.readouterr().out)
    assert out["task"] == "causal_lm" and out["model"]["name"] == "tiny"


def test_strip_secrets():
    cfg = {"logger": {"name": "wandb", "api_key": "abc", "WANDB_TOKEN": "x"}, "db": {"password": "p"},
           "data": {"max_length": 3, "train_tokens": 10, "tokenizer": None}, "hf_token": "t"}
    out = strip_secrets(cfg)
    assert out == {"logger": {"name": "wandb"}, "db": {}, "data": {"max_length": 3, "train_tokens": 10, "tokenizer": None}}


def test_any_trainer_argument_is_accepted_without_plus(capsys):
    cfg = compose_config(["recipe=classify", "trainer.enable_model_summary=false", "trainer.max_time=00:00:10:00"])
    assert cfg["trainer"]["enable_model_summary"] is False and cfg["trainer"]["max_time"] == "00:00:10:00"


def test_help_lists_recipes(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "recipe=NAME" in out and "instruct_lora" in out and "classify" in out
