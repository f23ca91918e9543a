"""Export to the Hugging Face format: merged folders and adapters that transformers and peft load.

Tiny runs (2 optimizer steps on the embedded tiny model, CPU fp32) are trained once per module, in-process
through `mistral_ft.train.main`, for LoRA, DoRA, QLoRA, classification and full fine-tuning; each is
exported once (module fixtures) and the tests compare three ways of computing the same logits:
transformers on OUT/merged, transformers on the original base + peft on OUT/adapter, and our model + peft.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from mistral_ft.checkpoints.export import CHECK_TEXT
from mistral_ft.export import main as export_main
from mistral_ft.train import main as train_main


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Tiny matrices: one intra-op thread is faster on the shared machine. A fixture, not a module-level
    set_num_threads: that ran at collection and changed the thread count of every later test in the process."""
    yield

QUIET = ["trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "trainer.max_steps=2",
         "data.batch_size=2", "data.validation_file=null", "checkpoint.every_n_train_steps=1",
         "scheduler.warmup_steps=0"]
RUNS = {
    "lora": ["recipe=instruct_lora"],
    "dora": ["recipe=instruct_lora", "peft=dora", "peft.target_modules=[q_proj,v_proj,down_proj,lm_head]"],
    "qlora": ["recipe=instruct_qlora"],
    "classify": ["recipe=classify", "peft=dora"],
    "full": ["recipe=full_finetune"],
}
# No literal "</s>" / "<s>": transformers parses them as control ids, we keep them text (docs/interfaces.md).
CORPUS = [
    "Hello world", " leading space", "  two leading spaces", "emoji 🙂🚀 and ünïcödé", "line one\nline two\n\n",
    "def f(x):\n    return x ** 2  # square\n\tindented", "tabs\tand   runs    of spaces", "[INST] not special [/INST]",
    "数字 123 4567.89", "",
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Train each kind of run once; returns {kind: run folder}. On the *random* tiny model: its logits are ~1 in
    scale (the pre-trained base's reach ~20), so the absolute 1e-5 merge tolerances below keep their meaning."""
    from mistral_ft.model.tiny import random_tiny_path

    root = tmp_path_factory.mktemp("export_runs")
    out = {}
    for kind, argv in RUNS.items():
        run_dir = root / kind
        assert train_main([*argv, "model=tiny", f"model.path={random_tiny_path()}", *QUIET,
                           f"hydra.run.dir={run_dir}"]) == 0, kind
        out[kind] = run_dir
    return out


@pytest.fixture(scope="module")
def exported(runs, tmp_path_factory) -> dict[str, Path]:
    """Each run exported once through the CLI (self-check on); returns {kind: output folder}."""
    root = tmp_path_factory.mktemp("exported")
    out = {}
    for kind, run_dir in runs.items():
        assert export_main([f"run_dir={run_dir}", f"output_dir={root / kind}"]) == 0, kind
        out[kind] = root / kind
    return out


def _ids() -> torch.Tensor:
    from mistral_ft.tokenizer import MistralTokenizer

    return torch.tensor([MistralTokenizer.from_pretrained(None).encode(CHECK_TEXT)])


def _logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def _base(run_dir: Path) -> Path:
    return Path(json.loads((run_dir / "base_model.json").read_text())["path"])


# ---- merged == base + adapter, in transformers and in our model ------------------------------------
@pytest.mark.parametrize("kind", ["lora", "dora", "qlora"])
def test_merged_equals_base_plus_adapter(kind, runs, exported, capsys):
    import transformers
    from peft import PeftModel

    from mistral_ft import MistralForCausalLM

    out, ids = exported[kind], _ids()
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert cfg["use_dora"] is (kind == "dora")
    base = _base(runs[kind])
    assert cfg["base_model_name_or_path"] == str(base)
    merged = _logits(transformers.AutoModelForCausalLM.from_pretrained(out / "merged", dtype=torch.float32), ids)
    theirs = PeftModel.from_pretrained(
        transformers.AutoModelForCausalLM.from_pretrained(cfg["base_model_name_or_path"], dtype=torch.float32),
        out / "adapter")
    peft_hf = _logits(theirs, ids)
    ours = _logits(PeftModel.from_pretrained(MistralForCausalLM.from_pretrained(base), out / "adapter"), ids)
    base_logits = _logits(MistralForCausalLM.from_pretrained(base), ids)
    assert (ours - base_logits).abs().max() > 1e-3  # the adapter trained: the test would be vacuous otherwise
    assert (merged - peft_hf).abs().max() < 1e-5
    assert (merged - ours).abs().max() < 1e-5
    if kind == "qlora":  # the gap to the NF4 model it trained with: reported, not asserted
        from mistral_ft.adapters.lora import apply_peft

        nf4 = apply_peft(MistralForCausalLM.from_pretrained(base), {"method": "qlora", "r": 16, "alpha": 32,
                         "target_modules": cfg["target_modules"]})
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        set_peft_model_state_dict(nf4, load_file(str(out / "adapter" / "adapter_model.safetensors")))
        gap = (_logits(nf4.eval(), ids) - merged).abs().max().item()
        with capsys.disabled():
            print(f"\nQLoRA: merged (full-precision base) vs the NF4 model it trained with: max |logit diff| = {gap:.4f}"
                  f" (logit scale {merged.abs().max().item():.2f})")


def test_qlora_trains_on_4bit_layers(runs):
    from mistral_ft import MistralForCausalLM
    from mistral_ft.adapters.lora import apply_peft
    from mistral_ft.adapters.quantize import count_4bit_layers

    model = apply_peft(MistralForCausalLM.from_pretrained(_base(runs["qlora"])),
                       {"method": "qlora", "r": 4, "alpha": 8, "target_modules": ["q_proj", "lm_head"]})
    assert count_4bit_layers(model) == 2 * 7  # every decoder Linear, not lm_head
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    assert type(q).__module__ == "peft.tuners.lora.bnb" and q.base_layer.weight.quant_type == "nf4"
    assert q.base_layer.weight.compress_statistics  # double quantization
    assert type(model.base_model.model.lm_head.base_layer) is torch.nn.Linear
    s = json.loads((runs["qlora"] / "summary.json").read_text())
    assert s["peft"] == "qlora" and s["global_step"] == 2


def test_classification_export_has_labels_and_head(runs, exported):
    import transformers
    from peft import PeftModel

    from mistral_ft import MistralForSequenceClassification

    out, ids = exported["classify"], _ids()
    model = transformers.AutoModelForSequenceClassification.from_pretrained(out / "merged", dtype=torch.float32)
    assert type(model).__name__ == "MistralForSequenceClassification"
    assert model.config.id2label == {0: "food", 1: "sports", 2: "weather"}
    assert model.config.pad_token_id == 0
    merged = _logits(model, ids)
    assert merged.shape == (1, 3)
    labels = dict(id2label=model.config.id2label, label2id=model.config.label2id)
    ours = _logits(PeftModel.from_pretrained(
        MistralForSequenceClassification.from_pretrained(_base(runs["classify"]), **labels), out / "adapter"), ids)
    theirs = _logits(PeftModel.from_pretrained(transformers.AutoModelForSequenceClassification.from_pretrained(
        _base(runs["classify"]), dtype=torch.float32, **labels), out / "adapter"), ids)
    assert (merged - ours).abs().max() < 1e-5 and (merged - theirs).abs().max() < 1e-5
    from safetensors import safe_open

    with safe_open(str(out / "adapter" / "adapter_model.safetensors"), "pt") as f:
        assert "base_model.model.score.weight" in f.keys()


def test_full_finetune_exports_trained_weights_only(runs, exported):
    import transformers

    from mistral_ft import MistralForCausalLM

    out, ids = exported["full"], _ids()
    assert not (out / "adapter").exists()
    trained = _logits(MistralForCausalLM.from_pretrained(runs["full"] / "model"), ids)
    merged = _logits(transformers.AutoModelForCausalLM.from_pretrained(out / "merged", dtype=torch.float32), ids)
    base = _logits(MistralForCausalLM.from_pretrained(_base(runs["full"])), ids)
    assert (merged - trained).abs().max() < 1e-5 and (trained - base).abs().max() > 1e-3
    ckpt = torch.load(runs["full"] / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["hyper_parameters"]["optimizer"]["name"] == "adamw8bit"  # 8-bit AdamW trained it, on CPU
    state = next(iter(ckpt["optimizer_states"][0]["state"].values()))["__bnb_optimizer_quant_state__"]
    assert state["state1"].dtype == torch.uint8  # Adam's first moment, block-wise 8-bit


def test_export_from_a_checkpoint_equals_export_from_the_run(runs, exported, tmp_path):
    from safetensors.torch import load_file

    for kind in ("dora", "full"):
        ckpt = runs[kind] / "checkpoints" / "step-000002.ckpt"
        assert export_main([f"run_dir={ckpt}", f"output_dir={tmp_path / kind}"]) == 0
        a = load_file(str(tmp_path / kind / "merged" / "model.safetensors"))
        b = load_file(str(exported[kind] / "merged" / "model.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), kind
    a = load_file(str(tmp_path / "dora" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(runs["dora"] / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and any("lora_magnitude_vector" in k for k in a)


def test_sharded_bf16_export_loads_in_transformers(runs, exported, tmp_path, capsys):
    import transformers

    out = tmp_path / "sharded"
    assert export_main([f"run_dir={runs['lora']}", f"output_dir={out}", "dtype=bfloat16", "max_shard_size=3MB"]) == 0
    assert "self-check: max |logit difference|" in capsys.readouterr().out
    index = json.loads((out / "merged" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 3
    assert json.loads((out / "merged" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    ids = _ids()
    bf16 = _logits(transformers.AutoModelForCausalLM.from_pretrained(out / "merged", dtype=torch.float32), ids)
    fp32 = _logits(transformers.AutoModelForCausalLM.from_pretrained(exported["lora"] / "merged", dtype=torch.float32), ids)
    assert 0 < (bf16 - fp32).abs().max() < 3e-2 * max(1.0, fp32.abs().max().item())


# ---- tokenizer and generation config --------------------------------------------------------------
def test_auto_tokenizer_gives_our_ids_and_chat_template(exported):
    import transformers

    from mistral_ft.tokenizer import MistralTokenizer

    merged = exported["lora"] / "merged"
    ours = MistralTokenizer.from_pretrained(str(merged))
    theirs = transformers.AutoTokenizer.from_pretrained(merged)
    for text in CORPUS:
        assert theirs(text)["input_ids"] == ours.encode(text), repr(text)
    assert theirs.pad_token_id == 0 and theirs.eos_token_id == 2
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there 🙂"},
            {"role": "assistant", "content": "Hello!\nHow can I help?"}, {"role": "user", "content": " code:\n\tx=1"}]
    ids = theirs.apply_chat_template(chat, tokenize=True, add_generation_prompt=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert list(ids) == ours.encode_chat(chat, add_generation_prompt=True)[0]
    gen = json.loads((merged / "generation_config.json").read_text())
    assert gen == {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    assert json.loads((merged / "config.json").read_text())["architectures"] == ["MistralForCausalLM"]


# ---- safety ---------------------------------------------------------------------------------------
def test_interrupted_export_leaves_no_folder(runs, tmp_path, monkeypatch):
    import mistral_ft.adapters.merge as merge

    real, calls = merge.merged_weight, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C halfway through the weights
        return real(*args, **kwargs)

    monkeypatch.setattr(merge, "merged_weight", failing)
    out = tmp_path / "out"
    assert export_main([f"run_dir={runs['lora']}", f"output_dir={out}"]) == 130
    assert not out.exists() and list(tmp_path.iterdir()) == []  # no half-written folder, no temp left


def test_sigkilled_export_leaves_nothing_that_loads(runs, tmp_path):
    """A real SIGKILL halfway through the weights (a subprocess): OUT never appears; the hidden temp folder
    that a kill cannot clean up is not a model folder anyone would load."""
    import signal
    import subprocess
    import sys

    script = (
        "import os, signal, sys\n"
        "import mistral_ft.adapters.merge as merge\n"
        "from mistral_ft.export import main\n"
        "real, calls = merge.merged_weight, []\n"
        "def dying(*a, **k):\n"
        "    calls.append(1)\n"
        "    if len(calls) == 5:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return real(*a, **k)\n"
        "merge.merged_weight = dying\n"
        "sys.exit(main(sys.argv[1:]))\n")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-c", script, f"run_dir={runs['lora']}", f"output_dir={out}"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert not out.exists()
    left = list(tmp_path.iterdir())
    assert all(p.name.startswith(".out.tmp-") for p in left)  # hidden, named as temporary
    assert export_main([f"run_dir={runs['lora']}", f"output_dir={out}"]) == 0  # a retry just works
    assert (out / "merged" / "config.json").is_file()


def _run(capsys, *argv) -> tuple[int, str]:
    rc = export_main(list(argv))
    return rc, capsys.readouterr().err


def test_bad_input_is_a_clear_error_and_nothing_is_overwritten(runs, tmp_path, capsys):
    from mistral_ft import MistralForCausalLM

    # an output folder that exists and is not empty
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    rc, err = _run(capsys, f"run_dir={runs['lora']}", f"output_dir={out}")
    assert rc == 2 and "already exists and is not empty" in err and "Traceback" not in err
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"

    # base weights that moved
    moved = tmp_path / "moved_run"
    shutil.copytree(runs["lora"], moved)
    record = json.loads((moved / "base_model.json").read_text())
    (moved / "base_model.json").write_text(json.dumps({**record, "path": str(tmp_path / "gone")}))
    rc, err = _run(capsys, f"run_dir={moved}", f"output_dir={tmp_path / 'o1'}")
    assert rc == 2 and "moved" in err and str(tmp_path / "gone") in err and "base=PATH" in err

    # ... pointed at weights that changed since training (same shapes, other values)
    changed = tmp_path / "changed_base"
    model = MistralForCausalLM.from_pretrained(_base(runs["lora"]))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1e-3)
    model.save_pretrained(changed)
    shutil.copy(_base(runs["lora"]) / "tokenizer.model", changed / "tokenizer.model")
    rc, err = _run(capsys, f"run_dir={moved}", f"output_dir={tmp_path / 'o2'}", f"base={changed}")
    assert rc == 2 and "changed since training" in err and "model.safetensors" in err
    # ... and at the original copy again: fine
    assert export_main([f"run_dir={moved}", f"output_dir={tmp_path / 'o3'}", f"base={_base(runs['lora'])}",
                        "check=false"]) == 0

    # a checkpoint from a different config (a classify checkpoint dropped into an instruct run)
    mixed = tmp_path / "mixed_run"
    shutil.copytree(runs["lora"], mixed, ignore=shutil.ignore_patterns("*.ckpt"))
    shutil.copy(runs["classify"] / "checkpoints" / "last.ckpt", mixed / "checkpoints" / "last.ckpt")
    rc, err = _run(capsys, f"run_dir={mixed / 'checkpoints' / 'last.ckpt'}", f"output_dir={tmp_path / 'o4'}")
    assert rc == 2 and "another config" in err and "task: 'classification'" in err

    # typos and missing keys
    rc, err = _run(capsys, f"run_dir={runs['lora']}", f"output_dri={tmp_path / 'o5'}")
    assert rc == 2 and "did you mean 'output_dir'" in err.lower()
    rc, err = _run(capsys, f"run_dir={tmp_path / 'nope'}", f"output_dir={tmp_path / 'o6'}")
    assert rc == 2 and "no such run folder" in err
    assert not any((tmp_path / f"o{i}").exists() for i in (1, 2, 4, 5, 6))


# ---- recipes -------------------------------------------------------------------------------------
def test_new_recipes_target_7b_and_specialize_on_tiny():
    from mistral_ft.training.compose import compose_config

    qlora = compose_config(["recipe=instruct_qlora"])
    assert qlora["model"]["path"] == "mistralai/Mistral-7B-Instruct-v0.1" and qlora["peft"]["method"] == "qlora"
    assert qlora["peft"]["quant_type"] == "nf4" and qlora["peft"]["double_quant"] and qlora["model"]["gradient_checkpointing"]
    full = compose_config(["recipe=full_finetune"])
    assert full["peft"]["method"] == "none" and full["optimizer"]["name"] == "adamw8bit"
    assert full["trainer"]["precision"] == "bf16-true"
    assert compose_config(["recipe=full_finetune", "model=tiny"])["trainer"]["precision"] == "auto"  # fp32 on CPU
    assert compose_config(["recipe=instruct_lora", "peft=dora"])["peft"]["method"] == "dora"


def test_adamw8bit_tracks_adamw_on_cpu():
    """bitsandbytes 0.50 runs AdamW8bit on CPU; its 8-bit moments give nearly fp32 AdamW's updates."""
    import bitsandbytes as bnb

    torch.manual_seed(0)
    w0 = torch.randn(256, 64)  # >= 4096 elements: bitsandbytes keeps smaller tensors' states in 32 bits
    p1, p2 = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
    o1 = torch.optim.AdamW([p1], lr=1e-2, weight_decay=0.01)
    o2 = bnb.optim.AdamW8bit([p2], lr=1e-2, weight_decay=0.01)
    for _ in range(10):
        g = torch.randn_like(w0)
        p1.grad, p2.grad = g.clone(), g.clone()
        o1.step()
        o2.step()
    assert o2.state[p2]["state1"].dtype == torch.uint8
    assert ((p1 - p2).norm() / (p1 - w0).norm()).item() < 0.05  # measured 0.013


@pytest.mark.parametrize("value", ["nan", "inf", "-1", "0"])
def test_export_refuses_a_tolerance_that_is_not_finite_and_positive(tmp_path, capsys, value):
    out = tmp_path / "out"
    assert export_main([f"run_dir={tmp_path}", f"output_dir={out}", f"tolerance={value}"]) == 2
    err = capsys.readouterr().err
    assert f"tolerance={value}" in err and "finite number > 0" in err and "Traceback" not in err
    assert not out.exists()


def test_an_export_that_loses_the_race_for_its_output_folder_exits_2(runs, tmp_path, capsys, monkeypatch):
    """Another export publishes into OUT while this one runs: exit 2 naming OUT, the winner's files kept."""
    from mistral_ft.checkpoints import export as export_mod

    out = tmp_path / "out"
    real = export_mod._share

    def winner_publishes_first(tmp):  # runs just before this export's rename
        real(tmp)
        out.mkdir()
        (out / "winner.txt").write_text("kept")

    monkeypatch.setattr(export_mod, "_share", winner_publishes_first)
    assert export_main([f"run_dir={runs['lora']}", f"output_dir={out}", "check=false"]) == 2
    err = capsys.readouterr().err
    assert "was filled by another process" in err and str(out.name) in err and "Traceback" not in err
    assert [p.name for p in out.iterdir()] == ["winner.txt"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp-")]
