"""What a finished run reports: summary.json, loss_curve.png, the closing lines on stdout."""

from __future__ import annotations

import json
import math
import resource
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional


def write_yaml(path: Path, data: Any) -> None:
    import yaml

    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")


def _mean(values: Sequence[float]) -> Optional[float]:
    return float(sum(values) / len(values)) if values else None


def peak_memory_mb() -> tuple[float, str]:
    """Peak CUDA memory allocated by tensors, or the process's peak resident memory on CPU."""
    import torch

    if torch.cuda.is_available() and torch.cuda.max_memory_allocated() > 0:
        return torch.cuda.max_memory_allocated() / 2**20, "cuda_max_allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return (rss / 2**20 if sys.platform == "darwin" else rss / 2**10), "cpu_peak_rss"


class StepClock:
    """Wall time of every optimizer step, end to end: data loading, hooks, logging and the step itself.

    What `summary.json`'s `step_times_s` reports, so a benchmark can time the CLI at steady state (later
    steps) and report start-up apart; one `perf_counter` per micro-batch, nothing that syncs a device.
    A Lightning callback made by `make()` (this module does not import Lightning at import time).
    """

    @staticmethod
    def make() -> Any:
        import lightning as L

        class _StepClock(L.Callback):
            def __init__(self) -> None:
                self.times: list[float] = []
                self._last: Optional[float] = None
                self._step: Optional[int] = None

            def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
                if self._last is None:  # the first step starts at its first batch (start-up not included)
                    self._last, self._step = time.perf_counter(), int(trainer.global_step)

            def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
                if int(trainer.global_step) != self._step:  # an optimizer step has just ended
                    now = time.perf_counter()
                    self.times.append(now - self._last)
                    self._last, self._step = now, int(trainer.global_step)

        return _StepClock()

    @staticmethod
    def times(trainer: Any) -> list[float]:
        return next((list(cb.times) for cb in trainer.callbacks if type(cb).__name__ == "_StepClock"), [])


def write_summary(module: Any, trainer: Any, run_dir: Path, c: Mapping[str, Any], info: Any, *, recipe: Optional[str], tokens: int, targets: int,
                  wall_s: float, trainable: int, total: int, exported: Optional[str]) -> dict[str, Any]:
    """summary.json + loss_curve.png.

    train_loss_first/last: means of the first/last k logged steps, k = min(5, steps // 2) (at least 1), so
    the two windows never overlap on a short run (with k = 5 a 6-step run's two means shared 4 steps).
    tokens_seen/tokens_per_s count *input* tokens (non-pad, prompt included); target_tokens_seen /
    target_tokens_per_s count the useful tokens, those with a loss (the benchmark's `tokens_per_s`).
    """
    losses = [v for _, v in module.loss_history]
    k = max(1, min(5, len(losses) // 2))
    val = module.val_history[-1] if module.val_history else {}
    mem, mem_kind = peak_memory_mb()
    ckpts = sorted(str(p) for p in (run_dir / "checkpoints").glob("*.ckpt"))
    logger = trainer.logger
    log_dir = getattr(logger, "log_dir", None) or getattr(logger, "save_dir", None)
    train_time = module.train_time_s
    gen = getattr(module, "generation_eval", None)
    summary: dict[str, Any] = {
        "recipe": recipe,
        "task": c["task"],
        "model": c["model"].get("path") or "tiny",
        "peft": c["peft"]["method"],
        "global_step": int(trainer.global_step),
        "train_loss_first": _mean(losses[:k]),
        "train_loss_last": _mean(losses[-k:]),
        "val_loss": val.get("val_loss"),
        **{k: v for k, v in val.items() if k not in ("step", "val_loss")},
        "tokens_seen": int(tokens),
        "tokens_per_s": float(tokens / train_time) if train_time > 0 else None,
        "target_tokens_seen": int(targets),
        "target_tokens_per_s": float(targets / train_time) if train_time > 0 else None,
        "train_time_s": float(train_time),
        # generation eval cost (inside validation, so never part of train_time_s)
        "eval_time_s": float(gen.time_s) if gen is not None else None,
        "eval_before": {f"val_{k}": v for k, v in gen.before.items()} if gen is not None and gen.before else None,
        "wall_s": float(wall_s),
        "step_times_s": StepClock.times(trainer),  # this process's optimizer steps (see StepClock)
        "peak_memory_mb": float(mem),
        "peak_memory_kind": mem_kind,
        "trainable_params": int(trainable),
        "total_params": int(total),
        "precision": str(trainer.precision),
        "world_size": int(trainer.world_size),
        "id2label": {str(k): v for k, v in (getattr(module, "id2label", None) or {}).items()} or None,
        "data": info.to_dict(),
        "paths": {
            "run_dir": str(run_dir),
            "config": str(run_dir / "config.yaml"),
            "last_checkpoint": str(run_dir / "checkpoints" / "last.ckpt"),
            "checkpoints": ckpts,
            "logs": str(log_dir) if log_dir else None,
            "metrics_csv": str(Path(log_dir) / "metrics.csv") if log_dir and c["logger"]["name"] == "csv" else None,
            "log_file": str(run_dir / "train.log"),
            "loss_curve": str(run_dir / "loss_curve.png"),
            "exported": exported,
            "eval_samples": str(gen.samples_path) if gen is not None and gen.samples_path and gen.samples_path.is_file() else None,
        },
        "nonfinite_skipped": len(module.nonfinite_skips),  # steps dropped with skip_nonfinite=true
        "nonfinite_skips": module.nonfinite_skips,
        "loss_history": [[s, v] for s, v in module.loss_history],
        "val_history": module.val_history,
    }
    if gen is not None:
        summary["eval_report"] = gen.report_lines()
    details = getattr(module, "last_details", None) or {}
    if "confusion" in details:
        summary["class_report"] = details
        summary["paths"]["confusion_matrix"] = str(plot_confusion(details, run_dir / "confusion_matrix.png"))
    elif "preds" in details:
        summary["paths"]["regression_scatter"] = str(plot_regression(details, run_dir / "regression_scatter.png"))
    summary = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in summary.items()}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    title = f"{run_dir.name} | recipe {recipe or 'none'} | lr {c['optimizer']['lr']:g}"
    before = {f"val_{k}": v for k, v in gen.before.items()} if gen is not None and gen.before else None
    plot_losses(module.loss_history, module.val_history, run_dir / "loss_curve.png", title=title, before=before)
    return summary


# The validation metric drawn on the second axis: the first of these a run logs (generation eval, then
# classification / reward scores). All are 0..1 fractions.
SCORE_METRICS = ("val_exact_match", "val_accuracy", "val_reward_accuracy")


def plot_losses(train: Sequence[tuple[int, float]], val: Sequence[Mapping[str, float]], path: Path,
                title: Optional[str] = None, before: Optional[Mapping[str, float]] = None) -> dict[str, Any]:
    """Loss per optimizer step (and validation points) as a PNG, the eval score on a second axis (from step 0
    when ``before``, the score before training, has it), the run (name, recipe, learning rate) in the title, so
    a PNG shown alone still says what it is; Agg needs no display. Returns what was drawn (title, legend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot([s for s, _ in train], [v for _, v in train], label="train loss (token-weighted)", lw=1)
    pts = [(v["step"], v["val_loss"]) for v in val if "val_loss" in v]
    if pts:
        ax.plot([s for s, _ in pts], [v for _, v in pts], "o-", label="val loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    metric = next((m for m in SCORE_METRICS if any(m in v for v in val)), None)
    if metric:  # a 0..1 score beside a loss: its own axis
        pts = [(0, before[metric])] if before and metric in before else []
        pts += [(v["step"], v[metric]) for v in val if metric in v]
        name = metric.removeprefix("val_").replace("_", " ")
        ax2 = ax.twinx()
        ax2.plot([s for s, _ in pts], [v for _, v in pts], "s--", color="tab:green", label=f"val {name}")
        ax2.set_ylim(-0.02, 1.02)
        ax2.set_ylabel(name)
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    ax.legend(handles, labels)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return {"title": title, "legend": labels, "score": metric}


def plot_confusion(report: Mapping[str, Any], path: Path) -> Path:
    """The last validation's confusion matrix (rows true, columns predicted) with counts in the cells."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names, counts = report["labels"], report["confusion"]
    fig, ax = plt.subplots(figsize=(1.2 * len(names) + 2, 1.2 * len(names) + 1.5))
    ax.imshow(counts, cmap="Blues")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    top = max(max(row) for row in counts) or 1
    for i, row in enumerate(counts):
        for j, v in enumerate(row):
            ax.text(j, i, str(v), ha="center", va="center", color="white" if v > top / 2 else "black")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_regression(points: Mapping[str, Sequence[float]], path: Path) -> Path:
    """Predicted vs true targets of the last validation, with the y = x line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5))
    ax.scatter(points["target"], points["preds"], s=10, alpha=0.7)
    lo = min([*points["target"], *points["preds"]], default=0.0)
    hi = max([*points["target"], *points["preds"]], default=1.0)
    ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="y = x")
    ax.set_xlabel("true")
    ax.set_ylabel("predicted")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def print_report(s: Mapping[str, Any]) -> None:
    p = s["paths"]
    fmt = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
    metrics = ", ".join(f"{k}={fmt(s[k])}" for k in ("val_accuracy", "val_f1", "val_mse", "val_r2", "val_ppl",
                                                       "val_reward_accuracy", "val_reward_margin", "val_margin",
                                                       "val_exact_match", "val_normalised_match")
                        if s.get(k) is not None)
    lines = [
        f"Done: {s['global_step']} steps in {s['wall_s']:.1f}s; train loss {fmt(s['train_loss_first'])} -> "
        f"{fmt(s['train_loss_last'])}, val_loss {fmt(s['val_loss'])}" + (f", {metrics}" if metrics else ""),
        f"Run folder: {p['run_dir']}",
        f"  summary:     {p['run_dir']}/summary.json",
        f"  config:      {p['config']}",
        f"  checkpoint:  {p['last_checkpoint']}",
        f"  metrics:     {p['metrics_csv'] or p['logs']}",
        f"  loss curve:  {p['loss_curve']}",
    ]
    if p["exported"]:
        lines.append(f"  weights:     {p['exported']}")
    if p.get("confusion_matrix"):
        lines.append(f"  confusion:   {p['confusion_matrix']}")
    if p.get("regression_scatter"):
        lines.append(f"  scatter:     {p['regression_scatter']}")
    lines += s.get("eval_report") or []
    if p.get("eval_samples"):
        lines.append(f"  eval table:  {p['eval_samples']} (generation eval: {s['eval_time_s']:.1f}s, not in train time)")
    lines.append(f"Continue with: python -m mistral_ft.train resume={p['run_dir']} trainer.max_steps=N")
    print("\n".join(lines), flush=True)
