"""The work every system does: one model, one data file, and the optimizer steps cut from it by our CLI's loader.

Why the CLI's own data loader decides the steps: the CLI (``python -m mistral_ft.train ... data.pack=true``) is
one of the systems, and it cannot be handed batches. So the harness composes the CLI's exact config, builds its
``MistralDataModule`` in-process (same seed, same best-fit packing, same sampler) and records the batches it
yields; every other system then trains on *the same examples per optimizer step*: our model-level step on those
very batches, the peers on the examples cut back out of the packed rows (``document_ids``) and laid out as each
peer's best setting wants (one flattened row, or padded rows). Same examples -> same useful (target) tokens
per step, and the same first-step loss (LoRA's B starts at zero), which the harness reports as a check.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any

IGNORE_INDEX = -100
LORA = dict(r=16, alpha=32, dropout=0.0,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
LR = 1e-4

# name -> model shape (over the tiny model's config: vocab 32000, the Mistral-7B-v0.1 tokenizer) and run sizes.
# cpu-small: 4 layers at width 256 with the real vocabulary (the LM head's share of the work is realistic for a
# small model); a step of 2 rows x 512 tokens takes about a second on one core, so the default suite of 5 rounds
# over 5 systems fits in 10 minutes on 2 cores.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(  # the smoke test's size
        model=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, sliding_window=4096),
        seq_len=64, micro_batch=2, warmup=1, steps=2, rounds=1, median_words=8),
    "cpu-small": dict(
        model=dict(hidden_size=256, intermediate_size=896, num_hidden_layers=4, num_attention_heads=8,
                   num_key_value_heads=2, max_position_embeddings=4096, sliding_window=4096),
        seq_len=512, micro_batch=2, warmup=10, steps=10, rounds=5, median_words=45),
}

WORDS = ("the of and to in is was for on that with as by at from his her an be this which or are not had have "
         "one all were they but we there been has more when will would who so if out no up into can said time "
         "only new some could these two may first then do any like my now over such our man me even most made "
         "after also did many before must through back years where much your way well down should because each "
         "just those people how too little state good very make world still own see men work long get here "
         "between both life being under never day same another know while last might us great old year off "
         "come since against go came right used take three").split()


def make_rows(n: int, median_words: int, seed: int) -> list[dict[str, str]]:
    """Synthetic alpaca rows: lognormal answer lengths (most short, a long tail); the prompt (instruction) is
    masked by the data pipeline, the answer is the target. Token values change no kernel's speed."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = max(4, round(rng.lognormvariate(math.log(median_words), 0.9)))
        prompt = max(2, int(words * rng.uniform(0.2, 0.5)))
        rows.append({"instruction": " ".join(rng.choice(WORDS) for _ in range(prompt)), "input": "",
                     "output": " ".join(rng.choice(WORDS) for _ in range(words - prompt))})
    return rows


def cli_overrides(workdir: Path, preset: dict[str, Any], max_steps: int, run_dir: Path) -> list[str]:
    """The CLI's command line: LoRA r16 on all linear layers, packing on, plain AdamW at a constant lr (what the
    model-level systems do), no validation, no checkpoint inside the timed steps, no adapter export. Everything
    else (loss path, progress bar, logging cadence, loader) is the CLI's default, as a user gets it."""
    return [
        "recipe=instruct_lora", "model=tiny", f"model.path={workdir / 'model'}",
        "data=jsonl", f"data.train_file={workdir / 'train.jsonl'}", "data.format=alpaca", "data.pack=true",
        f"data.max_length={preset['seq_len']}", f"data.batch_size={preset['micro_batch']}",
        f"peft.r={LORA['r']}", f"peft.alpha={LORA['alpha']}", f"peft.dropout={LORA['dropout']}",
        "peft.target_modules=[" + ",".join(LORA["target_modules"]) + "]",  # specialize/*_tiny adds lm_head
        f"optimizer.lr={LR}", "optimizer.weight_decay=0.0", "scheduler=constant", "scheduler.warmup_steps=0",
        f"trainer.max_steps={max_steps}", "trainer.accumulate_grad_batches=1", "trainer.gradient_clip_val=null",
        "trainer.val_check_interval=1000000", f"checkpoint.every_n_train_steps={max_steps + 1000}",
        "checkpoint.save_adapter=false", "eval.enabled=false", "logger=csv", f"hydra.run.dir={run_dir}",
    ]


def prepare(workdir: Path, preset: dict[str, Any], n_steps: int, seed: int = 0) -> dict[str, Any]:
    """Model folder + train.jsonl in `workdir`; returns the plan: per step, our batch (lists) and its examples."""
    from mistral_ft.data import MistralDataModule
    from mistral_ft.model.tiny import build_tiny
    from mistral_ft.tokenizer import MistralTokenizer
    from mistral_ft.training.compose import compose_config

    build_tiny(workdir / "model", seed=seed, overrides=preset["model"])
    # enough packed rows for every step (each row ~ seq_len tokens, ~1.3 tokens per word)
    mean_words = preset["median_words"] * math.exp(0.9 ** 2 / 2)
    n_rows = int(n_steps * preset["micro_batch"] * preset["seq_len"] / (mean_words * 1.3 + 12) * 1.3) + 32
    with open(workdir / "train.jsonl", "w", encoding="utf-8") as f:
        for row in make_rows(n_rows, preset["median_words"], seed):
            f.write(json.dumps(row) + "\n")
    c = compose_config(cli_overrides(workdir, preset, n_steps, workdir / "run"))
    data_cfg = dict(c["data"])  # as mistral_ft.training.run builds it
    batch_size = int(data_cfg.pop("batch_size"))
    data_cfg.pop("eval_batch_size", None)
    dm = MistralDataModule(data_cfg, MistralTokenizer.from_pretrained(str(workdir / "model")), task="causal_lm",
                           batch_size=batch_size)
    dm.setup("fit")
    steps = []
    for batch in dm.train_dataloader():
        if len(steps) == n_steps:
            break
        step = step_from_batch({k: v.tolist() if hasattr(v, "tolist") else v for k, v in batch.items()})
        step["ours_dtypes"] = {k: str(v.dtype).removeprefix("torch.") for k, v in batch.items() if hasattr(v, "dtype")}
        steps.append(step)
    if len(steps) < n_steps:
        raise RuntimeError(f"benchmark data gave {len(steps)} steps, {n_steps} needed (make more rows)")
    return {"steps": steps, "config": {k: v for k, v in c.items() if k != "_choices"}}


def step_from_batch(batch: dict[str, list]) -> dict[str, Any]:
    """Our packed batch (python lists) -> the step: the batch, its examples (in row order) and counts."""
    examples = []
    for ids, labels, docs in zip(batch["input_ids"], batch["labels"], batch["document_ids"]):
        start = 0
        for t in range(1, len(docs) + 1):
            if t == len(docs) or docs[t] != docs[start]:
                if docs[start] >= 0:  # -1: padding
                    examples.append({"input_ids": ids[start:t], "labels": labels[start:t]})
                start = t
    targets = sum(count_targets(e["labels"]) for e in examples)
    assert targets == sum(count_targets(row) for row in batch["labels"]), "a document crosses a row boundary"
    return {"ours": batch, "examples": examples, "targets": targets,
            "lengths": [len(e["input_ids"]) for e in examples],
            "rows": len(batch["input_ids"]), "row_len": len(batch["input_ids"][0])}


def count_targets(labels: list[int]) -> int:
    """Targets after the model's shift: position t predicts labels[t + 1]."""
    return sum(1 for x in labels[1:] if x != IGNORE_INDEX)


def padded_micro_batches(lengths: list[int], token_budget: int) -> list[list[int]]:
    """The padded peer's strongest layout at our activation memory: the step's examples longest first, cut into
    micro-batches whose padded size (rows x longest) stays within our micro-batch (rows x seq_len)."""
    order = sorted(range(len(lengths)), key=lambda j: -lengths[j])
    out, cur = [], []
    for j in order:
        if cur and (len(cur) + 1) * lengths[cur[0]] > token_budget:
            out.append(cur)
            cur = []
        cur.append(j)
    if cur:
        out.append(cur)
    return out
