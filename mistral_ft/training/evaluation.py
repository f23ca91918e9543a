"""Generation-based evaluation of instruction tuning: does the model now *answer* the held-out chats?

Loss and perplexity say little about what a fine-tuned model does; this module scores what it generates.
The definitions (issue 14), written once here so training, the demo report and later ``evaluate`` agree:

* reference = the conversation's last assistant turn; prompt = the turns before it, encoded with the
  tokenizer's generation prompt (``encode_chat(prompt, add_generation_prompt=True)``);
* generation = greedy decoding with our KV cache (``model.generate``) on left-padded batches; the new tokens
  are cut at the first EOS and decoded with special tokens skipped;
* ``exact_match``: ``generated.strip() == reference.strip()``; ``normalised_match``: the same after
  :func:`normalise` (casefold, collapse whitespace, drop one trailing period); ``mean_generated_tokens``:
  new tokens before the EOS, per sample.

Worked example: reference "Hello Max, nice to meet you!", generated " hello max,  nice to meet you! "
-> exact False, normalised True, 10-ish generated tokens.

Distributed (DDP / FSDP): rank r scores samples r, r + W, r + 2W, ...; every rank runs the same number of
batches (short ranks repeat a sample that is not counted) and, with W > 1, every batch decodes exactly
``max_new_tokens`` steps (no early stop), because a sharded model's forward is a collective: one rank
stopping early would hang the others. Cutting at the first EOS afterwards gives the same tokens as early
stopping (greedy decoding of a row does not depend on the other rows). Counts are summed across ranks.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from mistral_ft.errors import ConfigError
from mistral_ft.training.schema import GENERATION_METRICS as METRICS, EvalSchema as EvalSettings

# formats whose rows carry a reference answer (the last assistant turn after normalisation)
REFERENCE_FORMATS = ("messages", "sharegpt", "alpaca")


def normalise(text: str) -> str:
    """Casefold, collapse runs of whitespace, strip, and drop one trailing period."""
    text = re.sub(r"\s+", " ", text.casefold()).strip()
    return text[:-1].rstrip() if text.endswith(".") else text


def split_conversation(messages: Sequence[Mapping[str, Any]], where: str = "conversation") -> tuple[list[dict], str]:
    """(prompt messages, reference answer): the reference is the last assistant turn, the prompt what precedes it."""
    if not messages or messages[-1].get("role") != "assistant":
        raise ConfigError(f"{where}: generation metrics need a conversation ending with an assistant turn "
                          "(the reference answer)")
    # role + content only: the pipeline's canonical rows carry a `weight` on every turn, which the chat
    # encoder allows on assistant turns only (and which does not change a prompt's tokens)
    return [{"role": m["role"], "content": m["content"]} for m in messages[:-1]], str(messages[-1]["content"])


@dataclass
class Reference:
    """One evaluation sample: where it came from, the prompt messages, the reference answer."""

    loc: str
    prompt: list[dict]
    reference: str


def load_references(data_cfg: Mapping[str, Any], num_samples: int) -> list[Reference]:
    """The first `num_samples` validation conversations as (prompt, reference), from the validation split the
    training pipeline picks (file, hub split or `val_fraction` hold-out); [] when there is none.

    ConfigError when the rows cannot carry reference answers (a `text` data format).
    """
    from mistral_ft.data.dataset import validation_rows

    cfg = {k: v for k, v in data_cfg.items() if k not in ("batch_size", "eval_batch_size")}
    fmt = cfg.get("format", "messages")
    if fmt not in REFERENCE_FORMATS:
        raise ConfigError(f"eval.enabled=true: data.format={fmt!r} rows have no reference answers; generation "
                          f"metrics need {' or '.join(REFERENCE_FORMATS)} rows (or set eval.enabled=false)")
    locs, rows, _ = validation_rows(cfg)
    return [Reference(loc, *split_conversation(row["messages"], where=loc))
            for loc, row in list(zip(locs, rows))[:num_samples]]


@torch.no_grad()
def greedy_answers(model: torch.nn.Module, tokenizer: Any, prompts: Sequence[Sequence[Mapping[str, Any]]],
                   max_new_tokens: int, batch_size: int, fixed_steps: bool = False) -> list[list[int]]:
    """Greedy new tokens per prompt (cut before the first EOS), in left-padded batches.

    ``fixed_steps``: decode exactly ``max_new_tokens`` steps per batch (the distributed rule in the module
    docstring); the returned tokens are the same either way.
    """
    if max_new_tokens <= 0:
        raise ConfigError(f"eval.max_new_tokens: must be > 0, got {max_new_tokens}")
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = next(model.parameters()).device
    answers: list[list[int]] = []
    for start in range(0, len(prompts), batch_size):
        encoded = [tokenizer.encode_chat(p, add_generation_prompt=True)[0] for p in prompts[start:start + batch_size]]
        width = max(len(ids) for ids in encoded)
        input_ids = torch.full((len(encoded), width), pad, dtype=torch.long)
        mask = torch.zeros_like(input_ids)
        for row, ids in enumerate(encoded):  # left padding: every row's last prompt token sits at column width-1
            input_ids[row, width - len(ids):] = torch.tensor(ids)
            mask[row, width - len(ids):] = 1
        out = model.generate(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                             max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=[] if fixed_steps else eos, pad_token_id=pad)
        for row in out[:, width:].tolist():
            answers.append(row[:row.index(eos)] if eos in row else row)
    return answers


def score(samples: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Sums over scored samples: n, exact, normalised, generated_tokens (summable across ranks)."""
    return {"n": float(len(samples)), "exact": float(sum(s["exact"] for s in samples)),
            "normalised": float(sum(s["normalised"] for s in samples)),
            "generated_tokens": float(sum(s["generated_tokens"] for s in samples))}


def metrics_from_sums(sums: Mapping[str, float], names: Sequence[str] = METRICS) -> dict[str, float]:
    n = max(sums["n"], 1.0)
    all_metrics = {"exact_match": sums["exact"] / n, "normalised_match": sums["normalised"] / n,
                   "mean_generated_tokens": sums["generated_tokens"] / n}
    return {k: all_metrics[k] for k in names}


def evaluate_generation(model: torch.nn.Module, tokenizer: Any, refs: Sequence[Reference], max_new_tokens: int,
                        batch_size: int = 16, rank: int = 0, world: int = 1) -> list[dict[str, Any]]:
    """This rank's sample rows (prompt, reference, generated, scores); see the module docstring for ranks."""
    mine = list(refs[rank::world])
    per_rank = math.ceil(len(refs) / world)
    counted = len(mine)
    mine += [refs[0]] * (per_rank - counted)  # equal work on every rank; the repeats are not counted
    was_training = model.training
    model.eval()
    try:
        answers = greedy_answers(model, tokenizer, [r.prompt for r in mine], max_new_tokens, batch_size,
                                 fixed_steps=world > 1)
    finally:
        model.train(was_training)
    rows = []
    for ref, ids in zip(mine[:counted], answers):
        text = tokenizer.decode(ids, skip_special_tokens=True)
        rows.append({"loc": ref.loc, "prompt": ref.prompt, "reference": ref.reference, "generated": text,
                     "generated_tokens": len(ids), "exact": text.strip() == ref.reference.strip(),
                     "normalised": normalise(text) == normalise(ref.reference)})
    return rows


class GenerationEval:
    """What a causal-LM task runs at the end of each validation: scores, the sample table, its cost.

    ``reduce_sum`` sums a float across ranks (the strategy's reduce); ``gather`` collects every rank's sample
    rows on all ranks (``all_gather_object``), so rank 0 can write the whole table.
    """

    def __init__(self, settings: EvalSettings, refs: Sequence[Reference], tokenizer: Any,
                 samples_path: Optional[Path]) -> None:
        self.settings = settings
        self.refs = list(refs)
        self.tokenizer = tokenizer
        self.samples_path = samples_path
        self.time_s = 0.0
        self.last: dict[str, float] = {}
        self.last_rows: list[dict[str, Any]] = []
        self.before: Optional[dict[str, float]] = None  # the scores before the first optimizer step
        self.before_rows: list[dict[str, Any]] = []

    def run(self, model: torch.nn.Module, rank: int = 0, world: int = 1,
            reduce_sum: Callable[[float], float] = float,
            gather: Callable[[list], list] = lambda rows: rows) -> dict[str, float]:
        t0 = time.perf_counter()
        rows = evaluate_generation(model, self.tokenizer, self.refs, self.settings.max_new_tokens,
                                   self.settings.batch_size, rank, world)
        sums = {k: reduce_sum(v) for k, v in score(rows).items()}
        metrics = metrics_from_sums(sums, self.settings.metrics)
        everyone = gather(rows)
        if rank == 0 and self.samples_path is not None:
            write_samples(self.samples_path, everyone)
        self.time_s += time.perf_counter() - t0
        self.last, self.last_rows = metrics, everyone
        return metrics

    def run_before(self, model: torch.nn.Module, **kwargs: Any) -> dict[str, float]:
        """The same evaluation before training: the baseline the end-of-run report compares with."""
        self.before = self.run(model, **kwargs)
        self.before_rows = self.last_rows
        return self.before

    def log_table(self, loggers: Sequence[Any], step: int) -> None:
        """The latest evaluation's sample table to TensorBoard / W&B (:func:`log_sample_table`); rank 0 calls it."""
        log_sample_table(loggers, self.last_rows, step)

    def report_lines(self, show: int = 4) -> list[str]:
        """A few samples before -> after and the scores, for the end-of-run console report."""
        if not self.last_rows:
            return []
        before = {r["loc"]: r["generated"] for r in self.before_rows}
        lines = [f"Generation eval on {len(self.last_rows)} validation chats (greedy, "
                 f"max_new_tokens={self.settings.max_new_tokens}):"]
        for r in self.last_rows[:show]:
            lines.append(f"  Q: {r['prompt'][-1]['content']!r}  expected {r['reference']!r}")
            if r["loc"] in before:
                b = before[r["loc"]]
                lines.append(f"     before: {b[:60] + '...' if len(b) > 60 else b!r}")
            lines.append(f"     after:  {r['generated']!r}{'  (exact)' if r['exact'] else ''}")
        fmt = lambda m: ", ".join(f"{k} {v:.1%}" if k != "mean_generated_tokens" else f"{k} {v:.1f}"  # noqa: E731
                                  for k, v in m.items())
        if self.before is not None:
            lines.append(f"  before fine-tuning: {fmt(self.before)}")
        lines.append(f"  after fine-tuning:  {fmt(self.last)}")
        return lines


TABLE_COLUMNS = ("prompt", "reference", "generated", "exact")


def table_rows(rows: Sequence[Mapping[str, Any]]) -> list[list[Any]]:
    """The sample table's cells: the last user turn as the prompt (what a reader needs), then the answers."""
    return [[r["prompt"][-1]["content"] if r["prompt"] else "", r["reference"], r["generated"], bool(r["exact"])]
            for r in rows]


def log_sample_table(loggers: Sequence[Any], rows: Sequence[Mapping[str, Any]], step: int,
                     key: str = "eval_samples") -> None:
    """The sample table to the loggers that can show one: TensorBoard as a markdown text summary, W&B as a
    ``wandb.Table``; CSV (and any other logger) has no table and gets nothing. Rank 0 only (the caller's job)."""
    cells = table_rows(rows)
    for logger in loggers:
        kind = type(logger).__name__
        if kind == "TensorBoardLogger":
            esc = lambda v: str(v).replace("|", "\\|").replace("\n", " ")  # noqa: E731  (one table row per sample)
            md = "\n".join(["| " + " | ".join(TABLE_COLUMNS) + " |", "|" + " --- |" * len(TABLE_COLUMNS)]
                           + ["| " + " | ".join(esc(v) for v in row) + " |" for row in cells])
            logger.experiment.add_text(key, md, global_step=step)
        elif kind == "WandbLogger":
            logger.log_table(key, columns=list(TABLE_COLUMNS), data=cells, step=step)  # a wandb.Table


def write_samples(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    """eval_samples.jsonl: one JSON object per sample (the latest evaluation), written atomically."""
    from mistral_ft.fs import atomic_write_bytes

    text = "".join(json.dumps({"loc": r["loc"], "prompt": r["prompt"], "reference": r["reference"],
                               "generated": r["generated"], "exact": r["exact"], "normalised": r["normalised"]},
                              ensure_ascii=False) + "\n" for r in rows)
    atomic_write_bytes(path, text.encode("utf-8"))


# ---- evaluating a finished model over a data file (python -m mistral_ft.evaluate) ------------------------
def loss_over_file(model: torch.nn.Module, tokenizer: Any, data_cfg: Mapping[str, Any], batch_size: int) -> dict[str, float]:
    """Token-weighted loss and perplexity over every row of a causal data file, with the training pipeline's
    tokenization and masking (loss on assistant answers and their EOS only)."""
    from torch.utils.data import DataLoader

    from mistral_ft.data.collate import Collator
    from mistral_ft.data.dataset import build_datasets
    from mistral_ft.training.tasks.causal_lm import count_targets

    dataset, _, info = build_datasets(dict(data_cfg), tokenizer)
    device = next(model.parameters()).device
    total, n = 0.0, 0
    with torch.no_grad():
        for batch in DataLoader(dataset, batch_size=batch_size, collate_fn=Collator(tokenizer.pad_token_id or 0)):
            out = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                        labels=batch["labels"].to(device), loss_reduction="sum")
            total += float(out.loss)
            n += count_targets(batch["labels"])
    loss = total / max(n, 1)
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "target_tokens": float(n), "rows": float(info.train_rows)}


def evaluate_files(model_path: str, adapter: Optional[str], data_cfg: Mapping[str, Any], settings: Any,
                   out_dir: Path) -> dict[str, Any]:
    """Loss / perplexity and the generation metrics of a model (+ adapter) over one data file, written to
    ``out_dir`` (evaluate_summary.json, eval_samples.jsonl). Inputs are checked before ``out_dir`` is made."""
    from mistral_ft.checkpoints.load import load
    from mistral_ft.fs import atomic_write_bytes

    refs = load_references(data_cfg, settings.num_samples)  # bad data / no references: before any output
    model, tokenizer, folder = load(model_path, adapter, device="cpu" if not torch.cuda.is_available() else None)
    losses = loss_over_file(model, tokenizer, data_cfg, settings.batch_size)
    out_dir.mkdir(parents=True, exist_ok=True)
    ev = GenerationEval(settings, refs, tokenizer, out_dir / "eval_samples.jsonl")
    metrics = ev.run(model)
    summary = {"model": str(folder), "adapter": str(adapter) if adapter else None, "data": data_cfg["train_file"],
               **losses, **metrics, "eval_time_s": ev.time_s, "samples": len(refs),
               "max_new_tokens": settings.max_new_tokens, "eval_samples": str(out_dir / "eval_samples.jsonl")}
    atomic_write_bytes(out_dir / "evaluate_summary.json", json.dumps(summary, indent=2).encode("utf-8"))
    return summary
