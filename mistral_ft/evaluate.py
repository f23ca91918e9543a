"""`python -m mistral_ft.evaluate`: loss, perplexity and generation metrics of a model over a data file.

    python -m mistral_ft.evaluate run=runs/demo/2026-01-01_12-00-00 data=data/instruct_val.jsonl
    python -m mistral_ft.evaluate model=/models/exported adapter=null data=chats.jsonl eval.num_samples=100

`run=` a finished training run (its base + adapter, or its full model/), or `model=` an exported / any HF
Mistral folder with an optional `adapter=`; `data=` a JSONL/CSV/parquet file of chats (`data.format=messages`
or `alpaca`). Writes evaluate_summary.json and eval_samples.jsonl to `output_dir=` (default: <run>/evaluate,
or ./evaluate; the old `out=` still works, with a note). The metric definitions are mistral_ft.training.evaluation's, the same as during training.

A Hydra app over its own primary config (mistral_ft/commands_conf/evaluate.yaml, where `data=FILE` is
`data.file`): Hydra's flags (`--help`, `--cfg job`, `--info`, ...) and override grammar, as train's.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

from mistral_ft.cli import renamed, run_cli, user_message
from mistral_ft.errors import ConfigError
from mistral_ft.runs import resolve_run
from mistral_ft.training.schema import EvalSchema

KEYS = ("run", "model", "adapter", "data", "data.format", "data.max_length", "output_dir", "eval.num_samples",
        "eval.max_new_tokens", "eval.batch_size", "debug")


def parse(settings: dict[str, Any]) -> dict[str, str]:
    """The composed settings (flat keys, unset ones left out) under the names of KEYS; a key added with
    `+key=` that evaluate does not know is a user error."""
    out: dict[str, str] = {}
    for key, value in settings.items():
        key = "data" if key == "data.file" else key
        if key not in KEYS:
            raise ConfigError(f"evaluate: {key!r} is not one of the key=value settings {list(KEYS)}")
        out[key] = str(value)
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = renamed(list(sys.argv[1:] if argv is None else argv), {"out=": "output_dir="}, "evaluate")

    def body() -> int:
        from mistral_ft.training.hydra_app import command_settings

        printed, settings = command_settings([f"data.file={a[5:]}" if a.startswith("data=") else a for a in args],
                                             __file__, "evaluate")
        if printed is not None:
            return printed
        kv = parse(settings)
        if "data" not in kv:
            raise ConfigError("evaluate: data=FILE is required (chats with reference answers)")
        if ("run" in kv) == ("model" in kv):
            raise ConfigError("evaluate: give exactly one of run=RUN_FOLDER or model=MODEL_FOLDER")
        ints = {}
        for key in ("eval.num_samples", "eval.max_new_tokens", "eval.batch_size", "data.max_length"):
            if key in kv:
                try:
                    ints[key] = int(kv[key])
                except ValueError:
                    raise ConfigError(f"evaluate: {key} must be an integer, got {kv[key]!r}") from None
        settings = EvalSchema(enabled=True, **{k.split(".")[1]: v for k, v in ints.items() if k.startswith("eval.")})
        for key in ("max_new_tokens", "num_samples", "batch_size"):
            if getattr(settings, key) <= 0:
                raise ConfigError(f"eval.{key}: must be > 0, got {getattr(settings, key)}")
        if "run" in kv:
            model, adapter = resolve_run(Path(kv["run"]))
            out = Path(kv.get("output_dir") or Path(kv["run"]) / "evaluate")
        else:
            model, adapter = kv["model"], (kv.get("adapter") if kv.get("adapter") not in (None, "", "null") else None)
            out = Path(kv.get("output_dir") or "evaluate")
        data_cfg = {"train_file": kv["data"], "validation_file": kv["data"], "format": kv.get("data.format", "messages"),
                    "max_length": ints.get("data.max_length", 2048)}
        from mistral_ft.training.evaluation import evaluate_files

        s = evaluate_files(str(model), str(adapter) if adapter else None, data_cfg, settings, out)
        print(f"loss {s['loss']:.4f}, ppl {s['ppl']:.2f}; exact match {s['exact_match']:.1%}, normalised "
              f"{s['normalised_match']:.1%} on {s['samples']} chats\nsummary: {out / 'evaluate_summary.json'}")
        return 0

    def classify(err: Exception) -> Optional[tuple[str, int]]:
        message = user_message(err)
        return (message, 2) if message is not None else None

    return run_cli(body, args, "evaluation", classify)


if __name__ == "__main__":
    sys.exit(main())
