"""Bad input for `python -m mistral_ft.evaluate` and `python -m mistral_ft.validate`: numeric settings,
missing or corrupt files, rows. (validate's own exit status 1 means "data problems found", its report.)"""

from __future__ import annotations


import pytest

from helpers.bad_input import GOOD_CHAT, Case, case_params, check_case, deep_json, lines
from mistral_ft import evaluate, validate


def _ev(*kv, expect=None):
    def make(tmp, ctx):
        data = lines(tmp / "val.jsonl", [GOOD_CHAT])
        argv = [f"run={ctx['run']}", f"data={data}", f"out={tmp / 'eval_out'}", *kv]
        return Case(argv, expect or kv[0].split("=", 1), watch=[ctx["run"]])
    return make


def _ev_rows(rows, expect):
    def make(tmp, ctx):
        data = lines(tmp / "val.jsonl", rows)
        return Case([f"run={ctx['run']}", f"data={data}", f"out={tmp / 'eval_out'}"], [f"{data}:", *expect],
                    watch=[ctx["run"]])
    return make


def _ev_out_below_file(tmp, ctx):
    data = lines(tmp / "val.jsonl", [GOOD_CHAT])
    (tmp / "afile").write_text("x")
    return Case([f"run={ctx['run']}", f"data={data}", f"out={tmp / 'afile' / 'out'}"], [str(tmp / "afile")],
                watch=[ctx["run"]])


EVALUATE = {
    "num_samples_zero": _ev("eval.num_samples=0"),
    "batch_size_negative": _ev("eval.batch_size=-1"),
    "max_new_tokens_not_int": _ev("eval.max_new_tokens=abc", expect=["eval.max_new_tokens", "'abc'"]),
    "max_length_zero": _ev("data.max_length=0", expect=["max_length", "got 0"]),
    "unknown_key": _ev("eval.samples=3", expect=["eval.samples=3"]),
    "data_format_unknown": _ev("data.format=banana", expect=["banana"]),
    "no_data": lambda tmp, ctx: Case([f"run={ctx['run']}"], ["data=FILE"]),
    "run_and_model": lambda tmp, ctx: Case([f"run={ctx['run']}", f"model={ctx['run']}", "data=x.jsonl"],
                                           ["run=", "model="]),
    "run_missing": lambda tmp, ctx: Case([f"run={tmp / 'nope'}", "data=x.jsonl"], [str(tmp / "nope")]),
    "model_missing": lambda tmp, ctx: Case([f"model={tmp / 'nope'}", f"data={lines(tmp / 'v.jsonl', [GOOD_CHAT])}",
                                            f"out={tmp / 'o'}"], [str(tmp / "nope")]),
    "data_missing": lambda tmp, ctx: Case([f"run={ctx['run']}", f"data={tmp / 'nope.jsonl'}", f"out={tmp / 'o'}"],
                                          [str(tmp / "nope.jsonl")], watch=[ctx["run"]]),
    "data_malformed_row": _ev_rows([GOOD_CHAT, '{"messages": ['], ["malformed JSON"]),
    "data_duplicate_key": _ev_rows(['{"messages": [], "messages": []}'], ["duplicate key 'messages'"]),
    "out_below_a_file": _ev_out_below_file,
}


def _va(*extra, expect=None, rc=2):
    return lambda tmp, ctx: Case(["recipe=instruct_lora", "model=tiny", *extra], expect or extra[0].split("=", 1), rc=rc)


def _va_summary(text):
    def make(tmp, ctx):
        run = tmp / "prev"
        run.mkdir()
        (run / "summary.json").write_text(text)
        return Case(["recipe=instruct_lora", "model=tiny", f"run={run}"], [str(run / "summary.json")])
    return make


def _va_rows(rows, expect):
    def make(tmp, ctx):
        f = lines(tmp / "t.jsonl", rows)
        return Case(["recipe=instruct_lora", "model=tiny", f"data.train_file={f}", "data.validation_file=null"],
                    [f"{f}:", *expect], rc=1)  # validate's report of data problems
    return make


VALIDATE = {
    "tokens_per_s_zero": _va("tokens_per_s=0"),
    "tokens_per_s_nan": _va("tokens_per_s=nan"),
    "tokens_per_s_negative": _va("tokens_per_s=-5", expect=["tokens_per_s", "-5"]),
    "summary_malformed": _va_summary('{"tokens_per_s": '),
    "summary_too_deep": _va_summary(deep_json()),
    "summary_not_an_object": _va_summary("[1]"),
    "summary_rate_nan": _va_summary('{"tokens_per_s": NaN}'),
    "config_lr_nan": _va("optimizer.lr=nan", expect=["optimizer.lr", "finite"]),
    "config_max_length_zero": _va("data.max_length=0", expect=["max_length", "got 0"]),
    "unknown_recipe": _va("recipe=instruct_lorra", expect=["instruct_lorra"]),
    "data_file_missing": _va("data.train_file=/no/such.jsonl", expect=["/no/such.jsonl", "not found"], rc=1),
    "rows_too_deep": _va_rows([GOOD_CHAT, deep_json().replace("\n", " ").strip()], ["nested deeper"]),
    "rows_duplicate_key": _va_rows([GOOD_CHAT, '{"messages": [], "messages": []}'], ["duplicate key"]),
}


@pytest.mark.parametrize("name", case_params(EVALUATE, {"data_duplicate_key", "num_samples_zero", "out_below_a_file"}))
def test_evaluate_bad_input(name, tmp_path, bad_run, capsys):
    check_case(evaluate.main, EVALUATE[name](tmp_path, {"run": bad_run}), tmp_path, capsys)


@pytest.mark.parametrize("name", case_params(VALIDATE, {"summary_too_deep", "tokens_per_s_nan"}))
def test_validate_bad_input(name, tmp_path, capsys):
    check_case(validate.main, VALIDATE[name](tmp_path, {}), tmp_path, capsys)
