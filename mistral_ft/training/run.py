"""One training run, as a flat sequence of steps: config -> tokenizer -> data -> model -> task -> Trainer -> fit.

`run_training` is what `python -m mistral_ft.train` calls for each composed config (and what tests
call in-process); each step is a function of its own here or in the module that owns the idea
(registry: strategy / logger; distributed: fsdp; summary: summary.json and the loss plot).
"""

from __future__ import annotations

import logging
import shutil
import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

from mistral_ft.adapters.lora import apply_peft, describe_adapter, head_labels, trainable_parameter_count
from mistral_ft.data import MistralDataModule
from mistral_ft.distributed.fsdp import gather_trainable, is_sharded
from mistral_ft.distributed.rank_local import meta_model, rank_local_load_applies
from mistral_ft.distributed.checks import launcher_ranks, requested_devices
from mistral_ft.errors import ConfigError, TrainingStopped

from mistral_ft.model import MistralForCausalLM, MistralForSequenceClassification
from mistral_ft.model.attention import resolve_attn_implementation
from mistral_ft.runs import BASE_RECORD, TASK_MODEL, adapter_base_name, model_folder, record_base, resolve_resume
from mistral_ft.tokenizer import MistralTokenizer
from mistral_ft.training.compose import config_dir, to_plain
from mistral_ft.training.memory import log_memory_plan
from mistral_ft.training.progress import progress_bar
from mistral_ft.training.registry import HEADS, build, build_callbacks, continue_history_callback, resolve_precision
from mistral_ft.lock import FolderLock
from mistral_ft.masking import mask_log_handlers
from mistral_ft.training.reliability import AtomicCheckpointIO, oom_advice, RngStates
from mistral_ft.training.evaluation import GenerationEval, load_references
from mistral_ft.training.schema import EvalSchema, Sources, strip_secrets, validate_config
from mistral_ft.training.summary import StepClock, print_report, write_summary, write_yaml
from mistral_ft.training.tasks import TASKS, TaskSettings

log = logging.getLogger("mistral_ft.train")


# ---- the run --------------------------------------------------------------------------------------
def run_training(cfg: Any, run_dir: Path, overrides: Sequence[str] = (), choices: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
    """Train as `cfg` says, writing into `run_dir`; returns the summary (rank 0; other ranks get {}).

    `cfg` is the composed config (DictConfig or plain dict, no `hydra` node); `overrides` and
    `choices` are only recorded (overrides.yaml) and used to point error messages at files.
    """
    mask_log_handlers()  # Hydra has configured logging by now: no secret value reaches train.log or the console
    c = to_plain(cfg) if not isinstance(cfg, dict) else cfg
    validate_config(c, Sources(conf_dir=config_dir(), choices=choices or {}, overrides=overrides))
    run_dir = Path(run_dir).resolve()
    lock_cfg = c.get("lock") or {}
    if set(lock_cfg) - {"break"} or not isinstance(lock_cfg.get("break", False), bool):
        raise ConfigError(f"lock: takes only break=true|false, got {lock_cfg!r}")
    rank, _ = launcher_ranks()
    if rank != 0:  # rank 0 holds the run folder's lock for the whole job
        return _run_training(c, run_dir, overrides, choices)
    with FolderLock(run_dir, what="training", force=bool(lock_cfg.get("break", False))):
        return _run_training(c, run_dir, overrides, choices)


def _run_training(c: dict[str, Any], run_dir: Path, overrides: Sequence[str],
                  choices: Optional[Mapping[str, Any]]) -> dict[str, Any]:
    t_wall = time.perf_counter()
    import lightning as L
    import torch

    ckpt_dir = run_dir / "checkpoints"
    resume_ckpt = c.get("resume")
    rank, local_rank = launcher_ranks()
    if not resume_ckpt and rank == 0 and ckpt_dir.is_dir() and any(ckpt_dir.glob("*.ckpt")):
        raise ConfigError(f"run folder {run_dir} already holds checkpoints; pass resume={run_dir} to continue it, "
                          "or choose another hydra.run.dir")
    if resume_ckpt:
        resume_ckpt, _ = resolve_resume(str(resume_ckpt))

    L.seed_everything(int(c["seed"]), workers=True, verbose=False)
    accelerator = str(c["trainer"].get("accelerator", "auto"))
    use_cuda = torch.cuda.is_available() and accelerator in ("auto", "gpu", "cuda")
    precision = resolve_precision(c["trainer"].get("precision", "auto"), use_cuda)

    # tokenizer -> data -> model -> peft -> task module
    # hub id -> local folder first (fetched once, or found in the hub cache): the tokenizer lives there too
    model_path = model_folder(c["model"])
    tokenizer = MistralTokenizer.from_pretrained(c["model"].get("tokenizer") or model_path)
    vocab_problem = check_tokenizer_matches_model(tokenizer, model_path, bool(c["model"].get("allow_vocab_mismatch")))
    if vocab_problem:  # ids past the embedding would fail (CPU) or read garbage (CUDA) mid-training
        raise ConfigError(vocab_problem)
    data_cfg = dict(c["data"])
    if use_cuda and data_cfg.get("pad_to_multiple_of") is None:
        # bucketed lengths on CUDA: few distinct shapes (FlexAttention and torch.compile recompile per shape;
        # tensor cores like multiples of 128); unset stays unset on CPU, where padding is pure extra work
        data_cfg["pad_to_multiple_of"] = 128
    batch_size = int(data_cfg.pop("batch_size"))
    eval_batch_size = data_cfg.pop("eval_batch_size", None)
    task = str(c["task"])
    datamodule = MistralDataModule(data_cfg, tokenizer, task=task, batch_size=batch_size, eval_batch_size=eval_batch_size)
    datamodule.setup("fit")
    info = datamodule.info
    assert info is not None
    generation_eval = build_generation_eval(c, tokenizer, run_dir)  # bad eval input fails before the model loads

    device = torch.device("cuda", local_rank % max(1, torch.cuda.device_count())) if use_cuda else torch.device("cpu")
    model = build_model(c, model_path, info, device)
    trainable, total = trainable_parameter_count(model)
    log.info("model %s: %s trainable of %s parameters (%.3f%%)", model_path, f"{trainable:,}", f"{total:,}",
             100.0 * trainable / max(1, total))
    log_memory_plan(c, model, trainable, total, use_cuda,
                    requested_devices(c["trainer"].get("devices", 1), use_cuda) * int(c["trainer"].get("num_nodes", 1) or 1))

    hparams = strip_secrets(c)
    hparams["data_info"] = info.to_dict()
    module = TASKS[task](model, TaskSettings.from_config(c), hparams)
    module.generation_eval = generation_eval

    trainer = build_trainer(c, run_dir, precision)  # before any file: Lightning's own checks may refuse
    if rank == 0 and not trainer.fast_dev_run:  # the run folder's files, now that data, model and trainer are built
        write_run_files(run_dir, c, model_path, overrides, resumed=bool(resume_ckpt))
    if trainer.world_size > 1:  # which launcher Lightning found: the line to read when a multi-node job hangs
        env = getattr(trainer.strategy, "cluster_environment", None)
        log.info("rank %d of %d (node %d, local rank %d): %s", trainer.global_rank, trainer.world_size,
                 trainer.node_rank, trainer.local_rank, type(env).__name__)
    try:
        return _fit_and_report(trainer, module, datamodule, c, run_dir, resume_ckpt, tokenizer, info,
                               choices=choices, trainable=trainable, total=total, t_wall=t_wall)
    except torch.OutOfMemoryError as err:  # torch.cuda.OutOfMemoryError is the same class
        raise TrainingStopped(f"{oom_advice(c)}\n(at optimizer step {trainer.global_step}: "
                              f"{str(err).strip().splitlines()[0][:200]})") from err
    finally:
        # or the next run of a -m sweep would log into this W&B run
        if c["logger"].get("name") == "wandb" and not c["logger"].get("_target_"):
            import wandb

            wandb.finish()


def _fit_and_report(trainer: Any, module: Any, datamodule: Any, c: Mapping[str, Any], run_dir: Path,
                    resume_ckpt: Any, tokenizer: Any, info: Any, *, choices: Optional[Mapping[str, Any]],
                    trainable: int, total: int, t_wall: float) -> dict[str, Any]:
    ckpt_dir = run_dir / "checkpoints"
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(resume_ckpt) if resume_ckpt else None)

    # the final checkpoint first: a validate() run would drop the fit loop's data position from it
    last = ckpt_dir / "last.ckpt"
    final = ckpt_dir / f"step-{trainer.global_step:06d}.ckpt"
    # Decide from trainer state, not from the file system: every rank must take the same branch,
    # because save_checkpoint ends in a barrier (rank 0 may already have written the file).
    # ModelCheckpoint wrote step-N.ckpt itself when N is a multiple of every_n_train_steps.
    if trainer.fast_dev_run:  # Lightning's smoke test: it writes no checkpoints or logs, and neither do we
        log.info("fast_dev_run: nothing written (no checkpoint, adapter, summary or logs)")
        return {}
    if trainer.global_step % int(c["checkpoint"]["every_n_train_steps"]) != 0 or not trainer.global_step:
        trainer.save_checkpoint(final, weights_only=False)  # the full state: resume needs it
    # a final validation unless the last one was at the final step
    if datamodule.val_dataset is not None and (not module.val_history or module.val_history[-1]["step"] != trainer.global_step):
        trainer.validate(module, datamodule=datamodule, verbose=False)
    tokens, targets = module.total_tokens_seen(), module.total_targets_seen()
    # strategy=fsdp: the trainable weights as full tensors (a collective: every rank takes part)
    gathered = gather_trainable(module.model) if is_sharded(module.model) else None
    if not trainer.is_global_zero:
        return {}
    if final.is_dir():  # a sharded (DCP) checkpoint is a folder
        shutil.rmtree(last, ignore_errors=True)
        shutil.copytree(final, last)
    else:
        AtomicCheckpointIO.of(trainer).copy(final, last)  # a kill here leaves the previous last.ckpt, never a torn one
    exported = export_weights(module.model, run_dir, c, tokenizer, state_dict=gathered) if c["checkpoint"]["save_adapter"] else None
    summary = write_summary(module, trainer, run_dir, c, info, recipe=(choices or {}).get("recipe"), tokens=tokens, targets=targets, wall_s=time.perf_counter() - t_wall,
                            trainable=trainable, total=total, exported=exported)
    print_report(summary)
    return summary


def build_generation_eval(c: Mapping[str, Any], tokenizer: Any, run_dir: Path) -> Any:
    """The generation evaluation the causal-LM task runs at each validation (None when eval is off)."""
    settings = EvalSchema.from_config(c.get("eval"))
    if not settings.enabled:
        return None
    refs = load_references(c["data"], settings.num_samples)
    if not refs:  # no validation split: validation (and so the generation eval) never runs
        log.warning("eval.enabled=true but the data has no validation split: no generation eval")
        return None
    return GenerationEval(settings, refs, tokenizer, run_dir / "eval_samples.jsonl")


def load_model(c: Mapping[str, Any], model_path: str, info: Any, device: Any) -> Any:
    """Our MistralForCausalLM / MistralForSequenceClassification, the head sized from the data's labels."""
    kwargs: dict[str, Any] = dict(torch_dtype=c["model"]["dtype"], device=device,
                                  attn_implementation=resolve_attn_implementation(c["model"]["attn_implementation"],
                                                                                  device))
    kind, head = HEADS[str(c["task"])](info)  # the head: lm_head, or a score layer sized from the data's labels
    model_class = MistralForCausalLM if kind == "causal_lm" else MistralForSequenceClassification
    return model_class.from_pretrained(model_path, **kwargs, **head)


def build_trainer(c: Mapping[str, Any], run_dir: Path, precision: Any) -> Any:
    """A Lightning Trainer from `trainer.*` plus the strategy / logger groups, our callbacks and the
    `callbacks` group's (a user's own, e.g. `+callbacks.my_cb._target_=my.Callback`)."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    trainer_args = dict(c["trainer"])
    trainer_args["precision"] = precision
    checkpoint = ModelCheckpoint(
        dirpath=run_dir / "checkpoints", filename="step-{step:06d}", auto_insert_metric_name=False,
        every_n_train_steps=int(c["checkpoint"]["every_n_train_steps"]), save_top_k=-1, save_last=True,
        # a resumed run rewrites last.ckpt / a step it already saved (atomically) rather than adding last-v1.ckpt
        # beside it: the run folder holds one checkpoint per step and one last.ckpt (the lock keeps runs apart)
        enable_version_counter=False,
    )
    # atomic, fsynced checkpoint files read with weights_only=True (fsdp writes sharded folders its own way)
    plugins = [AtomicCheckpointIO()] if c["strategy"]["name"] != "fsdp" else []
    from lightning.fabric.utilities.exceptions import MisconfigurationException
    from lightning.pytorch.callbacks import ProgressBar

    user_callbacks = build_callbacks(c.get("callbacks"))
    own_bar = [] if not trainer_args.get("enable_progress_bar", True) or any(
        isinstance(cb, ProgressBar) for cb in user_callbacks) else [progress_bar()]  # a user's own bar wins
    # a resume continues the loggers' history (registry.continue_history_callback); a user's _target_ gets its keys
    logger_settings = c["logger"] if c["logger"].get("_target_") else {
        **c["logger"], "continue_history": bool(c.get("resume"))}
    try:  # Lightning validates accelerator / precision / devices itself: its ValueError names the value
        return L.Trainer(**trainer_args, strategy=build("strategy", c["strategy"], run_dir),
                         logger=build("logger", logger_settings, run_dir),
                         # fast_dev_run: Lightning skips step checkpoints but still writes last.ckpt; no checkpoint at all
                         callbacks=[RngStates(), StepClock.make(), *([] if trainer_args.get("fast_dev_run") else [checkpoint]),
                                    continue_history_callback(run_dir), *user_callbacks, *own_bar],
                         plugins=plugins,
                         default_root_dir=str(run_dir))
    except (ValueError, MisconfigurationException) as err:
        raise ConfigError(f"trainer: {err} (trainer.accelerator={trainer_args.get('accelerator')!r}, "
                          f"trainer.precision={trainer_args.get('precision')!r}, "
                          f"trainer.devices={trainer_args.get('devices')!r})") from err


def build_model(c: Mapping[str, Any], model_path: str, info: Any, device: Any) -> Any:
    """The model to train: loaded (or built on meta for a rank-local fsdp load), compiled /
    checkpointed as asked, with the peft adapter applied, in train mode."""
    import torch

    # strategy=fsdp: build on meta; each rank reads only its own shards once sharded (configure_model)
    rank_local = rank_local_load_applies(c)
    # qlora: load on CPU and quantize layer by layer onto `device` (a bf16 7B never sits on the GPU whole)
    model = meta_model(c, model_path) if rank_local else \
        load_model(c, model_path, info, torch.device("cpu") if c["peft"]["method"] == "qlora" else device)
    # a conf/model entry's architecture numbers must be the loaded config.json's (a wrong model.path is an error)
    model.config.check_architecture(c["model"].get("architecture"), f"model={c['model']['name']} ({model_path})")
    if c["model"].get("compile"):
        for layer in model.model.layers:  # per layer: one small graph, reused by every layer
            layer.compile()
    if c["model"].get("gradient_checkpointing"):
        model.gradient_checkpointing_enable()
        if c["peft"]["method"] != "none":
            model.enable_input_require_grads()  # a frozen embedding would cut the checkpointed graph
    rng = torch.random.get_rng_state()  # what peft draws the LoRA init from (replayed by a rank-local load)
    model = apply_peft(model, c["peft"], task=TASK_MODEL[str(c["task"])], device=device)
    if rank_local:
        model.rank_local_source = (model_path, rng)
    model.train()  # from_pretrained returns eval mode, and Lightning 2.6 keeps submodule modes as it finds them
    return model


def write_run_files(run_dir: Path, c: Mapping[str, Any], model_path: str, overrides: Sequence[str], *,
                    resumed: bool) -> None:
    """config.yaml, base_model.json (export refuses a moved or changed base) and overrides.yaml (what resume replays)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    write_yaml(run_dir / "config.yaml", strip_secrets(c))
    record_base(run_dir, model_path, c["model"])
    if not resumed or not (run_dir / "overrides.yaml").is_file():
        kept = [o for o in overrides if not o.lstrip("+").startswith(("resume=", "hydra."))]
        write_yaml(run_dir / "overrides.yaml", [o for o in kept if strip_secrets({o.partition("=")[0]: 1})])


# ---- outputs --------------------------------------------------------------------------------------
def export_weights(model: Any, run_dir: Path, c: Mapping[str, Any], tokenizer: Any,
                   state_dict: Optional[Mapping[str, Any]] = None) -> Optional[str]:
    """adapter/ (peft: adapter_config.json + adapter_model.safetensors, `score` included for
    classification) or model/ (full fine-tuning: HF folder), each with the tokenizer.
    `state_dict`: the gathered weights of a sharded (FSDP2) model, whose own tensors are shards."""
    folder = run_dir / ("model" if c["peft"]["method"] == "none" else "adapter")
    extra = {"state_dict": dict(state_dict)} if state_dict is not None else {}
    if c["peft"]["method"] == "none":
        model.save_pretrained(str(folder), **extra)
    else:
        # LoRA on lm_head would otherwise make peft copy the whole (frozen) output layer into the adapter
        model.save_pretrained(str(folder), save_embedding_layers=False, **extra)
        record = json.loads((run_dir / BASE_RECORD).read_text())
        config = model.get_base_model().config
        describe_adapter(folder, adapter_base_name(record.get("source"), record["path"]), record,
                         head_labels(config) if TASK_MODEL[c["task"]] == "classification" else None)
    tokenizer.save_pretrained(str(folder))
    return str(folder)


# Padded embeddings: checkpoints round vocab_size up (to a multiple of 64..1024) past the tokenizer's
# count; a smaller gap than this is padding, a larger one a different tokenizer (v3's 32768 on Nemo's 131072).
VOCAB_PADDING_LIMIT = 1024


def check_tokenizer_matches_model(tokenizer: Any, model_path: str | Path, allow_mismatch: bool = False) -> Optional[str]:
    """A problem string when the tokenizer and the model's embedding do not belong together.

    More tokens than ``vocab_size``: ids with no embedding row (a CUDA device assert mid-training), always
    an error. Fewer: fine when the gap is below ``VOCAB_PADDING_LIMIT`` (padded embeddings), else almost
    surely the wrong tokenizer for the model (it trains, silently, on ids the model never learned);
    ``model.allow_vocab_mismatch=true`` accepts it on purpose.
    """
    config = Path(model_path) / "config.json"
    try:
        vocab = int(json.loads(config.read_text(encoding="utf-8"))["vocab_size"])
    except (OSError, KeyError, ValueError, TypeError):
        return None  # from_pretrained reports a missing or broken config.json with its own message
    name = getattr(getattr(tokenizer, "kind", None), "name", "v1")
    source = getattr(tokenizer, "model_file", "the tokenizer")
    if tokenizer.vocab_size > vocab:
        return (f"model.tokenizer: the tokenizer ({source}, {name}) has {tokenizer.vocab_size} tokens but the model at "
                f"{model_path} has vocab_size {vocab} ({config}): ids >= {vocab} have no embedding row. Use the "
                "model's own tokenizer (model.tokenizer=null) or a model with a matching vocabulary")
    gap = vocab - tokenizer.vocab_size
    if gap >= VOCAB_PADDING_LIMIT and not allow_mismatch:
        return (f"model.tokenizer: the tokenizer ({source}, {name}) has {tokenizer.vocab_size} tokens but the model at "
                f"{model_path} has vocab_size {vocab} ({config}), {gap} more: more than embedding padding "
                f"(< {VOCAB_PADDING_LIMIT}), so probably another model's tokenizer. Use the model's own tokenizer "
                "(model.tokenizer=null), or set model.allow_vocab_mismatch=true if this pairing is intended")
    return None  # from_pretrained reports a missing or broken config.json with its own message
    if tokenizer.vocab_size > vocab:
        return (f"model.tokenizer: the tokenizer has {tokenizer.vocab_size} tokens but the model at {model_path} "
                f"has vocab_size {vocab} ({config}): ids >= {vocab} have no embedding row. Use the model's own "
                "tokenizer (model.tokenizer=null) or a model with a matching vocabulary")
    return None
