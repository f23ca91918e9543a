"""``python -m mistral_ft.generate`` — sample from a base or fine-tuned Mistral model, streaming to stdout.

    python -m mistral_ft.generate --model ~/models/Mistral-7B-v0.1 --prompt "My favourite condiment is"
    python -m mistral_ft.generate --model BASE --adapter RUN/adapter --chat          # v1 [INST] chat on stdin
    python -m mistral_ft.generate --run outputs/2026-11-25/12-00-00 --prompt "..."  # a training run folder
    python -m mistral_ft.generate --model M --prompt a --prompt b --do-sample --top-p 0.9 --seed 0

Output: for each ``--prompt``, the prompt and its continuation as they are decoded, then a newline; in
``--chat`` mode, each answer then a newline. What is printed for a sequence is exactly
``tokenizer.decode(ids, skip_special_tokens=True)`` of the generated ids (byte-fallback emoji, leading spaces and
newlines included): text is streamed through the tokenizer's ``StreamDecoder``, which holds back the bytes of an
incomplete character instead of printing a replacement character.

Errors the user can fix (a missing folder, a prompt longer than the model allows, an adapter trained on another
base) are one line on stderr and exit status 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

import torch

from .model.config import read_json_object

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# config.json keys that decide tensor shapes: an adapter trained on a base that differs in any of them cannot load.
SHAPE_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim")


class GenerateError(ValueError):
    """A problem with the command line or its inputs; printed as one line, without a traceback."""


class TextStreamer:
    """A ``generate`` streamer printing one sequence's text as it is decoded (transformers' streamer protocol).

    ``put`` gets the prompt (1, T) first, then each step's new token (1,); ``end`` flushes incomplete bytes.
    """

    def __init__(self, tokenizer: Any, out: TextIO, skip_prompt: bool = False):
        self.decoder = tokenizer.stream_decoder(skip_special_tokens=True)
        self.out = out
        self.skip_prompt = skip_prompt
        self.tokens: list[int] = []  # what was decoded: the printed text is decode(tokens, skip_special_tokens=True)
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if value.shape[0] != 1:
            raise ValueError(f"TextStreamer streams one sequence; got a batch of shape {tuple(value.shape)}")
        ids = value.reshape(-1).tolist()
        if not self._prompt_seen:
            self._prompt_seen = True
            if self.skip_prompt:
                return
        self.tokens += ids
        text = "".join(self.decoder.put(i) for i in ids)
        if text:
            self.out.write(text)
            self.out.flush()

    def end(self) -> None:
        text = self.decoder.flush()
        if text:
            self.out.write(text)
        self.out.flush()


# ------------------------------------------------------------------------------------------------ loading
def _shape_config(folder: Path) -> dict[str, Any] | None:
    p = folder / "config.json"
    if not p.is_file():
        return None
    try:
        d = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if d.get("head_dim") is None and d.get("hidden_size") and d.get("num_attention_heads"):
        d["head_dim"] = d["hidden_size"] // d["num_attention_heads"]
    return {k: d.get(k) for k in SHAPE_KEYS}


def read_adapter_config(adapter: Path) -> dict[str, Any]:
    if not adapter.is_dir():
        raise GenerateError(f"--adapter {adapter}: no such folder")
    path = adapter / ADAPTER_CONFIG
    if not path.is_file():
        raise GenerateError(f"--adapter {adapter}: no {ADAPTER_CONFIG} (not a peft adapter folder)")
    return read_json_object(path, GenerateError)


def check_adapter(adapter: Path, model: torch.nn.Module, model_path: Path) -> None:
    """Refuse, with a clear message, an adapter that was trained on another base than ``model``.

    Two checks: the base named in ``adapter_config.json`` (``base_model_name_or_path``), when it is a local
    folder, must have the same shape-deciding config as ``model``; and every tensor of the adapter must fit the
    module it targets (LoRA A: (r, in_features), B: (out_features, r); saved modules: the parameter's shape).
    A base named differently but with the same shapes (a copy, a hub id vs. its local snapshot) is accepted.
    """
    from safetensors import safe_open

    cfg = read_adapter_config(adapter)
    where = adapter / ADAPTER_CONFIG
    task = cfg.get("task_type")
    if task not in (None, "CAUSAL_LM"):
        raise GenerateError(f"{where}: task_type is {task!r}; generation needs a CAUSAL_LM adapter "
                            f"(a SEQ_CLS adapter belongs to a classification model)")
    base = cfg.get("base_model_name_or_path")
    ours = _shape_config(model_path)
    if base and ours is not None and Path(base).expanduser().is_dir():
        base_dir = Path(base).expanduser().resolve()
        theirs = _shape_config(base_dir)
        if theirs is not None and base_dir != model_path.resolve():
            diff = [f"{k}: {theirs[k]} (adapter's base) vs {ours[k]} (--model)" for k in SHAPE_KEYS
                    if theirs[k] != ours[k]]
            if diff:
                raise GenerateError(f"--adapter {adapter} was trained on base {base} ({where}: "
                                    f"base_model_name_or_path), which differs from --model {model_path}: "
                                    + "; ".join(diff))
    if base and Path(base).name != model_path.name and Path(base).expanduser().resolve() != model_path.resolve():
        # same shapes, other name: maybe a copy, maybe another fine-tune of the same architecture; say so
        print(f"note: {where} names base {base!r}; applying it to {model_path}", file=sys.stderr)
    weights = adapter / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise GenerateError(f"--adapter {adapter}: no {ADAPTER_WEIGHTS} (mistral_ft loads safetensors adapters only)")
    params = dict(model.named_parameters())
    modules = dict(model.named_modules())
    with safe_open(str(weights), framework="pt") as f:
        for key in f.keys():
            shape = tuple(f.get_slice(key).get_shape())
            name = key.removeprefix("base_model.model.")
            problem = None
            if ".lora_A." in name or ".lora_B." in name:
                path = name.split(".lora_")[0]
                module = modules.get(path)
                if module is None or not hasattr(module, "in_features"):
                    problem = f"targets module '{path}', which the base model does not have"
                elif ".lora_A." in name and shape[1] != module.in_features:
                    problem = f"has shape {shape}, but '{path}' takes {module.in_features} input features"
                elif ".lora_B." in name and shape[0] != module.out_features:
                    problem = f"has shape {shape}, but '{path}' has {module.out_features} output features"
            else:
                target = name.replace(".modules_to_save.default.", ".").replace(".original_module.", ".")
                if target in params and tuple(params[target].shape) != shape:
                    problem = f"has shape {shape}, but the base model's '{target}' is {tuple(params[target].shape)}"
            if problem:
                raise GenerateError(f"--adapter {adapter} does not fit --model {model_path}: tensor '{key}' "
                                    f"{problem}. Was it trained on another base (adapter_config.json says "
                                    f"{base!r})?")


def resolve_run(run: Path) -> tuple[Path, Path | None]:
    """A training run folder -> (model folder, adapter folder or None), from the layout train.py writes.

    ``model/`` (full fine-tuning) is a complete HF folder; ``adapter/`` is a peft adapter whose base is its
    ``base_model_name_or_path``, else the run's ``config.yaml`` ``model.path`` (null: the embedded tiny model).
    """
    if not run.is_dir():
        raise GenerateError(f"--run {run}: no such folder")
    if (run / "model" / "config.json").is_file():
        return run / "model", None
    adapter = run / "adapter"
    if (adapter / ADAPTER_CONFIG).is_file():
        base = read_adapter_config(adapter).get("base_model_name_or_path")
        if base and Path(base).expanduser().is_dir():
            return Path(base).expanduser(), adapter
        cfg_file = run / "config.yaml"
        if cfg_file.is_file():
            from omegaconf import OmegaConf

            path = OmegaConf.select(OmegaConf.load(cfg_file), "model.path", default=None)
            if path:
                return Path(str(path)).expanduser(), adapter
            from .model.tiny import tiny_model_path

            return tiny_model_path(), adapter
        raise GenerateError(f"--run {run}: the adapter's base {base!r} is not a local folder and the run has no "
                            f"config.yaml; pass the base with --model")
    raise GenerateError(f"--run {run}: no model/ or adapter/ folder (they are written when training ends; "
                        f"is this run finished?)")


def load(model_path: str | Path, adapter: str | Path | None = None, dtype: str = "float32", attn: str = "sdpa",
         device: str | None = None) -> tuple[torch.nn.Module, Any, Path]:
    """(model ready for ``generate``, tokenizer, model folder); peft layers injected when ``adapter`` is given."""
    from .model import MistralForCausalLM
    from .model.weights import resolve_model_path
    from .tokenizer import MistralTokenizer

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    p = Path(str(model_path)).expanduser()
    if not p.exists() and (str(model_path).startswith(("/", ".", "~")) or str(model_path).count("/") != 1):
        raise GenerateError(f"--model {model_path}: no such folder")
    folder = resolve_model_path(model_path)
    config_file = folder / "config.json"
    if config_file.is_file():
        archs = json.loads(config_file.read_text()).get("architectures") or []
        if archs and archs[0] == "MistralForSequenceClassification":
            raise GenerateError(f"{config_file}: this is a sequence-classification model; it cannot generate text")
    model = MistralForCausalLM.from_pretrained(folder, torch_dtype=dtype, device=device, attn_implementation=attn)
    tok_dir = None
    if adapter is not None:
        from peft import PeftModel

        adapter = Path(adapter).expanduser()
        check_adapter(adapter, model, folder)
        model = PeftModel.from_pretrained(model, str(adapter)).get_base_model()  # LoRA layers are now inside
        model.eval()
        if (adapter / "tokenizer.model").is_file():
            tok_dir = adapter
    if tok_dir is None and (folder / "tokenizer.model").is_file():
        tok_dir = folder
    if tok_dir is None:
        print(f"note: {folder} has no tokenizer.model; using the Mistral-7B-v0.1 tokenizer from mistral_common",
              file=sys.stderr)
    tokenizer = MistralTokenizer.from_pretrained(tok_dir)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise GenerateError(f"the tokenizer has {tokenizer.vocab_size} pieces, but the model's vocab_size is "
                            f"{model.config.vocab_size} ({config_file})")
    return model, tokenizer, folder


# ------------------------------------------------------------------------------------------------ CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mistral_ft.generate", description=(
        "Generate text from a Mistral model (HF folder), optionally with a peft adapter, streaming to stdout."))
    src = p.add_argument_group("model")
    src.add_argument("--model", help="HF-format folder (config.json + safetensors + tokenizer.model) or hub id")
    src.add_argument("--adapter", help="peft adapter folder (adapter_config.json + adapter_model.safetensors)")
    src.add_argument("--run", help="training run folder (uses its model/ or adapter/)")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", action="append", help="text to continue (repeatable)")
    what.add_argument("--chat", action="store_true",
                      help="interactive instruct chat (v1 [INST] format): one user message per stdin line, "
                           "until EOF or /exit")
    p.add_argument("--system", help="system prompt for --chat (prepended to the first user message)")
    s = p.add_argument_group("decoding")
    s.add_argument("--max-new-tokens", type=int, default=128)
    s.add_argument("--do-sample", action="store_true", help="sample (default: greedy)")
    s.add_argument("--temperature", type=float, default=1.0)
    s.add_argument("--top-k", type=int, default=None)
    s.add_argument("--top-p", type=float, default=None)
    s.add_argument("--seed", type=int, default=None, help="makes sampling reproducible")
    r = p.add_argument_group("runtime")
    r.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    r.add_argument("--attn", choices=["sdpa", "eager"], default="sdpa")
    r.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    r.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def _check_length(ids: Sequence[int], model: torch.nn.Module, what: str, folder: Path) -> None:
    limit = model.config.max_position_embeddings
    if len(ids) > limit:
        raise GenerateError(f"{what} is {len(ids)} tokens long, but the model allows at most {limit} "
                            f"(max_position_embeddings in {folder / 'config.json'})")


def _generate(model, ids: list[int], args, generator, streamer) -> list[int]:
    x = torch.tensor([ids], device=model.device)
    out = model.generate(x, max_new_tokens=args.max_new_tokens, do_sample=args.do_sample,
                         temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, generator=generator,
                         streamer=streamer)
    return out[0, len(ids):].tolist()


def run(args: argparse.Namespace, stdin: TextIO, stdout: TextIO) -> int:
    if args.run and args.adapter:
        raise GenerateError("give either --run or --adapter, not both")
    if not args.run and not args.model:
        raise GenerateError("give --model FOLDER (or --run RUN_FOLDER)")
    if args.max_new_tokens < 0:
        raise GenerateError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    model_path, adapter = args.model, args.adapter
    if args.run:
        run_model, adapter = resolve_run(Path(args.run).expanduser())
        model_path = model_path or run_model
    model, tok, folder = load(model_path, adapter, args.dtype, args.attn, args.device)
    generator = None
    if args.seed is not None:
        generator = torch.Generator(device=model.device).manual_seed(args.seed)
    if not args.chat:
        prompts = [tok.encode(p) for p in args.prompt]
        for i, ids in enumerate(prompts):
            _check_length(ids, model, f"--prompt #{i + 1}", folder)
        for ids in prompts:
            _generate(model, ids, args, generator, TextStreamer(tok, stdout))
            stdout.write("\n")
            stdout.flush()
        return 0
    messages: list[dict[str, str]] = [{"role": "system", "content": args.system}] if args.system else []
    interactive = stdin.isatty()
    while True:
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)
        line = stdin.readline()
        if not line or line.strip() == "/exit":
            return 0
        text = line.rstrip("\n")
        if not text.strip():
            continue
        messages.append({"role": "user", "content": text})
        ids, _ = tok.encode_chat(messages)
        _check_length(ids, model, "the conversation", folder)
        streamer = TextStreamer(tok, stdout, skip_prompt=True)
        _generate(model, ids, args, generator, streamer)
        stdout.write("\n")
        stdout.flush()
        answer = tok.decode(streamer.tokens, skip_special_tokens=True)
        if answer.strip():
            messages.append({"role": "assistant", "content": answer})
        else:  # the v1 format has no empty answers: forget this exchange rather than fail the next turn
            messages.pop()
            print("(empty answer: this exchange is not kept in the conversation)", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (0 ok, 2 a user error reported on stderr)."""
    args = build_parser().parse_args(argv)
    try:
        with torch.no_grad():
            return run(args, sys.stdin, sys.stdout)
    except (GenerateError, FileNotFoundError, ValueError, OSError) as e:  # CheckpointError/ConfigError are ValueErrors
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
