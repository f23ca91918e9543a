"""recipe=dpo / dpo_qlora / reward end to end on the embedded tiny model, in-process through `main(argv)`,
plus the pair weighting of an optimizer step across micro-batches, the reward export against transformers,
`validate` on pairs and a bad pair on the command line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from mistral_ft.train import main

QUIET = ["trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]
SHORT = ["trainer.max_steps=4", "checkpoint.every_n_train_steps=2", "data.batch_size=4", "trainer.limit_val_batches=1",
         "trainer.val_check_interval=4", *QUIET]


def _summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("dpo") / "run"
    assert main(["recipe=dpo", "model=tiny", *SHORT, f"hydra.run.dir={run}"]) == 0
    return run


def test_dpo_run_logs_preference_metrics_and_saves_only_the_adapter(dpo_run):
    s = _summary(dpo_run)
    assert s["task"] == "dpo" and s["global_step"] == 4
    for key in ("val_reward_accuracy", "val_reward_chosen", "val_reward_rejected", "val_reward_margin",
                "val_logps_chosen", "val_logps_rejected"):
        assert isinstance(s[key], float), key
    assert s["loss_history"][0][1] == pytest.approx(0.6931, abs=1e-3)  # policy == reference at step 0
    header = (dpo_run / "logs" / "version_0" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"train_loss", "train_reward_accuracy", "train_reward_margin", "train_logps_chosen"} <= set(header)
    ckpt = torch.load(dpo_run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["state_dict"] and all("lora_" in k for k in ckpt["state_dict"])  # no frozen base, no reference copy
    assert (dpo_run / "adapter" / "adapter_model.safetensors").is_file()
    cfg = json.loads((dpo_run / "adapter" / "adapter_config.json").read_text())
    assert cfg["task_type"] == "CAUSAL_LM"


def test_dpo_resume_continues_exactly(dpo_run, tmp_path):
    """Resume from the step-2 checkpoint: steps 3-4 repeat the uninterrupted run's losses."""
    run = tmp_path / "run"
    shutil.copytree(dpo_run, run)
    for name in ("step-000004.ckpt", "last.ckpt"):
        (run / "checkpoints" / name).unlink()
    shutil.rmtree(run / "adapter")
    assert main([f"resume={run / 'checkpoints' / 'step-000002.ckpt'}", "trainer.max_steps=4", *QUIET]) == 0
    resumed, straight = _summary(run)["loss_history"], _summary(dpo_run)["loss_history"]
    assert [s for s, _ in resumed] == [0, 1, 2, 3]
    torch.testing.assert_close(torch.tensor([v for _, v in resumed]), torch.tensor([v for _, v in straight]),
                               rtol=1e-5, atol=1e-6)


def test_dpo_qlora_recipe_runs(tmp_path):
    run = tmp_path / "run"
    assert main(["recipe=dpo_qlora", "model=tiny", "trainer.max_steps=2", "data.batch_size=2",
                 "trainer.limit_val_batches=1", *QUIET, f"hydra.run.dir={run}"]) == 0
    s = _summary(run)
    assert s["peft"] == "qlora" and s["global_step"] == 2 and s["val_reward_accuracy"] is not None


def test_reward_run_exports_a_folder_whose_score_transformers_reproduces(tmp_path):
    import transformers

    from mistral_ft.export import main as export_main

    run = tmp_path / "run"
    assert main(["recipe=reward", "model=tiny", *SHORT, f"hydra.run.dir={run}"]) == 0
    s = _summary(run)
    assert s["task"] == "reward" and s["val_accuracy"] is not None and s["val_margin"] is not None
    assert export_main([f"run_dir={run}", f"output_dir={tmp_path / 'out'}"]) == 0
    folder = tmp_path / "out" / "merged"
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["num_labels"] == 1 and cfg["pad_token_id"] == 0 and cfg["architectures"] == ["MistralForSequenceClassification"]

    from mistral_ft.data.preference import PairCollator, build_pair_datasets
    from mistral_ft.model import MistralForSequenceClassification
    from mistral_ft.tokenizer import MistralTokenizer

    tok = MistralTokenizer.from_pretrained(str(folder))
    val, _, _ = build_pair_datasets({"train_file": "data/preference_val.jsonl", "format": "preference", "max_length": 128}, tok)
    batch = PairCollator(0)([val[i] for i in range(4)])  # right-padded rows of different lengths
    theirs = transformers.AutoModelForSequenceClassification.from_pretrained(folder, dtype=torch.float32).eval()
    ours = MistralForSequenceClassification.from_pretrained(str(folder)).eval()
    with torch.no_grad():
        a = theirs(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        b = ours(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert a.shape == (8, 1) and float((a - b).abs().max()) < 1e-5


# ---- pair weighting of a step -------------------------------------------------------------------------
def _grads_after_one_step(batches: list[dict], accumulate: int) -> dict[str, torch.Tensor]:
    import lightning as L

    from mistral_ft.model import MistralForCausalLM
    from mistral_ft.model.tiny import random_tiny_path  # gradient scales the tolerances were set for
    from mistral_ft.training.tasks import DPOTask, TaskSettings

    captured: dict[str, torch.Tensor] = {}

    class Capture(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            captured.update({n: p.grad.clone() for n, p in pl_module.named_parameters() if p.grad is not None})

    cfg = {"optimizer": {"name": "adamw", "lr": 0.0, "weight_decay": 0.0, "betas": [0.9, 0.999], "eps": 1e-8},
           "scheduler": {"name": "constant", "warmup_steps": 0, "min_lr_ratio": 1.0}, "task": "dpo",
           "preference": {"beta": 0.5}}
    model = MistralForCausalLM.from_pretrained(str(random_tiny_path()))
    module = DPOTask(model, TaskSettings.from_config(cfg), cfg)
    with torch.no_grad():  # move the policy off the reference, so that pairs differ in their gradients
        model.lm_head.weight.add_(0.05 * torch.randn_like(model.lm_head.weight, generator=torch.Generator().manual_seed(0)))
    trainer = L.Trainer(max_steps=1, accumulate_grad_batches=accumulate, accelerator="cpu", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[Capture()], num_sanity_val_steps=0)
    trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None))
    return captured


def test_a_step_is_a_mean_over_all_its_pairs(one_thread):
    from mistral_ft.data.preference import PairCollator, build_pair_datasets
    from mistral_ft.model.tiny import tiny_model_path
    from mistral_ft.tokenizer import MistralTokenizer

    tok = MistralTokenizer.from_pretrained(str(tiny_model_path()))
    pairs, _, _ = build_pair_datasets({"train_file": "data/preference_val.jsonl", "format": "preference", "max_length": 128}, tok)
    items = [pairs[i] for i in range(4)]
    collate = PairCollator(0)
    accumulated = _grads_after_one_step([collate(items[:1]), collate(items[1:])], accumulate=2)  # 1 + 3 pairs
    single = _grads_after_one_step([collate(items)], accumulate=1)
    first_alone = _grads_after_one_step([collate(items[:1])], accumulate=1)
    assert accumulated.keys() == single.keys() and len(single) > 5
    for name in single:
        torch.testing.assert_close(accumulated[name], single[name], atol=1e-6, rtol=1e-4, msg=name)
    # one pair alone gives other gradients: the comparison above can fail
    assert max(float((first_alone[n] - single[n]).abs().max()) for n in single) > 1e-5


# ---- bad pairs ------------------------------------------------------------------------------------------
GOOD = {"prompt": "Greet Ben.", "chosen": "Hello Ben!", "rejected": "Hello Ana!"}


def _write(tmp_path, rows, name="pairs.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_validate_reports_every_bad_pair(tmp_path, capsys):
    from mistral_ft.validate import main as validate

    path = _write(tmp_path, [GOOD, {"prompt": "Hi", "chosen": "Yes", "rejected": "Yes"}, GOOD, {"prompt": "Hi", "chosen": "a"}])
    rc = validate(["recipe=dpo", "model=tiny", f"data.train_file={path}", "data.validation_file=null"])
    err = capsys.readouterr().err
    assert rc == 1 and "pairs.jsonl:2: field 'rejected': identical" in err and "pairs.jsonl:4: field 'rejected': missing" in err
    assert validate(["recipe=dpo", "model=tiny"]) == 0
    assert "train examples: 200 valid" in capsys.readouterr().out


def test_cli_bad_pair_exits_2_with_file_line_and_no_run_folder(tmp_path, capsys):
    path = _write(tmp_path, [GOOD, {"prompt": "Hi", "chosen": "Yes", "rejected": "Yes"}])
    run = tmp_path / "run"
    rc = main(["recipe=dpo", "model=tiny", f"data.train_file={path}", "data.validation_file=null", f"hydra.run.dir={run}"])
    err = capsys.readouterr().err
    assert rc == 2 and "pairs.jsonl:2: field 'rejected': identical" in err and "Traceback" not in err
    assert not run.exists()
