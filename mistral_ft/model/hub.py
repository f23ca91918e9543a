"""The one rule for "is this a hub id", and the local folder a model path or hub id names.

A model path is a local folder when it exists; otherwise `org/name` (one slash, not starting with
`.`, `/` or `~`) is a Hugging Face hub id, fetched once into (or found in) the hub cache. Every command
(train, validate, export, generate) and the weights loader go through these two functions.
"""

from __future__ import annotations

import os
from pathlib import Path

from mistral_ft.errors import CheckpointError


def is_hub_id(path_or_id: str | os.PathLike) -> bool:
    """`org/name`: exactly one slash and no leading `.`, `/` or `~` (the caller checks it is not a local path)."""
    s = str(path_or_id)
    return s.count("/") == 1 and not s.startswith((".", "/", "~"))


def local_model_folder(path_or_id: str | os.PathLike) -> Path:
    """A local folder as is; otherwise a hub id fetched (or found in the local hub cache) via huggingface_hub."""
    p = Path(path_or_id).expanduser()
    if p.exists():
        if not p.is_dir():
            raise CheckpointError(f"{p}: expected a folder with config.json and *.safetensors, got a file")
        return p
    s = str(path_or_id)
    if not is_hub_id(s):
        raise FileNotFoundError(f"{s}: no such model folder (and not a hub id of the form 'org/name')")
    try:
        from huggingface_hub import snapshot_download

        patterns = ["*.json", "*.safetensors", "tokenizer.model", "tokenizer.model.v*"]
        try:
            return Path(snapshot_download(s, allow_patterns=patterns, local_files_only=True))
        except Exception:
            return Path(snapshot_download(s, allow_patterns=patterns))
    except Exception as e:  # offline, unknown repo, gated repo, ...
        raise CheckpointError(
            f"could not fetch '{s}' from the Hugging Face hub ({type(e).__name__}: {str(e).splitlines()[0][:200]}). "
            f"If this machine is offline, download the model elsewhere and set the model path to a local folder "
            f"holding config.json, *.safetensors and tokenizer.model.") from None
