"""A training run to Hugging Face folders (the library behind `python -m mistral_ft.export`).

    OUT/merged/    base + adapter merged (or the fully fine-tuned weights): sharded safetensors + index,
                   config.json (architectures, id2label for classification), generation_config.json,
                   tokenizer.model + tokenizer_config.json (pad token, chat template). transformers'
                   AutoModelForCausalLM / AutoModelForSequenceClassification / AutoTokenizer load it.
    OUT/adapter/   (peft runs) adapter_config.json + adapter_model.safetensors (classification head
                   included), `base_model_name_or_path` = the base it trained on (hub id or local folder),
                   base_model.json (that base's fingerprint), labels.json (classification: the head's labels):
                   `peft.PeftModel.from_pretrained(transformers_model, OUT/adapter)` loads it.
    OUT/model.gguf (gguf=true) the merged model for llama.cpp (mistral_ft.checkpoints.gguf).

Why a separate command instead of merging at the end of training: the merge reads the original
full-precision base shard by shard (mistral_ft.merge), which QLoRA needs (its training copy is NF4) and
which keeps memory near one shard; and a run can be exported from any checkpoint, not just the last.

Safety: inputs are checked before anything is written (the base's fingerprint recorded at training time,
the checkpoint's config against the run's, adapter shapes against the base); everything is written into
a hidden temporary folder next to OUT and renamed to OUT only after the self-check passed, so an
interrupted export never leaves a folder that looks complete, and an existing non-empty OUT is refused.
The self-check reloads OUT/merged with our model and compares its logits with base + adapter (our model
with peft) or with the trained weights, printing the largest difference.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

import torch

from mistral_ft.adapters.lora import describe_adapter, head_labels
from mistral_ft.adapters.lora import lora_config as build_lora_config
from mistral_ft.adapters.merge import lora_scaling, merge_shards, split_adapter
from mistral_ft.distributed.checkpoint import read_sharded_checkpoint
from mistral_ft.errors import ExportError
from mistral_ft.model import MistralConfig, MistralForCausalLM, MistralForSequenceClassification
from mistral_ft.model.config import read_json_object
from mistral_ft.model.weights import save_state_dict
from mistral_ft.runs import (BASE_RECORD, CheckpointReadError, RunFolder, adapter_base_name, check_base, fingerprint,
                             model_folder, read_checkpoint)
from mistral_ft.tokenizer import MistralTokenizer
from mistral_ft.tokenizer.files import find_in_folder
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}
CHECK_TEXT = "Export self-check: the quick brown fox jumps over 13 lazy dogs.\n  def f(x): return x * 2  # ok"


# ---- command line ---------------------------------------------------------------------------------


# ---- what a run holds -----------------------------------------------------------------------------
class Run(RunFolder):
    """A training run folder (or a checkpoint in one) as export needs it: config, weights, base, labels.

    The folder is read by `runs.RunFolder` (the one reader of the run layout); here: the checkpoint's
    trainable weights, checked against the run's config, and what export derives from them.
    """

    def __init__(self, path: str | os.PathLike):
        super().__init__(path, ExportError, "run_dir")
        self.ckpt: Optional[Path] = self.checkpoint
        self.state: Optional[dict[str, torch.Tensor]] = None  # checkpoint weights, run-config-checked
        self.extra: dict[str, Any] = {}
        if self.ckpt is not None:
            self._load_checkpoint()

    def _load_checkpoint(self) -> None:
        """Read the checkpoint's trainable weights; refuse one trained with another config than the run's."""
        assert self.ckpt is not None
        try:
            if self.ckpt.is_dir():  # sharded (torch.distributed.checkpoint): read every rank's shards
                ckpt = read_sharded_checkpoint(self.ckpt)
            else:
                ckpt = read_checkpoint(self.ckpt, mmap=True)
        except CheckpointReadError:
            raise
        except Exception as e:  # noqa: BLE001 - truncated file, not a checkpoint, ...
            raise ExportError(f"{self.ckpt}: cannot read the checkpoint ({type(e).__name__}: {str(e)[:200]})") from None
        diffs = self.identity_mismatches(ckpt.get("hyper_parameters") or {})
        if diffs:
            raise ExportError(f"{self.ckpt} was trained with another config than its run folder: " + "; ".join(diffs[:4]))
        self.extra = dict(ckpt.get("mistral_ft") or {})
        state = {k.removeprefix("model."): v for k, v in (ckpt.get("state_dict") or {}).items()}
        if not state:
            raise ExportError(f"{self.ckpt}: the checkpoint holds no weights")
        self.state = state

    # ---- the trained weights, as export consumes them ---------------------------------------------
    def adapter(self, base_name: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(adapter tensors with peft's saved names, adapter_config dict) for a peft run."""
        folder = self.dir / "adapter"
        cfg_file = folder / "adapter_config.json"
        if self.state is not None:
            state = {}
            for key, t in self.state.items():  # peft's in-memory names -> its saved names
                k = key.replace(".modules_to_save.default.", ".").replace(".lora_magnitude_vector.default.weight",
                                                                            ".lora_magnitude_vector")
                state[k.replace(".default.", ".")] = t
            cfg = (read_json_object(cfg_file, ExportError) if cfg_file.is_file()
                   else lora_config(self.config["peft"], self.task))
        else:
            weights = folder / "adapter_model.safetensors"
            if not weights.is_file() or not cfg_file.is_file():
                raise ExportError(f"{folder}: adapter_config.json or adapter_model.safetensors is missing")
            from safetensors.torch import load_file

            try:
                state = load_file(str(weights))
            except Exception as e:  # noqa: BLE001 - safetensors' errors for a torn or foreign file
                raise ExportError(f"{weights}: not a readable safetensors file (truncated or corrupt: "
                                  f"{str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__})"
                                  ) from None
            cfg = read_json_object(cfg_file, ExportError)
        cfg.update(base_model_name_or_path=base_name, inference_mode=True)
        return state, cfg

    def labels(self) -> dict[str, Any]:
        """Model-config keys of a classification head (num_labels, id2label, label2id, problem_type)."""
        id2label = self.extra.get("id2label")
        if id2label is None:
            summary = self.dir / "summary.json"
            if summary.is_file():
                id2label = json.loads(summary.read_text()).get("id2label")
        if str(self.config.get("data", {}).get("format")) in ("regression", "preference"):  # + reward models
            return {"num_labels": 1, "problem_type": "regression"}
        if not id2label:
            raise ExportError(f"{self.dir}: cannot find the label names of this classification run "
                              "(summary.json or the checkpoint)")
        id2label = {int(k): str(v) for k, v in id2label.items()}
        return {"num_labels": len(id2label), "id2label": id2label, "label2id": {v: k for k, v in id2label.items()},
                "problem_type": "single_label_classification"}


def lora_config(peft_cfg: Mapping[str, Any], task: str) -> dict[str, Any]:
    """The adapter_config.json that `adapters.apply_peft` would have given peft, for checkpoint-only runs."""
    d = build_lora_config(peft_cfg, task).to_dict()
    return json.loads(json.dumps(d, default=lambda o: sorted(o) if isinstance(o, set) else str(o)))


def resolve_base(run: Run, base: Optional[str]) -> tuple[Path, str]:
    """(local base folder, name for adapter_config's base_model_name_or_path), checked against the record."""
    record_file = run.dir / BASE_RECORD
    record = read_json_object(record_file, ExportError) if record_file.is_file() else None
    if record is not None and not isinstance(record.get("path"), str):
        raise ExportError(f"{record_file}: no 'path' of the base weights (a corrupt record); pass base=PATH to "
                          "the weights the run trained on")
    source = (record or {}).get("source") or run.config.get("model", {}).get("path")
    if base is not None:
        folder = Path(base).expanduser().resolve()
        if not folder.is_dir():
            raise ExportError(f"base={base}: no such folder")
    elif record is not None:
        folder = Path(record["path"])
        if not folder.is_dir():
            raise ExportError(f"the base weights moved: {folder} (recorded in {record_file}) no longer exists; "
                              "pass base=PATH to where they are now")
    else:
        folder = Path(model_folder(run.config.get("model", {})))
    if record is not None:
        check_base(record, folder, record_file)
    return folder, adapter_base_name(source, folder)


# ---- export ---------------------------------------------------------------------------------------
def export(run_dir: str | os.PathLike, output_dir: str | os.PathLike, base: Optional[str] = None, dtype: str = "auto",
           check: bool = True, tolerance: Optional[float] = None, max_shard_size: int = 2 * 10**9,
           gguf: bool = False) -> dict[str, Any]:
    """Write OUT/merged (+ OUT/adapter for peft runs, + OUT/model.gguf with `gguf`) from a run folder or
    checkpoint; returns a report."""
    t0 = time.perf_counter()
    if tolerance is not None and not (math.isfinite(float(tolerance)) and float(tolerance) > 0):
        raise ExportError(f"tolerance={tolerance}: must be a finite number > 0 (a NaN would turn the self-check off)")
    if not isinstance(max_shard_size, int) or max_shard_size <= 0:
        raise ExportError(f"max_shard_size={max_shard_size}: must be a whole number of bytes > 0")
    out = Path(output_dir).expanduser().resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"output_dir={output_dir} already exists and is not empty; nothing was written "
                          "(choose a new folder, or remove it yourself)")
    run = Run(run_dir)
    if gguf:
        from mistral_ft.checkpoints.gguf import _gguf

        _gguf()  # the optional package, before any work
        if run.task != "causal_lm":
            raise ExportError(f"gguf=true: {run.dir} trained a {run.task} model; GGUF export is for causal LMs "
                              "(llama.cpp's llama architecture has no classification head)")
    peft = run.method != "none"
    if peft:
        base_folder, base_name = resolve_base(run, base)
        adapter_state, adapter_cfg = run.adapter(base_name)
        config = MistralConfig.from_pretrained(base_folder, **(run.labels() if run.task == "classification" else {}))
    else:
        base_folder, base_name = None, None
        if run.state is None:
            config = MistralConfig.from_pretrained(run.dir / "model")
        else:
            config = MistralConfig.from_pretrained(*_base_for_config(run, base),
                                                   **(run.labels() if run.task == "classification" else {}))
    out_dtype = DTYPES[dtype] if dtype != "auto" else DTYPES.get(str(config.torch_dtype or "float32"), torch.float32)
    arch = "MistralForSequenceClassification" if run.task == "classification" else "MistralForCausalLM"

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        merged = tmp / "merged"
        merged.mkdir()
        if peft:
            lora, whole = split_adapter(adapter_state, adapter_cfg, str(run.dir / "adapter"))
            drop = (lambda k: k == "lm_head.weight") if run.task == "classification" else (lambda k: k == "score.weight")
            info = merge_shards(base_folder, merged, lora=lora, scaling=lora_scaling(adapter_cfg), whole=whole,
                                dtype=out_dtype, drop=drop, max_shard_size=max_shard_size)
            _write_adapter(tmp / "adapter", adapter_state, adapter_cfg)
            describe_adapter(tmp / "adapter", base_name, _base_record(run, base_folder),
                             head_labels(config) if run.task == "classification" else None)
        elif run.state is None:
            info = merge_shards(run.dir / "model", merged, lora={}, scaling=1.0, whole={}, dtype=out_dtype,
                                max_shard_size=max_shard_size)
        else:
            state = {k: (v.to(out_dtype) if v.is_floating_point() else v) for k, v in run.state.items()}
            info = {"files": save_state_dict(state, merged, max_shard_size)}
            del state
        _write_config(merged, config, arch, out_dtype)
        tokenizer = _tokenizer(run, base_folder)
        tokenizer.save_pretrained(merged)
        if peft:
            tokenizer.save_pretrained(tmp / "adapter")
        report: dict[str, Any] = {"merged": str(out / "merged"), "adapter": str(out / "adapter") if peft else None,
                                  "files": info["files"], "dtype": str(out_dtype).removeprefix("torch."),
                                  "architecture": arch, "base": base_name, "source": str(run.ckpt or run.dir)}
        if check:
            tol = tolerance if tolerance is not None else TOLERANCE[out_dtype]
            diff, scale = self_check(run, tmp, base_folder, tokenizer)
            report.update(max_abs_diff=diff, tolerance=tol)
            print(f"self-check: max |logit difference| = {diff:.3g} (relative {diff / scale:.3g}, tolerance {tol:g})")
            if diff / scale > tol:
                raise ExportError(f"self-check failed: the merged model's logits differ from base + adapter by {diff:.3g} "
                                  f"(relative {diff / scale:.3g} > tolerance {tol:g}); nothing was written")
        if gguf:
            from mistral_ft.checkpoints.gguf import GGUF_NAME, write_gguf

            report.update(write_gguf(merged, tmp / GGUF_NAME, config, out_dtype, out.name))
            report["gguf"] = str(out / GGUF_NAME)
        _share(tmp)
        try:
            if out.exists():
                out.rmdir()  # empty (checked above); a folder filled meanwhile makes rmdir fail, not overwrite
            os.rename(tmp, out)
        except OSError as err:  # another export (or anything) published into OUT while this one ran
            raise ExportError(f"output_dir={output_dir} was filled by another process while this export ran "
                              f"({err.strerror or err}); its files were kept and this export's were discarded") from err
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report["seconds"] = round(time.perf_counter() - t0, 2)
    print(f"exported {report['source']} -> {out}\n  merged:  {report['merged']} ({arch}, {report['dtype']}, "
          f"{len(report['files'])} shard(s))" + (f"\n  adapter: {report['adapter']} (base {base_name})" if peft else "")
          + (f"\n  gguf:    {report['gguf']}" if gguf else ""))
    return report


def _share(tmp: Path) -> None:
    """mkdtemp and safetensors create 0700 / 0600 entries; an exported model is meant to be shared."""
    umask = os.umask(0)
    os.umask(umask)
    for p in [tmp, *tmp.rglob("*")]:
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~umask)


def _base_record(run: Run, folder: Path) -> dict[str, Any]:
    """base_model.json for OUT/adapter: the base merged into (checked against the run's record, when it has one)."""
    record_file = run.dir / BASE_RECORD
    source = run.config.get("model", {}).get("path")
    if record_file.is_file():
        source = json.loads(record_file.read_text()).get("source") or source
    return {"path": str(folder), "source": source, "fingerprint": fingerprint(folder)}


def _base_for_config(run: Run, base: Optional[str]) -> tuple[Path]:
    """A full fine-tuning checkpoint has weights but no config.json: take it from the base it started from."""
    folder, _ = resolve_base(run, base)
    return (folder,)


def _write_config(folder: Path, config: Any, arch: str, dtype: torch.dtype) -> None:
    """config.json (hub spelling, as save_pretrained writes it) and generation_config.json (BOS/EOS/pad)."""
    cfg = config.to_dict()
    cfg["architectures"] = [config.architecture_name(arch)]
    cfg["torch_dtype"] = str(dtype).removeprefix("torch.")
    (folder / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    gen = {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id}
    if config.pad_token_id is not None:
        gen["pad_token_id"] = config.pad_token_id
    (folder / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")


def _write_adapter(folder: Path, state: Mapping[str, torch.Tensor], cfg: Mapping[str, Any]) -> None:
    from safetensors.torch import save_file

    folder.mkdir()
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "adapter_model.safetensors"),
              metadata={"format": "pt"})
    (folder / "adapter_config.json").write_text(json.dumps(dict(cfg), indent=2, sort_keys=True) + "\n")


def _tokenizer(run: Run, base_folder: Optional[Path]) -> Any:
    """The run's tokenizer: model.tokenizer if set, else the one saved with the run, else the base's."""
    configured = run.config.get("model", {}).get("tokenizer")
    candidates = [Path(configured)] if configured else []
    candidates += [run.dir / "adapter", run.dir / "model"] + ([base_folder] if base_folder else [])
    for folder in candidates:
        if folder.is_file() or (folder.is_dir() and find_in_folder(folder) is not None):
            return MistralTokenizer.from_pretrained(str(folder))
    return MistralTokenizer.from_pretrained(None)


# ---- self-check -----------------------------------------------------------------------------------
def self_check(run: Run, tmp: Path, base_folder: Optional[Path], tokenizer: Any) -> tuple[float, float]:
    """(max |logit diff|, max(1, max |reference logit|)): merged reload vs base + adapter / trained weights.

    The reference runs first and is freed before the merged model loads: one model in memory at a time.
    Both in fp32 on CPU, so the difference is the merge's (and the output dtype's rounding), not the check's.
    """
    cls = MistralForSequenceClassification if run.task == "classification" else MistralForCausalLM
    ids = torch.tensor([tokenizer.encode(CHECK_TEXT)])
    labels = run.labels() if run.task == "classification" else {}
    with torch.no_grad():
        if run.method != "none":
            from peft import PeftModel

            model = cls.from_pretrained(str(base_folder), torch_dtype=torch.float32, **labels)
            model = PeftModel.from_pretrained(model, str(tmp / "adapter")).eval()
        elif run.state is None:
            model = cls.from_pretrained(str(run.dir / "model"), torch_dtype=torch.float32).eval()
        else:
            model = cls.from_pretrained(str(tmp / "merged"), torch_dtype=torch.float32)
            model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in run.state.items()})
        ref = model(input_ids=ids).logits.float()
        del model
        merged = cls.from_pretrained(str(tmp / "merged"), torch_dtype=torch.float32)
        got = merged(input_ids=ids).logits.float()
        del merged
    return float((got - ref).abs().max()), max(1.0, float(ref.abs().max()))

