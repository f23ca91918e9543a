"""Tokenizers v2, v3, v7 and Tekken, with mistral_common (Mistral's reference implementation) as the engine.

Why mistral_common here and our own code for v1: the v2+ chat formats have rules that moved between
versions (v2/v3 put the system prompt and ``[AVAILABLE_TOOLS]`` before the *last* user message, v7 has
``[SYSTEM_PROMPT]``, v3 refuses an assistant message with both content and tool calls, Tekken is tiktoken),
and the ids mistral_common gives are by definition the ones Mistral's models were trained on. We call its
public request API (``encode_chat_completion``) and never re-implement the format.

The loss mask (which tokens the model is trained to produce) comes from the same single call:
mistral_common encodes a request message by message (``encode_user_message``, ``encode_assistant_message``,
``encode_tool_message``, ``encode_system_message``) and concatenates the results after ``start()`` (BOS).
We record what each per-message call returns during that one call, and check that ``start()`` plus the
recorded pieces, in order, *is* the returned id list; the assistant pieces (answer or ``[TOOL_CALLS]...``,
with their EOS) are the targets. So mask and ids cannot disagree: a mismatch raises instead of training
on a shifted mask. Worked example, v3, ``[user "Hi", assistant "Yo"]``::

    <s> [INST] ▁Hi [/INST] ▁Yo </s>
    1   3      16127 4     1395 29477 2        (v3 ids)
    mask: F F F F T T T

Validation modes: a conversation ending with an assistant turn is a training row (mistral_common's
``finetuning`` mode: tool-call ids kept as written); one ending with a user or tool turn is a prompt
(``test`` mode, the generation prompt ``add_generation_prompt=True`` asks for).

Pad id: Tekken has ``<pad>`` (id 11); sentencepiece v2+ has none, so pad is ``<unk>`` (id 0), which
byte-fallback encoding never produces (as in v1). Pad is never EOS (that would hide the EOS target).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from mistral_ft.tokenizer.batching import DEFAULT_MODEL_MAX_LENGTH, BatchCalls
from mistral_ft.tokenizer.files import TOOL_VERSIONS, ChatError, TokenizerFileError, TokenizerKind

_RECORDED = ("encode_user_message", "encode_assistant_message", "encode_tool_message", "encode_system_message")
_OUR_KEYS = ("weight",)  # message keys of our data format that mistral_common does not know


def _load_engine(model_file: Path, kind: TokenizerKind) -> Any:
    """mistral_common's tokenizer for ``model_file`` read as ``kind``, in finetuning mode.

    mistral_common takes the version from the file *name*; we have already read it from the contents, so
    we hand it a link (or copy) named as that version expects, in a temporary folder.
    """
    from mistral_common.protocol.instruct.validator import ValidationMode
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer as Engine

    with tempfile.TemporaryDirectory(prefix="mistral_ft_tok_") as tmp:
        alias = Path(tmp) / kind.canonical_file_name
        try:
            os.symlink(model_file.resolve(), alias)
        except OSError:
            shutil.copyfile(model_file, alias)
        try:
            return Engine.from_file(str(alias), mode=ValidationMode.finetuning)
        except Exception as error:  # mistral_common raises assertion/value/tokenizer errors on bad files
            raise TokenizerFileError(
                f"tokenizer file {str(model_file)!r} (detected {kind.name}) cannot be loaded by mistral_common: {error}"
            ) from None


class MistralCommonTokenizer(BatchCalls):
    """A v2, v3, v7 or Tekken tokenizer with the interface of the v1 ``MistralTokenizer``.

    Build it with ``MistralTokenizer.from_pretrained`` (which detects the version). Plain ``encode`` is the
    raw tokenizer's (special-token text such as "[INST]" or "</s>" stays text); ``encode_chat`` is
    mistral_common's chat format with a loss mask (module docstring).
    """

    def __init__(
        self,
        model_file: str | os.PathLike,
        kind: TokenizerKind,
        padding_side: str = "right",
        model_max_length: int = DEFAULT_MODEL_MAX_LENGTH,
    ) -> None:
        self.model_file = Path(model_file)
        self.kind = kind
        self.padding_side = padding_side
        self.model_max_length = model_max_length
        self.add_bos_token = True
        self.add_eos_token = False
        self._setup()

    def _setup(self) -> None:
        from mistral_common.protocol.instruct.validator import ValidationMode, get_validator
        from mistral_common.tokens.tokenizers.mistral import MistralTokenizer as Engine

        self._train_engine = _load_engine(self.model_file, self.kind)
        instruct = self._train_engine.instruct_tokenizer
        # The prompt engine shares the instruct tokenizer; only the validation mode differs.
        self._prompt_engine = Engine(
            instruct,
            validator=get_validator(instruct.tokenizer.version, mode=ValidationMode.test),
            request_normalizer=self._train_engine._instruct_request_normalizer,
        )
        raw = instruct.tokenizer
        self._raw = raw
        self.bos_token_id = raw.bos_id
        self.eos_token_id = raw.eos_id
        self.unk_token_id = raw.unk_id
        pad = raw.pad_id
        self.pad_token_id = pad if pad is not None and pad >= 0 else raw.unk_id
        if self.pad_token_id == self.eos_token_id or self.pad_token_id < 0:
            raise TokenizerFileError(
                f"tokenizer file {str(self.model_file)!r}: no pad id distinct from EOS (pad={pad}, unk={raw.unk_id})"
            )
        self.bos_token = raw.id_to_piece(self.bos_token_id)
        self.eos_token = raw.id_to_piece(self.eos_token_id)
        self.unk_token = raw.id_to_piece(self.unk_token_id)
        self.pad_token = raw.id_to_piece(self.pad_token_id)
        self.all_special_ids = sorted(int(i) for i in raw.special_ids)
        self._special = frozenset(self.all_special_ids)

    def __getstate__(self) -> dict[str, Any]:
        """Pickle the file bytes, not mistral_common's objects (DataLoader workers under spawn)."""
        state = {k: v for k, v in self.__dict__.items()
                 if k not in ("_train_engine", "_prompt_engine", "_raw", "_special")}
        state["_file_bytes"] = self.model_file.read_bytes() if self.model_file.is_file() else None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        data = state.pop("_file_bytes")
        self.__dict__.update(state)
        if not self.model_file.is_file() and data is not None:  # the worker runs where the file is gone
            tmp = Path(tempfile.mkdtemp(prefix="mistral_ft_tok_")) / self.kind.canonical_file_name
            tmp.write_bytes(data)
            self.model_file = tmp
        self._setup()

    # ------------------------------------------------------------------ attributes

    @property
    def vocab_size(self) -> int:
        """Number of ids (32768 for v2/v3/v7, 131072 for the shipped Tekken files)."""
        return int(self._raw.n_words)

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def supports_tools(self) -> bool:
        return self.kind.name in TOOL_VERSIONS

    def __repr__(self) -> str:
        return (f"MistralCommonTokenizer(model_file={str(self.model_file)!r}, version={self.kind.name!r}, "
                f"vocab_size={self.vocab_size}, padding_side={self.padding_side!r})")

    # ------------------------------------------------------------------ encode / decode

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = False) -> list[int]:
        """Ids of ``text`` with BOS/EOS when asked; special-token text ("[INST]", "</s>") stays text."""
        if not isinstance(text, str):
            raise TypeError(f"encode: text must be a str, got {type(text).__name__}")
        return list(self._raw.encode(text, bos=add_bos, eos=add_eos))

    def encode_batch(self, texts: Sequence[str], add_bos: bool = True, add_eos: bool = False) -> list[list[int]]:
        if isinstance(texts, str) or not isinstance(texts, Sequence):
            raise TypeError(f"encode_batch: texts must be a list of str, got {type(texts).__name__}")
        return [self.encode(text, add_bos=add_bos, add_eos=add_eos) for text in texts]

    def _check_ids(self, ids: Any, where: str) -> list[int]:
        if isinstance(ids, torch.Tensor):
            if ids.ndim != 1:
                raise ValueError(f"{where}: ids must be 1-D, got shape {tuple(ids.shape)} (use batch_decode)")
            ids = ids.tolist()
        out = []
        for position, token_id in enumerate(ids):
            if isinstance(token_id, bool) or not isinstance(token_id, int) and not hasattr(token_id, "__index__"):
                raise ValueError(f"{where}: token id at position {position} must be an int, got {token_id!r}")
            token_id = int(token_id)
            if not 0 <= token_id < self.vocab_size:
                raise ValueError(f"{where}: token id {token_id} at position {position} is outside the vocabulary "
                                 f"[0, {self.vocab_size})")
            out.append(token_id)
        return out

    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special_tokens: bool = False) -> str:
        """Text of ``ids``; special tokens dropped with ``skip_special_tokens``, else rendered ("[INST]")."""
        from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy

        ids = self._check_ids(ids, "decode")
        if skip_special_tokens:
            return self._raw.decode([i for i in ids if i not in self._special],
                                    special_token_policy=SpecialTokenPolicy.IGNORE)
        # Special tokens as their text between decoded runs of ordinary tokens. mistral_common's KEEP
        # policy renders sentencepiece pieces raw ("▁Yo"); a run after the start keeps its leading
        # space (only the first piece of the text loses the dummy prefix, as in v1's decode).
        parts: list[str] = []
        run: list[int] = []

        def close_run() -> None:
            if run:
                text = self._raw.decode(run, special_token_policy=SpecialTokenPolicy.IGNORE)
                if parts and self.kind.family == "sentencepiece" and self._raw.id_to_piece(run[0]).startswith("\u2581"):
                    text = " " + text
                parts.append(text)
                run.clear()

        for token_id in ids:
            if token_id in self._special:
                close_run()
                parts.append(self._raw.id_to_piece(token_id))
            else:
                run.append(token_id)
        close_run()
        return "".join(parts)

    def stream_decoder(self, skip_special_tokens: bool = True) -> IncrementalDecoder:
        """A fresh ``IncrementalDecoder`` (one per generated sequence)."""
        return IncrementalDecoder(self, skip_special_tokens=skip_special_tokens)

    def id_to_piece(self, token_id: int) -> str:
        return self._raw.id_to_piece(self._check_ids([token_id], "id_to_piece")[0])

    # ------------------------------------------------------------------ save

    def save_pretrained(self, folder: str | os.PathLike) -> list[Path]:
        """Write the tokenizer file byte for byte, under the name its version is read from
        (``tokenizer.model.v3``, ``tekken.json``: mistral_common and transformers take the version from
        the name, so a v3 file saved as plain ``tokenizer.model`` would read back as v1), and a
        ``tokenizer_config.json`` whose ``tokenizer_class`` makes transformers' ``AutoTokenizer`` build
        its mistral_common-backed tokenizer (``MistralCommonBackend``, transformers >= 5).
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / self.kind.canonical_file_name
        if not target.exists() or not target.samefile(self.model_file):
            shutil.copyfile(self.model_file, target)
        config = {
            "tokenizer_class": "MistralCommonBackend",
            "padding_side": self.padding_side,
            "model_max_length": self.model_max_length,
            "mistral_ft_tokenizer_version": self.kind.name,
        }
        config_file = folder / "tokenizer_config.json"
        config_file.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        return [target, config_file]

    # ------------------------------------------------------------------ chat

    def encode_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        tools: Sequence[Mapping[str, Any]] | None = None,
        add_generation_prompt: bool = False,
    ) -> tuple[list[int], list[bool]]:
        """mistral_common's ids for the conversation, and the loss mask (module docstring).

        ``messages``: OpenAI / mistral-finetune shape (``role`` system | user | assistant | tool;
        assistant ``tool_calls`` [{id, type: function, function: {name, arguments}}], tool
        ``tool_call_id``), plus our optional ``weight`` (0 | 1) on assistant messages: weight 0 keeps
        the answer as context only. A conversation ending with an assistant turn is a training row;
        one ending with a user or tool turn a prompt, which ``add_generation_prompt=True`` requires.
        Anything mistral_common refuses is a ``ChatError`` with its reason.
        """
        if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence) or not messages:
            raise ChatError("messages must be a non-empty list of dicts")
        if tools and not self.supports_tools:
            raise ChatError(
                f"tokenizer {str(self.model_file)!r} is {self.kind.name}, whose format drops or lacks tool calls; "
                f"tools need one of {list(TOOL_VERSIONS)}"
            )
        last_role = messages[-1].get("role") if isinstance(messages[-1], Mapping) else None
        is_prompt = last_role != "assistant"
        if add_generation_prompt and not is_prompt:
            raise ChatError(
                f"messages[{len(messages) - 1}].role: add_generation_prompt=True needs a conversation ending with a "
                f"user or tool message, got {last_role!r}"
            )
        weights = [m.get("weight") for m in messages if isinstance(m, Mapping) and m.get("role") == "assistant"]
        request = {"messages": [{k: v for k, v in m.items() if k not in _OUR_KEYS and v is not None}
                                for m in messages if isinstance(m, Mapping)]}
        if tools:
            request["tools"] = list(tools)
        engine = self._prompt_engine if is_prompt else self._train_engine
        with self._recording() as pieces:
            try:
                from mistral_common.protocol.instruct.request import ChatCompletionRequest

                tokens = list(engine.encode_chat_completion(ChatCompletionRequest.model_validate(request)).tokens)
            except Exception as error:  # pydantic ValidationError or a mistral_common exception: bad input
                if isinstance(error, (RuntimeError, AssertionError)) and not _is_mistral_common_error(error):
                    raise
                raise ChatError(f"{self.kind.name} chat format: {_one_line(error)}") from None
        return tokens, self._mask(tokens, pieces, weights)

    @contextlib.contextmanager
    def _recording(self) -> Iterator[list[tuple[str, list[int]]]]:
        """Record (method, tokens) of each per-message encoder call during one request (module docstring)."""
        instruct = self._train_engine.instruct_tokenizer
        pieces: list[tuple[str, list[int]]] = []

        def wrap(name: str) -> Any:
            original = getattr(type(instruct), name)

            def recorded(*args: Any, **kwargs: Any) -> Any:
                result = original(instruct, *args, **kwargs)
                tokens = result if name == "encode_assistant_message" else result[0]
                pieces.append((name, list(tokens) if tokens is not None else []))
                return result

            return recorded

        for name in _RECORDED:
            setattr(instruct, name, wrap(name))
        try:
            yield pieces
        finally:
            for name in _RECORDED:
                instruct.__dict__.pop(name, None)

    def _mask(self, tokens: list[int], pieces: list[tuple[str, list[int]]], weights: list[Any]) -> list[bool]:
        start = list(self._train_engine.instruct_tokenizer.start())
        rebuilt = start + [t for _, piece in pieces for t in piece]
        if rebuilt != tokens:
            raise RuntimeError(
                f"mistral_common's per-message pieces do not add up to its ids ({len(rebuilt)} vs {len(tokens)} "
                "tokens): the loss mask would be shifted; this mistral_common version is not supported"
            )
        assistant_pieces = sum(1 for name, _ in pieces if name == "encode_assistant_message")
        if assistant_pieces != len(weights) and len(set(weights)) > 1:
            raise ChatError(
                "consecutive assistant messages with different 'weight' are merged by the chat format; "
                "give them the same weight or merge them"
            )
        mask = [False] * len(start)
        turn = 0
        for name, piece in pieces:
            trained = False
            if name == "encode_assistant_message":
                weight = weights[turn] if turn < len(weights) else weights[-1]
                trained = weight is None or bool(weight)
                turn += 1
            mask += [trained] * len(piece)
        return mask


def _is_mistral_common_error(error: BaseException) -> bool:
    return type(error).__module__.startswith("mistral_common")


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text[:600]


class IncrementalDecoder:
    """Streaming decode for the mistral_common tokenizers: ``put`` one id, get the new text; ``flush`` at the end.

    ``"".join(put(i) for i in ids) + flush() == tokenizer.decode(ids, skip_special_tokens)`` (tested).
    Why not decode each id alone: a character split over byte tokens decodes to U+FFFD piece by piece,
    and sentencepiece drops the leading space of the first piece it decodes. We decode a window that
    starts at an earlier emission point ``start`` and subtract the decode of ``ids[start:read]``; both
    drop the same leading space, so the difference is exactly the new text. Text ending in U+FFFD (an
    incomplete character) waits for the next id. The window moves forward only onto a range holding a
    visible (non-skipped) token, so the subtracted text always contains the piece whose space is dropped.
    """

    def __init__(self, tokenizer: MistralCommonTokenizer, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._start = 0  # window start
        self._read = 0   # ids[:read] are already emitted

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip)

    def put(self, token_id: int) -> str:
        self._ids.append(token_id)
        return self._emit(final=False)

    def flush(self) -> str:
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        if self._read == len(self._ids):
            return ""
        before = self._decode(self._ids[self._start:self._read])
        text = self._decode(self._ids[self._start:])
        if not final and text.endswith("\ufffd"):
            return ""
        if not text.startswith(before):  # a decoder whose output is not prefix-stable: decode from the start
            before = self._decode(self._ids[:self._read])
            text = self._decode(self._ids)
            if not text.startswith(before):
                raise RuntimeError("streamed text is not a prefix of the full decode")
        visible = [i for i in self._ids[self._read:] if not (self._skip and i in self._tokenizer._special)]
        if visible:
            self._start = self._read
        self._read = len(self._ids)
        return text[len(before):]
