"""The corpus through real processes: `python -m mistral_ft.<cli>` exits 2 with the message and no traceback
(what the in-process cases cannot see: the `__main__` wiring, argparse's exit, an import-time failure).

A fresh interpreter costs ~8 s of CPU here (torch, Lightning imports; measured 9-30 s wall per process on
the shared 2-core machine), so the default suite runs 15 cases (two or three per CLI);
`-m slow` runs every case of the corpus that needs no monkeypatching (a full disk is simulated in-process
only).
"""

from __future__ import annotations

import pytest
from helpers.bad_input import check_subprocess

from bad_input import test_bad_convert, test_bad_evaluate_validate, test_bad_export, test_bad_generate, test_bad_train

# (cli module, case table, how its makers are called)
TABLES = {
    "generate": (test_bad_generate.CASES, "ctx"),
    "convert": (test_bad_convert.CASES, "mp"),
    "export": (test_bad_export.CASES, "ctx_mp"),
    "evaluate": (test_bad_evaluate_validate.EVALUATE, "ctx"),
    "validate": (test_bad_evaluate_validate.VALIDATE, "ctx"),
    "train": (test_bad_train.CASES, "ctx_mp"),
}
# about 15 by default, spread over every CLI and every kind of culprit (a value, a file, a folder, a run)
DEFAULT = {("generate", "top_p_above_one"), ("generate", "device_banana"), ("generate", "adapter_weights_truncated"),
           ("export", "base_model_json_malformed"), ("export", "output_non_empty_kept"), ("export", "tolerance_inf"),
           ("convert", "zero_heads"), ("convert", "tokenizer_garbage"), ("convert", "shard_size_zero"),
           ("evaluate", "data_malformed_row"), ("evaluate", "num_samples_zero"),
           ("validate", "rows_duplicate_key"), ("validate", "tokens_per_s_nan"),
           ("train", "lr_inf"), ("train", "run_dir_below_a_file")}
ALL = [(cli, name) for cli, (table, _) in TABLES.items() for name in sorted(table) if name != "disk_full"]


def _params():
    for cli, name in ALL:
        marks = () if (cli, name) in DEFAULT else (pytest.mark.slow,)
        yield pytest.param(cli, name, marks=marks, id=f"{cli}-{name}")


@pytest.mark.parametrize(("cli", "name"), list(_params()))
def test_bad_input_in_a_subprocess(cli, name, tmp_path, bad_run, tiny_folder, monkeypatch):
    table, style = TABLES[cli]
    ctx = {"run": bad_run, "tiny": tiny_folder}
    make = table[name]
    case = make(tmp_path, ctx) if style == "ctx" else make(tmp_path, monkeypatch) if style == "mp" else \
        make(tmp_path, ctx, monkeypatch)
    check_subprocess(cli, case, tmp_path)


def test_the_default_cases_exist():
    assert DEFAULT <= set(ALL)
