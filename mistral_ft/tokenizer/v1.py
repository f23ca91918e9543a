"""The Mistral tokenizer: sentencepiece byte-fallback BPE, batch encode/decode, v1 ``[INST]`` chat format.

Mistral-7B-v0.1 and -Instruct-v0.1 share one sentencepiece model (32000 pieces: ``<unk>`` 0, ``<s>`` 1,
``</s>`` 2, 256 byte pieces ``<0x00>``..``<0xFF>`` at 3..258, then BPE pieces). We wrap sentencepiece
directly rather than transformers' tokenizer (transformers is our test peer, not a dependency), and
keep the HF call conventions (``tok(texts, padding=..., return_tensors="pt")``, ``batch_decode``,
``save_pretrained``) so that code written against the seed's API keeps working.

Conventions, and why:

- Encoding is sentencepiece's, exactly: a dummy-prefix space ("Hello" -> "▁Hello"), whitespace runs
  kept, byte fallback for characters outside the vocabulary (so ``<unk>`` is never produced).
  Special-token *text* is never parsed: "</s>" or "[INST]" typed by a user encodes as ordinary
  pieces (``▁</``, ``s``, ``>``), never as the control ids 1/2. This differs from transformers, whose
  tokenizers split registered special tokens out of the text (unless ``split_special_tokens=True``).
- Pad id 0 (``<unk>``): pad must differ from EOS, or padding would hide the EOS target; ``<unk>`` is
  never produced with byte fallback, so id 0 is free.
- ``decode(ids, skip_special_tokens=True)`` equals ``SentencePieceProcessor.decode`` on the ids without
  0/1/2 (checked in tests, random ids included). One leading space, the dummy prefix of the first piece,
  is dropped. For valid UTF-8 this is also what transformers' ``LlamaTokenizer`` gives.
- ``decode(ids, skip_special_tokens=False)`` follows transformers: special tokens render as
  ``<s>``/``</s>``/``<unk>``, and the dummy prefix is dropped only when the very first token is a
  ``▁``-piece, so ``[1, ▁The]`` decodes to ``"<s> The"`` and ``[▁The, 2, ▁The]`` to ``"The</s> The"``.
- Invalid UTF-8 in byte pieces follows sentencepiece: each byte that does not start a complete, valid
  character becomes one U+FFFD, the valid characters around it survive. transformers' ``ByteFallback``
  decoder instead turns a *whole run* of byte tokens into U+FFFDs when any part of it is invalid, and
  strips a leading space that came from a ``<0x20>`` byte piece; neither happens for ids that
  sentencepiece itself produced from text. Following sentencepiece makes streaming exact: a character
  is final as soon as its bytes are complete (see ``StreamDecoder``).

The v1 instruct format (Mistral-7B-Instruct-v0.1) is a token-level rule (same as ``mistral_common``'s
``InstructTokenizerV1``)::

    [BOS] + sp("[INST] " + user1 + " [/INST]") + sp(answer1) + [EOS] + sp("[INST] " + user2 + " [/INST]") ...

with each ``sp()`` a separate sentencepiece call (each piece gets its own dummy prefix, so
``</s>▁[INST]`` appears, which tokenizing the rendered string with sentencepiece would not give). A
system prompt is prepended to the first user message with "\\n\\n". Worked example::

    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    ->  <s> ▁[ INST ] ▁Hi ▁[ / INST ] ▁Hello </s>
        1   733 16289 28793 15359 733 28748 16289 28793 22557 2
    target_mask: False everywhere except ▁Hello and </s>.
"""

from __future__ import annotations

import importlib.resources
import json
import os
import shutil
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import sentencepiece as spm
import torch

from mistral_ft.tokenizer.batching import DEFAULT_MODEL_MAX_LENGTH, BatchCalls
from mistral_ft.tokenizer.common import MistralCommonTokenizer
from mistral_ft.tokenizer.files import FOLDER_FILE_NAMES, ChatError, TokenizerKind, detect, find_in_folder

__all__ = ["MistralTokenizer", "StreamDecoder", "check_token_ids", "default_tokenizer_file"]

TOKENIZER_FILE = "tokenizer.model"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"

_ROLES = ("system", "user", "assistant")

# Piece kinds in the lookup table built once per tokenizer.
_NORMAL, _BYTE, _SPECIAL = 0, 1, 2


def default_tokenizer_file() -> Path:
    """Path of the Mistral-7B-v0.1 ``tokenizer.model`` shipped inside the installed ``mistral_common``.

    Why: the embedded default (``model=tiny``) and the tests need the real Mistral vocabulary without a
    download; ``mistral_common`` (a dependency) ships it as ``data/tokenizer.model.v1``.
    """
    path = Path(str(importlib.resources.files("mistral_common") / "data" / "tokenizer.model.v1"))
    if not path.is_file():
        raise FileNotFoundError(
            f"mistral_common is installed but has no data/tokenizer.model.v1 (looked at {path}); "
            "reinstall mistral-common>=1.5 or pass the path of a tokenizer.model explicitly"
        )
    return path


def check_token_ids(ids: Any, vocab_size: int, where: str = "input_ids") -> None:
    """Raise a ValueError naming ``where``, the position and the value of the first id outside ``[0, vocab_size)``.

    Why: an out-of-range id reaches ``nn.Embedding`` as an opaque CUDA device-side assert (or a CPU
    IndexError without context). The data path calls this on the host, once per example or batch,
    never inside a model forward (checking a CUDA tensor there would force a device sync per step).

    ``ids``: a sequence of ints, a list of such sequences (ragged allowed), a numpy array or a tensor.
    The position is an index (1-D) or a tuple of indices.
    """
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size <= 0:
        raise ValueError(f"check_token_ids: vocab_size must be a positive int, got {vocab_size!r}")
    if isinstance(ids, torch.Tensor):
        _check_array(ids.detach().cpu().numpy(), vocab_size, where, ())
    elif isinstance(ids, np.ndarray):
        _check_array(ids, vocab_size, where, ())
    elif isinstance(ids, Sequence) and not isinstance(ids, (str, bytes)):
        if len(ids) > 0 and not isinstance(ids[0], (int, np.integer)):
            # A batch: row by row, so ragged rows work and the position names the row.
            for row_index, row in enumerate(ids):
                if isinstance(row, torch.Tensor):
                    row = row.detach().cpu().numpy()
                if isinstance(row, (str, bytes)) or not isinstance(row, (Sequence, np.ndarray)):
                    raise ValueError(
                        f"{where}: row {row_index} must be a sequence of token ids, got {type(row).__name__}"
                    )
                _check_array(_as_int_array(row, where), vocab_size, where, (row_index,))
        else:
            _check_array(_as_int_array(ids, where), vocab_size, where, ())
    else:
        raise ValueError(f"{where}: expected token ids (list, array or tensor), got {type(ids).__name__}")


def _as_int_array(values: Any, where: str) -> np.ndarray:
    if any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) for v in values):
        bad = next(v for v in values if isinstance(v, bool) or not isinstance(v, (int, np.integer)))
        raise ValueError(f"{where}: token ids must be ints, got {bad!r}")
    return np.asarray(values, dtype=np.int64)


def _check_array(array: np.ndarray, vocab_size: int, where: str, prefix: tuple[int, ...]) -> None:
    if array.size == 0:
        return
    if not np.issubdtype(array.dtype, np.integer) or array.dtype == np.bool_:
        raise ValueError(f"{where}: token ids must be integers, got dtype {array.dtype}")
    bad = (array < 0) | (array >= vocab_size)
    if not bad.any():
        return
    flat_index = int(np.argmax(bad.reshape(-1)))
    position = prefix + tuple(int(p) for p in np.unravel_index(flat_index, array.shape))
    position_text = str(position[0]) if len(position) == 1 else str(position)
    value = int(array.reshape(-1)[flat_index])
    raise ValueError(
        f"{where}: token id {value} at position {position_text} is outside the vocabulary [0, {vocab_size})"
    )


class MistralTokenizer(BatchCalls):
    """Sentencepiece byte-fallback BPE with HF-style batch calls and the v1 ``[INST]`` chat format.

    Build with ``MistralTokenizer.from_pretrained(path_or_folder_or_None)``. See the module docstring
    for the exact encode/decode conventions and how they differ from transformers.
    """

    def __init__(
        self,
        model_file: str | os.PathLike,
        padding_side: str = "right",
        model_max_length: int = DEFAULT_MODEL_MAX_LENGTH,
    ) -> None:
        model_file = Path(model_file)
        if not model_file.is_file():
            raise FileNotFoundError(f"tokenizer model_file {str(model_file)!r} does not exist or is not a file")
        self.model_file = model_file
        self._processor = self._load_processor(model_file.read_bytes(), str(model_file))
        self.padding_side = padding_side
        self.model_max_length = model_max_length
        self.add_bos_token = True
        self.add_eos_token = False
        self._build_tables()

    # ------------------------------------------------------------------ construction

    @staticmethod
    def _load_processor(model_proto: bytes, source: str) -> spm.SentencePieceProcessor:
        processor = spm.SentencePieceProcessor()
        try:
            processor.LoadFromSerializedProto(model_proto)
        except Exception as error:  # sentencepiece raises RuntimeError/OSError with a terse message
            raise ValueError(f"tokenizer file {source!r} is not a valid sentencepiece model: {error}") from error
        return processor

    def _build_tables(self) -> None:
        """One pass over the vocabulary: piece kind and decoded text per id (decode is then a table lookup)."""
        processor = self._processor
        size = processor.get_piece_size()
        kinds: list[int] = []
        texts: list[str | int] = []
        for token_id in range(size):
            piece = processor.id_to_piece(token_id)
            if processor.is_byte(token_id):
                kinds.append(_BYTE)
                texts.append(int(piece[3:5], 16))  # "<0xNN>"
            elif processor.is_control(token_id) or processor.is_unknown(token_id):
                kinds.append(_SPECIAL)
                texts.append(piece)
            else:
                kinds.append(_NORMAL)
                texts.append(piece.replace("\u2581", " "))
        if _BYTE not in kinds:
            raise ValueError(
                f"tokenizer {str(self.model_file)!r} has no byte-fallback pieces: Mistral tokenizers are "
                "byte-fallback BPE, "
                "and pad id 0 (<unk>) is only safe when <unk> can never be produced"
            )
        self._kinds = kinds
        self._texts = texts
        self.bos_token_id = processor.bos_id()
        self.eos_token_id = processor.eos_id()
        self.unk_token_id = processor.unk_id()
        if min(self.bos_token_id, self.eos_token_id, self.unk_token_id) < 0:
            raise ValueError(
                f"tokenizer {str(self.model_file)!r} lacks <s>, </s> or <unk> "
                f"(bos={self.bos_token_id}, eos={self.eos_token_id}, unk={self.unk_token_id})"
            )
        self.pad_token_id = self.unk_token_id
        self.bos_token = processor.id_to_piece(self.bos_token_id)
        self.eos_token = processor.id_to_piece(self.eos_token_id)
        self.unk_token = processor.id_to_piece(self.unk_token_id)
        self.pad_token = self.unk_token
        self.all_special_ids = sorted(i for i, kind in enumerate(kinds) if kind == _SPECIAL)

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike | None = None,
        padding_side: str | None = None,
        model_max_length: int | None = None,
    ) -> MistralTokenizer | MistralCommonTokenizer:
        """The tokenizer of any Mistral version, from a file, a folder holding one, a hub id already in the
        local HF cache, or ``None`` (the Mistral-7B-v0.1 tokenizer shipped in ``mistral_common``).

        Files: ``tokenizer.model``, ``tokenizer.model.v1``..``v7``, ``tekken.json`` (a folder's is the first
        of ``files.FOLDER_FILE_NAMES`` present). The version comes from the file's contents
        (``files.detect``), never its name: v1 gives this class (our exact sentencepiece path), v2, v3, v7
        and Tekken give a ``MistralCommonTokenizer`` with the same interface (mistral_common is the
        engine of their chat format). An unreadable file or an unsupported Tekken version is a
        ``TokenizerFileError`` naming the file.

        A folder's ``tokenizer_config.json`` (ours or a hub checkpoint's) supplies ``padding_side`` and
        ``model_max_length`` unless given here. Never downloads: a hub id must already be cached.
        """
        config: dict[str, Any] = {}
        if path is None:
            model_file = default_tokenizer_file()
        else:
            candidate = Path(path).expanduser()
            if candidate.is_file():
                model_file = candidate
            elif candidate.is_dir():
                found = find_in_folder(candidate)
                if found is None:
                    raise FileNotFoundError(
                        f"tokenizer folder {str(candidate)!r} has no tokenizer file (looked for "
                        f"{', '.join(FOLDER_FILE_NAMES)}; found: {sorted(p.name for p in candidate.iterdir())[:20]})"
                    )
                model_file = found
                config_file = candidate / TOKENIZER_CONFIG_FILE
                if config_file.is_file():
                    config = json.loads(config_file.read_text(encoding="utf-8"))
            else:
                model_file, config = _from_hub_cache(str(path))
        if padding_side is None:
            padding_side = config.get("padding_side") or "right"
        if model_max_length is None:
            model_max_length = config.get("model_max_length") or DEFAULT_MODEL_MAX_LENGTH
        kind = detect(Path(model_file))
        if kind.name != "v1":
            return MistralCommonTokenizer(model_file, kind, padding_side=padding_side,
                                          model_max_length=int(model_max_length))
        return cls(model_file, padding_side=padding_side, model_max_length=int(model_max_length))

    kind = TokenizerKind("sentencepiece", "v1")

    def __getstate__(self) -> dict[str, Any]:
        """Pickle the model bytes (DataLoader workers under spawn receive a pickled tokenizer)."""
        state = {k: v for k, v in self.__dict__.items() if k not in ("_processor", "_kinds", "_texts")}
        state["_model_proto"] = self._processor.serialized_model_proto()
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        model_proto = state.pop("_model_proto")
        self.__dict__.update(state)
        self._processor = self._load_processor(model_proto, str(self.model_file))
        self._build_tables()

    # ------------------------------------------------------------------ attributes

    @property
    def vocab_size(self) -> int:
        """Number of ids (32000 for Mistral-7B v1); every valid id is in ``[0, vocab_size)``."""
        return len(self._kinds)

    def __len__(self) -> int:
        return self.vocab_size

    def id_to_piece(self, token_id: int) -> str:
        """The sentencepiece piece of an id (``▁Hello``, ``<0x0A>``, ``</s>``): for debugging and tests."""
        self._check_id(token_id, "id_to_piece")
        return self._processor.id_to_piece(token_id)

    def __repr__(self) -> str:
        return (
            f"MistralTokenizer(model_file={str(self.model_file)!r}, vocab_size={self.vocab_size}, "
            f"padding_side={self.padding_side!r})"
        )

    # ------------------------------------------------------------------ encode

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = False) -> list[int]:
        """Sentencepiece ids of ``text``, with BOS/EOS when asked. Special-token text stays text."""
        if not isinstance(text, str):
            raise TypeError(f"encode: text must be a str, got {type(text).__name__}")
        ids = self._processor.encode(text)
        return ([self.bos_token_id] if add_bos else []) + ids + ([self.eos_token_id] if add_eos else [])

    def encode_batch(self, texts: Sequence[str], add_bos: bool = True, add_eos: bool = False) -> list[list[int]]:
        """``encode`` over a list, in sentencepiece's multithreaded C++ batch call (the data path's hot loop)."""
        if isinstance(texts, str) or not isinstance(texts, Sequence):
            raise TypeError(f"encode_batch: texts must be a list of str, got {type(texts).__name__}")
        for index, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"encode_batch: texts[{index}] must be a str, got {type(text).__name__}")
        batch = self._processor.encode(list(texts)) if texts else []
        head = [self.bos_token_id] if add_bos else []
        tail = [self.eos_token_id] if add_eos else []
        return [head + ids + tail for ids in batch]

    # ------------------------------------------------------------------ decode

    def _check_id(self, token_id: Any, where: str, position: int | None = None) -> int:
        if isinstance(token_id, bool) or not isinstance(token_id, (int, np.integer)):
            at = f" at position {position}" if position is not None else ""
            raise ValueError(f"{where}: token id{at} must be an int, got {token_id!r}")
        if not 0 <= token_id < len(self._kinds):
            at = f" at position {position}" if position is not None else ""
            raise ValueError(f"{where}: token id {int(token_id)}{at} is outside the vocabulary [0, {len(self._kinds)})")
        return int(token_id)

    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special_tokens: bool = False) -> str:
        """Text of ``ids`` (a list or a 1-D tensor); conventions in the module docstring."""
        if isinstance(ids, (torch.Tensor, np.ndarray)):
            if ids.ndim != 1:
                raise ValueError(f"decode: ids must be 1-D, got shape {tuple(ids.shape)} (use batch_decode)")
            ids = ids.tolist()
        decoder = StreamDecoder(self, skip_special_tokens=skip_special_tokens)
        parts = [decoder.put(token_id, _position=position) for position, token_id in enumerate(ids)]
        parts.append(decoder.flush())
        return "".join(parts)

    def stream_decoder(self, skip_special_tokens: bool = True) -> StreamDecoder:
        """A fresh ``StreamDecoder`` (one per generated sequence)."""
        return StreamDecoder(self, skip_special_tokens=skip_special_tokens)

    # ------------------------------------------------------------------ chat (v1 [INST] format)

    def encode_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        tools: Sequence[Mapping[str, Any]] | None = None,
        add_generation_prompt: bool = False,
    ) -> tuple[list[int], list[bool]]:
        """Token ids of a conversation in the v1 ``[INST]`` format, and the loss mask.

        ``messages``: ``[{"role": "system"|"user"|"assistant", "content": str, "weight": 0|1 (optional)}]``;
        an optional system message first, then user/assistant alternating, starting with a user. A
        conversation ending with a user message ends with ``... [/INST]``, the prompt to generate from
        (v1 has no assistant header, so this is all a "generation prompt" is);
        ``add_generation_prompt=True`` asserts that it does. ``target_mask`` is True on the tokens of
        each assistant answer and its EOS, except for answers with ``weight`` 0 (kept as context only).
        Extra keys in a message are ignored (``datasets`` adds missing fields as None).
        """
        if tools:
            raise ChatError(
                f"tokenizer {str(self.model_file)!r} is v1, which has no tool format; tools need a tokenizer of "
                "version v3, v7 or Tekken (e.g. Mistral-7B-Instruct-v0.3's tokenizer.model.v3)"
            )
        system, turns = _validate_messages(messages)
        if add_generation_prompt and turns[-1][0] != "user":
            raise ValueError(
                f"messages[{len(messages) - 1}].role: add_generation_prompt=True needs a conversation ending "
                f"with a user message, got {turns[-1][0]!r}"
            )
        ids = [self.bos_token_id]
        mask = [False]
        first_user = True
        for role, content, weight in turns:
            if role == "user":
                if first_user and system is not None:
                    content = system + "\n\n" + content
                first_user = False
                piece = self._processor.encode("[INST] " + content + " [/INST]")
                ids += piece
                mask += [False] * len(piece)
            else:
                piece = self._processor.encode(content) + [self.eos_token_id]
                ids += piece
                mask += [bool(weight)] * len(piece)
        return ids, mask

    @staticmethod
    def render_chat_template() -> str:
        """Jinja chat template reproducing the v1 format as text, for transformers' ``apply_chat_template``.

        Rendered: ``<s>[INST] {system}\\n\\n{user} [/INST] {answer}</s>[INST] {user2} [/INST]``. Tokenized
        by transformers (legacy sentencepiece mode, ``<s>``/``</s>`` parsed as control tokens, each chunk
        after a control token given its own dummy prefix) this gives the ids of ``encode_chat``; the one
        difference is content containing literal "<s>", "</s>" or "<unk>", which transformers turns
        into control ids and ``encode_chat`` keeps as text. ``weight`` does not affect the text.
        """
        return _CHAT_TEMPLATE

    # ------------------------------------------------------------------ save

    def save_pretrained(self, folder: str | os.PathLike, hf_tokenizer_class: str = "LlamaTokenizer") -> list[Path]:
        """Write ``tokenizer.model``, ``tokenizer_config.json`` and ``special_tokens_map.json`` into ``folder``.

        The config is the hub Mistral-7B one (``LlamaTokenizer``, legacy sentencepiece mode, BOS added)
        plus our pad token (``<unk>``, id 0), padding side and chat template, so transformers 4.x and
        vLLM load it as they load the hub checkpoint. transformers 5 with a ``config.json`` of
        ``model_type`` "mistral" beside it (an exported model folder) builds a ``TokenizersBackend`` from
        ``tokenizer.model`` that gives our ids exactly; on a tokenizer-only folder it builds its own
        ``LlamaTokenizer``, which drops the space of text starting with a space and splits whitespace
        runs differently: pass ``hf_tokenizer_class="TokenizersBackend"`` for exact ids there
        (transformers >= 5 only).
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / TOKENIZER_FILE
        if not target.exists() or not target.samefile(self.model_file):
            shutil.copyfile(self.model_file, target)
        special = {str(self.unk_token_id): self.unk_token, str(self.bos_token_id): self.bos_token,
                   str(self.eos_token_id): self.eos_token}
        config = {
            "tokenizer_class": hf_tokenizer_class,
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "unk_token": self.unk_token,
            "pad_token": self.pad_token,
            "add_bos_token": self.add_bos_token,
            "add_eos_token": self.add_eos_token,
            # legacy: each text chunk between special tokens gets its own dummy prefix, as sentencepiece
            # gives for the v1 format ("</s>▁[INST]"); transformers 5 rebuilds an exact normalizer from it.
            "legacy": True,
            "padding_side": self.padding_side,
            "truncation_side": "right",
            "model_max_length": self.model_max_length,
            "clean_up_tokenization_spaces": False,
            "spaces_between_special_tokens": False,
            "use_default_system_prompt": False,
            "sp_model_kwargs": {},
            "added_tokens_decoder": {
                token_id: {"content": content, "lstrip": False, "normalized": False, "rstrip": False,
                           "single_word": False, "special": True}
                for token_id, content in special.items()
            },
            "chat_template": self.render_chat_template(),
        }
        special_map = {"bos_token": self.bos_token, "eos_token": self.eos_token, "unk_token": self.unk_token,
                       "pad_token": self.pad_token}
        (folder / TOKENIZER_CONFIG_FILE).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n",
                                                   encoding="utf-8")
        (folder / SPECIAL_TOKENS_MAP_FILE).write_text(json.dumps(special_map, indent=2) + "\n", encoding="utf-8")
        return [target, folder / TOKENIZER_CONFIG_FILE, folder / SPECIAL_TOKENS_MAP_FILE]


class StreamDecoder:
    """Incremental decode: ``put`` one id at a time, get the new text; ``flush`` at the end.

    ``"".join(put(i) for i in ids) + flush() == tokenizer.decode(ids, skip_special_tokens)`` for any ids.
    Why a class: a byte-fallback character (an emoji not in the vocabulary) arrives as up to four byte
    pieces, and the dummy-prefix space is dropped only at the very start; decoding each id alone gets
    both wrong, re-decoding the whole sequence at each step is quadratic. Worked example, "Hi 🫠"::

        ids      ▁Hi    ▁      <0xF0>  <0x9F>  <0xAB>  <0xA0>
        put ->   "Hi"   " "    ""      ""      ""      "🫠"

    Incomplete bytes wait until the character completes; bytes that can no longer form a valid
    character come out as U+FFFD at once (sentencepiece's rule, one per byte). With
    ``skip_special_tokens=True`` a special id is as if absent (bytes on both sides of it join, as in
    transformers, which drops special ids before decoding).
    """

    def __init__(self, tokenizer: MistralTokenizer, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._kinds = tokenizer._kinds
        self._texts = tokenizer._texts
        self._skip = skip_special_tokens
        self._pending = bytearray()
        self._at_start = True

    def put(self, token_id: int, _position: int | None = None) -> str:
        """Feed one id; returns the text it completes (possibly "")."""
        token_id = self._tokenizer._check_id(token_id, "decode", _position)
        kind = self._kinds[token_id]
        if kind == _BYTE:
            self._pending.append(self._texts[token_id])
            self._at_start = False
            return self._drain(final=False)
        if kind == _SPECIAL and self._skip:
            return ""  # as if absent: bytes around a skipped special token still join into one character
        out = self._drain(final=True) if self._pending else ""
        text = self._texts[token_id]
        if kind == _SPECIAL:
            self._at_start = False
            return out + text
        if self._at_start and text.startswith(" "):
            text = text[1:]  # the dummy prefix of the first piece
        self._at_start = False
        return out + text

    def flush(self) -> str:
        """Text of bytes still waiting (incomplete characters become U+FFFD). Call once at the end."""
        return self._drain(final=True)

    def _drain(self, final: bool) -> str:
        pending = self._pending
        out: list[str] = []
        index = 0
        while index < len(pending):
            lead = pending[index]
            # UTF-8 length from the lead byte; 0: a continuation byte or an impossible lead (0xF8..0xFF)
            size = (1 if lead < 0x80 else 2 if 0xC0 <= lead < 0xE0 else 3 if 0xE0 <= lead < 0xF0
                    else 4 if 0xF0 <= lead < 0xF8 else 0)
            if size == 0:
                out.append("\ufffd")
                index += 1
                continue
            chunk = pending[index:index + size]
            if len(chunk) < size:
                if not final and all(0x80 <= byte < 0xC0 for byte in chunk[1:]):
                    break  # may still complete: wait for the next byte piece
                out.append("\ufffd")
                index += 1
                continue
            try:
                out.append(bytes(chunk).decode("utf-8"))
                index += size
            except UnicodeDecodeError:
                out.append("\ufffd")
                index += 1
        del pending[:index]
        return "".join(out)


def _validate_messages(messages: Any) -> tuple[str | None, list[tuple[str, str, int]]]:
    """Check a v1 conversation; returns (system prompt or None, [(role, content, weight)] without the system)."""
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence):
        raise ValueError(f"messages must be a list of dicts, got {type(messages).__name__}")
    if len(messages) == 0:
        raise ValueError("messages is empty: a conversation needs at least one user message")
    system: str | None = None
    turns: list[tuple[str, str, int]] = []
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ValueError(
                f"messages[{index}] must be a dict with 'role' and 'content', got {type(message).__name__}"
            )
        role = message.get("role")
        if role not in _ROLES:
            raise ValueError(f"messages[{index}].role must be one of {_ROLES}, got {role!r}")
        content = message.get("content")
        if not isinstance(content, str):
            raise ValueError(f"messages[{index}].content must be a str, got {type(content).__name__}")
        if content == "":
            raise ValueError(f"messages[{index}].content is empty (role {role!r})")
        weight = message.get("weight")
        if weight is not None:
            if role != "assistant":
                raise ValueError(f"messages[{index}].weight is only allowed on assistant messages (role {role!r})")
            if isinstance(weight, bool) or weight not in (0, 1):
                raise ValueError(f"messages[{index}].weight must be 0 or 1, got {weight!r}")
        if role == "system":
            if index != 0:
                raise ValueError(
                    f"messages[{index}].role: a system message is only allowed first, got one at index {index}"
                )
            system = content
            continue
        previous = turns[-1][0] if turns else None
        if previous is None and role != "user":
            raise ValueError(f"messages[{index}].role: the conversation must start with a user message, got {role!r}")
        if previous == role:
            raise ValueError(
                f"messages[{index}].role: roles must alternate user/assistant, got two {role!r} messages in a row"
            )
        turns.append((role, content, 1 if weight is None else int(weight)))
    if not turns:
        raise ValueError("messages has only a system message: a conversation needs at least one user message")
    return system, turns


def _from_hub_cache(repo_id: str) -> tuple[Path, dict[str, Any]]:
    """Resolve a hub id from the local HF cache only (this package never downloads a tokenizer)."""
    from huggingface_hub import try_to_load_from_cache

    error = FileNotFoundError(
        f"tokenizer path {repo_id!r} is neither a file nor a folder, and no tokenizer file for a hub repo of that "
        "name is in the local Hugging Face cache (downloads are never attempted here; download the repo first, "
        "or pass a local path)"
    )
    if repo_id.count("/") != 1:
        raise error
    cached = None
    for name in FOLDER_FILE_NAMES:
        try:
            cached = try_to_load_from_cache(repo_id, name)
        except Exception:  # invalid repo id syntax
            raise error from None
        if isinstance(cached, str):
            break
    if not isinstance(cached, str):
        raise error
    config: dict[str, Any] = {}
    cached_config = try_to_load_from_cache(repo_id, TOKENIZER_CONFIG_FILE)
    if isinstance(cached_config, str):
        config = json.loads(Path(cached_config).read_text(encoding="utf-8"))
    return Path(cached), config


# v1 format as text. Whitespace control ({%- -%}) keeps the template's own layout out of the output.
_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set system_message = messages[0]['content'] -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set system_message = none -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- if loop_messages | length == 0 -%}"
    "{{- raise_exception('A conversation needs at least one user message') -}}"
    "{%- endif -%}"
    "{{- bos_token -}}"
    "{%- for message in loop_messages -%}"
    "{%- if message['role'] not in ['user', 'assistant'] -%}"
    "{{- raise_exception('Only user and assistant roles may follow an optional first system message') -}}"
    "{%- endif -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') -}}"
    "{%- endif -%}"
    "{%- if message['role'] == 'user' -%}"
    "{%- if loop.first and system_message is not none -%}"
    "{{- '[INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' -}}"
    "{%- else -%}"
    "{{- '[INST] ' + message['content'] + ' [/INST]' -}}"
    "{%- endif -%}"
    "{%- else -%}"
    "{{- ' ' + message['content'] + eos_token -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
)
