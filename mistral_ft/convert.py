"""`python -m mistral_ft.convert --input_dir D --output_dir O [--max_position_embeddings N]` — original Mistral
weights (consolidated.safetensors / consolidated.00.pth, tokenizer.model[.vN] / tekken.json) to an HF folder.

The command line only; the conversion lives in mistral_ft.checkpoints.convert (also behind
scripts/convert_mistral_weights_to_hf.py, the seed's command).
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional

from mistral_ft.checkpoints.convert import MODEL_SIZES, convert_checkpoint
from mistral_ft.cli import run_cli, user_message
from mistral_ft.errors import ConversionError
from mistral_ft.model.weights import parse_size


def main(argv: list[str] | None = None) -> int:
    """``python scripts/convert_mistral_weights_to_hf.py --input_dir D --model_size 7B --output_dir O``."""
    p = argparse.ArgumentParser(prog="convert_mistral_weights_to_hf.py", description=(
        "Convert an original Mistral checkpoint (params.json + consolidated.safetensors or consolidated.00.pth + "
        "tokenizer.model[.vN] or tekken.json) into a Hugging Face folder (safetensors + config.json + tokenizer)."))
    p.add_argument("--input_dir", required=True, help="folder of the original release")
    p.add_argument("--output_dir", required=True, help="HF folder to write")
    p.add_argument("--model_size", default=None, choices=sorted(MODEL_SIZES),
                   help="checked against params.json (optional)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="output dtype (default: the checkpoint's)")
    p.add_argument("--max_shard_size", default="5GB")
    p.add_argument("--max_position_embeddings", type=int, default=None,
                   help="context length for config.json when params.json has no max_seq_len (releases since "
                        "7B-v0.3 have none: 32768 for 7B-v0.3/Small-24B/Codestral, 1024000 for Nemo)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --output_dir (after the new one is complete)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    args = p.parse_args(argv)

    def body() -> int:
        check_options(args)
        out = convert_checkpoint(args.input_dir, args.output_dir, args.model_size, args.dtype, args.max_shard_size,
                                 args.max_position_embeddings, overwrite=args.overwrite)
        print(f"wrote {out}")
        return 0

    def classify(err: Exception) -> Optional[tuple[str, int]]:
        message = user_message(err)  # ConversionError/CheckpointError are UserErrors; OS errors on a path; full disk
        return (message, 2) if message is not None else None

    # bugs keep their traceback (raise_unknown); Ctrl-C exits 130 as before, now with one line instead of a traceback
    return run_cli(body, ["debug=true"] if args.debug else [], "conversion", classify, raise_unknown=True)


def check_options(args: argparse.Namespace) -> None:
    """Numeric options, checked before anything is read (a bad shard size would otherwise fail after the
    whole conversion, in save_pretrained)."""
    try:
        size = parse_size(args.max_shard_size)
    except (ValueError, OverflowError):
        raise ConversionError(f"--max_shard_size {args.max_shard_size}: expected a size like 5GB or 500MB") from None
    if size < 1:
        raise ConversionError(f"--max_shard_size {args.max_shard_size}: must be positive")
    if args.max_position_embeddings is not None and args.max_position_embeddings < 1:
        raise ConversionError(f"--max_position_embeddings {args.max_position_embeddings}: must be >= 1")


if __name__ == "__main__":
    sys.exit(main())
