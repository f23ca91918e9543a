"""The Mistral model family: one readable file, top to bottom.

RMSNorm -> rotary -> attention (GQA, sliding window, sdpa/eager/flash-attn 2) -> SwiGLU MLP -> decoder layer ->
MistralModel -> MistralForCausalLM / MistralForSequenceClassification.

Module names are the Hugging Face weight names, so HF safetensors load with a plain ``load_state_dict`` and peft
adapters trained here load onto transformers' model. Numbers follow transformers 5.x (checked in
tests/test_parity.py on tiny random configs).

Notation (shape comments):
    B batch, T new tokens (queries), S keys (T, or cached slots + T), D hidden_size,
    nh attention heads, nkv key/value heads, hd head_dim, V vocab_size.

Attention rule (sliding window W): query at sequence index i attends key j iff  i - W < j <= i, j is not padding,
and (packed rows) j belongs to the same document as i. ``sliding_window=None`` is plain causal attention.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention import varlen_segments
from .cache import MistralCache
from .config import MistralConfig
from .losses import classification_loss_sum, infer_problem_type


# ------------------------------------------------------------------------------------------------ outputs
@dataclass
class ModelOutput:
    """Attribute, key and index access like transformers' outputs (``out.logits``, ``out["logits"]``, ``out[0]``)."""

    def to_tuple(self) -> tuple:
        return tuple(getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None)

    def __getitem__(self, key: str | int) -> Any:
        return getattr(self, key) if isinstance(key, str) else self.to_tuple()[key]

    def keys(self) -> list[str]:
        return [f.name for f in fields(self) if getattr(self, f.name) is not None]


@dataclass
class BaseModelOutputWithPast(ModelOutput):
    last_hidden_state: torch.Tensor | None = None
    past_key_values: MistralCache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


@dataclass
class CausalLMOutputWithPast(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    past_key_values: MistralCache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


@dataclass
class SequenceClassifierOutputWithPast(CausalLMOutputWithPast):
    pass


# ------------------------------------------------------------------------------------------------ layers
class MistralRMSNorm(nn.Module):
    """RMSNorm computed in fp32 (bf16 squares lose too much), cast back before the weight, as HF does."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x.to(dtype)


class MistralRotaryEmbedding(nn.Module):
    """RoPE in HF's rotate_half layout: dims [0, hd/2) pair with [hd/2, hd).

    inv_freq is kept in fp32, on the CPU (even while the model is built on the meta device) and outside the state
    dict/buffers, so ``model.to(bfloat16)`` cannot round it. With yarn (``config.rope_scaling``), inv_freq and a
    cos/sin scale come from :func:`yarn_inv_freq`.
    """

    def __init__(self, config: MistralConfig):
        super().__init__()
        d = config.head_dim
        self.attention_scaling = 1.0
        if config.rope_scaling is None:
            exponents = torch.arange(0, d, 2, dtype=torch.int64, device="cpu").float() / d  # (hd/2,)
            self._inv_freq = 1.0 / (config.rope_theta ** exponents)
        else:
            self._inv_freq, self.attention_scaling = yarn_inv_freq(d, config.rope_theta, config.rope_scaling,
                                                                   config.max_position_embeddings)
        self._per_device: dict[torch.device, torch.Tensor] = {}

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = self._per_device.get(x.device)
        if inv_freq is None:
            inv_freq = self._per_device[x.device] = self._inv_freq.to(x.device)
        freqs = position_ids[..., None].float() * inv_freq  # (B|1, T, hd/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (B|1, T, hd)
        cos, sin = emb.cos(), emb.sin()
        if self.attention_scaling != 1.0:
            cos, sin = cos * self.attention_scaling, sin * self.attention_scaling
        return cos.to(x.dtype), sin.to(x.dtype)


def yarn_inv_freq(dim: int, theta: float, rope: dict[str, Any], max_position_embeddings: int
                  ) -> tuple[torch.Tensor, float]:
    """YaRN (Peng et al. 2023, arXiv:2309.00071): per-frequency blend of original and interpolated RoPE.

    Why: a model pretrained on ``original_max_position_embeddings`` (L) tokens is stretched ``factor`` (s) times.
    Frequencies that turn many times within L (high ones, > beta_fast turns) are kept (extrapolation); those that
    turn less than beta_slow times are divided by s (interpolation); a linear ramp over the dims in between blends
    the two. cos/sin are then scaled by ``attention_factor`` (default 0.1 ln s + 1), which sharpens the softmax.
    Numbers as transformers 5.24 computes them (same fp32 operations in the same order):

        dim_of(turns) = dim * ln(L / (2 pi turns)) / (2 ln theta)          # the dim index that turns `turns` times
        low, high     = floor(dim_of(beta_fast)), ceil(dim_of(beta_slow))   # unless truncate=false
        ramp[i]       = clamp((i - low) / (high - low), 0, 1), i < dim/2    # 0: keep, 1: interpolate
        inv_freq      = inv_interp * ramp + inv_extrap * (1 - ramp)

    ``attention_factor`` given is used as is; else with both ``mscale`` and ``mscale_all_dim`` it is
    m(s, mscale) / m(s, mscale_all_dim) with m(s, k) = 0.1 k ln s + 1 (1 for s <= 1); else m(s, 1).
    ``factor: null`` means max_position_embeddings / L; beta_fast/beta_slow default to 32/1 (also when 0).
    """
    factor = rope["factor"]
    L = rope.get("original_max_position_embeddings") or max_position_embeddings
    if factor is None:
        factor = max_position_embeddings / L

    def m(scale: float, k: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * k * math.log(scale) + 1.0

    attention_factor = rope.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = rope.get("mscale"), rope.get("mscale_all_dim")
        attention_factor = float(m(factor, mscale) / m(factor, mscale_all_dim)) if mscale and mscale_all_dim \
            else m(factor)
    beta_fast, beta_slow = rope.get("beta_fast") or 32, rope.get("beta_slow") or 1

    def dim_of(turns: float) -> float:
        return (dim * math.log(L / (turns * 2 * math.pi))) / (2 * math.log(theta))

    low, high = dim_of(beta_fast), dim_of(beta_slow)
    if rope.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # a one-dim ramp would divide by zero
    pos_freqs = theta ** (torch.arange(0, dim, 2, dtype=torch.float, device="cpu") / dim)  # (hd/2,)
    inv_extrap, inv_interp = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    keep = 1 - torch.clamp((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low), 0, 1)
    return inv_interp * (1 - keep) + inv_extrap * keep, attention_factor


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B|1, 1, T, hd): broadcast over heads
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, nkv, S, hd) -> (B, nkv * n_rep, S, hd): each key/value head serves n_rep query heads (GQA)."""
    if n_rep == 1:
        return x
    B, nkv, S, hd = x.shape
    return x[:, :, None].expand(B, nkv, n_rep, S, hd).reshape(B, nkv * n_rep, S, hd)


@dataclass
class AttentionInputs:
    """What every layer's attention needs about masking, computed once per forward (never per layer).

    ``mask`` is a (B|1, 1, T, S) boolean "may attend" tensor, or None when plain causal attention (``is_causal``)
    is exact: no padding, no documents, no cache, and the window covers the whole sequence. ``sdpa_mask`` is
    that mask with fully masked query rows opened (SDPA would return NaN for them).
    ``cu_seq_lens`` / ``max_seq_len``: varlen segments over the flattened tokens (flash-attn; see
    :func:`mistral_ft.model.attention.varlen_segments`); ``segments``: the same as host (row, start, end)
    triples, for the per-document CPU path.
    """

    mask: torch.Tensor | None
    cached: bool = False
    block_mask: Any = None  # FlexAttention BlockMask (attn_implementation="flex_attention")
    sdpa_mask: torch.Tensor | None = None
    cu_seq_lens: torch.Tensor | None = None
    max_seq_len: int | None = None
    segments: list[tuple[int, int, int]] | None = None
    window_masks: dict[int, torch.Tensor] | None = None  # per segment length, built on first use (CPU path)


_compiled_flex = None


def flex_attention_fn(device: torch.device):
    """FlexAttention, compiled once per process on CUDA (uncompiled it is a slow reference); eager on CPU,
    where it has a forward only (tests compare it with SDPA there).

    ``dynamic=None`` (automatic): the first length compiles a static kernel, a second one recompiles once with T
    symbolic, and later lengths reuse it. ``dynamic=False`` recompiled for every new T until dynamo's cache limit
    (8), then fell back to the slow eager kernel. With the collator's ``pad_to_multiple_of`` (128 on CUDA)
    lengths come in few buckets anyway; tests/gpu counts the compiles.
    """
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention

    if device.type != "cuda":
        return flex_attention
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=None)
    return _compiled_flex


_block_mask_cache: dict[tuple, Any] = {}


def build_block_mask(B: int, T: int, window: int | None, key_valid: torch.Tensor | None,
                     document_ids: torch.Tensor | None, device: torch.device):
    """The rule of :func:`build_attention_mask` as a FlexAttention BlockMask: blocks entirely outside the window,
    another document or padding are skipped, not computed and masked.

    Built once per forward (all layers of a window share it). Without padding or documents the mask depends
    only on (T, window, device): cached by that shape, so a run of equal-length batches builds it once.
    """
    from torch.nn.attention.flex_attention import create_block_mask

    shape_only = key_valid is None and document_ids is None
    key = (T, window, str(device))
    if shape_only and key in _block_mask_cache:
        return _block_mask_cache[key]

    def mask_mod(b, h, q_idx, kv_idx):
        ok = kv_idx <= q_idx
        if window is not None:
            ok = ok & (q_idx - kv_idx < window)
        if key_valid is not None:
            ok = ok & key_valid[b, kv_idx]
        if document_ids is not None:
            ok = ok & (document_ids[b, q_idx] == document_ids[b, kv_idx])
        return ok

    batch = None if shape_only else B
    block_mask = create_block_mask(mask_mod, batch, None, T, T, device=device)
    if shape_only:
        if len(_block_mask_cache) >= 16:  # a few buckets of lengths are normal; many mean unbucketed lengths
            _block_mask_cache.pop(next(iter(_block_mask_cache)))
        _block_mask_cache[key] = block_mask
    return block_mask


def sdpa_ready(mask: torch.Tensor | None) -> torch.Tensor | None:
    """A query with no key to attend (a left-padding row) would give NaN in SDPA; let it see every key instead.
    Its output is never used, and no valid query attends to it. Done once per forward, not per layer."""
    return None if mask is None else mask | ~mask.any(dim=-1, keepdim=True)


def build_attention_mask(q_index: torch.Tensor, k_index: torch.Tensor, window: int | None,
                         key_valid: torch.Tensor | None, document_ids: torch.Tensor | None) -> torch.Tensor:
    """Boolean (B|1, 1, T, S) mask of the rule ``i - W < j <= i`` ∧ key not padding ∧ same document.

    Example, W = 3, T = S = 5 (rows are queries, 1 = may attend)::

        1 . . . .
        1 1 . . .
        1 1 1 . .
        . 1 1 1 .
        . . 1 1 1
    """
    diff = q_index[:, None] - k_index[None, :]  # (T, S)
    allowed = diff >= 0
    if window is not None:
        allowed = allowed & (diff < window)
    allowed = allowed[None, None]  # (1, 1, T, S)
    if key_valid is not None:
        allowed = allowed & key_valid[:, None, None, :]
    if document_ids is not None:
        allowed = allowed & (document_ids[:, None, :, None] == document_ids[:, None, None, :])
    return allowed


def check_token_ids(input_ids: torch.Tensor, vocab_size: int) -> None:
    """Raise a clear error for ids outside [0, vocab_size) (the embedding would fail with a bare IndexError)."""
    bad = (input_ids < 0) | (input_ids >= vocab_size)
    if bad.any():
        pos = tuple(bad.nonzero()[0].tolist())
        raise ValueError(f"input_ids{list(pos)} = {int(input_ids[pos])} is outside the vocabulary "
                         f"[0, {vocab_size}): the tokenizer does not match this model")


def _flash_attn_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


class MistralAttention(nn.Module):
    """Multi-head attention with grouped key/value heads, rotary positions and a sliding window.

    ``sliding_window`` is this layer's own window (``config.layer_window``: with ``layer_types`` some layers
    attend over the full context); the masks of every window in use are built once per forward.
    """

    def __init__(self, config: MistralConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.sliding_window = config.layer_window(layer_idx)
        self.num_heads = config.num_attention_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.num_key_value_groups = self.num_heads // self.num_key_value_heads
        self.head_dim = config.head_dim
        self.scaling = self.head_dim ** -0.5
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, self.num_key_value_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, self.num_key_value_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], attn: AttentionInputs,
                cache: MistralCache | None = None, output_attentions: bool = False):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k_proj(x).view(B, T, self.num_key_value_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.v_proj(x).view(B, T, self.num_key_value_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        q, k = apply_rotary_pos_emb(q, k, *rope)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)  # (B, nkv, S, hd)
        dropout = self.config.attention_dropout if self.training else 0.0
        impl = self.config.attn_implementation
        weights = None
        if output_attentions or impl == "eager":
            y, weights = self._eager(q, k, v, attn.mask, dropout)
        elif impl == "flash_attention_2" and not attn.cached:
            y = self._flash(q, k, v, attn, dropout)
        elif attn.segments is not None:
            y = self._sdpa_segments(q, k, v, attn, dropout)
        elif impl == "flex_attention" and attn.block_mask is not None:
            if dropout:
                raise ValueError("attention_dropout is not supported with attn_implementation='flex_attention'")
            y = flex_attention_fn(q.device)(q, k, v, block_mask=attn.block_mask, scale=self.scaling,
                                            enable_gqa=self.num_key_value_groups > 1)
        else:
            y = self._sdpa(q, k, v, attn.sdpa_mask, dropout)
        y = y.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim)  # (B, T, nh*hd)
        return self.o_proj(y), weights

    def _sdpa(self, q, k, v, mask, dropout):
        """``mask``: :func:`sdpa_ready`'s (B|1, 1, T, S), or None for plain causal attention."""
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=mask is None,
                                              scale=self.scaling, enable_gqa=self.num_key_value_groups > 1)

    def _sdpa_segments(self, q, k, v, attn: AttentionInputs, dropout):
        """Packed rows on CPU: SDPA per (row, document) segment instead of over a dense T x T mask, so the cost
        grows with the sum of squared document lengths, not T squared. Each segment is causal (with the window
        as a small mask when the segment is longer than it); padding runs are segments of their own, whose
        outputs are never used. Equal to the dense path at every real token (tests/unit/model)."""
        W, rows = self.sliding_window, []
        gqa = self.num_key_value_groups > 1
        for b, start, end in attn.segments:
            if start == 0:
                rows.append([])
            L = end - start
            mask = None
            if W is not None and L > W:
                mask = attn.window_masks.get(L)
                if mask is None:
                    idx = torch.arange(L, device=q.device)
                    mask = attn.window_masks[L] = build_attention_mask(idx, idx, W, None, None)[0, 0]
            rows[-1].append(F.scaled_dot_product_attention(
                q[b:b + 1, :, start:end], k[b:b + 1, :, start:end], v[b:b + 1, :, start:end], attn_mask=mask,
                dropout_p=dropout, is_causal=mask is None, scale=self.scaling, enable_gqa=gqa))
        return torch.cat([torch.cat(parts, dim=2) for parts in rows], dim=0)  # (B, nh, T, hd)

    def _eager(self, q, k, v, mask, dropout):
        """Explicit softmax(QK^T)V; masks with the dtype's minimum (not -inf) so fully masked rows stay finite."""
        k, v = repeat_kv(k, self.num_key_value_groups), repeat_kv(v, self.num_key_value_groups)
        scores = torch.matmul(q, k.transpose(2, 3)) * self.scaling  # (B, nh, T, S)
        if mask is None:
            T = q.shape[2]
            mask = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()[None, None]
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        weights = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        weights = F.dropout(weights, p=dropout, training=self.training)
        return torch.matmul(weights, v), weights

    def _flash(self, q, k, v, attn: AttentionInputs, dropout):
        """flash-attn 2: dense kernel when nothing is masked, else varlen over (row, document) segments."""
        from flash_attn import flash_attn_func, flash_attn_varlen_func  # optional extra: pip install .[flash]

        if q.device.type != "cuda" or q.dtype not in (torch.float16, torch.bfloat16):
            raise RuntimeError(
                f"attn_implementation='flash_attention_2' needs CUDA tensors in float16/bfloat16; got {q.device.type} "
                f"{q.dtype}. Load with torch_dtype=torch.bfloat16 on a GPU, or use attn_implementation='sdpa'.")
        return flash_attention(q, k, v, attn.cu_seq_lens, attn.max_seq_len, self.sliding_window, self.scaling,
                               dropout, flash_attn_func, flash_attn_varlen_func)


def flash_attention(q, k, v, cu_seq_lens, max_seq_len, window, scale, dropout, dense_fn, varlen_fn):
    """Map our attention rule onto flash-attn's API (kept separate so tests can pass a plain-PyTorch stand-in).

    q: (B, nh, T, hd); k, v: (B, nkv, T, hd) (no cache). flash-attn takes (B, T, heads, hd), handles GQA itself,
    and its ``window_size=(left, right)`` counts keys *besides* the query: ``(W - 1, 0)`` is our ``i - W < j <= i``.
    Padding and packed documents go through the varlen kernel over all B*T tokens, one segment per (row,
    document, padding run) given by ``cu_seq_lens`` / ``max_seq_len`` (computed once per batch, on the host by
    the collator): no gather, no ``nonzero``, no sync in the layer. ``cu_seq_lens=None``: the dense kernel.
    Checked against a plain-PyTorch stand-in of flash-attn's documented semantics only (tests/unit/model).
    """
    B, nh, T, hd = q.shape
    win = (-1, -1) if window is None else (window - 1, 0)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, T, heads, hd)
    if cu_seq_lens is None:
        out = dense_fn(q, k, v, dropout_p=dropout, softmax_scale=scale, causal=True, window_size=win)
        return out.transpose(1, 2)
    qv, kv_, vv = (t.reshape(B * T, *t.shape[2:]) for t in (q, k, v))  # (B*T, heads, hd)
    out = varlen_fn(qv, kv_, vv, cu_seqlens_q=cu_seq_lens, cu_seqlens_k=cu_seq_lens, max_seqlen_q=max_seq_len,
                    max_seqlen_k=max_seq_len, dropout_p=dropout, softmax_scale=scale, causal=True, window_size=win)
    return out.view(B, T, nh, hd).transpose(1, 2)


class MistralMLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: MistralConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MistralDecoderLayer(nn.Module):
    def __init__(self, config: MistralConfig, layer_idx: int):
        super().__init__()
        self.self_attn = MistralAttention(config, layer_idx)
        self.mlp = MistralMLP(config)
        self.input_layernorm = MistralRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = MistralRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, x, rope, attn: dict[int | None, AttentionInputs], cache=None, output_attentions=False):
        """``attn`` maps each window in use to its masks; this layer takes its own window's."""
        h, weights = self.self_attn(self.input_layernorm(x), rope, attn[self.self_attn.sliding_window], cache,
                                    output_attentions)
        x = x + h
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, weights


# ------------------------------------------------------------------------------------------------ models
class MistralPreTrainedModel(nn.Module):
    """Shared plumbing: init, from_pretrained/save_pretrained (in weights.py), the bits peft expects."""

    config_class = MistralConfig
    base_model_prefix = "model"
    generation_config = None  # peft's generate wrapper reads and writes this attribute
    supports_gradient_checkpointing = True
    _no_split_modules = ["MistralDecoderLayer"]

    def __init__(self, config: MistralConfig):
        super().__init__()
        if config.attn_implementation == "flash_attention_2" and not _flash_attn_available():
            raise ImportError("attn_implementation='flash_attention_2' needs the flash-attn package "
                              "(pip install 'mistral_ft[flash]', CUDA only); use attn_implementation='sdpa'.")
        self.config = config

    # weights --------------------------------------------------------------------------------------
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.padding_idx is not None:
                with torch.no_grad():
                    module.weight[module.padding_idx].zero_()
        elif isinstance(module, MistralRMSNorm):
            nn.init.ones_(module.weight)

    def post_init(self) -> None:
        if not next(self.parameters()).is_meta:  # a model built on meta is about to be loaded: nothing to init
            self.apply(self._init_weights)
        self.tie_weights()

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings and hasattr(self, "lm_head"):
            self.lm_head.weight = self.model.embed_tokens.weight

    @classmethod
    def from_pretrained(cls, path: str, **kwargs: Any):
        """Load an HF-format folder or hub id; see :func:`mistral_ft.model.weights.load_pretrained`."""
        from .weights import load_pretrained

        return load_pretrained(cls, path, **kwargs)

    def save_pretrained(self, folder: str, **kwargs: Any) -> None:
        """Write sharded safetensors + index + config.json + generation_config.json (transformers loads them)."""
        from .weights import save_pretrained

        save_pretrained(self, folder, **kwargs)

    # conveniences transformers users (and peft) expect ---------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(p for p in self.parameters() if p.is_floating_point()).dtype

    def num_parameters(self, only_trainable: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not only_trainable)

    def _base(self) -> "MistralModel":
        return self if isinstance(self, MistralModel) else self.model

    def get_input_embeddings(self) -> nn.Embedding:
        return self._base().embed_tokens

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        """Recompute each decoder layer in backward (activation memory ~ one layer instead of all of them)."""
        self._base().gradient_checkpointing = True

    def gradient_checkpointing_disable(self) -> None:
        self._base().gradient_checkpointing = False

    @property
    def is_gradient_checkpointing(self) -> bool:
        return self._base().gradient_checkpointing

    def enable_input_require_grads(self) -> None:
        """Make embedding outputs require grad, so checkpointed layers over a frozen base still backpropagate."""
        def hook(module, inputs, output):
            output.requires_grad_(True)
        self._require_grads_hook = self.get_input_embeddings().register_forward_hook(hook)


class MistralModel(MistralPreTrainedModel):
    """The decoder stack: embeddings, layers, final norm. Returns hidden states (no head)."""

    def __init__(self, config: MistralConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        # _weight skips nn.Embedding's own init: post_init does it, and normal_ on the meta device (what
        # from_pretrained builds on) costs a one-time ~3 s import of torch._dynamo.
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx,
                                         _weight=torch.empty(config.vocab_size, config.hidden_size))
        self.layers = nn.ModuleList(MistralDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = MistralRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = MistralRotaryEmbedding(config)
        self.gradient_checkpointing = False
        if type(self) is MistralModel:
            self.post_init()

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, past_key_values: MistralCache | None = None,
                inputs_embeds: torch.Tensor | None = None, use_cache: bool | None = None,
                output_attentions: bool | None = None, output_hidden_states: bool | None = None,
                return_dict: bool | None = None, document_ids: torch.Tensor | None = None,
                cu_seq_lens: torch.Tensor | None = None, max_seq_len: int | None = None,
                ) -> BaseModelOutputWithPast | tuple:
        """Run the decoder.

        attention_mask: (B, T) or (B, past + T), 1 = real token, 0 = padding (left or right).
        position_ids: (B, T); default ``arange`` continuing after the cache, as in transformers' forward
            (generation derives them from the attention mask instead).
        past_key_values: a :class:`MistralCache` to read and extend (``use_cache=True`` makes one if None).
        document_ids: (B, T) for packed rows: tokens of different documents never attend to each other.
        cu_seq_lens, max_seq_len: the varlen segments of (attention_mask, document_ids) as
            :func:`mistral_ft.model.attention.varlen_segments` makes them (the collator does, on the host);
            computed here when not given. Checked against the masks on CPU; trusted on a GPU (a check would sync).
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            if input_ids.device.type == "cpu":  # free on the host; on a GPU the data path checks ids instead
                check_token_ids(input_ids, self.vocab_size)
            inputs_embeds = self.embed_tokens(input_ids)  # (B, T, D)
        B, T, _ = inputs_embeds.shape
        device = inputs_embeds.device
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if (self.training or document_ids is not None) and past_key_values is None:
            use_cache = False  # inference state stays out of the training (and packed) path
        cache = past_key_values
        if cache is None and use_cache:
            cache = MistralCache.for_config(self.config)
        if cache is not None and cache.layer_windows != self.config.layer_windows:
            raise ValueError(f"past_key_values was made for layer windows {cache.layer_windows}, but this model's "
                             f"layers use {self.config.layer_windows}; use MistralCache.for_config(model.config)")
        past = cache.seen if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=device)[None]  # (1, T)
        if document_ids is not None and cache is not None:
            raise ValueError("document_ids (packed rows) cannot be combined with a KV cache")

        new_valid = None
        if attention_mask is not None:
            if attention_mask.dim() != 2 or attention_mask.shape[0] != B or attention_mask.shape[1] not in (T, past + T):
                raise ValueError(f"attention_mask must be (batch, {T}) or (batch, {past + T}); "
                                 f"got {tuple(attention_mask.shape)}")
            new_valid = attention_mask[:, -T:].bool()
        # One set of masks per distinct window (two with layer_types, one otherwise), shared by its layers.
        windows = list(dict.fromkeys(self.config.layer_windows))
        if cache is not None:
            if new_valid is None:
                new_valid = torch.ones(B, T, dtype=torch.bool, device=device)
            keys = cache.begin(new_valid)  # window -> (key index (S,), key valid (B, S))
            q_index = torch.arange(past, past + T, device=device)
            attn = {}
            for W in windows:
                k_index, key_valid = keys[W]
                mask = build_attention_mask(q_index, k_index, W, key_valid, None)
                attn[W] = AttentionInputs(mask, cached=True, sdpa_mask=sdpa_ready(mask))
        else:
            attn = self._attention_inputs(B, T, windows, new_valid, document_ids, cu_seq_lens, max_seq_len,
                                          bool(output_attentions), device)

        rope = self.rotary_emb(inputs_embeds, position_ids)
        x = inputs_embeds
        all_hidden = [] if output_hidden_states else None
        all_attn = [] if output_attentions else None
        for layer in self.layers:
            if all_hidden is not None:
                all_hidden.append(x)
            if self.gradient_checkpointing and self.training:
                x, w = checkpoint(layer, x, rope, attn, None, bool(output_attentions), use_reentrant=False)
            else:
                x, w = layer(x, rope, attn, cache, bool(output_attentions))
            if all_attn is not None:
                all_attn.append(w)
        x = self.norm(x)
        if all_hidden is not None:
            all_hidden.append(x)
        out = BaseModelOutputWithPast(x, cache if use_cache or past_key_values is not None else None,
                                      tuple(all_hidden) if all_hidden is not None else None,
                                      tuple(all_attn) if all_attn is not None else None)
        return out if return_dict is not False else out.to_tuple()

    def _attention_inputs(self, B, T, windows, new_valid, document_ids, cu_seq_lens, max_seq_len,
                          output_attentions, device) -> dict[int | None, AttentionInputs]:
        """Each window's masks for a forward without cache, in the form the backend takes, built once for all
        layers: the dense rule (eager, sdpa), a BlockMask (flex), varlen segments (flash, and packed rows on
        CPU, which run SDPA per document instead of over a dense T x T mask)."""
        impl = self.config.attn_implementation
        on_host = device.type == "cpu"
        if new_valid is not None and on_host and bool(new_valid.all()):
            new_valid = None  # no padding: keep the is_causal fast path (a free check on the host)
        per_document = (on_host and impl == "sdpa" and document_ids is not None and not output_attentions)
        segments = None
        if (impl == "flash_attention_2" and not output_attentions and
                (new_valid is not None or document_ids is not None or cu_seq_lens is not None)) or per_document:
            if cu_seq_lens is None or on_host:  # made here when not given; on the host also a free check
                if new_valid is None and document_ids is None:  # one segment per row
                    cu, longest = torch.arange(0, B * T + 1, T, dtype=torch.int32, device=device), T
                else:
                    cu, longest = varlen_segments(new_valid, document_ids)
                if cu_seq_lens is not None and not (torch.equal(cu_seq_lens.cpu().to(torch.int32), cu)
                                                    and max_seq_len == longest):
                    raise ValueError("cu_seq_lens / max_seq_len do not match attention_mask and document_ids "
                                     "(make them with mistral_ft.model.attention.varlen_segments)")
                cu_seq_lens, max_seq_len = cu, longest
            if per_document:
                bounds = cu_seq_lens.tolist()  # on the host already: no sync
                segments = [(a // T, a % T, a % T + (b - a)) for a, b in zip(bounds[:-1], bounds[1:])]
        attn = {}
        for W in windows:
            need_mask = new_valid is not None or document_ids is not None or (W is not None and T > W)
            # flash and flex take the rule in their own form; the dense mask is only for sdpa/eager
            need_mask = need_mask and (impl in ("sdpa", "eager") or output_attentions) and not per_document
            mask = None
            if need_mask:
                idx = torch.arange(T, device=device)
                mask = build_attention_mask(idx, idx, W, new_valid, document_ids)
            block_mask = None
            if impl == "flex_attention" and not output_attentions:
                block_mask = build_block_mask(B, T, W, new_valid, document_ids, device)
            eager = impl == "eager" or output_attentions
            attn[W] = AttentionInputs(mask if eager else None, block_mask=block_mask,
                                      sdpa_mask=None if eager else sdpa_ready(mask), cu_seq_lens=cu_seq_lens,
                                      max_seq_len=max_seq_len, segments=segments,
                                      window_masks={} if segments is not None else None)
        return attn


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy: position t predicts labels[t + 1]; -100 is ignored.

    "mean" divides by the number of counted tokens of this batch (transformers' loss). "sum" lets the caller
    divide by the target count of a whole optimizer step (all micro-batches and ranks): a token-weighted mean.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {reduction!r}")
    shift_labels = F.pad(labels, (0, 1), value=-100)[..., 1:]
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), shift_labels.reshape(-1).to(logits.device),
                           ignore_index=-100, reduction=reduction)


class _LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of ``h @ weight.T`` whose gradients are computed chunk by chunk in the forward.

    Per chunk: fp32 logits, loss += logsumexp - logit[target], and with p = softmax - onehot (zero on ignored
    rows): grad_h = p @ W, grad_W += p^T @ h. Only grad_h (N x D) and grad_W (when the head trains) are kept
    for backward, so the head runs twice per token (never a third time for a recompute) and at most one
    (chunk, V) buffer exists at a time: logsumexp and softmax are computed in place of the logits.
    """

    @staticmethod
    def forward(ctx, h, weight, targets, chunk_size):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        for start in range(0, h.shape[0], chunk_size):
            hc, tc = h[start:start + chunk_size], targets[start:start + chunk_size]
            logits = (hc @ weight.T).float()  # (c, V): the only (c, V) buffer of the chunk
            valid = tc != -100
            tgt = tc.clamp(min=0)[:, None]
            picked = logits.gather(1, tgt).squeeze(1)
            # logsumexp and softmax in place: torch.logsumexp would allocate a second (c, V) buffer for its
            # exp (78 MB per 600 targets at V = 32000, the CLI's peak RSS on CPU) and exp would run twice
            top = logits.amax(dim=-1, keepdim=True)
            p = logits.sub_(top).exp_()  # exp(logits - max), in place of the logits
            norm = p.sum(dim=-1, keepdim=True)
            lse = (top + norm.log()).squeeze(1)
            total += ((lse - picked) * valid).sum()
            if need_h or need_w:
                p.div_(norm)  # softmax
                p.scatter_add_(1, tgt, torch.full_like(tgt, -1, dtype=p.dtype))
                p.mul_(valid[:, None])
                if need_h:
                    grad_h[start:start + chunk_size] = (p.to(weight.dtype) @ weight).to(h.dtype)
                if need_w:
                    grad_w += p.T @ hc.float()
        ctx.weight_dtype = weight.dtype
        ctx.save_for_backward(grad_h, grad_w)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        return (grad_h * grad_out if grad_h is not None else None,
                (grad_w * grad_out).to(ctx.weight_dtype) if grad_w is not None else None, None, None)


def chunked_causal_lm_loss(hidden: torch.Tensor, lm_head: nn.Module, labels: torch.Tensor, chunk_size: int,
                           reduction: str = "mean", select_targets: bool | None = None,
                           target_index: torch.Tensor | None = None) -> torch.Tensor:
    """The same loss as :func:`causal_lm_loss`, without ever holding fp32 logits for the whole batch.

    * Only target positions reach the head: prompt and padding tokens get no logits at all. ``target_index``
      (flattened positions, :func:`mistral_ft.model.attention.target_positions`, made by the collator on the
      host) selects them on any device without a sync; without it they are found here on CPU (free there),
      while on CUDA all positions go through, masked inside the chunks (finding them would sync).
    * A plain ``nn.Linear`` head uses :class:`_LinearCrossEntropy` (gradients computed in the forward, one
      chunk of logits at a time). A head wrapped by peft (LoRA on lm_head, modules_to_save) goes through
      checkpointed chunks instead: the wrapper's own forward runs, recomputed in backward.
    For Mistral-7B at 4 x 4096 tokens this avoids 2 GiB of fp32 logits plus as much for their gradient.
    Called inside the model's forward, so FSDP's hooks have gathered ``lm_head`` when it runs.
    ``select_targets`` overrides the device rule (None: select on CPU only), so the CUDA path, where ignored
    positions are masked inside the chunks, is testable on CPU.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {reduction!r}")
    targets = F.pad(labels, (0, 1), value=-100)[..., 1:].reshape(-1).to(hidden.device)
    h = hidden.reshape(-1, hidden.shape[-1])
    if target_index is not None and h.device.type == "cpu" and not torch.equal(
            target_index.to(h.device), (targets != -100).nonzero().squeeze(-1)):
        raise ValueError("target_index does not match labels (make it with mistral_ft.model.attention."
                         "target_positions)")  # checked where it is free; trusted on a GPU
    if target_index is None and ((h.device.type == "cpu") if select_targets is None else select_targets):
        target_index = (targets != -100).nonzero().squeeze(-1)
    if target_index is not None:
        target_index = target_index.to(h.device)
        h, targets = h.index_select(0, target_index), targets.index_select(0, target_index)
        count = target_index.numel()  # the shape is known on the host: no sync
    else:
        count = (targets != -100).sum()
    if type(lm_head) is nn.Linear and lm_head.bias is None:
        total = _LinearCrossEntropy.apply(h, lm_head.weight, targets, chunk_size)
    else:
        def chunk_loss(h_chunk: torch.Tensor, t_chunk: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(lm_head(h_chunk).float(), t_chunk, ignore_index=-100, reduction="sum")

        total = h.new_zeros((), dtype=torch.float32)
        for start in range(0, h.shape[0], chunk_size):
            hc, tc = h[start:start + chunk_size], targets[start:start + chunk_size]
            total = total + (checkpoint(chunk_loss, hc, tc, use_reentrant=False) if torch.is_grad_enabled()
                             else chunk_loss(hc, tc))
    return total if reduction == "sum" else total / count


class MistralForCausalLM(MistralPreTrainedModel):
    """Decoder + language-model head. ``labels`` (unshifted, -100 ignored) give ``loss``."""

    def __init__(self, config: MistralConfig):
        super().__init__(config)
        self.model = MistralModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, past_key_values: MistralCache | None = None,
                inputs_embeds: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                use_cache: bool | None = None, output_attentions: bool | None = None,
                output_hidden_states: bool | None = None, return_dict: bool | None = None,
                document_ids: torch.Tensor | None = None, loss_reduction: str = "mean",
                loss_chunk_size: int | None = None, return_logits: bool = True, logits_to_keep: int = 0,
                cu_seq_lens: torch.Tensor | None = None, max_seq_len: int | None = None,
                target_index: torch.Tensor | None = None, **kwargs: Any) -> CausalLMOutputWithPast | tuple:
        """Besides the HF arguments: ``document_ids`` (packed rows), ``loss_reduction`` ("mean" | "sum"),
        ``loss_chunk_size`` (compute the loss ``loss_chunk_size`` tokens at a time, see
        :func:`chunked_causal_lm_loss`) and ``return_logits=False`` (skip the full logits when only the loss
        is needed: with chunking, training never materialises (B, T, V)). ``logits_to_keep=N`` (as in
        transformers) returns logits for the last N positions only: a prefill needs just the last one.
        ``cu_seq_lens`` / ``max_seq_len`` (varlen segments) and ``target_index`` (positions with a target, for
        the chunked loss) are what the collator computes on the host, so the step needs no device sync."""
        out = self.model(input_ids, attention_mask, position_ids, past_key_values, inputs_embeds, use_cache,
                         output_attentions, output_hidden_states, True, document_ids, cu_seq_lens, max_seq_len)
        hidden = out.last_hidden_state
        loss = logits = None
        if labels is not None and loss_chunk_size:
            loss = chunked_causal_lm_loss(hidden, self.lm_head, labels, loss_chunk_size, loss_reduction,
                                          target_index=target_index)
        if labels is not None and loss is None:
            logits = self.lm_head(hidden)  # (B, T, V)
            loss = causal_lm_loss(logits, labels, loss_reduction)
            if logits_to_keep:
                logits = logits[:, -logits_to_keep:]
        elif return_logits:
            logits = self.lm_head(hidden[:, -logits_to_keep:] if logits_to_keep else hidden)  # (B, T|N, V)
        res = CausalLMOutputWithPast(loss, logits, out.past_key_values, out.hidden_states, out.attentions)
        return res if return_dict is not False else res.to_tuple()

    def prepare_inputs_for_generation(self, input_ids: torch.Tensor, past_key_values: MistralCache | None = None,
                                      attention_mask: torch.Tensor | None = None, **kwargs: Any) -> dict:
        """Inputs for one decoding step (what peft's generation wrapper calls)."""
        if past_key_values is not None and past_key_values.seen > 0:
            input_ids = input_ids[:, past_key_values.seen:]
        position_ids = None
        if attention_mask is not None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -input_ids.shape[1]:]
        return {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids,
                "past_key_values": past_key_values, "use_cache": True, "logits_to_keep": 1}

    def generate(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Greedy or sampled decoding with the KV cache; see :func:`mistral_ft.model.generation.generate`."""
        from .generation import generate

        return generate(self, *args, **kwargs)


class MistralForSequenceClassification(MistralPreTrainedModel):
    """Decoder + ``score`` head pooled at the last non-pad token of each row (left or right padding).

    Loss follows transformers: ``problem_type`` from the config, or inferred: ``num_labels == 1`` -> MSE
    (regression); integer labels -> cross-entropy (ignores -100); otherwise BCE with logits (multi-label).
    """

    def __init__(self, config: MistralConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = MistralModel(config)
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=False)
        self.post_init()

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, past_key_values: MistralCache | None = None,
                inputs_embeds: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                use_cache: bool | None = None, output_attentions: bool | None = None,
                output_hidden_states: bool | None = None, return_dict: bool | None = None,
                **kwargs: Any) -> SequenceClassifierOutputWithPast | tuple:
        out = self.model(input_ids, attention_mask, position_ids, past_key_values, inputs_embeds, use_cache,
                         output_attentions, output_hidden_states, True)
        logits = self.score(out.last_hidden_state)  # (B, T, num_labels)
        B = logits.shape[0]
        pad = self.config.pad_token_id
        if pad is None and B != 1:
            raise ValueError("Cannot pool a batch of more than one sequence without config.pad_token_id "
                             "(needed to find each row's last real token)")
        if pad is None or input_ids is None:
            last = torch.full((B,), logits.shape[1] - 1, device=logits.device)  # with inputs_embeds: last position
        else:
            # Rightmost non-pad token: correct for both left and right padding.
            idx = torch.arange(input_ids.shape[-1], device=logits.device)
            last = (idx * (input_ids != pad).to(logits.device, torch.int64)).argmax(-1)
        pooled = logits[torch.arange(B, device=logits.device), last]  # (B, num_labels)
        loss = self.classification_loss(pooled, labels) if labels is not None else None
        res = SequenceClassifierOutputWithPast(loss, pooled, out.past_key_values, out.hidden_states, out.attentions)
        return res if return_dict is not False else res.to_tuple()

    def classification_loss(self, pooled: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """transformers' mean loss: the shared summed loss (model/losses.py) over the examples it counts."""
        if self.config.problem_type is None:
            self.config.problem_type = infer_problem_type(self.num_labels, labels)
        total, n = classification_loss_sum(pooled, labels, self.config.problem_type)
        return (total / n).to(pooled.dtype)
