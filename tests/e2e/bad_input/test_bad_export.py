"""Bad input for `python -m mistral_ft.export`: options, corrupt files inside a run folder, output folders that
must not be overwritten or half-made, a full disk."""

from __future__ import annotations

import shutil

import pytest

from helpers.bad_input import Case, case_params, check_case, deep_json, enospc_open
from mistral_ft import export


def _copy(tmp, ctx):
    run = tmp / "run"
    shutil.copytree(ctx["run"], run)
    return run


def _option(*opts, expect=None):
    def make(tmp, ctx, monkeypatch):
        return Case([f"run_dir={ctx['run']}", f"output_dir={tmp / 'out'}", *opts], expect or list(opts),
                    watch=[ctx["run"]])
    return make


def _corrupt(rel, data, expect=()):
    def make(tmp, ctx, monkeypatch):
        run = _copy(tmp, ctx)
        f = run / rel
        f.write_bytes(data(f) if callable(data) else data)
        return Case([f"run_dir={run}", f"output_dir={tmp / 'out'}"], [str(f), *expect])
    return make


def _output_non_empty(tmp, ctx, monkeypatch):
    out = tmp / "out"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"precious")
    return Case([f"run_dir={ctx['run']}", f"output_dir={out}"], [f"output_dir={out}", "not empty"], watch=[ctx["run"]])


def _output_below_file(tmp, ctx, monkeypatch):
    (tmp / "afile").write_text("x")
    return Case([f"run_dir={ctx['run']}", f"output_dir={tmp / 'afile' / 'out'}"], [str(tmp / "afile")],
                watch=[ctx["run"]])


def _disk_full(tmp, ctx, monkeypatch):
    (tmp / "disk").mkdir()
    enospc_open(monkeypatch, tmp / "disk")
    return Case([f"run_dir={ctx['run']}", f"output_dir={tmp / 'disk' / 'out'}"],
                [str(tmp / "disk"), "no space left", "B free of"], watch=[ctx["run"]])


def _run_dir_not_a_checkpoint(tmp, ctx, monkeypatch):
    return Case([f"run_dir={ctx['run'] / 'config.yaml'}", f"output_dir={tmp / 'out'}"],
                [str(ctx["run"] / "config.yaml"), "not a checkpoint"], watch=[ctx["run"]])


CASES = {
    "tolerance_inf": _option("tolerance=inf", expect=["tolerance=inf"]),
    "tolerance_zero": _option("tolerance=0", expect=["tolerance=0"]),
    "tolerance_not_a_number": _option("tolerance=tight"),
    "shard_size_zero": _option("max_shard_size=0"),
    "shard_size_banana": _option("max_shard_size=banana"),
    "shard_size_inf": _option("max_shard_size=infGB"),
    "check_not_bool": _option("check=maybe"),
    "positional_argument": _option("merged", expect=["'merged'", "missing EQUAL"]),  # Hydra's override grammar
    "run_dir_missing": lambda tmp, ctx, mp: Case([f"run_dir={tmp / 'nope'}", f"output_dir={tmp / 'out'}"],
                                                 [str(tmp / "nope")]),
    "run_dir_not_a_checkpoint": _run_dir_not_a_checkpoint,
    "base_model_json_malformed": _corrupt("base_model.json", b'{"path": "/x",', ["line 1"]),
    "base_model_json_too_deep": _corrupt("base_model.json", deep_json().encode(), ["line 2", "nested deeper"]),
    "base_model_json_not_an_object": _corrupt("base_model.json", b"[]", ["expected a JSON object"]),
    "base_model_json_without_path": _corrupt("base_model.json", b'{"fingerprint": {}}', ["'path'"]),
    "adapter_weights_truncated": _corrupt("adapter/adapter_model.safetensors", lambda f: f.read_bytes()[:100], []),
    "adapter_config_malformed": _corrupt("adapter/adapter_config.json", b"{\"r\": ", ["line 1"]),
    "config_yaml_malformed": _corrupt("config.yaml", b"model: [unclosed\n", []),
    "output_non_empty_kept": _output_non_empty,
    "output_below_a_file": _output_below_file,
    "disk_full": _disk_full,
}


@pytest.mark.parametrize("name", case_params(CASES,
    {"adapter_weights_truncated", "base_model_json_malformed", "disk_full", "output_below_a_file", "tolerance_inf"}))
def test_export_bad_input(name, tmp_path, bad_run, capsys, monkeypatch):
    case = CASES[name](tmp_path, {"run": bad_run}, monkeypatch)
    check_case(export.main, case, tmp_path, capsys)
