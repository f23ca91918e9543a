"""Bad input for `python -m mistral_ft.convert`: params.json values, shard sizes, tokenizer and weight files,
output folders (never overwritten, never half-made), a full disk."""

from __future__ import annotations

import json

import pytest

from helpers.bad_input import (ORIGINAL_PARAMS, Case, case_params, check_case, deep_json, enospc_open,
                                original_folder)
from mistral_ft import convert


def _argv(src, out, *extra):
    return ["--input_dir", str(src), "--output_dir", str(out), *extra]


def _params(**change):
    def make(tmp, monkeypatch):
        p = {**ORIGINAL_PARAMS, **change}
        src = original_folder(tmp / "src", p)
        key = next(iter(change))
        return Case(_argv(src, tmp / "out"), [str(src / "params.json"), key])
    return make


def _option(*extra, expect=None):
    def make(tmp, monkeypatch):
        src = original_folder(tmp / "src")
        return Case(_argv(src, tmp / "out", *extra), expect or [extra[0], extra[1]])
    return make


def _file(name, data, expect):
    def make(tmp, monkeypatch):
        src = original_folder(tmp / "src")
        (src / name).write_bytes(data(src / name) if callable(data) else data)
        return Case(_argv(src, tmp / "out"), [str(src / name), *expect])
    return make


def _output_below_file(tmp, monkeypatch):
    src = original_folder(tmp / "src")
    (tmp / "afile").write_text("x")
    return Case(_argv(src, tmp / "afile" / "out"), [str(tmp / "afile")])


def _output_non_empty_kept(tmp, monkeypatch):
    src = original_folder(tmp / "src")
    out = tmp / "out"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"precious")
    return Case(_argv(src, out), [f"--output_dir {out}", "not empty"])


def _overwrite_but_bad_input(tmp, monkeypatch):
    src = original_folder(tmp / "src", {**ORIGINAL_PARAMS, "n_layers": 0})
    out = tmp / "out"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"precious")  # --overwrite must keep it when the conversion fails
    return Case(_argv(src, out, "--overwrite"), [str(src / "params.json"), "n_layers"])


def _disk_full(tmp, monkeypatch):
    src = original_folder(tmp / "src")
    enospc_open(monkeypatch, tmp / "disk")
    out = tmp / "disk" / "out"
    out.parent.mkdir()
    return Case(_argv(src, out), [str(tmp / "disk"), "no space left", "B free of"])


CASES = {
    "zero_heads": _params(n_heads=0),
    "zero_layers": _params(n_layers=0),
    "negative_dim": _params(dim=-32),
    "zero_kv_heads": _params(n_kv_heads=0),
    "kv_heads_do_not_divide_heads": _params(n_kv_heads=3),
    "norm_eps_zero": _params(norm_eps=0.0),
    "rope_theta_negative": _params(rope_theta=-1.0),
    "vocab_size_zero": _params(vocab_size=0),
    "max_seq_len_zero": _params(max_seq_len=0),
    "params_malformed": _file("params.json", b'{"dim": 32,\n"n_layers": ', ["line 2"]),
    "params_too_deep": _file("params.json", deep_json().encode(), ["line 2", "nested deeper"]),
    "params_not_an_object": _file("params.json", b"[1, 2]", ["expected a JSON object"]),
    "params_duplicate_key": _file("params.json", b'{"dim": 32, "dim": 64}', ["duplicate key 'dim'"]),
    "tokenizer_garbage": _file("tokenizer.model", b"\x00garbage" * 64, []),
    "weights_truncated": _file("consolidated.safetensors", lambda p: p.read_bytes()[:500], []),
    "weights_garbage": _file("consolidated.safetensors", b"\x00" * 64, []),
    "shard_size_banana": _option("--max_shard_size", "banana"),
    "shard_size_zero": _option("--max_shard_size", "0"),
    "shard_size_inf": _option("--max_shard_size", "infGB"),
    "shard_size_negative": _option("--max_shard_size=-5GB", expect=["--max_shard_size", "-5GB"]),
    "max_positions_zero": _option("--max_position_embeddings", "0"),
    "max_positions_not_int": _option("--max_position_embeddings", "many"),
    "model_size_unknown": _option("--model_size", "70B"),
    "output_below_a_file": _output_below_file,
    "output_non_empty_kept": _output_non_empty_kept,
    "overwrite_keeps_old_on_bad_input": _overwrite_but_bad_input,
    "disk_full": _disk_full,
}


@pytest.mark.parametrize("name", case_params(CASES,
    {"disk_full", "overwrite_keeps_old_on_bad_input", "shard_size_banana", "tokenizer_garbage", "zero_heads"}))
def test_convert_bad_input(name, tmp_path, capsys, monkeypatch):
    case = CASES[name](tmp_path, monkeypatch)
    check_case(convert.main, case, tmp_path, capsys)

