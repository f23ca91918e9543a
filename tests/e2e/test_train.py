"""End-to-end training on the embedded tiny model, in-process through `main(argv)`.

One instruct run and one classify run are shared (session fixtures) by the tests that inspect a
run folder; tests that change a folder (resume) work on a copy.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from mistral_ft.train import main
from mistral_ft.training.compose import compose_config

REPO = Path(__file__).resolve().parents[2]
QUIET = ["trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]
INSTRUCT_STEPS = 20
CLASSIFY_STEPS = 40


def _summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


@pytest.fixture(scope="session")
def instruct_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("instruct") / "run"
    rc = main(["recipe=instruct_lora", "model=tiny", f"trainer.max_steps={INSTRUCT_STEPS}",
               "checkpoint.every_n_train_steps=10", "eval.num_samples=6", "eval.max_new_tokens=12",
               f"hydra.run.dir={run_dir}", *QUIET])
    assert rc == 0
    return run_dir


@pytest.fixture(scope="session")
def classify_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("classify") / "run"
    rc = main(["recipe=classify", "model=tiny", f"trainer.max_steps={CLASSIFY_STEPS}",
               f"hydra.run.dir={run_dir}", *QUIET])
    assert rc == 0
    return run_dir


def _load(path: Path) -> dict:
    # weights_only=True is torch.load's default: hyperparameters must be plain containers
    return torch.load(path, map_location="cpu", weights_only=True)


# ---- the embedded default meets its thresholds --------------------------------------------------
def test_instruct_lora_loss_falls_and_run_folder_is_complete(instruct_run):
    s = _summary(instruct_run)
    assert s["global_step"] == INSTRUCT_STEPS
    assert s["train_loss_last"] <= 0.9 * s["train_loss_first"], (s["train_loss_first"], s["train_loss_last"])
    assert s["val_loss"] is not None and s["val_ppl"] > 1
    for key in ("tokens_seen", "tokens_per_s", "wall_s", "peak_memory_mb"):
        assert s[key] > 0, key
    assert s["tokens_seen"] >= INSTRUCT_STEPS * 8 * 10  # 8 rows of >= 10 tokens per step
    for name in ("config.yaml", "overrides.yaml", "summary.json", "loss_curve.png", "checkpoints/last.ckpt",
                 f"checkpoints/step-{INSTRUCT_STEPS:06d}.ckpt", "checkpoints/step-000010.ckpt",
                 "adapter/adapter_config.json", "adapter/adapter_model.safetensors"):
        assert (instruct_run / name).is_file(), name
    assert (instruct_run / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"
    metrics = Path(s["paths"]["metrics_csv"])
    header = metrics.read_text().splitlines()[0].split(",")
    assert {"train_loss", "val_loss", "lr", "step"} <= set(header)
    config = (instruct_run / "config.yaml").read_text()
    assert "q_proj" in config and "lm_head" not in config and f"max_steps: {INSTRUCT_STEPS}" in config


def test_instruct_run_reports_generation_eval(instruct_run):
    """The tiny default runs the generation eval (specialize/instruct_lora_tiny.yaml): before, at each
    validation, in summary.json, the sample table and the report; its cost apart from training time."""
    s = _summary(instruct_run)
    for key in ("val_exact_match", "val_normalised_match", "val_mean_generated_tokens"):
        assert 0 <= s[key] and key in s["val_history"][-1], key
        assert key in s["eval_before"], key
    assert s["eval_before"]["val_mean_generated_tokens"] > 0  # the base continues text before fine-tuning
    assert s["eval_time_s"] > 0 and s["train_time_s"] > 0
    rows = [json.loads(line) for line in Path(s["paths"]["eval_samples"]).read_text().splitlines()]
    assert len(rows) == 6 and {"prompt", "reference", "generated"} <= set(rows[0])
    assert s["val_exact_match"] == sum(r["exact"] for r in rows) / 6
    assert any("before fine-tuning" in line for line in s["eval_report"])
    header = Path(s["paths"]["metrics_csv"]).read_text().splitlines()[0].split(",")
    assert "val_exact_match" in header


def test_classify_beats_chance(classify_run):
    s = _summary(classify_run)
    chance = 1 / 3  # sports / food / weather, balanced
    assert s["val_accuracy"] >= chance + 0.25, s["val_accuracy"]
    assert 0 <= s["val_f1"] <= 1
    assert s["id2label"] == {"0": "food", "1": "sports", "2": "weather"}
    assert s["train_loss_last"] < s["train_loss_first"]


# ---- checkpoints hold only what trains ------------------------------------------------------------
def test_classify_reports_per_class_metrics_and_confusion_png(classify_run):
    s = _summary(classify_run)
    rep = s["class_report"]
    counts = rep["confusion"]
    assert rep["labels"] == [s["id2label"][str(i)] for i in range(len(rep["labels"]))]
    assert sum(map(sum, counts)) == s["data"]["val_examples"]  # every validation example counted once
    # the matrix's diagonal is the accuracy torchmetrics logged
    assert sum(counts[i][i] for i in range(len(counts))) / sum(map(sum, counts)) == pytest.approx(s["val_accuracy"])
    assert set(rep["precision"]) == set(rep["labels"]) == set(rep["recall"])
    assert Path(s["paths"]["confusion_matrix"]).read_bytes()[:4] == b"\x89PNG"


def test_checkpoint_holds_no_frozen_base_weights(instruct_run):
    ckpt = _load(instruct_run / "checkpoints" / "last.ckpt")
    keys = list(ckpt["state_dict"])
    # LoRA matrices, and the tiny recipe's lm_head, trained in full (modules_to_save)
    assert keys and all("lora_A" in k or "lora_B" in k or "lm_head.modules_to_save." in k for k in keys), keys[:5]
    assert not any(k.endswith(("base_layer.weight", "embed_tokens.weight", "norm.weight")) for k in keys)
    n_saved = sum(v.numel() for v in ckpt["state_dict"].values())
    assert n_saved == _summary(instruct_run)["trainable_params"]
    assert isinstance(ckpt["hyper_parameters"], dict) and ckpt["hyper_parameters"]["task"] == "causal_lm"
    assert ckpt["optimizer_states"] and ckpt["lr_schedulers"]
    assert ckpt["global_step"] == INSTRUCT_STEPS


def test_classification_head_and_labels_are_saved(classify_run):
    ckpt = _load(classify_run / "checkpoints" / "last.ckpt")
    head = [k for k in ckpt["state_dict"] if "score" in k]
    assert head and all("modules_to_save" in k for k in head), head
    assert not any("original_module" in k for k in ckpt["state_dict"])
    assert ckpt["mistral_ft"]["id2label"] == {0: "food", 1: "sports", 2: "weather"}
    assert ckpt["global_step"] == CLASSIFY_STEPS  # saved after fit: 40 is not a multiple of every_n_train_steps
    from safetensors import safe_open

    with safe_open(str(classify_run / "adapter" / "adapter_model.safetensors"), "pt") as f:
        assert any("score" in k for k in f.keys())


# ---- resume -------------------------------------------------------------------------------------
def _data_position(ckpt: dict) -> dict:
    return ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]


def test_resume_continues_step_count_and_data_position(instruct_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(instruct_run, run)
    before = _load(run / "checkpoints" / "last.ckpt")
    assert _data_position(before)["samples"] == INSTRUCT_STEPS * 8
    rc = main([f"resume={run}", f"trainer.max_steps={INSTRUCT_STEPS + 4}", *QUIET])
    assert rc == 0
    s = _summary(run)
    assert s["global_step"] == INSTRUCT_STEPS + 4
    assert [step for step, _ in s["loss_history"]] == list(range(INSTRUCT_STEPS + 4))
    after = _load(run / "checkpoints" / "last.ckpt")
    assert _data_position(after)["samples"] == (INSTRUCT_STEPS + 4) * 8
    assert s["tokens_seen"] > _summary(instruct_run)["tokens_seen"]
    # one last.ckpt, rewritten, and no versioned copies (last-v1.ckpt, step-N-v1.ckpt) beside it
    assert not [p.name for p in (run / "checkpoints").iterdir() if "-v" in p.stem], list((run / "checkpoints").iterdir())
    # one history (issue 17): the resumed segment appends to logs/version_0, steps continuing
    assert sorted(p.name for p in (run / "logs").iterdir()) == ["version_0"]
    rows = (run / "logs" / "version_0" / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    steps = [int(r.split(",")[header.index("step")]) for r in rows[1:] if r.split(",")[header.index("train_loss")]]
    assert steps == list(range(INSTRUCT_STEPS + 4))


def test_resume_keeps_head_and_label_mapping(classify_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(classify_run, run)
    head_before = {k: v for k, v in _load(run / "checkpoints" / "last.ckpt")["state_dict"].items() if "score" in k}
    # the head rows mean labels: resuming with another label order is refused
    rc = main([f"resume={run}", f"trainer.max_steps={CLASSIFY_STEPS + 2}", "data.labels=[weather,food,sports]", *QUIET])
    assert rc == 2 and "label mapping changed" in capsys.readouterr().err
    rc = main([f"resume={run}", f"trainer.max_steps={CLASSIFY_STEPS + 2}", *QUIET])
    assert rc == 0
    s = _summary(run)
    assert s["global_step"] == CLASSIFY_STEPS + 2 and s["id2label"] == {"0": "food", "1": "sports", "2": "weather"}
    head_after = {k: v for k, v in _load(run / "checkpoints" / "last.ckpt")["state_dict"].items() if "score" in k}
    assert head_after.keys() == head_before.keys()
    # training went on from the saved head (small steps), not from a fresh random one
    for k in head_before:
        assert (head_after[k] - head_before[k]).abs().max() < 0.2 * head_before[k].abs().max()


def test_fresh_run_refuses_a_folder_with_checkpoints(instruct_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(instruct_run / "checkpoints", run / "checkpoints")
    rc = main(["recipe=instruct_lora", "model=tiny", "trainer.max_steps=1", f"hydra.run.dir={run}", *QUIET])
    assert rc == 2 and "already holds checkpoints" in capsys.readouterr().err


# ---- bad data leaves no progress behind ---------------------------------------------------------
def test_data_error_is_reported_without_progress(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine", "label": "a"}\n{"text": "broken", "label": \n')
    run = tmp_path / "run"
    rc = main(["recipe=classify", "model=tiny", f"data.train_file={bad}", "data.validation_file=null",
               f"hydra.run.dir={run}", *QUIET])
    err = capsys.readouterr().err
    assert rc == 2 and f"{bad}:2" in err and "Traceback" not in err
    assert not (run / "checkpoints").exists() and not (run / "summary.json").exists()


# ---- token-weighted loss ------------------------------------------------------------------------
def _tiny_lm():
    from mistral_ft.model import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    cfg = MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    return MistralForCausalLM(cfg)


TRAIN_CFG = {"optimizer": {"name": "adamw", "lr": 0.0, "weight_decay": 0.0, "betas": [0.9, 0.999], "eps": 1e-8},
             "scheduler": {"name": "constant", "warmup_steps": 0, "min_lr_ratio": 1.0}, "task": "causal_lm"}


def _grads_after_one_step(batches: list[dict], accumulate: int) -> dict[str, torch.Tensor]:
    import lightning as L

    from mistral_ft.training.tasks import CausalLMTask, TaskSettings

    captured: dict[str, torch.Tensor] = {}

    class Capture(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            # after the optimizer step the (rescaled) gradients are still there
            captured.update({n: p.grad.clone() for n, p in pl_module.named_parameters() if p.grad is not None})

    module = CausalLMTask(_tiny_lm(), TaskSettings.from_config(TRAIN_CFG))
    trainer = L.Trainer(max_steps=1, accumulate_grad_batches=accumulate, accelerator="cpu", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[Capture()], num_sanity_val_steps=0)
    trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None))
    return captured


def _token_batches() -> tuple[list[dict], list[dict]]:
    """Two micro-batches with 3 and 30 targets, and one right-padded batch holding both."""
    g = torch.Generator().manual_seed(1)
    short = torch.randint(3, 64, (1, 4), generator=g)  # 3 targets (label 0 is never a target: shift)
    long = torch.randint(3, 64, (1, 31), generator=g)  # 30 targets
    micro = [
        {"input_ids": short, "attention_mask": torch.ones_like(short), "labels": short.clone()},
        {"input_ids": long, "attention_mask": torch.ones_like(long), "labels": long.clone()},
    ]
    both_ids = torch.zeros(2, 31, dtype=torch.long)
    both_ids[0, :4], both_ids[1] = short[0], long[0]
    mask = (torch.arange(31) < torch.tensor([[4], [31]])).long()
    labels = both_ids.masked_fill(mask == 0, -100)
    return micro, [{"input_ids": both_ids, "attention_mask": mask, "labels": labels}]


def test_token_weighted_loss_across_micro_batches():
    micro, one = _token_batches()
    accumulated = _grads_after_one_step(micro, accumulate=2)
    single = _grads_after_one_step(one, accumulate=1)
    assert accumulated.keys() == single.keys() and len(single) > 5
    for name in single:
        torch.testing.assert_close(accumulated[name], single[name], atol=1e-6, rtol=1e-5, msg=name)

    # the reference: sum of token losses / 33, one backward
    model = _tiny_lm()
    loss = sum(model(**b, loss_reduction="sum").loss for b in micro) / 33
    loss.backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(single["model." + name], p.grad, atol=1e-6, rtol=1e-5)

    # and it is not what a mean of per-batch means gives (the test can tell them apart)
    model.zero_grad()
    (sum(model(**b).loss for b in micro) / 2).backward()
    diff = max((single["model." + n] - p.grad).abs().max().item() for n, p in model.named_parameters())
    assert diff > 1e-3


# ---- prompt masking through the real data pipeline ----------------------------------------------
def test_prompt_tokens_carry_minus_100():
    from mistral_ft.data import MistralDataModule
    from mistral_ft.model.tiny import tiny_model_path
    from mistral_ft.tokenizer import MistralTokenizer

    cfg = compose_config(["recipe=instruct_lora", "model=tiny"])
    data = dict(cfg["data"])
    batch_size = data.pop("batch_size")
    data.pop("eval_batch_size")
    tok = MistralTokenizer.from_pretrained(tiny_model_path())
    dm = MistralDataModule(data, tok, task="causal_lm", batch_size=batch_size)
    batch = next(iter(dm.train_dataloader()))
    for ids, labels, mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"]):
        real = int(mask.sum())
        targets = (labels != -100).nonzero().flatten().tolist()
        assert targets, "every chat has an answer"
        spans = []  # contiguous runs of targets: one per assistant answer
        for t in targets:
            if spans and t == spans[-1][-1] + 1:
                spans[-1].append(t)
            else:
                spans.append([t])
        assert tok.decode(ids[: spans[0][0]].tolist()).startswith("<s>")
        for span in spans:
            # everything before an answer up to "[/INST]" is prompt (label -100) ...
            assert tok.decode(ids[: span[0]].tolist()).rstrip().endswith("[/INST]")
            # ... and each answer ends with its EOS, which is a target
            assert labels[span[-1]] == tok.eos_token_id
        assert spans[-1][-1] == real - 1
        assert (labels[targets] == ids[targets]).all() and (labels[real:] == -100).all()


# ---- multirun -----------------------------------------------------------------------------------
def test_multirun_two_point_sweep(tmp_path):
    """Two runs in one process, one per logger; each gets its own folder under the sweep dir."""
    sweep = tmp_path / "sweep"
    rc = main(["-m", "recipe=classify", "model=tiny", "trainer.max_steps=2", "trainer.limit_val_batches=1",
               "checkpoint.save_adapter=false", "logger=csv,tensorboard", f"hydra.sweep.dir={sweep}", *QUIET])
    assert rc == 0
    csv_run, tb_run = sweep / "0", sweep / "1"
    assert _summary(csv_run)["global_step"] == 2 and _summary(tb_run)["global_step"] == 2
    assert (csv_run / "logs" / "version_0" / "metrics.csv").is_file()
    assert list((tb_run / "logs").rglob("events.out.tfevents.*"))
    assert "name: tensorboard" in (tb_run / "config.yaml").read_text()


# ---- the wheel ----------------------------------------------------------------------------------
def test_wheel_install_runs_a_recipe_from_elsewhere(tmp_path):
    """Build the wheel, install it (no deps) into a fresh venv that sees the project venv's packages
    through a .pth file but not the editable install, and train two steps from an unrelated folder."""
    t0 = time.perf_counter()
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns(".venv", ".git", "runs", "build", "dist", "*.egg-info", "__pycache__",
                                    ".pytest_cache", "outputs", "multirun", "wandb", "lightning_logs")
    shutil.copytree(REPO, src, symlinks=True, ignore=ignore)
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels),
                    str(src)], check=True, capture_output=True)
    wheel = next(wheels.glob("mistral_ft-*.whl"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    vpy = venv / "bin" / "python"
    site = Path(subprocess.run([str(vpy), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    project_site = Path(torch.__file__).resolve().parents[1]
    # a plain path line: the project venv's own .pth files (the editable finder) are not processed
    (site / "project_deps.pth").write_text(str(project_site) + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(vpy), "install", "--no-deps", "-q", str(wheel)],
                   check=True, capture_output=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    where = subprocess.run([str(vpy), "-c", "import mistral_ft; print(mistral_ft.__file__)"], cwd=elsewhere, env=env,
                           check=True, capture_output=True, text=True).stdout.strip()
    assert where.startswith(str(site)), where
    run = elsewhere / "run"
    proc = subprocess.run(
        [str(vpy), "-m", "mistral_ft.train", "recipe=classify", "model=tiny", "trainer.max_steps=2",
         "trainer.limit_val_batches=1", f"hydra.run.dir={run}", *QUIET],  # bundled data from the wheel
        cwd=elsewhere, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _summary(run)["global_step"] == 2
    print(f"wheel build + install + run: {time.perf_counter() - t0:.1f}s")


@pytest.mark.slow
def test_ddp_two_cpu_processes(tmp_path):
    """strategy=ddp on 2 CPU processes (gloo): Lightning replays the command line for rank 1."""
    run = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "mistral_ft.train", "recipe=classify", "model=tiny", "strategy=ddp",
         "trainer.devices=2", "trainer.accelerator=cpu", "trainer.max_steps=3", "trainer.limit_val_batches=1",
         f"hydra.run.dir={run}", *QUIET], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = _summary(run)
    assert s["world_size"] == 2 and s["global_step"] == 3
    assert (run / "checkpoints" / "last.ckpt").is_file()


# ---- small pieces -------------------------------------------------------------------------------
def test_lr_schedule_shapes():
    from mistral_ft.training.tasks import lr_factor

    cos = [lr_factor(s, warmup_steps=4, total_steps=20, kind="cosine", min_lr_ratio=0.1) for s in range(21)]
    assert cos[0] == pytest.approx(0.25) and cos[3] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(cos[3:], cos[4:])) and cos[20] == pytest.approx(0.1)
    const = [lr_factor(s, warmup_steps=0, total_steps=20, kind="constant", min_lr_ratio=0.1) for s in range(21)]
    assert const == [1.0] * 21


def test_classification_losses_match_transformers_rules():
    import torch.nn.functional as F

    from mistral_ft.training.tasks import classification_loss_sum

    logits = torch.randn(4, 3)
    labels = torch.tensor([0, 2, -100, 1])
    loss, n = classification_loss_sum(logits, labels, "single_label_classification")
    assert n == 3 and torch.allclose(loss / n, F.cross_entropy(logits, labels, ignore_index=-100))
    multi = torch.tensor([[1, 0, 1], [0, 0, 1], [1, 1, 1], [0, 0, 0]]).float()
    loss, n = classification_loss_sum(logits, multi, "multi_label_classification")
    assert n == 4 and torch.allclose(loss / n, F.binary_cross_entropy_with_logits(logits, multi))
    reg_logits, target = torch.randn(4, 1), torch.randn(4)
    loss, n = classification_loss_sum(reg_logits, target, "regression")
    assert n == 4 and torch.allclose(loss / n, F.mse_loss(reg_logits.squeeze(-1), target))


def test_apply_peft_targets_and_head():
    from mistral_ft.adapters.lora import apply_peft
    from mistral_ft.model import MistralConfig, MistralForSequenceClassification

    cfg = MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=1, num_labels=3)
    model = apply_peft(MistralForSequenceClassification(cfg), {"method": "lora", "r": 4, "alpha": 8}, "classification")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    for layer in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        assert any(layer in n and "lora_A" in n for n in trainable), layer
    assert any("score.modules_to_save" in n for n in trainable)
    assert not any("embed_tokens" in n for n in trainable)
    with pytest.raises(ValueError, match="q_projj"):
        apply_peft(MistralForSequenceClassification(cfg), {"method": "lora", "target_modules": ["q_projj"]}, "classification")
    full = apply_peft(MistralForSequenceClassification(cfg), {"method": "none"}, "classification")
    assert all(p.requires_grad for p in full.parameters())


DDP_GRAD_SCRIPT = '''
import sys, torch, lightning as L
from torch.utils.data import DataLoader
sys.path.insert(0, {tests!r})
from test_train import TRAIN_CFG, _tiny_lm, _token_batches
from mistral_ft.training.tasks import CausalLMTask, TaskSettings

micro, _ = _token_batches()
class Capture(L.Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.is_global_zero:
            torch.save({{n: p.grad for n, p in pl_module.named_parameters()}}, {out!r})
trainer = L.Trainer(max_steps=1, strategy="ddp", devices=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, callbacks=[Capture()])
trainer.fit(CausalLMTask(_tiny_lm(), TaskSettings.from_config(TRAIN_CFG)), train_dataloaders=DataLoader(micro, batch_size=None))
'''


@pytest.mark.slow
def test_token_weighted_loss_across_ddp_ranks(tmp_path):
    """Rank 0 gets the 3-target batch, rank 1 the 30-target one: DDP's averaging must be undone."""
    out = tmp_path / "grads.pt"
    script = tmp_path / "ddp_grads.py"
    script.write_text(DDP_GRAD_SCRIPT.format(tests=str(Path(__file__).parent), out=str(out)))
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp = torch.load(out, weights_only=True)
    _, one = _token_batches()
    single = _grads_after_one_step(one, accumulate=1)
    for name in single:
        torch.testing.assert_close(ddp[name], single[name], atol=1e-6, rtol=1e-5, msg=name)


def test_regression_run_writes_a_scatter_png(tmp_path):
    rows = "".join(json.dumps({"text": f"value {i}", "label": float(i % 5)}) + "\n" for i in range(16))
    data = tmp_path / "reg.jsonl"
    data.write_text(rows)
    run_dir = tmp_path / "run"
    rc = main(["recipe=classify", "model=tiny", "data.format=regression", f"data.train_file={data}",
               f"data.validation_file={data}", "trainer.max_steps=2", "trainer.val_check_interval=2",
               f"hydra.run.dir={run_dir}", *QUIET])
    assert rc == 0
    s = _summary(run_dir)
    assert s["val_mse"] is not None and s["val_r2"] is not None
    assert Path(s["paths"]["regression_scatter"]).read_bytes()[:4] == b"\x89PNG"


def test_evaluate_cli_reproduces_the_runs_own_eval(instruct_run, tmp_path):
    """`python -m mistral_ft.evaluate run=...` on the finished run: the same answers as the end-of-run eval
    (the adapter reloaded from disk), and the same validation loss."""
    from mistral_ft.evaluate import main as evaluate

    out = tmp_path / "ev"
    rc = evaluate([f"run={instruct_run}", "data=data/instruct_val.jsonl", "eval.num_samples=6",
                   "eval.max_new_tokens=12", f"out={out}", "data.max_length=128"])
    assert rc == 0
    s = json.loads((out / "evaluate_summary.json").read_text())
    run = _summary(instruct_run)
    assert s["loss"] == pytest.approx(run["val_loss"], rel=1e-4)
    ours = [json.loads(line)["generated"] for line in (out / "eval_samples.jsonl").read_text().splitlines()]
    theirs = [json.loads(line)["generated"] for line in Path(run["paths"]["eval_samples"]).read_text().splitlines()]
    assert ours == theirs and s["exact_match"] == run["val_exact_match"]


@pytest.mark.parametrize("args, message", [
    (["data=data/instruct_val.jsonl", "eval.max_new_tokens=0"], "eval.max_new_tokens"),
    (["data=data/instruct_val.jsonl", "bogus=1"], "bogus: unknown key"),
    ([], "data=FILE is required"),
])
def test_evaluate_cli_bad_input_exits_2_and_writes_nothing(instruct_run, tmp_path, capsys, args, message):
    from mistral_ft.evaluate import main as evaluate

    out = tmp_path / "ev"
    assert evaluate([f"run={instruct_run}", f"out={out}", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and not out.exists()
