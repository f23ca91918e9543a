"""The named builders (training/registry.py): every table key builds, and `_target_` is checked before a run."""

from __future__ import annotations

import pytest
import torch

from mistral_ft.model.losses import CLASSIFICATION_LOSSES, PROBLEM_TYPES, classification_loss_sum
from mistral_ft.training import registry
from mistral_ft.training.compose import available, compose_config, config_dir
from mistral_ft.training.schema import CHOICES


def _group_file(group: str, name: str) -> dict:
    """The group option's YAML as the run sees it (reading the file: composing a whole config is slower)."""
    import yaml

    return yaml.safe_load((config_dir() / group / f"{name}.yaml").read_text())


def _groups() -> list[dict]:
    torch.manual_seed(0)
    w, b = torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.zeros(4))
    return [{"params": [w], "weight_decay": 0.1}, {"params": [b], "weight_decay": 0.0}]


def test_choices_and_group_files_are_the_table_keys():
    for group, table in (("optimizer", registry.OPTIMIZERS), ("scheduler", registry.SCHEDULERS),
                         ("logger", registry.LOGGERS), ("strategy", registry.STRATEGIES)):
        assert CHOICES[f"{group}.name"] == tuple(table)
        assert sorted(available(group)) == sorted(table), group  # one YAML file per built-in
    assert CHOICES["task"] == tuple(registry.HEADS)
    assert PROBLEM_TYPES == tuple(CLASSIFICATION_LOSSES)


@pytest.mark.parametrize("name", list(registry.OPTIMIZERS))
def test_each_optimizer_builds_from_its_yaml(name):
    settings = _group_file("optimizer", name)
    opt = registry.build("optimizer", settings, _groups())
    assert opt.param_groups[0]["lr"] == settings["lr"] and opt.param_groups[0]["betas"] == tuple(settings["betas"])
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]  # the groups' own decay is kept


@pytest.mark.parametrize("name", list(registry.SCHEDULERS))
def test_each_scheduler_builds_and_follows_lr_factor(name):
    settings = {"name": name, "warmup_steps": 2, "min_lr_ratio": 0.1}
    opt = torch.optim.SGD(_groups(), lr=1.0)
    sched = registry.build("scheduler", settings, opt, 10)
    seen = []
    for _ in range(10):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    want = [registry.lr_factor(s, warmup_steps=2, total_steps=10, kind=name, min_lr_ratio=0.1) for s in range(10)]
    assert seen == pytest.approx(want)
    assert seen[0] == 0.5 and seen[1] == 1.0  # warmup reaches 1 at step warmup_steps - 1


@pytest.mark.parametrize("name", list(registry.LOGGERS))
def test_each_logger_builds_into_the_run_folder(name, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    settings = _group_file("logger", name)
    logger = registry.build("logger", settings, tmp_path)
    assert str(tmp_path) in str(logger.save_dir)


@pytest.mark.parametrize("name", list(registry.STRATEGIES))
def test_each_strategy_builds(name):
    settings = _group_file("strategy", name)
    strategy = registry.build("strategy", settings, None)
    assert strategy is not None


def test_each_head_sizes_the_model_from_the_data():
    class Info:
        format, id2label = "classification", {0: "neg", 1: "pos", 2: "mixed"}

    assert registry.HEADS["causal_lm"](Info) == ("causal_lm", {}) == registry.HEADS["dpo"](Info)
    kind, head = registry.HEADS["classification"](Info)
    assert kind == "classification" and head["num_labels"] == 3 and head["label2id"]["mixed"] == 2
    assert registry.HEADS["reward"](Info)[1] == {"num_labels": 1, "problem_type": "regression"}
    Info.format = "regression"
    assert registry.HEADS["classification"](Info)[1]["num_labels"] == 1


@pytest.mark.parametrize("problem_type", PROBLEM_TYPES)
def test_each_loss_is_the_models_mean_loss_times_its_count(problem_type):
    from mistral_ft.model import MistralForSequenceClassification

    from conftest import tiny_config

    torch.manual_seed(0)
    n = 1 if problem_type == "regression" else 3
    model = MistralForSequenceClassification(tiny_config(num_labels=n, problem_type=problem_type)).eval()
    ids = torch.randint(5, 100, (4, 6))
    labels = {"regression": torch.randn(4), "single_label_classification": torch.tensor([0, 2, -100, 1]),
              "multi_label_classification": torch.tensor([[1, 0, 1], [0, 0, 1], [1, 1, 1], [0, 0, 0]]).float()}[problem_type]
    out = model(input_ids=ids, labels=labels)
    total, count = classification_loss_sum(out.logits, labels, problem_type)
    assert count == (3 if problem_type == "single_label_classification" else 4)
    torch.testing.assert_close(out.loss, total / count)


def test_target_optimizer_gets_its_keys_and_only_ours_it_takes():
    settings = {"name": "adamw", "lr": 0.01, "weight_decay": 0.0, "betas": [0.9, 0.999], "eps": 1e-8,
                "_target_": "torch.optim.SGD", "momentum": 0.9}
    assert registry.check_target("optimizer", settings, "optimizer") is None
    opt = registry.build("optimizer", settings, _groups())
    assert type(opt) is torch.optim.SGD and opt.param_groups[0]["momentum"] == 0.9 and opt.param_groups[0]["lr"] == 0.01
    assert "betas" not in opt.defaults  # SGD takes no betas: ours were not passed


def test_target_logger_keeps_a_name_of_its_own(tmp_path):
    settings = {"name": "custom_logs", "_target_": "lightning.pytorch.loggers.CSVLogger"}
    logger = registry.build("logger", settings, tmp_path)
    assert logger.name == "custom_logs" and logger.save_dir == str(tmp_path)
    settings["name"] = "csv"  # the group file's selector left over: not passed
    assert registry.build("logger", settings, tmp_path).name == "lightning_logs"


@pytest.mark.parametrize("override, expected", [
    ("optimizer._target_=torch.optim.SGDD", "optimizer._target_: cannot import torch.optim.SGDD"),
    ("scheduler._target_=torch.optim.lr_scheduler.StepLR", "missing a required argument: 'step_size'"),
    ("+callbacks.mine._target_=torch.nn.Linear", "callbacks.mine._target_: torch.nn.Linear does not take"),
    ("+callbacks.mine.patience=3", "callbacks.mine: expected a mapping with _target_"),
    ("logger._target_=json.decoder", "logger._target_: json.decoder is not a class or function"),
    ("logger._target_=json", "logger._target_: 'json' is not a dotted import path"),
])
def test_bad_target_is_a_config_error_naming_key_and_value(override, expected):
    from mistral_ft.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        compose_config(["recipe=instruct_lora", "model=tiny", override])
    msg = str(info.value)
    assert expected in msg and ("from the command line" in msg or "_target_" not in override), msg
