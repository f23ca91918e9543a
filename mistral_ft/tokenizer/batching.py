"""What every tokenizer version shares: transformers-style batch calls and streaming built on ``encode_batch``,
``decode`` and ``stream_decoder``.

Why a base class: the v1 tokenizer (our own sentencepiece path) and the mistral_common-backed ones (v2, v3,
v7, Tekken) differ in how they encode and decode, not in how a batch is padded, truncated or streamed;
writing that once keeps the conventions (pad side, truncation keeping BOS/EOS) identical for all.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

DEFAULT_MODEL_MAX_LENGTH = 32768
_PADDING_SIDES = ("right", "left")


class BatchCalls:
    """``__call__`` / ``batch_decode`` / ``decode_stream`` / padding settings for a tokenizer subclass.

    The subclass provides ``encode_batch``, ``decode``, ``stream_decoder``, ``bos_token_id``,
    ``eos_token_id``, ``pad_token_id``, ``add_bos_token`` and ``add_eos_token``.
    """

    @property
    def padding_side(self) -> str:
        """Where ``__call__`` pads: "right" (training) or "left" (batched generation)."""
        return self._padding_side

    @padding_side.setter
    def padding_side(self, value: str) -> None:
        if value not in _PADDING_SIDES:
            raise ValueError(f"padding_side must be one of {_PADDING_SIDES}, got {value!r}")
        self._padding_side = value

    @property
    def model_max_length(self) -> int:
        """Cap used by ``truncation=True`` when no ``max_length`` is given."""
        return self._model_max_length

    @model_max_length.setter
    def model_max_length(self, value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"model_max_length must be a positive int, got {value!r}")
        self._model_max_length = value

    def __call__(
        self,
        texts_or_text: str | Sequence[str],
        return_tensors: str | None = None,
        padding: bool | str = False,
        truncation: bool = False,
        max_length: int | None = None,
        add_special_tokens: bool = True,
    ) -> dict[str, Any]:
        """HF-style encode: ``{"input_ids", "attention_mask"}`` as lists or, with ``return_tensors="pt"``, LongTensors.

        A single string gives flat lists (or a (1, T) tensor), a list gives one row per text, as in
        transformers. ``padding``: False/"do_not_pad", True/"longest", "max_length" (needs ``max_length``);
        ``pad_token_id`` on ``self.padding_side``. ``truncation=True`` keeps the first ``max_length`` (default
        ``model_max_length``) tokens, special tokens included (BOS kept, EOS kept when added).
        """
        single = isinstance(texts_or_text, str)
        texts = [texts_or_text] if single else texts_or_text
        if not isinstance(texts, Sequence) or not all(isinstance(t, str) for t in texts):
            bad = type(texts).__name__ if not isinstance(texts, Sequence) else next(
                f"texts[{i}] is {type(t).__name__}" for i, t in enumerate(texts) if not isinstance(t, str)
            )
            raise TypeError(f"tokenizer call: texts_or_text must be a str or a list of str ({bad})")
        if len(texts) == 0:
            raise ValueError("tokenizer call: texts_or_text is an empty list")
        if return_tensors not in (None, "pt"):
            raise ValueError(f"return_tensors must be None or 'pt', got {return_tensors!r}")
        if padding is True:
            padding = "longest"
        elif padding is False or padding is None:
            padding = "do_not_pad"
        if padding not in ("do_not_pad", "longest", "max_length"):
            raise ValueError(f"padding must be False, True, 'longest' or 'max_length', got {padding!r}")
        bad_max_length = isinstance(max_length, bool) or not isinstance(max_length, int) or max_length <= 0
        if max_length is not None and bad_max_length:
            raise ValueError(f"max_length must be a positive int or None, got {max_length!r}")
        if padding == "max_length" and max_length is None:
            raise ValueError("padding='max_length' needs max_length (got None)")
        if truncation not in (True, False):
            raise ValueError(f"truncation must be True or False, got {truncation!r}")

        add_bos = add_special_tokens and self.add_bos_token
        add_eos = add_special_tokens and self.add_eos_token
        rows = self.encode_batch(list(texts), add_bos=False, add_eos=False)
        if truncation:
            limit = max_length if max_length is not None else self.model_max_length
            budget = limit - int(add_bos) - int(add_eos)
            if budget < 0:
                raise ValueError(f"max_length={limit} leaves no room for the special tokens")
            rows = [row[:budget] for row in rows]
        head = [self.bos_token_id] if add_bos else []
        tail = [self.eos_token_id] if add_eos else []
        rows = [head + row + tail for row in rows]
        masks = [[1] * len(row) for row in rows]

        if padding != "do_not_pad":
            target = max_length if padding == "max_length" else max((len(r) for r in rows), default=0)
            for index, row in enumerate(rows):
                missing = target - len(row)
                if missing <= 0:
                    continue
                pads = [self.pad_token_id] * missing
                zeros = [0] * missing
                if self.padding_side == "right":
                    rows[index], masks[index] = row + pads, masks[index] + zeros
                else:
                    rows[index], masks[index] = pads + row, zeros + masks[index]

        if return_tensors == "pt":
            lengths = {len(row) for row in rows}
            if len(lengths) > 1:
                raise ValueError(
                    f"return_tensors='pt' needs equal lengths, got lengths {sorted(lengths)}: "
                    "pass padding=True (or truncation=True with padding='max_length')"
                )
            return {
                "input_ids": torch.tensor(rows, dtype=torch.long).reshape(len(rows), -1),
                "attention_mask": torch.tensor(masks, dtype=torch.long).reshape(len(rows), -1),
            }
        if single:
            return {"input_ids": rows[0], "attention_mask": masks[0]}
        return {"input_ids": rows, "attention_mask": masks}

    def batch_decode(
        self, batch: Sequence[Sequence[int]] | torch.Tensor, skip_special_tokens: bool = False
    ) -> list[str]:
        """``decode`` per row of a list of lists or a 2-D tensor."""
        if isinstance(batch, (torch.Tensor, np.ndarray)):
            if batch.ndim != 2:
                raise ValueError(f"batch_decode: batch must be 2-D, got shape {tuple(batch.shape)}")
            batch = batch.tolist()
        return [self.decode(row, skip_special_tokens=skip_special_tokens) for row in batch]

    def decode_stream(self, ids: Iterable[int], skip_special_tokens: bool = True) -> Iterator[str]:
        """Yield non-empty text pieces as ``ids`` arrive; their ``"".join`` is ``decode(ids, skip_special_tokens)``."""
        decoder = self.stream_decoder(skip_special_tokens=skip_special_tokens)
        for token_id in ids:
            text = decoder.put(token_id)
            if text:
                yield text
        text = decoder.flush()
        if text:
            yield text

