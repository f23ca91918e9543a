"""An exported (merged) Hugging Face folder to one GGUF file that llama.cpp loads (`export ... gguf=true`).

Why our own writer over llama.cpp's `convert_hf_to_gguf.py`: that script is not on PyPI (it lives in the
llama.cpp repository, with its own pinned torch); the `gguf` package it is built on is (`pip install
mistral_ft[gguf]`). We write what the converter writes for a Mistral checkpoint, architecture `llama`:

- tensor names from gguf's own table (`gguf.get_tensor_name_map(MODEL_ARCH.LLAMA, n)`):
  `model.layers.0.self_attn.q_proj.weight` -> `blk.0.attn_q.weight`, `lm_head.weight` -> `output.weight`, ...
- q_proj / k_proj rows permuted back from the HF rotary layout (rotate-half: the two halves of each head)
  to GGML's (interleaved pairs), as the converter's `LlamaModel.permute` does: per head, rows
  [0, 1, ..., d/2-1, d/2, ..., d-1] become [0, d/2, 1, d/2+1, ...]. Worked example, one head of d = 4:
  HF rows (a0, a1, b0, b1) -> GGUF rows (a0, b0, a1, b1).
- 1-D tensors (the RMSNorm weights) in F32, matrices in the export dtype (F32, F16 or BF16).
- the SentencePiece vocabulary (`tokenizer.ggml.model = llama`: pieces, scores, token types), bos / eos /
  unk / pad ids; a Tekken (tiktoken) tokenizer is refused: its GGUF form is another tokenizer model that we
  do not write.

What GGUF loses: llama.cpp's `llama` architecture has no sliding-window attention, so a model whose
`sliding_window` is shorter than its context (Mistral 7B v0.1: 4096 of 32768) attends over the whole
context there and its outputs differ from ours (and transformers') once a sequence is longer than the
window. `write_gguf` warns, and the export report carries the warning.

Memory: tensors are read one at a time from the safetensors shards and written straight to the file
(header and tensor table first, from the shards' metadata), so peak memory is about one tensor.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

import torch

from mistral_ft.errors import ExportError

log = logging.getLogger("mistral_ft.export")

GGUF_NAME = "model.gguf"


def _gguf() -> Any:
    try:
        import gguf
    except ImportError:
        raise ExportError("gguf=true needs the gguf package: pip install 'mistral_ft[gguf]' (or pip install gguf)") from None
    return gguf


def permute_for_ggml(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF's rotate-half row order of q/k_proj -> GGML's interleaved pairs (llama.cpp's converter `permute`)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def sliding_window_warning(config: Any) -> Optional[str]:
    """The warning `write_gguf` gives when llama.cpp will not apply the model's sliding window."""
    window, context = getattr(config, "sliding_window", None), int(config.max_position_embeddings)
    if window is None or int(window) >= context:
        return None
    return (f"gguf: this model uses a sliding attention window of {window} tokens, shorter than its context of "
            f"{context}; llama.cpp's 'llama' architecture has no sliding window, so past {window} tokens its outputs "
            "differ from this model's (see docs/export.md)")


def write_gguf(folder: Path, out_file: Path, config: Any, dtype: torch.dtype, name: str) -> dict[str, Any]:
    """Write `folder` (an exported merged/ causal-LM folder) as the GGUF file `out_file` (`general.name` =
    `name`); returns a report."""
    gguf = _gguf()
    from safetensors import safe_open

    from mistral_ft.model.weights import shard_map

    tok_file = folder / "tokenizer.model"
    if not tok_file.is_file():
        raise ExportError(f"gguf=true: {folder} has no SentencePiece tokenizer.model (a Tekken tokenizer?); "
                          "export writes GGUF for SentencePiece (v1/v2/v3) tokenizers only")
    n_head, n_kv, n_layers = config.num_attention_heads, config.num_key_value_heads, config.num_hidden_layers
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // n_head)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layers)
    kinds = {torch.float32: (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
             torch.float16: (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
             torch.bfloat16: (gguf.GGMLQuantizationType.BF16, gguf.LlamaFileType.MOSTLY_BF16)}
    qtype, ftype = kinds[dtype]

    # the plan: (hf name, shard, gguf name, shape, torch dtype) in file order
    plan = []
    for shard in shard_map(folder):
        with safe_open(str(folder / shard), framework="pt", device="cpu") as f:
            for key in f.keys():
                new = names.get_name(key, try_suffixes=(".weight", ".bias"))
                if new is None:
                    raise ExportError(f"gguf=true: tensor '{key}' ({folder / shard}) has no GGUF name in the llama "
                                      "architecture")
                shape = tuple(f.get_slice(key).get_shape())
                plan.append((key, shard, new, shape, torch.float32 if len(shape) == 1 else dtype))

    warning = sliding_window_warning(config)
    if warning:
        log.warning("%s", warning)
    writer = gguf.GGUFWriter(str(out_file), "llama")
    writer.add_name(name)
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_block_count(n_layers)
    writer.add_feed_forward_length(int(config.intermediate_size))
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // n_head:  # Nemo: 128-wide heads on a 5120-wide model
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_rope_freq_base(float(config.rope_theta))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(int(config.vocab_size))
    writer.add_file_type(int(ftype))
    _add_vocab(writer, gguf, tok_file, config)
    for _, _, new, shape, tdtype in plan:
        nbytes = int(torch.Size(shape).numel()) * torch.empty((), dtype=tdtype).element_size()
        if tdtype == torch.bfloat16:  # numpy has no bf16: its bits as uint16, typed by raw_dtype
            writer.add_tensor_info(new, shape, _np_dtype(torch.int16), nbytes, raw_dtype=qtype)
        else:
            writer.add_tensor_info(new, shape, _np_dtype(tdtype), nbytes)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    from tqdm import tqdm

    open_shards: dict[str, Any] = {}
    try:
        for key, shard, new, shape, tdtype in tqdm(plan, desc="gguf", unit="tensor", disable=None):
            if shard not in open_shards:
                for f in open_shards.values():
                    f.__exit__(None, None, None)
                open_shards = {shard: safe_open(str(folder / shard), framework="pt", device="cpu").__enter__()}
            t = open_shards[shard].get_tensor(key)
            if key.endswith("q_proj.weight"):
                t = permute_for_ggml(t, n_head)
            elif key.endswith("k_proj.weight"):
                t = permute_for_ggml(t, n_kv)
            t = t.to(tdtype).contiguous()
            writer.write_tensor_data((t.view(torch.int16) if tdtype == torch.bfloat16 else t).numpy())
    finally:
        for f in open_shards.values():
            f.__exit__(None, None, None)
        writer.close()
    return {"gguf": str(out_file), "tensors": len(plan), "warnings": [warning] if warning else []}


def _np_dtype(dtype: torch.dtype) -> Any:
    return torch.empty((), dtype=dtype).numpy().dtype


def _add_vocab(writer: Any, gguf: Any, tok_file: Path, config: Any) -> None:
    """SentencePiece pieces, scores and types (as llama.cpp's converter writes them), padded to vocab_size."""
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(tok_file))
    tokens, scores, types = [], [], []
    for i in range(sp.vocab_size()):
        tokens.append(sp.id_to_piece(i).encode("utf-8"))
        scores.append(float(sp.get_score(i)))
        kind = gguf.TokenType.NORMAL
        if sp.is_unknown(i):
            kind = gguf.TokenType.UNKNOWN
        elif sp.is_control(i):
            kind = gguf.TokenType.CONTROL
        elif sp.is_unused(i):
            kind = gguf.TokenType.UNUSED
        elif sp.is_byte(i):
            kind = gguf.TokenType.BYTE
        types.append(int(kind))
    if len(tokens) > config.vocab_size:
        raise ExportError(f"gguf=true: the tokenizer ({tok_file}) has {len(tokens)} tokens, the model {config.vocab_size}")
    for i in range(len(tokens), int(config.vocab_size)):  # padded embedding rows, as the converter names them
        tokens.append(f"[PAD{i}]".encode())
        scores.append(-1000.0)
        types.append(int(gguf.TokenType.UNUSED))
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(int(config.bos_token_id))
    writer.add_eos_token_id(int(config.eos_token_id))
    if sp.unk_id() >= 0:
        writer.add_unk_token_id(int(sp.unk_id()))
    if config.pad_token_id is not None:
        writer.add_pad_token_id(int(config.pad_token_id))
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
