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
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional, TextIO

import torch

from mistral_ft.checkpoints.load import load
from mistral_ft.cli import run_cli, user_message
from mistral_ft.errors import GenerateError
from mistral_ft.runs import resolve_run

# config.json keys that decide tensor shapes: an adapter trained on a base that differs in any of them cannot load.


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


def check_options(args: argparse.Namespace) -> None:
    """Refuse decoding values that would fail deep inside sampling (or silently mean something else)."""
    def bad(flag: str, value: Any, want: str) -> GenerateError:
        return GenerateError(f"{flag} {value}: must be {want}")

    if args.max_new_tokens < 1:
        raise bad("--max-new-tokens", args.max_new_tokens, "a whole number >= 1")
    if not (math.isfinite(args.temperature) and args.temperature > 0):
        raise bad("--temperature", args.temperature, "a finite number > 0 (use greedy decoding, the default, "
                  "for temperature 0)")
    if args.top_k is not None and args.top_k < 1:
        raise bad("--top-k", args.top_k, "a whole number >= 1 (leave it out for no top-k filtering)")
    if args.top_p is not None and not (math.isfinite(args.top_p) and 0 < args.top_p <= 1):
        raise bad("--top-p", args.top_p, "in (0, 1] (leave it out for no nucleus filtering)")
    if args.seed is not None and not 0 <= args.seed < 2**63:
        raise bad("--seed", args.seed, "a whole number in [0, 2**63)")
    args.device = check_device(args.device)


def check_device(device: Optional[str]) -> str:
    """`--device` as torch spells it, refused here when torch could not use it (not a device, no CUDA)."""
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        d = torch.device(device)
    except (RuntimeError, ValueError):
        raise GenerateError(f"--device {device}: not a device torch knows (cpu, cuda, cuda:N, mps)") from None
    if d.type == "cuda":
        if not torch.cuda.is_available():
            raise GenerateError(f"--device {device}: CUDA is not available on this machine (torch "
                                f"{torch.__version__}, CUDA build {torch.version.cuda}); use --device cpu")
        if d.index is not None and d.index >= torch.cuda.device_count():
            raise GenerateError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s) "
                                f"(cuda:0 .. cuda:{torch.cuda.device_count() - 1})")
    elif d.type == "mps" and not torch.backends.mps.is_available():
        raise GenerateError(f"--device {device}: MPS is not available on this machine; use --device cpu")
    elif d.type not in ("cpu", "cuda", "mps"):
        raise GenerateError(f"--device {device}: generation runs on cpu, cuda or mps")
    return device


def run(args: argparse.Namespace, stdin: TextIO, stdout: TextIO) -> int:
    if args.run and args.adapter:
        raise GenerateError("give either --run or --adapter, not both")
    if not args.run and not args.model:
        raise GenerateError("give --model FOLDER (or --run RUN_FOLDER)")
    check_options(args)
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
        ids, _ = tok.encode_chat(messages, add_generation_prompt=True)
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

    def body() -> int:
        with torch.no_grad():
            return run(args, sys.stdin, sys.stdout)

    def classify(err: Exception) -> Optional[tuple[str, int]]:
        message = user_message(err)  # the one policy: our UserErrors and OS errors on a given path
        return (message, 2) if message is not None else None

    return run_cli(body, ["debug=true"] if args.debug else [], "generation", classify, interrupted="",
                   raise_unknown=True)


if __name__ == "__main__":
    sys.exit(main())
