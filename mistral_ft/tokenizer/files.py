"""Which tokenizer file a path means, and which Mistral tokenizer version it holds (read from its contents).

Why contents, not names: HF folders ship a v3 model as plain ``tokenizer.model``, users rename files, and
mistral_common itself guesses the version from the file-name suffix (a bare ``tokenizer.model`` is v1 to
it). Loading a v3 file as v1 trains silently in the wrong format (``[INST]`` as text), so we decide from
what the file declares:

- sentencepiece: ``[INST]`` a control piece -> v2 or later (v1 spells it as text); ``[PREFIX]`` (id 11,
  added with ``[IMG]``/``[MIDDLE]``/``[SUFFIX]`` in v3; a ``[control_9]`` placeholder in v2) -> v3 or
  later; ``[SYSTEM_PROMPT]`` (id 16) -> v7. ``[AVAILABLE_TOOLS]`` does not separate v2 from v3: both have
  it at id 6 (checked on the files mistral_common ships).
- Tekken (tiktoken JSON): ``config.version``; v3 (Nemo, Pixtral, Ministral; both files mistral_common
  ships) and v7 (Small-24B: accepted, but no v7 Tekken file is shipped to test against).

This module imports nothing else from the package but the error base: every tokenizer module may use it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from mistral_ft.errors import UserError

# Names looked for in a folder, best first: a folder holding both (HF repos since v0.3 ship
# ``tokenizer.model`` and ``tokenizer.model.v3`` with the same contents) uses the first one present.
FOLDER_FILE_NAMES = (
    "tekken.json",
    "tokenizer.model.v7",
    "tokenizer.model.v3",
    "tokenizer.model.v2",
    "tokenizer.model.v1",
    "tokenizer.model",
)
SUPPORTED_TEKKEN_VERSIONS = ("v3", "v7")
# Versions whose chat format has tool calls mistral_common encodes without dropping any.
TOOL_VERSIONS = ("v3", "v7", "tekken-v3", "tekken-v7")


class TokenizerFileError(UserError):
    """A tokenizer file (or folder) that cannot be used; the message names the file."""


class ChatError(UserError):
    """A conversation this tokenizer's chat format cannot encode (tools on v1/v2, a field mistral_common refuses)."""


@dataclass(frozen=True)
class TokenizerKind:
    """``family``: "sentencepiece" or "tekken"; ``version``: "v1", "v2", "v3" or "v7"."""

    family: str
    version: str

    @property
    def name(self) -> str:
        """"v3" for sentencepiece, "tekken-v3" for Tekken: the name messages and errors use."""
        return self.version if self.family == "sentencepiece" else f"tekken-{self.version}"

    @property
    def canonical_file_name(self) -> str:
        """The name mistral_common reads this version from (it parses the suffix) and export writes."""
        return "tekken.json" if self.family == "tekken" else f"tokenizer.model.{self.version}"

    @property
    def supports_tools(self) -> bool:
        return self.name in TOOL_VERSIONS


def find_in_folder(folder: Path) -> Path | None:
    """The tokenizer file of a folder (first of ``FOLDER_FILE_NAMES``), or None when it holds none."""
    for name in FOLDER_FILE_NAMES:
        if (folder / name).is_file():
            return folder / name
    return None


def detect(path: Path) -> TokenizerKind:
    """The family and version of a tokenizer file, from its contents; ``TokenizerFileError`` naming the file."""
    try:
        data = path.read_bytes()
    except OSError as error:
        raise TokenizerFileError(f"tokenizer file {str(path)!r} cannot be read: {error}") from None
    if data.lstrip()[:1] == b"{":
        return _detect_tekken(path, data)
    return _detect_sentencepiece(path, data)


def _detect_tekken(path: Path, data: bytes) -> TokenizerKind:
    try:
        parsed = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise TokenizerFileError(f"tokenizer file {str(path)!r} looks like JSON but does not parse: {error}") from None
    config = parsed.get("config") if isinstance(parsed, dict) else None
    if not isinstance(config, dict) or "vocab" not in parsed:
        raise TokenizerFileError(
            f"tokenizer file {str(path)!r} is JSON but not a Tekken tokenizer (no 'config' and 'vocab'); "
            f"expected a sentencepiece tokenizer.model[.vN] or a tekken.json"
        )
    version = config.get("version")
    if version not in SUPPORTED_TEKKEN_VERSIONS:
        raise TokenizerFileError(
            f"tokenizer file {str(path)!r}: Tekken version {version!r} (config.version) is not supported; "
            f"supported: {list(SUPPORTED_TEKKEN_VERSIONS)}"
        )
    return TokenizerKind("tekken", str(version))


def _detect_sentencepiece(path: Path, data: bytes) -> TokenizerKind:
    import sentencepiece as spm

    processor = spm.SentencePieceProcessor()
    try:
        processor.LoadFromSerializedProto(data)
    except Exception as error:  # sentencepiece raises RuntimeError/OSError with a terse message
        raise TokenizerFileError(
            f"tokenizer file {str(path)!r} is neither a sentencepiece model nor a tekken.json: {error}"
        ) from None

    def control(piece: str) -> bool:
        token_id = processor.piece_to_id(piece)
        return token_id != processor.unk_id() and processor.is_control(token_id)

    if not control("[INST]"):
        return TokenizerKind("sentencepiece", "v1")
    if not control("[PREFIX]"):
        return TokenizerKind("sentencepiece", "v2")
    if not control("[SYSTEM_PROMPT]"):
        return TokenizerKind("sentencepiece", "v3")
    return TokenizerKind("sentencepiece", "v7")
