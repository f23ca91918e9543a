"""A corpus of bad input for the four CLIs (train, validate, generate, export), run in-process.

Every case asserts the same contract: a non-zero exit, a message that points at the problem (the file
and line or row, the key or field), no traceback, and the run folder left as it was (not created, or the
same listing before and after). Cases are data rows, configs, model folders, checkpoints and CLI
arguments; each `make(tmp, env)` builds its own broken input and returns (tool, argv, expected pieces,
folders to watch).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers.bad_input import Case, check_case

from mistral_ft import convert as convert_cli
from mistral_ft import export as export_cli
from mistral_ft import generate as generate_cli
from mistral_ft import train as train_cli
from mistral_ft import validate as validate_cli

REPO = Path(__file__).resolve().parents[2]
GOOD_CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
QUIET = ["trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]
INSTRUCT = ["recipe=instruct_lora", "model=tiny", "data.validation_file=null", *QUIET]
CLASSIFY = ["recipe=classify", "model=tiny", "data.validation_file=null", *QUIET]
TOOLS: dict[str, Callable] = {"train": train_cli.main, "validate": validate_cli.main, "generate": generate_cli.main,
                              "export": export_cli.main, "convert": convert_cli.main}


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """A finished 2-step LoRA run (the base of the checkpoint, resume, export and generate cases)."""
    run = tmp_path_factory.mktemp("trained") / "run"
    rc = train_cli.main(["recipe=instruct_lora", "model=tiny", "trainer.max_steps=2", "data.batch_size=2",
                         "data.validation_file=null", "peft.target_modules=[q_proj,v_proj]", "peft.r=2",
                         f"hydra.run.dir={run}", *QUIET])
    assert rc == 0
    return run


@pytest.fixture(scope="module")
def tiny_folder() -> Path:
    from mistral_ft.model.tiny import tiny_model_path

    return Path(tiny_model_path())


def _lines(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def _model_copy(tiny: Path, tmp: Path) -> Path:
    folder = tmp / "model"
    shutil.copytree(tiny, folder)
    return folder


def _listing(folder: Path) -> dict[str, tuple[int, int]] | None:
    if not folder.exists():
        return None
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


# ---- the cases: name -> make(tmp, ctx) -> (tool, argv, expected pieces, watched folders) -----------------
def data_case(rows, expected_line, field, fmt="messages", suffix=".jsonl", extra=()):
    def make(tmp, ctx):
        f = tmp / f"train{suffix}"
        if isinstance(rows, bytes):
            f.write_bytes(rows)
        elif suffix == ".csv":
            f.write_text(rows, encoding="utf-8")
        else:
            _lines(f, rows)
        base = INSTRUCT if fmt == "messages" else CLASSIFY
        where = f"{f}:{expected_line}" if expected_line else str(f)
        return "train", [*base, f"data.train_file={f}", *extra], [where, field], []
    return make


def config_case(argv, *expected):
    def make(tmp, ctx):
        return "train", [*argv, *QUIET], list(expected), []
    return make


def _corrupt_safetensors(tmp, ctx):
    folder = _model_copy(ctx["tiny"], tmp)
    st = folder / "model.safetensors"
    st.write_bytes(st.read_bytes()[:1000])
    return "train", [*INSTRUCT, f"model.path={folder}"], [str(st), "truncated or corrupt"], []


def _garbage_safetensors(tmp, ctx):
    folder = _model_copy(ctx["tiny"], tmp)
    (folder / "model.safetensors").write_bytes(b"\x00" * 64)
    return "train", [*INSTRUCT, f"model.path={folder}"], ["model.safetensors"], []


def _vocab_mismatch(tmp, ctx):
    folder = _model_copy(ctx["tiny"], tmp)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["vocab_size"] = 1000
    (folder / "config.json").write_text(json.dumps(cfg))
    return "train", [*INSTRUCT, f"model.path={folder}"], ["model.tokenizer", "vocab_size 1000", "config.json"], []


def _pickle_only_model(tmp, ctx):
    folder = _model_copy(ctx["tiny"], tmp)
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"not really")
    return "train", [*INSTRUCT, f"model.path={folder}"], [str(folder), "no pickle"], []


def _hub_offline(tmp, ctx):
    os.environ["HF_HUB_OFFLINE"] = "1"
    return "train", [*INSTRUCT, "model.path=acme-nonexistent/model-x"], ["acme-nonexistent/model-x", "local folder"], []


def _labels_do_not_match_data(tmp, ctx):
    return "train", [*CLASSIFY, "data.labels=[food,sports]"], ["classify_train.jsonl:", "weather", "label"], []


def _checkpoint_dir_case(mutate, expected):
    def make(tmp, ctx):
        run = tmp / "run"
        shutil.copytree(ctx["run"](), run)
        pieces = mutate(run)
        return "train", [f"resume={pieces[0]}", "trainer.max_steps=4", *QUIET], [*pieces[1:], *expected], [run]
    return make


def _torn_last(run):
    last = run / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[:5000])
    return [run, str(last)]


def _foreign_ckpt(run):
    odd = run / "checkpoints" / "odd.ckpt"
    import torch

    torch.save([1, 2, 3], odd)
    return [odd, str(odd)]


def _fresh_into_used_folder(tmp, ctx):
    run = tmp / "run"
    shutil.copytree(ctx["run"](), run)
    return "train", [*INSTRUCT, "trainer.max_steps=1", f"hydra.run.dir={run}"], [str(run), "already holds checkpoints",
                                                                               "resume="], [run]


def _validate_bad_rows(tmp, ctx):
    f = _lines(tmp / "v.jsonl", [GOOD_CHAT, {"messages": "not a list"}])
    return "validate", ["recipe=instruct_lora", "model=tiny", f"data.train_file={f}", "data.validation_file=null"], \
        [f"{f}:2", "field 'messages'"], []


def _generate_corrupt(tmp, ctx):
    folder = _model_copy(ctx["tiny"], tmp)
    st = folder / "model.safetensors"
    st.write_bytes(st.read_bytes()[:2000])
    return "generate", ["--model", str(folder), "--prompt", "hi"], [str(st), "corrupt"], []


def _generate_run_without_weights(tmp, ctx):
    run = tmp / "run"
    shutil.copytree(ctx["run"](), run)
    shutil.rmtree(run / "adapter")
    return "generate", ["--run", str(run), "--prompt", "hi"], [str(run), "adapter"], [run]


def _export_case(args_fn, expected):
    def make(tmp, ctx):
        run = tmp / "run"
        shutil.copytree(ctx["run"](), run)
        argv, pieces = args_fn(run, tmp)
        return "export", argv, [*pieces, *expected], [run, tmp / "out"]
    return make


def _export_torn_checkpoint(run, tmp):
    last = run / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[:3000])
    return [f"run_dir={last}", f"output_dir={tmp / 'out'}"], ["last.ckpt"]


def _export_moved_base(run, tmp):
    info = json.loads((run / "base_model.json").read_text())
    info["folder"] = str(tmp / "gone")
    if "path" in info:
        info["path"] = str(tmp / "gone")
    (run / "base_model.json").write_text(json.dumps(info))
    return [f"run_dir={run}", f"output_dir={tmp / 'out'}", f"base={tmp / 'gone'}"], [str(tmp / "gone")]


CASES: dict[str, Callable] = {
    # data rows (train): file:line and field
    "jsonl_malformed_line": data_case([GOOD_CHAT, GOOD_CHAT, '{"messages": ['], 3, "malformed JSON"),
    "jsonl_missing_field": data_case([GOOD_CHAT, {"msgs": []}], 2, "field 'messages'"),
    "jsonl_empty_answer": data_case([GOOD_CHAT, {"messages": [{"role": "user", "content": "hi"},
                                                              {"role": "assistant", "content": ""}]}], 2,
                                    "messages[1].content"),
    "jsonl_role_order": data_case([{"messages": [{"role": "assistant", "content": "x"}]}], 1, "messages[0].role"),
    "jsonl_not_an_object": data_case([GOOD_CHAT, "[1, 2]"], 2, "expected a JSON object"),
    "jsonl_not_utf8": data_case(json.dumps(GOOD_CHAT).encode() + b"\n" + b'{"messages": "\xff\xfe"}\n', 2, "not UTF-8"),
    "jsonl_empty_file": data_case([], None, "empty file"),
    "jsonl_every_target_truncated": data_case([GOOD_CHAT, {"messages": [{"role": "user", "content": "word " * 80},
                                                                        {"role": "assistant", "content": "ok"}]}],
                                              2, "max_length", extra=["data.max_length=16"]),
    # the formats users bring (docs/data.md)
    "sharegpt_unknown_role": data_case([{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]},
                                        {"conversations": [{"from": "human", "value": "hi"}, {"from": "bot", "value": "yo"}]}],
                                       2, "conversations[1].from", extra=["data.format=sharegpt"]),
    "content_part_image": data_case([{"messages": [{"role": "user", "content": [
        {"type": "text", "text": "what is it?"}, {"type": "image_url", "image_url": {"url": "https://x/cat.png"}}]},
        {"role": "assistant", "content": "a cat"}]}], 1, "messages[0].content[1].type"),
    "txt_without_format_text": data_case(b"a document\n", None, "set data.format=text", suffix=".txt"),
    "alpaca_rows_under_messages": data_case([{"instruction": "hi", "output": "yo"}] * 3, 1, "set data.format=alpaca"),
    "classify_missing_label": data_case([{"text": "a", "label": "x"}, {"text": "b"}], 2, "field 'label'",
                                        fmt="classification"),
    "classify_mixed_label_types": data_case([{"text": "a", "label": "x"}, {"text": "b", "label": 1}], 2,
                                            "field 'label'", fmt="classification"),
    "csv_extra_cells": data_case("text,label\nhello,a\nhi,b,extra\n", "row 2", "malformed CSV", fmt="classification",
                                 suffix=".csv"),
    "csv_empty_text": data_case("text,label\nhello,a\n,b\n", "row 2", "field 'text'", fmt="classification",
                                suffix=".csv"),
    "data_file_missing": config_case([*INSTRUCT, "data.train_file=/no/such/train.jsonl"], "/no/such/train.jsonl",
                                     "not found"),
    "labels_do_not_match_data": _labels_do_not_match_data,
    # configs (train)
    "unknown_key": config_case(["recipe=classify", "optimizer.lrr=1e-3"], "optimizer.lrr", "optimizer.lr"),
    "unknown_key_plus": config_case(["recipe=classify", "+peft.rank=4"], "peft.rank", "Valid keys here"),
    "wrong_type_int": config_case(["recipe=classify", "trainer.max_steps=many"], "trainer.max_steps", "expected an int"),
    "wrong_type_bool": config_case(["recipe=classify", "skip_nonfinite=maybe"], "skip_nonfinite", "true/false"),
    "negative_lr": config_case(["recipe=classify", "optimizer.lr=-1"], "optimizer.lr", "> 0"),
    "dropout_out_of_range": config_case(["recipe=classify", "peft.dropout=1.5"], "peft.dropout", "[0, 1)"),
    "bad_choice": config_case(["recipe=classify", "scheduler.name=linear"], "scheduler.name", "cosine"),
    "format_task_mismatch": config_case(["recipe=classify", "data.format=messages"], "data.format", "does not fit"),
    "no_recipe": config_case(["model=tiny"], "no recipe given", "recipe=NAME"),
    "unknown_recipe": config_case(["recipe=instruct_lorra"], "instruct_lorra", "instruct_lora"),
    "unknown_flag": config_case(["recipe=classify", "--fast"], "unknown flag", "--fast"),
    "secret_override_masked": config_case(["recipe=classify", "+logger.api_key=hunter2"], "logger.api_key", "***"),
    "resume_auto_without_run_dir": config_case(["recipe=classify", "resume=auto"], "resume=auto", "hydra.run.dir"),
    # model folders
    "model_path_missing": config_case([*INSTRUCT, "model.path=/no/such/model"], "model.path", "/no/such/model"),
    "hub_id_offline": _hub_offline,
    "safetensors_truncated": _corrupt_safetensors,
    "safetensors_garbage": _garbage_safetensors,
    "tokenizer_vocab_mismatch": _vocab_mismatch,
    "pickle_only_weights": _pickle_only_model,
    # checkpoints / resume
    "resume_torn_last_ckpt": _checkpoint_dir_case(_torn_last, ["not a readable checkpoint"]),
    "resume_foreign_ckpt": _checkpoint_dir_case(_foreign_ckpt, ["not a Lightning checkpoint"]),
    "resume_missing_run": config_case(["resume=/no/such/run"], "resume=/no/such/run", "no such run folder"),
    "fresh_run_into_used_folder": _fresh_into_used_folder,
    # validate CLI
    "validate_bad_rows": _validate_bad_rows,
    "validate_bad_rate": lambda tmp, ctx: ("validate", ["recipe=instruct_lora", "model=tiny", "--tokens-per-s=fast"],
                                           ["--tokens-per-s", "'fast'"], []),
    "validate_missing_run": lambda tmp, ctx: ("validate", ["recipe=instruct_lora", "model=tiny",
                                                           f"--from-run={tmp / 'nope'}"], [str(tmp / "nope"), "summary.json"], []),
    "validate_unknown_key": lambda tmp, ctx: ("validate", ["recipe=instruct_lora", "data.max_lenght=5"],
                                              ["data.max_lenght", "max_length"], []),
    # generate CLI
    "generate_missing_model": lambda tmp, ctx: ("generate", ["--model", str(tmp / "nope"), "--prompt", "hi"],
                                                [str(tmp / "nope"), "no such folder"], []),
    "generate_truncated_weights": _generate_corrupt,
    "generate_run_without_weights": _generate_run_without_weights,
    "generate_bad_int": lambda tmp, ctx: ("generate", ["--model", "x", "--prompt", "hi", "--max-new-tokens", "ten"],
                                          ["--max-new-tokens", "'ten'"], []),
    # export CLI
    "export_unknown_key": _export_case(lambda run, tmp: ([f"run_dirr={run}", f"output_dir={tmp / 'out'}"], []),
                                       ["run_dirr: unknown key", "output_dir"]),
    "export_missing_output": _export_case(lambda run, tmp: ([f"run_dir={run}"], []), ["output_dir"]),
    "export_bad_dtype": _export_case(lambda run, tmp: ([f"run_dir={run}", f"output_dir={tmp / 'out'}", "dtype=float8"],
                                                       []), ["dtype=float8"]),
    "export_torn_checkpoint": _export_case(_export_torn_checkpoint, []),
    "export_missing_base": _export_case(_export_moved_base, []),
}


def _convert_into_non_empty(tmp, ctx):
    out = tmp / "out"
    out.mkdir()
    (out / "config.json").write_text("{}")
    return "convert", ["--input_dir", str(tmp / "nope"), "--output_dir", str(out)], \
        [f"--output_dir {out}", "not empty", "--overwrite"], [out]


# issue 13: values only libraries checked, JSON the parser chokes on, secrets, the converter, numeric options
CASES.update({
    "config_lr_nan": config_case([*INSTRUCT, "optimizer.lr=nan"], "optimizer.lr", "not a finite number"),
    "config_weight_decay_inf": config_case([*INSTRUCT, "optimizer.weight_decay=inf"], "optimizer.weight_decay", "finite"),
    "config_accelerator": config_case([*INSTRUCT, "trainer.accelerator=warp_drive"], "warp_drive", "trainer.accelerator"),
    "config_precision": config_case([*INSTRUCT, "trainer.precision=13-mixed"], "13-mixed"),
    "config_lock_break_not_bool": config_case([*INSTRUCT, "lock.break=maybe"], "lock"),
    "config_secret_access_key": config_case([*INSTRUCT, "+logger.access_key=AKIAVALUE"], "logger.access_key=***"),
    "config_secret_credentials": config_case([*INSTRUCT, "+logger.credentials=hunter2"], "logger.credentials=***"),
    "config_secret_hf_auth": config_case([*INSTRUCT, "+data.hf_auth=hf_value"], "data.hf_auth=***"),
    "jsonl_duplicate_key": data_case([GOOD_CHAT, '{"messages": [], "messages": []}'], 2, "duplicate key 'messages'"),
    "jsonl_too_deep": data_case([GOOD_CHAT, '{"messages": ' + "[" * 100000 + "]" * 100000 + "}"], 2, "nested deeper"),
    "export_tolerance_nan": _export_case(lambda run, tmp: ([f"run_dir={run}", f"output_dir={tmp / 'out'}",
                                                            "tolerance=nan"], []), ["tolerance=nan", "finite"]),
    "export_tolerance_negative": _export_case(lambda run, tmp: ([f"run_dir={run}", f"output_dir={tmp / 'out'}",
                                                                 "tolerance=-1"], []), ["tolerance=-1"]),
    "convert_missing_input": lambda tmp, ctx: ("convert", ["--input_dir", str(tmp / "nope"), "--output_dir",
                                                           str(tmp / "out")], ["--input_dir", "no such folder"], [tmp / "out"]),
    "convert_non_empty_output": _convert_into_non_empty,
})


RC = {"validate_bad_rows": 1}  # validate's own report: data problems found (listed), not a usage error


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input(name, tmp_path, tiny_folder, request, capsys, monkeypatch):
    """The shared contract (helpers.bad_input.check_case): exit 2, culprit named, no traceback, `tmp_path` and
    every watched folder byte-for-byte unchanged."""
    monkeypatch.setenv("HF_HUB_OFFLINE", os.environ.get("HF_HUB_OFFLINE", "1"))
    ctx = {"tiny": tiny_folder, "run": lambda: request.getfixturevalue("trained_run")}
    tool, argv, expected, watched = CASES[name](tmp_path, ctx)
    if tool == "train" and not any(a.startswith(("hydra.run.dir=", "resume=")) for a in argv):
        argv = [*argv, f"hydra.run.dir={tmp_path / 'run_new'}"]
    outside = [w for w in watched if tmp_path not in Path(w).parents]
    check_case(TOOLS[tool], Case(argv, expected, watch=outside, rc=RC.get(name, 2)), tmp_path, capsys)


def test_the_corpus_is_large_enough():
    """Issue 13: at least 100 cases across every CLI (this file plus tests/e2e/bad_input/)."""
    import importlib.util

    total = len(CASES)
    for f in sorted((REPO / "tests" / "e2e" / "bad_input").glob("test_bad_*.py")):
        spec = importlib.util.spec_from_file_location(f"_corpus_{f.stem}", f)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        total += sum(len(v) for k, v in vars(module).items() if k.endswith("CASES") or k in ("EVALUATE", "VALIDATE"))
    assert total >= 100, total
