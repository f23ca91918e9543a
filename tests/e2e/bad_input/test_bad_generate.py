"""Bad input for `python -m mistral_ft.generate`: devices, decoding options, adapters that do not fit."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from helpers.bad_input import Case, case_params, check_case
from mistral_ft import generate


def _adapter(tmp, ctx):
    folder = tmp / "adapter"
    shutil.copytree(ctx["run"] / "adapter", folder)
    return folder


def _opts(*extra):
    return lambda tmp, ctx: Case(["--model", str(ctx["tiny"]), "--prompt", "hi", *extra], [extra[0], extra[1]])


def _adapter_rank_disagrees(tmp, ctx):
    a = _adapter(tmp, ctx)
    cfg = json.loads((a / "adapter_config.json").read_text())
    cfg["r"] = 8  # the weights have r=2
    (a / "adapter_config.json").write_text(json.dumps(cfg))
    return Case(["--model", str(ctx["tiny"]), "--adapter", str(a), "--prompt", "hi"],
                [str(a / "adapter_model.safetensors"), "lora_A", "r=8", "(2, "])


def _adapter_targets_disagree(tmp, ctx):
    a = _adapter(tmp, ctx)
    cfg = json.loads((a / "adapter_config.json").read_text())
    cfg["target_modules"] = ["k_proj"]  # the weights are for q_proj and v_proj
    (a / "adapter_config.json").write_text(json.dumps(cfg))
    return Case(["--model", str(ctx["tiny"]), "--adapter", str(a), "--prompt", "hi"],
                [str(a / "adapter_model.safetensors"), "q_proj", "target_modules"])


def _adapter_weights_truncated(tmp, ctx):
    a = _adapter(tmp, ctx)
    w = a / "adapter_model.safetensors"
    w.write_bytes(w.read_bytes()[:100])
    return Case(["--model", str(ctx["tiny"]), "--adapter", str(a), "--prompt", "hi"], [str(w)])


def _adapter_config_malformed(tmp, ctx):
    a = _adapter(tmp, ctx)
    (a / "adapter_config.json").write_text('{"r": 2,')
    return Case(["--model", str(ctx["tiny"]), "--adapter", str(a), "--prompt", "hi"],
                [str(a / "adapter_config.json"), "line 1"])


def _adapter_config_deep(tmp, ctx):
    from helpers.bad_input import deep_json

    a = _adapter(tmp, ctx)
    (a / "adapter_config.json").write_text(deep_json())
    return Case(["--model", str(ctx["tiny"]), "--adapter", str(a), "--prompt", "hi"],
                [f"{a / 'adapter_config.json'}: line 2", "nested deeper"])


def _adapter_seq_cls(tmp, ctx):
    a = _adapter(tmp, ctx)
    cfg = json.loads((a / "adapter_config.json").read_text())
    cfg["task_type"] = "SEQ_CLS"
    (a / "adapter_config.json").write_text(json.dumps(cfg))
    return Case(["--model", str(ctx["tiny"]), "--adapter", str(a), "--prompt", "hi"], ["task_type", "SEQ_CLS"])


def _model_config_garbage(tmp, ctx):
    m = tmp / "model"
    shutil.copytree(ctx["tiny"], m)
    (m / "config.json").write_bytes(b"\xff\xfe\x00garbage")
    return Case(["--model", str(m), "--prompt", "hi"], [str(m / "config.json")])


def _run_config_yaml_garbage(tmp, ctx):
    run = tmp / "run"
    shutil.copytree(ctx["run"], run)
    cfg = json.loads((run / "adapter" / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(tmp / "gone")  # so the run's config.yaml is read for the base
    (run / "adapter" / "adapter_config.json").write_text(json.dumps(cfg))
    (run / "config.yaml").write_text("model: [unclosed\n")
    return Case(["--run", str(run), "--prompt", "hi"], [str(run / "config.yaml")])


def _prompt_too_long(tmp, ctx):
    limit = json.loads((ctx["tiny"] / "config.json").read_text())["max_position_embeddings"]
    return Case(["--model", str(ctx["tiny"]), "--prompt", "word " * (limit + 10)], ["--prompt #1", "at most"])


no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message when CUDA is missing")
CASES = {
    "device_banana": _opts("--device", "banana"),
    "device_cuda_index_out_of_range": _opts("--device", "cuda:99"),
    "max_new_tokens_zero": _opts("--max-new-tokens", "0"),
    "max_new_tokens_negative": _opts("--max-new-tokens", "-1"),
    "temperature_nan": _opts("--temperature", "nan"),
    "temperature_negative": _opts("--temperature", "-1"),
    "temperature_inf": _opts("--temperature", "inf"),
    "top_p_above_one": _opts("--top-p", "1.5"),
    "top_p_zero": _opts("--top-p", "0"),
    "top_k_negative": _opts("--top-k", "-1"),
    "seed_negative": _opts("--seed", "-3"),
    "max_new_tokens_not_int": _opts("--max-new-tokens", "ten"),
    "dtype_unknown": _opts("--dtype", "float8"),
    "run_and_adapter": lambda tmp, ctx: Case(["--run", str(ctx["run"]), "--adapter", str(ctx["run"] / "adapter"),
                                              "--prompt", "hi"], ["--run", "--adapter"]),
    "no_model": lambda tmp, ctx: Case(["--prompt", "hi"], ["--model"]),
    "missing_adapter": lambda tmp, ctx: Case(["--model", str(ctx["tiny"]), "--adapter", str(tmp / "nope"),
                                              "--prompt", "hi"], [str(tmp / "nope")]),
    "adapter_rank_disagrees_with_weights": _adapter_rank_disagrees,
    "adapter_targets_disagree_with_weights": _adapter_targets_disagree,
    "adapter_weights_truncated": _adapter_weights_truncated,
    "adapter_config_malformed": _adapter_config_malformed,
    "adapter_config_too_deep": _adapter_config_deep,
    "adapter_for_classification": _adapter_seq_cls,
    "model_config_not_utf8": _model_config_garbage,
    "run_config_yaml_malformed": _run_config_yaml_garbage,
    "prompt_too_long": _prompt_too_long,
}


@pytest.mark.parametrize("name", case_params(CASES,
    {"adapter_config_too_deep", "adapter_rank_disagrees_with_weights", "device_banana", "temperature_nan", "top_p_above_one"}))
def test_generate_bad_input(name, tmp_path, bad_run, tiny_folder, capsys):
    case = CASES[name](tmp_path, {"run": bad_run, "tiny": tiny_folder})
    check_case(generate.main, case, tmp_path, capsys)


@no_cuda
def test_generate_device_cuda_without_cuda(tmp_path, tiny_folder, capsys):
    check_case(generate.main, Case(["--model", str(tiny_folder), "--prompt", "hi", "--device", "cuda"],
                                   ["--device cuda", "CUDA"]), tmp_path, capsys)
