"""`python -m mistral_ft.train` as a Hydra app: Hydra's flags print what Hydra's own apps print, the override
grammar (`~key`, `+key`) and plugins work, a recipe may be a file, a user's own group option wins.

Hydra's behaviour is taken from a minimal plain `@hydra.main` app run in the same test (not from a copy
of its output), so a drift in either shows up as a difference in structure.
"""

from __future__ import annotations

import csv
import logging
import sys
from pathlib import Path

import pytest
import yaml

from mistral_ft.train import main

REPO = Path(__file__).resolve().parents[2]
QUIET = ["trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]
TINY = ["recipe=instruct_lora", "model=tiny"]


def _plain_app(tmp_path: Path, capsys, *flags: str) -> str:
    """What a plain `@hydra.main` app (config: db.driver/db.user, one group `db`) prints for `flags`."""
    import hydra
    from hydra.core.global_hydra import GlobalHydra

    conf = tmp_path / "plain_conf"
    (conf / "db").mkdir(parents=True, exist_ok=True)
    (conf / "config.yaml").write_text("defaults:\n  - db: mysql\n  - _self_\nseed: 1\n")
    (conf / "db" / "mysql.yaml").write_text("driver: mysql\nuser: omry\n")

    @hydra.main(version_base="1.3", config_path=str(conf), config_name="config")
    def app(cfg) -> None:  # pragma: no cover - the flags exit before a run
        raise AssertionError("the plain app ran instead of printing")

    GlobalHydra.instance().clear()
    argv, sys.argv = sys.argv, ["app.py", *flags]
    root = logging.getLogger()
    handlers = list(root.handlers)
    capsys.readouterr()
    try:
        app()
    except SystemExit as done:
        assert not done.code, done
    finally:
        sys.argv = argv
        root.handlers[:] = handlers
        GlobalHydra.instance().clear()
    return capsys.readouterr().out


def _ours(capsys, *argv: str) -> str:
    capsys.readouterr()
    assert main(list(argv)) == 0
    return capsys.readouterr().out


def test_cfg_job_hydra_and_package_print_as_hydra_does(tmp_path, capsys):
    plain = yaml.safe_load(_plain_app(tmp_path, capsys, "--cfg", "job"))
    ours = yaml.safe_load(_ours(capsys, *TINY, "--cfg", "job"))
    assert "hydra" not in plain and "hydra" not in ours  # job: the app's config only
    assert ours["model"]["name"] == "tiny" and ours["data"]["max_length"] == 128
    assert "max_epochs" in ours["trainer"]  # every Lightning Trainer argument is a declared key
    plain_h = yaml.safe_load(_plain_app(tmp_path, capsys, "--cfg", "hydra"))
    ours_h = yaml.safe_load(_ours(capsys, *TINY, "--cfg", "hydra"))
    assert list(plain_h) == list(ours_h) == ["hydra"]
    assert set(plain_h["hydra"]) == set(ours_h["hydra"])  # the same Hydra node: run, sweep, launcher, ...
    assert ours_h["hydra"]["runtime"]["choices"]["recipe"] == "instruct_lora"
    plain_p = _plain_app(tmp_path, capsys, "--cfg", "job", "--package", "db")
    ours_p = _ours(capsys, *TINY, "--cfg", "job", "--package", "scheduler")
    assert plain_p.splitlines()[0] == "# @package db" and ours_p.splitlines()[0] == "# @package scheduler"
    assert yaml.safe_load(ours_p)["name"] == "cosine"
    resolved = yaml.safe_load(_ours(capsys, *TINY, "--cfg", "hydra", "--resolve"))
    assert "${" not in str(resolved["hydra"]["run"]["dir"])


def test_info_and_help_print_as_hydra_does(tmp_path, capsys):
    plain = _plain_app(tmp_path, capsys, "--info", "defaults").splitlines()
    ours = _ours(capsys, *TINY, "--info", "defaults").splitlines()
    # the same table: title, underline, column header; each of our groups is a row
    assert [plain[i] for i in (1, 2)] == [ours[i] for i in (1, 2)] == ["Defaults List", "*************"]
    assert plain[3].split("|")[1:-1][1:] and [c.strip() for c in plain[3].split("|")] == \
        [c.strip() for c in ours[3].split("|")]
    assert any(line.startswith("| recipe/instruct_lora ") for line in ours)
    assert any(line.startswith("| specialize/instruct_lora_tiny ") for line in ours)
    assert len([line for line in ours if "Defaults List" in line]) == 1  # printed once
    plain_help = _plain_app(tmp_path, capsys, "--help")
    ours_help = _ours(capsys, "--help")
    for section in ("== Configuration groups ==", "== Config ==", "Powered by Hydra (https://hydra.cc)",
                    "Use --hydra-help to view Hydra specific help"):
        assert section in plain_help and section in ours_help, section
    assert "db: mysql" in plain_help and "recipe: classify, dpo" in ours_help  # $APP_CONFIG_GROUPS
    assert "The config above is recipe=instruct_lora" in ours_help
    hydra_help = _ours(capsys, "--hydra-help")
    assert "Hydra (" in hydra_help and "--multirun" in hydra_help and "--shell-completion" in hydra_help
    script = _ours(capsys, "--shell-completion", "install=bash")
    assert "hydra_bash_completion" in script


def test_flag_errors_are_one_paragraph(capsys, tmp_path):
    assert main([*TINY, "--cfg"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: argument --cfg/-c: expected one argument") and "Traceback" not in err
    assert main([*TINY, "--bogus"]) == 2
    assert "unknown flag '--bogus'" in capsys.readouterr().err
    assert main(["model=tiny", "--cfg", "job"]) == 2
    assert "no recipe given" in capsys.readouterr().err
    assert main([*TINY, "--resolve"]) == 2
    assert "--resolve can only be used with --cfg or --help" in capsys.readouterr().err


def _own_conf(tmp_path: Path) -> Path:
    """A user's own config folder with a data group option (bundled chats, max_length 64)."""
    conf = tmp_path / "my_conf"
    (conf / "data").mkdir(parents=True)
    (conf / "data" / "my_data.yaml").write_text(
        f"train_file: {REPO / 'data' / 'instruct_train.jsonl'}\nvalidation_file: {REPO / 'data' / 'instruct_val.jsonl'}\n"
        "format: messages\nmax_length: 64\nbatch_size: 2\n")
    return conf


def test_a_users_own_group_option_wins_and_is_reported(tmp_path, capsys, caplog):
    conf = _own_conf(tmp_path)
    with caplog.at_level(logging.WARNING, logger="mistral_ft.train"):
        out = yaml.safe_load(_ours(capsys, *TINY, "data=my_data", f"hydra.searchpath=[file://{conf}]", "--cfg", "job"))
    assert out["data"]["max_length"] == 64 and out["data"]["batch_size"] == 2  # not the tiny model's 128 / 8
    said = caplog.text
    assert "data.max_length: keeping 64 from your data=my_data over 128 from specialize/instruct_lora_tiny.yaml" in said
    # the command line still wins over the user's group; -cd finds the group without hydra.searchpath
    out = yaml.safe_load(_ours(capsys, *TINY, "data=my_data", "data.max_length=100", "-cd", str(conf), "--cfg", "job"))
    assert out["data"]["max_length"] == 100 and out["data"]["batch_size"] == 2
    # our own options keep Hydra's order: the tiny layer still sets max_length for data=instruct_tiny
    assert yaml.safe_load(_ours(capsys, *TINY, "data=instruct_tiny", "--cfg", "job"))["data"]["max_length"] == 128


def test_sweep_points_are_all_validated_before_any_folder(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    assert main(["-m", *TINY, "optimizer.lr=1e-3,-1", f"hydra.sweep.dir={sweep}"]) == 2
    err = capsys.readouterr().err
    assert "optimizer.lr" in err and "must be > 0" in err
    assert not sweep.exists()
    from mistral_ft.training.hydra_app import sweep_points

    points = sweep_points(["a=1,2", "b=range(0,2)", "c=x"])
    assert points == [["a=1", "b=0", "c=x"], ["a=1", "b=1", "c=x"], ["a=2", "b=0", "c=x"], ["a=2", "b=1", "c=x"]]


def test_recipe_file_removed_scheduler_and_recorded_overrides(tmp_path, capsys):
    """A recipe of the user's own by path, `~scheduler` (a constant lr), and overrides.yaml as typed."""
    recipe = tmp_path / "recipes_of_mine" / "my_sft.yaml"
    recipe.parent.mkdir()
    recipe.write_text("# @package _global_\ndefaults:\n  - _self_\n  - override /model: tiny\n"
                      "task: causal_lm\noptimizer:\n  lr: 1.0e-3\nscheduler:\n  warmup_steps: 5\n"
                      "trainer:\n  max_steps: 3\n  val_check_interval: 3\n")
    run = tmp_path / "run"
    rel = Path("..") / recipe.relative_to(tmp_path)  # relative to the working directory, as typed
    import os

    cwd = os.getcwd()
    (tmp_path / "work").mkdir()
    os.chdir(tmp_path / "work")
    try:
        rc = main([f"recipe={rel}", "~scheduler", "trainer.limit_val_batches=1", "checkpoint.save_adapter=false",
                   "trainer.max_time=00:00:30:00", f"hydra.run.dir={run}", *QUIET])
    finally:
        os.chdir(cwd)
    assert rc == 0, capsys.readouterr().err
    recorded = yaml.safe_load((run / "overrides.yaml").read_text())
    assert f"recipe={recipe}" in recorded and "~scheduler" in recorded  # the path, made absolute
    assert "trainer.max_time=00:00:30:00" in recorded and not any(o.startswith("++") for o in recorded)
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["scheduler"] == {"name": "constant", "warmup_steps": 0, "min_lr_ratio": 1.0, "_target_": None}
    rows = list(csv.DictReader((run / "logs" / "version_0" / "metrics.csv").open()))
    lrs = {float(r["lr"]) for r in rows if r.get("lr")}
    assert len(rows) >= 3 and len(lrs) == 1 and lrs.pop() == pytest.approx(1.0e-3, rel=1e-6)  # no warmup, no decay
    assert not list(Path(os.environ.get("TMPDIR", "/tmp")).glob("mistral_ft_recipe_*"))  # the link folder is gone


@pytest.mark.slow  # two loky worker processes importing torch and Lightning
def test_joblib_launcher_plugin_runs_each_point_once(tmp_path):
    """`hydra/launcher=joblib` (the hydra-joblib-launcher plugin): each job runs and logs once."""
    import os
    import subprocess

    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    sweep = tmp_path / "sweep"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "mistral_ft.train", "-m", "recipe=classify", "model=tiny",
                           "trainer.max_steps=2", "trainer.limit_val_batches=1", "checkpoint.save_adapter=false",
                           "optimizer.lr=1e-3,2e-3", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
                           f"hydra.sweep.dir={sweep}", *QUIET], capture_output=True, text=True, cwd=tmp_path,
                          env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    both = proc.stdout + proc.stderr
    assert both.count("`Trainer.fit` stopped: `max_steps=2` reached.") == 2  # once per job, not twice
    assert both.count("trainable of") == 2
    for job in ("0", "1"):
        recorded = yaml.safe_load((sweep / job / "overrides.yaml").read_text())
        assert f"optimizer.lr={('0.001', '0.002')[int(job)]}" in recorded, recorded
