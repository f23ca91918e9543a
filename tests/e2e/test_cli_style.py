"""One CLI style (docs/cli.md): `key=value` for the commands that compose a config, flags for the one-shot
tools, the same names for the same things; old spellings still work with a note; `mistral-ft COMMAND`."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mistral_ft.__main__ import COMMANDS
from mistral_ft.__main__ import main as mistral_ft

REPO = Path(__file__).resolve().parents[2]
TINY = ["recipe=instruct_lora", "model=tiny"]


def test_the_same_names_in_both_styles(capsys):
    from mistral_ft import evaluate, export, generate

    flags = {a.dest for a in generate.build_parser()._actions}
    assert {"model", "adapter", "run"} <= flags
    assert {"run", "model", "adapter", "data", "output_dir"} <= set(evaluate.KEYS)
    assert {"run", "output_dir"} <= set(export.KEYS) and "run_dir" not in export.KEYS
    from mistral_ft import convert

    with pytest.raises(SystemExit):  # convert builds its parser inside main: its --help lists the flags
        convert.main(["--help"])
    assert "--output_dir" in capsys.readouterr().out


def test_dispatcher_runs_each_command_in_process(capsys):
    assert mistral_ft(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(f"  {name} " in out for name in ("train", "validate", "evaluate", "export", "generate", "convert"))
    assert set(COMMANDS) == {"train", "validate", "evaluate", "export", "generate", "convert"}
    assert mistral_ft(["tarin"]) == 2
    assert "unknown command 'tarin'" in capsys.readouterr().err
    assert mistral_ft(["train", *TINY, "--cfg", "job", "--package", "model"]) == 0
    via_dispatcher = capsys.readouterr().out
    from mistral_ft.train import main as train

    assert train([*TINY, "--cfg", "job", "--package", "model"]) == 0
    assert capsys.readouterr().out == via_dispatcher and via_dispatcher.startswith("# @package model")
    assert mistral_ft(["export", "--help"]) == 0
    assert "run=RUN_OR_CKPT" in capsys.readouterr().out


@pytest.mark.slow  # a fresh interpreter importing torch and Lightning: ~20 s on 2 shared cores
def test_python_dash_m_and_the_console_script(tmp_path):
    """Once as a subprocess (`python -m mistral_ft`); the installed `mistral-ft` script too when it is this tree's."""
    cmd = [sys.executable, "-m", "mistral_ft", "train", *TINY, "--cfg", "job", "--package", "data"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert yaml.safe_load(proc.stdout)["max_length"] == 128
    script = Path(sys.executable).parent / "mistral-ft"
    if not script.is_file():
        pytest.skip("mistral-ft is not installed (pip install -e . makes the console script)")
    proc = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0 and "validate" in proc.stdout, proc.stderr[-2000:]


def test_old_spellings_work_with_a_note(tmp_path, capsys):
    from mistral_ft.evaluate import main as evaluate
    from mistral_ft.export import main as export
    from mistral_ft.validate import main as validate

    gone = tmp_path / "gone"
    assert export([f"run_dir={gone}", f"output_dir={tmp_path / 'out'}"]) == 2
    old = capsys.readouterr().err
    assert export([f"run={gone}", f"output_dir={tmp_path / 'out'}"]) == 2
    new = capsys.readouterr().err
    assert "note: export: run_dir=... is deprecated" in old and "use run=..." in old and "note:" not in new
    assert old.splitlines()[-1] == new.splitlines()[-1] and str(gone) in new  # the same error either way
    assert evaluate([f"model={gone}", "data=x.jsonl", f"out={tmp_path / 'e'}"]) == 2
    assert "note: evaluate: out=... is deprecated" in capsys.readouterr().err
    assert validate([*TINY, f"--from-run={gone}"]) == 2
    err = capsys.readouterr().err
    assert "note: validate: --from-run=... is deprecated" in err and f"run={gone}: " in err
    assert validate([*TINY, "tokens_per_s=fast"]) == 2
    assert "tokens_per_s: expected a number, got 'fast'" in capsys.readouterr().err


def test_validate_takes_hydra_flags(capsys):
    from mistral_ft.validate import main as validate

    assert validate([*TINY, "--cfg", "job", "--package", "optimizer"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# @package optimizer") and yaml.safe_load(out)["name"] == "adamw"
    assert validate(["--help"]) == 0
    assert "python -m mistral_ft.validate recipe=NAME" in capsys.readouterr().out


def test_evaluate_and_export_are_hydra_apps(tmp_path, capsys):
    """Hydra's flags over their own primary configs (mistral_ft/commands_conf): `--cfg job` prints exactly
    the settings the command then runs with; flags that mean nothing for one run are refused."""
    from mistral_ft import evaluate, export
    from mistral_ft.training.hydra_app import command_settings

    args = [f"run={tmp_path / 'run'}", f"output_dir={tmp_path / 'out'}", "dtype=bfloat16", "max_shard_size=500MB",
            "check=false"]
    capsys.readouterr()
    assert export.main([*args, "--cfg", "job"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    printed, settings = command_settings(args, export.__file__, "export")
    assert printed is None and {k: v for k, v in shown.items() if v is not None} == settings
    kwargs = export.parse_args(settings)
    assert (kwargs["run_dir"], kwargs["max_shard_size"], kwargs["check"], kwargs["dtype"], kwargs["gguf"]) == \
        (str(tmp_path / "run"), 500 * 10**6, False, "bfloat16", False)
    # evaluate: data=FILE is data.file; the old out= spelling lands in output_dir; --package one node
    ev = [f"run={tmp_path / 'run'}", "data=chats.jsonl", "eval.num_samples=3", f"out={tmp_path / 'ev'}"]
    assert evaluate.main([*ev, "--cfg", "job"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["data"] == {"file": "chats.jsonl", "format": "messages", "max_length": 2048}
    assert shown["eval"]["num_samples"] == 3 and shown["output_dir"] == str(tmp_path / "ev")
    assert evaluate.main([*ev, "--cfg", "job", "--package", "eval"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# @package eval") and yaml.safe_load(out)["num_samples"] == 3
    for main, usage in ((export.main, "run=RUN_OR_CKPT output_dir=FOLDER"), (evaluate.main, "data=FILE")):
        assert main(["--help"]) == 0
        text = capsys.readouterr().out
        assert usage in text and "== Config ==" in text and "Configuration groups" not in text
        assert "Powered by Hydra" in text
    assert export.main(["--hydra-help"]) == 0 and "--shell-completion" in capsys.readouterr().out
    assert export.main(["--info", "searchpath"]) == 0 and "commands_conf" in capsys.readouterr().out
    assert evaluate.main(["-sc", "install=bash"]) == 0 and "hydra_bash_completion" in capsys.readouterr().out
    for argv, message in (([*args, "-m"], "export runs once: -m/--multirun sweeps are train's"),
                          ([*args, "--resolve"], "--resolve can only be used with --cfg or --help"),
                          ([*args, "--bogus"], "unknown flag '--bogus'"),
                          ([args[0], "outptu_dir=x"], "Did you mean 'output_dir'?"),
                          ([*args, "+extra=1"], "unknown key 'extra'"),
                          ([args[0]], "output_dir: a value is required")):
        assert export.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert evaluate.main([*ev, "-m"]) == 2 and "evaluate runs once" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not (tmp_path / "ev").exists()
