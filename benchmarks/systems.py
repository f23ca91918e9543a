"""One class per system: how it builds its model and lays out a step's examples, and how it runs a step.

Model-level systems (`StepSystem`) run in a worker process of their own (peak RSS is per process) and time
only the optimizer step, from tensors prepared before timing. `OursCLI` is the whole training command: one
process per round, timed by its own per-step clock (summary.json's `step_times_s`) at steady state, start-up
reported apart. Every system trains LoRA r16 / alpha 32 on all seven linear layers with AdamW at lr 1e-4 on
the same examples per optimizer step (see `benchmarks.workload`), token-weighted: sum of token losses / the
step's targets.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.workload import IGNORE_INDEX, LORA, LR


class StepSystem:
    """A model-level optimizer step. Subclasses: `load` (model with LoRA) and `layout` (a step's micro-batches)."""

    name = ""
    label = ""
    layout_note = ""  # how a step's examples are laid out, for the table
    needs = ("torch", "peft")  # modules that must import in this system's environment

    def __init__(self, spec: dict[str, Any]) -> None:
        import torch

        self.torch = torch
        self.spec = spec
        torch.set_num_threads(int(spec["threads"]))
        torch.manual_seed(int(spec["seed"]) + 1)  # the LoRA A init (B is zero: the first loss never depends on it)
        self.model = self.load(Path(spec["workdir"]) / "model")
        self.model.train()
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.trainable = sum(p.numel() for p in params)
        self.opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)

    def load(self, folder: Path) -> Any:
        raise NotImplementedError

    def layout(self, step: dict[str, Any]) -> list[dict[str, Any]]:
        raise NotImplementedError

    def loss(self, micro: dict[str, Any], n_targets: int) -> Any:
        raise NotImplementedError

    def train_step(self, micros: list[dict[str, Any]], n_targets: int) -> tuple[float, float]:
        """(seconds, token-weighted loss) of one optimizer step over prepared micro-batches."""
        t0 = time.perf_counter()
        total = 0.0
        for micro in micros:
            loss = self.loss(micro, n_targets)
            loss.backward()
            total += float(loss.detach())
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0, total


def _peft_lora() -> Any:
    import peft

    return peft.LoraConfig(r=LORA["r"], lora_alpha=float(LORA["alpha"]), lora_dropout=LORA["dropout"],
                           target_modules=LORA["target_modules"], bias="none", task_type="CAUSAL_LM")


class OursModel(StepSystem):
    """Our model + peft LoRA on the CLI's own packed batches, our loss path (fused linear + cross-entropy on
    target positions, `model.loss_chunk_size`), the step without the Lightning loop around it."""

    name = "ours_model"
    label = "mistral_ft model-level step"
    layout_note = "the CLI's packed rows (best-fit, no attention across documents), one micro-batch"

    def load(self, folder: Path) -> Any:
        from mistral_ft import MistralForCausalLM
        from mistral_ft.adapters.lora import apply_peft

        model = MistralForCausalLM.from_pretrained(str(folder), torch_dtype="float32", attn_implementation="sdpa")
        return apply_peft(model, {"method": "lora", **LORA}, task="causal_lm")

    def layout(self, step: dict[str, Any]) -> list[dict[str, Any]]:
        # the CLI's batch as its collator made it (host-side metadata such as max_seq_len stays a python int)
        dtypes = step["ours_dtypes"]
        return [{k: self.torch.tensor(v, dtype=getattr(self.torch, dtypes[k])) if k in dtypes else v
                 for k, v in step["ours"].items()}]

    def loss(self, micro: dict[str, Any], n_targets: int) -> Any:
        # what tasks/causal_lm.py hands the model (the collator's other keys are the task's own counts)
        keys = ("input_ids", "attention_mask", "labels", "position_ids", "document_ids", "cu_seq_lens", "max_seq_len",
                "target_index")
        out = self.model(**{k: micro[k] for k in keys if k in micro}, loss_reduction="sum",
                         loss_chunk_size=int(self.spec["loss_chunk_size"]), return_logits=False)
        return out.loss / n_targets


class _Transformers(StepSystem):
    needs = ("torch", "peft", "transformers")

    def load(self, folder: Path) -> Any:
        import peft
        import transformers

        model = transformers.MistralForCausalLM.from_pretrained(str(folder), dtype=self.torch.float32,
                                                                attn_implementation="sdpa")
        return peft.get_peft_model(model, _peft_lora())

    def loss(self, micro: dict[str, Any], n_targets: int) -> Any:
        # num_items_in_batch: transformers' token-weighted loss across micro-batches (sum / targets of the step)
        return self.model(**micro, use_cache=False, num_items_in_batch=self.torch.tensor(n_targets)).loss


class HFFlat(_Transformers):
    """transformers + peft at its documented best for variable-length SFT: `DataCollatorWithFlattening` (all
    the step's examples in one row, position ids restarting per example, no padding; transformers builds the
    per-document causal mask from the position ids)."""

    name = "hf_flat"
    label = "transformers+peft padding-free"
    layout_note = "DataCollatorWithFlattening: the step's examples in one row, no padding, one micro-batch"

    def layout(self, step: dict[str, Any]) -> list[dict[str, Any]]:
        from transformers import DataCollatorWithFlattening

        collate = DataCollatorWithFlattening(return_position_ids=True, separator_id=IGNORE_INDEX, return_tensors="pt")
        batch = collate([{"input_ids": e["input_ids"], "labels": e["labels"]} for e in step["examples"]])
        return [{k: batch[k] for k in ("input_ids", "labels", "position_ids")}]


class HFPadded(_Transformers):
    """transformers + peft without packing, padded: the step's examples longest first, in micro-batches whose
    padded size fits our micro-batch (rows x seq_len), each padded to its own longest example."""

    name = "hf_padded"
    label = "transformers+peft padded"
    layout_note = "padded to each micro-batch's longest, length-sorted, <= rows x seq_len padded tokens per micro-batch"

    def layout(self, step: dict[str, Any]) -> list[dict[str, Any]]:
        from benchmarks.workload import padded_micro_batches

        torch = self.torch
        out = []
        for micro in padded_micro_batches(step["lengths"], step["rows"] * int(self.spec["seq_len"])):
            exs = [step["examples"][j] for j in micro]
            n = max(len(e["input_ids"]) for e in exs)
            ids = torch.zeros((len(exs), n), dtype=torch.long)
            labels = torch.full((len(exs), n), IGNORE_INDEX, dtype=torch.long)
            mask = torch.zeros((len(exs), n), dtype=torch.long)
            for i, e in enumerate(exs):
                k = len(e["input_ids"])
                ids[i, :k], labels[i, :k], mask[i, :k] = torch.tensor(e["input_ids"]), torch.tensor(e["labels"]), 1
            out.append({"input_ids": ids, "labels": labels, "attention_mask": mask})
        return out


class TRLPacked(_Transformers):
    """TRL's SFT data path at its documented best (`packing=True, packing_strategy="bfd"`, padding-free): the
    step's examples packed by `trl.pack_dataset(strategy="bfd")` into rows of seq_len, collated by TRL's
    padding-free `DataCollatorForLanguageModeling`, then the transformers + peft step. Only the data path is
    TRL's: the loop is this harness's (TRL's Trainer loop is not measured)."""

    name = "trl_bfd"
    label = "TRL bfd packing + padding-free collator"
    layout_note = "trl.pack_dataset(bfd) rows, TRL's padding-free collator, one micro-batch"
    needs = ("torch", "peft", "transformers", "trl", "datasets")

    def layout(self, step: dict[str, Any]) -> list[dict[str, Any]]:
        from datasets import Dataset
        from trl.data_utils import pack_dataset
        from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

        ds = Dataset.from_list([{"input_ids": e["input_ids"], "labels": e["labels"]} for e in step["examples"]])
        packed = pack_dataset(ds, int(self.spec["seq_len"]), strategy="bfd")
        collate = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True, return_position_ids=True)
        batch = collate([dict(r) for r in packed])
        return [{k: batch[k] for k in ("input_ids", "labels", "position_ids")}]


class TorchtuneLoRA(StepSystem):
    """torchtune's LoRA recipe components (`lora_finetune_single_device`) at its documented best for SFT:
    `lora_mistral` with LoRA on q/k/v/output and the MLP, the HF checkpoint through `convert_weights.hf_to_tune`,
    the step's examples packed by `PackedDataset` (rows of seq_len, no attention across documents) and collated
    by `padded_collate_packed`, `CEWithChunkedOutputLoss` (8 output chunks), labels shifted as the recipe does.
    Runs in its own venv (`--setup-peers`); its loss is a mean over the micro-batch's targets, here the step's."""

    name = "torchtune"
    label = "torchtune LoRA recipe (packed)"
    layout_note = "PackedDataset rows of seq_len (greedy, no splitting), padded_collate_packed, one micro-batch"
    needs = ("torch", "torchtune")
    venv = "torchtune"

    def load(self, folder: Path) -> Any:
        from safetensors.torch import load_file
        from torchtune.models.convert_weights import hf_to_tune
        from torchtune.models.mistral import lora_mistral
        from torchtune.modules.loss import CEWithChunkedOutputLoss
        from torchtune.modules.peft import get_adapter_params, set_trainable_params

        cfg = json.loads((folder / "config.json").read_text())
        modules = {"q_proj": "q_proj", "k_proj": "k_proj", "v_proj": "v_proj", "o_proj": "output_proj"}
        model = lora_mistral(
            lora_attn_modules=[modules[m] for m in LORA["target_modules"] if m in modules],
            apply_lora_to_mlp=True, apply_lora_to_output=False, vocab_size=cfg["vocab_size"],
            num_layers=cfg["num_hidden_layers"], num_heads=cfg["num_attention_heads"],
            num_kv_heads=cfg["num_key_value_heads"], embed_dim=cfg["hidden_size"],
            intermediate_dim=cfg["intermediate_size"], max_seq_len=cfg["max_position_embeddings"],
            attn_dropout=0.0, norm_eps=cfg["rms_norm_eps"], rope_base=cfg["rope_theta"],
            lora_rank=LORA["r"], lora_alpha=float(LORA["alpha"]), lora_dropout=LORA["dropout"])
        state = hf_to_tune(load_file(str(folder / "model.safetensors")), num_heads=cfg["num_attention_heads"],
                           num_kv_heads=cfg["num_key_value_heads"], dim=cfg["hidden_size"])
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or any("lora" not in k for k in missing):
            raise RuntimeError(f"torchtune checkpoint mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
        set_trainable_params(model, get_adapter_params(model))
        model.set_num_output_chunks(8)
        self.loss_fn = CEWithChunkedOutputLoss(num_output_chunks=8)
        return model

    def layout(self, step: dict[str, Any]) -> list[dict[str, Any]]:
        from torchtune.data import padded_collate_packed
        from torchtune.datasets import PackedDataset

        ds = [{"tokens": e["input_ids"], "labels": e["labels"]} for e in step["examples"]]
        packed = PackedDataset(ds, max_seq_len=int(self.spec["seq_len"]), padding_idx=0, split_across_pack=False)
        batch = padded_collate_packed([packed[i] for i in range(len(packed))])
        labels = batch["labels"]  # the recipe's shift: position t predicts t + 1
        batch["labels"] = self.torch.cat([labels[:, 1:], self.torch.full_like(labels[:, :1], IGNORE_INDEX)], 1)
        batch["input_ids"] = batch.pop("tokens")  # the harness counts positions by this name
        return [batch]

    def loss(self, micro: dict[str, Any], n_targets: int) -> Any:
        logits = self.model(micro["input_ids"], mask=micro["mask"], input_pos=micro["input_pos"])
        count = int((micro["labels"] != IGNORE_INDEX).sum())
        return self.loss_fn(logits, micro["labels"]) * (count / n_targets)  # mean over the step's targets


class LitGPTLoRA(StepSystem):
    """litgpt's LoRA finetune (`litgpt finetune lora`) step: `litgpt.lora.GPT` with LoRA on q/k/v, the
    projection and the MLP (head off), the HF checkpoint through its `copy_weights_hf_llama`, its batches
    (examples padded to the batch's longest, no packing: litgpt has none; length-sorted micro-batches of at most
    rows x seq_len padded tokens, as `hf_padded`), `lm_head_chunk_size=128` + `chunked_cross_entropy` as its
    `fit` calls them. Sliding window off: at seq_len 512 the 4096 window never binds and litgpt would build a
    dense mask for it. Runs in its own venv (`--setup-peers`)."""

    name = "litgpt"
    label = "litgpt LoRA finetune (padded)"
    layout_note = "padded to each micro-batch's longest, length-sorted, <= rows x seq_len padded tokens per micro-batch"
    needs = ("torch", "litgpt")
    venv = "litgpt"

    def load(self, folder: Path) -> Any:
        from litgpt.lora import GPT, Config, mark_only_lora_as_trainable
        from litgpt.scripts.convert_hf_checkpoint import copy_weights_hf_llama
        from safetensors.torch import load_file

        c = json.loads((folder / "config.json").read_text())
        config = Config(
            name="bench-mistral", block_size=c["max_position_embeddings"], vocab_size=c["vocab_size"],
            padded_vocab_size=c["vocab_size"], n_layer=c["num_hidden_layers"], n_head=c["num_attention_heads"],
            n_query_groups=c["num_key_value_heads"], n_embd=c["hidden_size"],
            head_size=c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"], rotary_percentage=1.0,
            parallel_residual=False, bias=False, norm_class_name="RMSNorm", norm_eps=c["rms_norm_eps"],
            mlp_class_name="LLaMAMLP", intermediate_size=c["intermediate_size"], rope_base=int(c["rope_theta"]),
            lora_r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"], lora_query=True,
            lora_key=True, lora_value=True, lora_projection=True, lora_mlp=True, lora_head=False)
        model = GPT(config)
        state: dict[str, Any] = {}
        copy_weights_hf_llama(config, {}, state, load_file(str(folder / "model.safetensors")))
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or any("lora" not in k for k in missing):
            raise RuntimeError(f"litgpt checkpoint mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
        mark_only_lora_as_trainable(model)
        return model

    def layout(self, step: dict[str, Any]) -> list[dict[str, Any]]:
        from benchmarks.workload import padded_micro_batches

        torch = self.torch
        out = []
        for micro in padded_micro_batches(step["lengths"], step["rows"] * int(self.spec["seq_len"])):
            exs = [step["examples"][j] for j in micro]
            n = max(len(e["input_ids"]) for e in exs)
            ids = torch.zeros((len(exs), n), dtype=torch.long)
            labels = torch.full((len(exs), n), IGNORE_INDEX, dtype=torch.long)
            for i, e in enumerate(exs):
                ids[i, :len(e["input_ids"])], labels[i, :len(e["labels"])] = (torch.tensor(e["input_ids"]),
                                                                              torch.tensor(e["labels"]))
            out.append({"input_ids": ids, "labels": labels})
        return out

    def loss(self, micro: dict[str, Any], n_targets: int) -> Any:
        from litgpt.utils import chunked_cross_entropy

        logits = self.model(micro["input_ids"], lm_head_chunk_size=128)
        logits[-1] = logits[-1][..., :-1, :]  # as litgpt's fit: position t predicts t + 1
        targets = micro["labels"][..., 1:]
        count = int((targets != IGNORE_INDEX).sum())
        return chunked_cross_entropy(logits, targets) * (count / n_targets)  # its mean -> the step's


STEP_SYSTEMS: dict[str, type[StepSystem]] = {
    cls.name: cls for cls in (OursModel, HFFlat, HFPadded, TRLPacked, TorchtuneLoRA, LitGPTLoRA)}


class OursCLI:
    """`python -m mistral_ft.train ... data.pack=true` as a user runs it: one process per round, steps
    warmup..N timed by the run's own per-step clock, start-up (imports, data, model, Trainer) reported apart."""

    name = "ours_cli"
    label = "mistral_ft CLI (python -m mistral_ft.train)"
    layout_note = "its own loader: best-fit packed rows, the same batches as the model-level step"

    def __init__(self, spec: dict[str, Any], overrides: list[str]) -> None:
        self.spec = spec
        self.overrides = overrides

    def run(self, round_index: int) -> dict[str, Any]:
        workdir = Path(self.spec["workdir"])
        run_dir = workdir / f"cli_run_{round_index}"
        overrides = [o for o in self.overrides if not o.startswith("hydra.run.dir=")] + [f"hydra.run.dir={run_dir}"]
        env = {**os.environ, **thread_env(int(self.spec["threads"])), "PYTHONPATH": repo_path()}
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "mistral_ft.train", *overrides], env=env, cwd=workdir,
                              capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise RuntimeError(f"the CLI failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        summary = json.loads((run_dir / "summary.json").read_text())
        times = summary["step_times_s"]
        return {"times": times, "wall_s": wall, "startup_s": wall - sum(times),
                "peak_rss_mb": summary["peak_memory_mb"], "peak_memory_kind": summary["peak_memory_kind"],
                "losses": [v for _, v in summary["loss_history"]]}


def system_python(name: str) -> str:
    """The interpreter a step system's worker runs on: ours and transformers' in this environment, a peer in
    its own venv (built by `scripts/benchmark.py --setup-peers`)."""
    venv = getattr(STEP_SYSTEMS[name], "venv", None)
    if venv is None:
        return sys.executable
    py = Path(__file__).resolve().parents[1] / ".bench_venvs" / venv / "bin" / "python"
    if not py.exists():
        raise SystemExit(f"benchmark: {name} runs in its own venv, {py} is missing: run "
                         f"`python scripts/benchmark.py --setup-peers {venv}` first")
    return str(py)


def thread_env(threads: int) -> dict[str, str]:
    return {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


def repo_path() -> str:
    """PYTHONPATH for a child process: this checkout first (benchmarks/ and mistral_ft/), then the caller's."""
    here = str(Path(__file__).resolve().parents[1])
    return os.pathsep.join([here, *([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])])
