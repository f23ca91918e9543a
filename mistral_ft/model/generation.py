"""Greedy and sampled decoding with the KV cache (and Mistral's rolling buffer), left-padded batches.

``MistralForCausalLM.generate`` delegates here. The loop follows transformers' ``generate`` (our parity peer):

* the prompt is processed in one forward (prefill), then one token per step on top of the cache;
* position ids come from the attention mask (``cumsum - 1``), so a left-padded row starts at position 0;
* the attention mask grows by one column of ones per step, for every row (as transformers does);
* a row that produced EOS is finished: it emits the pad id from then on, and decoding stops when every row is
  finished or the length budget is spent;
* the result is the full sequences (prompt + new tokens), shape (B, prompt_len + steps).

With ``sliding_window = W`` the cache is a rolling buffer of W slots (see :mod:`mistral_ft.model.cache`): memory
stays flat however long the output, and the logits equal a full forward under the window rule ``i - W < j <= i``
(tests/test_generation.py checks both).

Host-device syncs per step: one, for the "all rows finished?" check (and one more when a streamer asks for the
new tokens). Everything else (cache slot choice, lengths) is decided on the host without reading tensors.

Example, B = 2, prompts of 3 and 1 tokens (left padding, ``_`` = pad, ``E`` = EOS), greedy, max_new_tokens=3::

    input_ids       [[a b c], [_ _ d]]       attention_mask [[1 1 1], [0 0 1]]
    position_ids    [[0 1 2], [0 0 0]]       (pad positions are clamped; pad keys are masked anyway)
    step 1          row 0 -> x, row 1 -> E    row 1 is finished
    step 2          row 0 -> y, row 1 -> _    (finished rows emit pad)
    step 3          row 0 -> z, row 1 -> _
    result          [[a b c x y z], [_ _ d E _ _]]
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from .cache import MistralCache

DEFAULT_MAX_LENGTH = 20  # transformers' GenerationConfig default, used when no length is given


class Streamer(Protocol):
    """transformers' streamer protocol: ``put`` gets the prompt (B, T) once, then each step's new tokens (B,)."""

    def put(self, value: torch.Tensor) -> None: ...

    def end(self) -> None: ...


@dataclass
class GenerateOutput:
    """What ``return_dict_in_generate=True`` returns (transformers' field names).

    ``logits``: per step, the raw (B, V) next-token logits; ``scores``: per step, the processed logits that were
    sampled from (after temperature / top-k / top-p; equal to ``logits`` for greedy decoding).
    """

    sequences: torch.Tensor
    logits: tuple[torch.Tensor, ...] | None = None
    scores: tuple[torch.Tensor, ...] | None = None
    past_key_values: MistralCache | None = None

    def __getitem__(self, key: str) -> Any:
        return getattr(self, key)


def _left_padding_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                       pad_token_id: int | None, eos_ids: list[int]) -> torch.Tensor:
    """The (B, T) attention mask, checked on the host: left padding only, no empty row.

    Without a mask, padding is inferred from ``pad_token_id`` as transformers does (when pad != EOS).
    """
    if attention_mask is None:
        if pad_token_id is not None and pad_token_id not in eos_ids and bool((input_ids == pad_token_id).any()):
            attention_mask = (input_ids != pad_token_id).long()
        else:
            return torch.ones_like(input_ids, dtype=torch.long)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"generate: attention_mask has shape {tuple(attention_mask.shape)}, but input_ids has "
                         f"shape {tuple(input_ids.shape)}; they must match")
    host = attention_mask.detach().to("cpu", torch.long)
    if bool(((host != 0) & (host != 1)).any()):
        raise ValueError("generate: attention_mask must hold only 0 (padding) and 1 (token)")
    right = (host[:, :-1] > host[:, 1:]).any(dim=1)  # a 0 right after a 1: padding on the right
    if bool(right.any()):
        row = int(right.nonzero()[0])
        raise ValueError(
            f"generate: row {row} of the batch is right-padded (its attention_mask has a 0 after a 1: "
            f"{host[row].tolist()}). Batched generation needs left padding: set tokenizer.padding_side = 'left'.")
    empty = host.sum(dim=1) == 0
    if bool(empty.any()):
        raise ValueError(f"generate: row {int(empty.nonzero()[0])} of the batch is all padding (empty prompt)")
    return attention_mask.to(torch.long)


def process_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                   top_p: float | None = None) -> torch.Tensor:
    """Temperature, then top-k, then top-p (nucleus), in fp32; removed tokens get -inf (transformers' order).

    top-p keeps the smallest set of most likely tokens whose probability mass reaches ``top_p`` (at least one).
    """
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # mass of the strictly more likely tokens
        drop_sorted = mass_before >= top_p
        drop_sorted[..., 0] = False
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def _check_sampling(do_sample: bool, temperature: float, top_k: int | None, top_p: float | None) -> None:
    if not do_sample:
        return
    if not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"generate: temperature must be > 0 when do_sample=True, got {temperature!r} "
                         f"(use do_sample=False for greedy decoding)")
    if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1):
        raise ValueError(f"generate: top_k must be a positive integer or None, got {top_k!r}")
    if top_p is not None and not (0.0 < float(top_p) <= 1.0):
        raise ValueError(f"generate: top_p must be in (0, 1], got {top_p!r}")


@torch.no_grad()
def generate(model: torch.nn.Module, input_ids: torch.Tensor | None = None,
             attention_mask: torch.Tensor | None = None, max_new_tokens: int | None = None,
             max_length: int | None = None, do_sample: bool = False, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, eos_token_id: int | list[int] | None = None,
             pad_token_id: int | None = None, seed: int | None = None, generator: torch.Generator | None = None,
             streamer: Streamer | None = None, use_cache: bool = True, past_key_values: MistralCache | None = None,
             return_dict_in_generate: bool = False, output_logits: bool = False, output_scores: bool = False,
             **kwargs: Any) -> torch.Tensor | GenerateOutput:
    """Generate continuations of left-padded prompts; returns (B, prompt_len + steps) token ids.

    Args:
        model: a causal LM with our forward signature (``MistralForCausalLM``, or one with peft layers injected).
        input_ids: (B, T) prompts, left-padded. attention_mask: (B, T), 1 = token, 0 = padding; inferred from
            ``pad_token_id`` when omitted. Right padding is refused (the new tokens would follow pad tokens).
        max_new_tokens: new tokens per row at most; or ``max_length``, the total length (transformers' meaning).
            Neither: ``max_length = 20`` (transformers' default).
        do_sample: False = greedy (argmax); True = sample from the processed distribution.
        temperature, top_k, top_p: sampling controls, applied in this order (ignored when greedy).
        eos_token_id: int or list; default (None) ``config.eos_token_id``; ``[]`` = never stop early.
        pad_token_id: default ``config.pad_token_id`` or 0; emitted by finished rows.
        seed: makes sampling reproducible (a fresh ``torch.Generator`` on the model's device); or pass
            ``generator`` directly.
        streamer: gets ``put(prompt)``, then ``put(new_tokens)`` (B,) per step on the CPU, then ``end()``.
        use_cache: False recomputes the whole sequence each step (a reference for tests; same numbers).
        past_key_values: a :class:`MistralCache` to use (it may already hold a prefix of ``input_ids``).
        return_dict_in_generate, output_logits, output_scores: return a :class:`GenerateOutput` with per-step
            raw logits / processed scores, as transformers does.
    """
    if kwargs.pop("num_beams", 1) != 1:
        raise ValueError("generate: beam search is not supported (num_beams must be 1)")
    kwargs.pop("use_model_defaults", None)
    if input_ids is None:
        input_ids = kwargs.pop("inputs", None)  # transformers' name for the first argument
    if kwargs:
        raise TypeError(f"generate: unexpected argument(s) {sorted(kwargs)}")
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"generate: input_ids must be a (batch, length) tensor of token ids, got "
                        f"{type(input_ids).__name__} (tokenize with return_tensors='pt')")
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"generate: input_ids must be a non-empty (batch, length) tensor, got shape "
                         f"{tuple(input_ids.shape)}")
    config = model.config
    if eos_token_id is None:
        eos_token_id = config.eos_token_id
    if isinstance(eos_token_id, torch.Tensor):
        eos_token_id = eos_token_id.tolist()
    eos_ids = [] if eos_token_id is None else ([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
    if pad_token_id is None:
        pad_token_id = config.pad_token_id if config.pad_token_id is not None else 0
    _check_sampling(do_sample, temperature, top_k, top_p)

    device = model.device
    input_ids = input_ids.to(device)
    mask = _left_padding_mask(input_ids, attention_mask, pad_token_id, eos_ids).to(device)
    B, T = input_ids.shape
    limit = config.max_position_embeddings
    if T > limit:
        raise ValueError(f"generate: the prompt is {T} tokens long, but the model allows at most "
                         f"max_position_embeddings = {limit} tokens")
    if max_new_tokens is None:
        max_new_tokens = (max_length if max_length is not None else DEFAULT_MAX_LENGTH) - T
    if max_new_tokens < 0 and max_length is not None:
        max_new_tokens = 0  # transformers warns and returns the prompt
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"generate: max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if T + max_new_tokens > limit:  # positions past max_position_embeddings were never trained
        warnings.warn(f"generate: stopping at max_position_embeddings = {limit} tokens "
                      f"({limit - T} new tokens instead of {max_new_tokens})", stacklevel=2)
        max_new_tokens = limit - T

    if generator is None and seed is not None:
        generator = torch.Generator(device=device).manual_seed(int(seed))
    cache = None
    if use_cache:
        cache = past_key_values if past_key_values is not None else MistralCache.for_config(config)
        if cache.seen >= T:
            raise ValueError(f"generate: past_key_values already holds {cache.seen} tokens, but input_ids has only "
                             f"{T}; input_ids must contain the cached prefix plus at least one new token")
    eos = torch.tensor(eos_ids, device=device, dtype=input_ids.dtype)
    unfinished = torch.ones(B, dtype=torch.bool, device=device)
    all_logits: list[torch.Tensor] = []
    all_scores: list[torch.Tensor] = []
    sequences = input_ids
    if streamer is not None:
        streamer.put(input_ids.cpu())

    for _ in range(max_new_tokens):
        if cache is not None:
            step = model.prepare_inputs_for_generation(sequences, past_key_values=cache, attention_mask=mask)
        else:
            step = {"input_ids": sequences, "attention_mask": mask,
                    "position_ids": (mask.cumsum(-1) - 1).clamp(min=0), "use_cache": False, "logits_to_keep": 1}
        out = model(**step, return_dict=True)
        logits = out.logits[:, -1, :]  # (B, V)
        if cache is not None:
            cache.check_bounds()
        if do_sample:
            scores = process_logits(logits, temperature, top_k, top_p)
            next_tokens = torch.multinomial(scores.softmax(dim=-1), 1, generator=generator).squeeze(1)
        else:
            scores = logits
            next_tokens = logits.argmax(dim=-1)
        if output_logits:
            all_logits.append(logits.clone())
        if output_scores:
            all_scores.append(scores.clone())
        next_tokens = torch.where(unfinished, next_tokens, torch.full_like(next_tokens, pad_token_id))
        sequences = torch.cat([sequences, next_tokens[:, None]], dim=1)
        mask = torch.cat([mask, mask.new_ones(B, 1)], dim=1)
        if streamer is not None:
            streamer.put(next_tokens.cpu())
        if eos.numel():
            unfinished = unfinished & ~torch.isin(next_tokens, eos)
            if not bool(unfinished.any()):  # the one sync per step
                break
    if streamer is not None:
        streamer.end()
    if return_dict_in_generate:
        return GenerateOutput(sequences, tuple(all_logits) if output_logits else None,
                              tuple(all_scores) if output_scores else None, cache)
    return sequences
