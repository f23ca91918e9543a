#!/usr/bin/env python
"""The 7B-shaped benchmark of scripts/gpu_check.sh: ours vs transformers+peft, LoRA r16 on all linear layers.

    python scripts/gpu_bench.py --out gpu_bench.json --md gpu_bench.md          # CUDA: 32 layers at 7B width, bf16
    python scripts/gpu_bench.py --device cpu --size tiny --steps 2 --warmup 1  # the CPU fallback (seconds)

Both systems train on the same packed rows (``--micro-batch`` x ``--seq-len``, documents of long-tailed
lengths, prompts masked) with the same base weights (transformers' model takes ours by ``load_state_dict(...,
assign=True)``: the frozen base is shared, not copied) and the same LoRA config (one ``lora_config``). Ours:
``attn_implementation=auto`` (flash-attn 2 if installed, else FlexAttention), the collator's host-side varlen
segments and target positions, the fused chunked loss. transformers: ``attn_implementation=sdpa`` with the
packed ``position_ids`` (its padding-free path) and its own loss over full logits. One process, systems in
turn: peak memory is the CUDA allocator's, reset before each system (the shared frozen weights count in both).

MFU counts 4N FLOPs per token for LoRA (forward 2N, backward through the frozen weights 2N; N = the matmul
weights: decoder linears + lm_head), attention not included, against ``--peak-tflops`` (989.4: H100/H200
bf16 dense). The first-step losses of the two systems are reported side by side: a difference means the
comparison is broken (e.g. documents attending across boundaries), not that one system is faster.
This is the short check; scripts/benchmark.py is the full comparison (rounds, peers, CPU).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

SIZES = {  # 7b: Mistral-7B's width (num_hidden_layers from --layers); tiny: the CPU fallback
    "7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=8, sliding_window=4096, max_position_embeddings=32768),
    "tiny": dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, sliding_window=48, max_position_embeddings=512),
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto (cuda if available), cuda or cpu")
    p.add_argument("--size", choices=sorted(SIZES), default=None, help="default: 7b on CUDA, tiny on CPU")
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default: the size's)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per row (default 2048 on CUDA, 64 on CPU)")
    p.add_argument("--micro-batch", type=int, default=None, help="rows per step (default 4 on CUDA, 2 on CPU)")
    p.add_argument("--steps", type=int, default=6, help="timed steps per system")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation, allocator)")
    p.add_argument("--systems", default="ours,transformers+peft")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--peak-tflops", type=float, default=989.4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="write the JSON here")
    p.add_argument("--md", type=Path, default=None, help="write the markdown table here")
    a = p.parse_args(argv)
    if a.device == "auto":
        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    if a.device not in ("cuda", "cpu"):
        p.error(f"--device must be auto, cuda or cpu, got {a.device!r}")
    if a.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible (use --device cpu for the tiny fallback)")
    cuda = a.device == "cuda"
    a.size = a.size or ("7b" if cuda else "tiny")
    a.seq_len = a.seq_len or (2048 if cuda else 64)
    a.micro_batch = a.micro_batch or (4 if cuda else 2)
    systems = [s.strip() for s in a.systems.split(",") if s.strip()]
    unknown = [s for s in systems if s not in SYSTEMS]
    if unknown or not systems:
        p.error(f"--systems: {unknown or systems} not in {list(SYSTEMS)}")
    a.systems = systems
    for name in ("steps", "seq_len", "micro_batch"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return a


def make_batches(a: argparse.Namespace, vocab: int) -> list[dict[str, Any]]:
    """warmup + steps micro-batches of packed rows; documents of 1/16 to 1/2 row long (long-tailed), the first
    quarter of each a prompt (label -100)."""
    from mistral_ft.data.collate import Collator, pack_examples

    g = torch.Generator().manual_seed(a.seed)
    need = (a.warmup + a.steps) * a.micro_batch
    examples = []
    while True:
        n = int(a.seq_len / 16 * (8 ** torch.rand((), generator=g).item()))
        ids = torch.randint(3, vocab, (max(4, min(n, a.seq_len)),), generator=g).tolist()
        ids[0] = 1
        cut = max(1, len(ids) // 4)
        examples.append((ids, [-100] * cut + ids[cut:]))
        if len(examples) % 64 == 0 and len(pack_examples(examples, a.seq_len, "best_fit")) > need:
            break
    rows = pack_examples(examples, a.seq_len, "best_fit")[:need]
    collate = Collator(pad_token_id=0, pad_to_multiple_of=a.seq_len)  # every row exactly seq_len: one shape
    return [collate(rows[i:i + a.micro_batch]) for i in range(0, need, a.micro_batch)]


def ours_step(model: Any, batch: dict[str, Any]) -> torch.Tensor:
    keys = ("input_ids", "attention_mask", "labels", "position_ids", "document_ids", "cu_seq_lens", "max_seq_len",
            "target_index")
    out = model(**{k: batch[k] for k in keys}, loss_reduction="sum", loss_chunk_size=2048, return_logits=False)
    return out.loss / batch["target_index"].numel()


def hf_step(model: Any, batch: dict[str, Any]) -> torch.Tensor:
    # padding-free: packed position_ids, no attention_mask (rows are full; padding would be a document of its own)
    return model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], labels=batch["labels"],
                 use_cache=False).loss  # with a cache transformers ignores the packing in position_ids


SYSTEMS = {"ours": ours_step, "transformers+peft": hf_step}


def build(system: str, base: Any, pristine: dict[str, torch.Tensor], cfg: Any, device: torch.device) -> Any:
    """The system's trainable model over the shared frozen weights (``pristine``: the base's state dict taken
    before any LoRA was injected into it)."""
    from mistral_ft.adapters.lora import apply_peft

    lora = {"method": "lora", "r": 16, "alpha": 32, "dropout": 0.0}
    if system == "ours":
        return apply_peft(base, lora)
    import transformers
    from peft import get_peft_model

    from mistral_ft.adapters.lora import lora_config

    hf_cfg = transformers.MistralConfig(**{k: getattr(cfg, k) for k in SIZES["tiny"]}, head_dim=cfg.head_dim,
                                        rms_norm_eps=cfg.rms_norm_eps, rope_theta=cfg.rope_theta, tie_word_embeddings=False)
    with torch.device(device):
        hf = transformers.MistralForCausalLM._from_config(hf_cfg, attn_implementation="sdpa", dtype=base.dtype)
    hf.load_state_dict(pristine, assign=True)  # shares our frozen weights
    return get_peft_model(hf, lora_config(lora, "causal_lm"))


def measure(system: str, model: Any, batches: list[dict[str, Any]], a: argparse.Namespace, device: torch.device):
    step = SYSTEMS[system]
    if a.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    cuda = device.type == "cuda"
    on_device = [{k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in b.items()} for b in batches]
    first_loss, t0 = None, None
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    for i, batch in enumerate(on_device):
        if i == a.warmup:
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            loss = step(model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if first_loss is None:
            first_loss = float(loss)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    timed = batches[a.warmup:]
    tokens = sum(int(b["attention_mask"].sum()) for b in timed)
    targets = sum(int(b["target_index"].numel()) for b in timed)
    return {"system": system, "first_step_loss": first_loss, "seconds": seconds, "tokens_per_s": tokens / seconds,
            "target_tokens_per_s": targets / seconds,
            "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None}


def matmul_params(cfg: Any) -> int:
    D, I, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    attn = D * hd * (cfg.num_attention_heads * 2 + cfg.num_key_value_heads * 2)
    return cfg.num_hidden_layers * (attn + 3 * D * I) + D * cfg.vocab_size


def markdown(result: dict[str, Any]) -> str:
    s = result["setup"]
    lines = [f"GPU check benchmark: {s['device_name']}, {s['layers']} layers at {s['size']} width, bf16={s['bf16']}, "
             f"LoRA r16 all-linear, packed {s['micro_batch']}x{s['seq_len']}, {s['steps']} timed steps",
             "", "| system | tokens/s | target tokens/s | MFU (4N) | peak GiB | first-step loss |",
             "|---|---|---|---|---|---|"]
    for r in result["systems"]:
        mfu = f"{100 * r['mfu_4n']:.1f} %" if r.get("mfu_4n") is not None else "n/a (CPU)"
        mem = f"{r['peak_memory_gib']:.1f}" if r["peak_memory_gib"] is not None else "n/a (CPU)"
        lines.append(f"| {r['system']} | {r['tokens_per_s']:,.0f} | {r['target_tokens_per_s']:,.0f} | {mfu} | {mem} | "
                     f"{r['first_step_loss']:.5f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    a = parse_args(argv)
    from mistral_ft.model import MistralConfig, MistralForCausalLM

    device = torch.device(a.device)
    cuda = device.type == "cuda"
    cfg = MistralConfig(**{**SIZES[a.size], **({"num_hidden_layers": a.layers} if a.layers else {})})
    cfg.attn_implementation = "auto"
    from mistral_ft.model.attention import resolve_attn_implementation

    cfg.attn_implementation = resolve_attn_implementation("auto", device)
    batches = make_batches(a, cfg.vocab_size)
    torch.manual_seed(a.seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16 if cuda else torch.float32)  # 7B built in bf16 directly
    try:
        with torch.device(device):
            base = MistralForCausalLM(cfg)
    finally:
        torch.set_default_dtype(default)
    base.requires_grad_(False)
    pristine = base.state_dict()
    n = matmul_params(cfg)
    result: dict[str, Any] = {"setup": {
        "device": a.device, "device_name": torch.cuda.get_device_name() if cuda else "cpu", "size": a.size,
        "layers": cfg.num_hidden_layers, "seq_len": a.seq_len, "micro_batch": a.micro_batch, "steps": a.steps,
        "warmup": a.warmup, "bf16": cuda, "our_attn_implementation": cfg.attn_implementation,
        "gradient_checkpointing": a.gradient_checkpointing, "matmul_params": n, "peak_tflops": a.peak_tflops,
        "torch": torch.__version__}, "systems": []}
    for system in a.systems:
        torch.manual_seed(a.seed)  # the same LoRA initialisation for both
        model = build(system, base, pristine, cfg, device)
        r = measure(system, model, batches, a, device)
        r["mfu_4n"] = 4 * n * r["tokens_per_s"] / (a.peak_tflops * 1e12) if cuda else None
        result["systems"].append(r)
        print(json.dumps(r), flush=True)
        del model
        if cuda:
            torch.cuda.empty_cache()
    if a.out:
        a.out.write_text(json.dumps(result, indent=2) + "\n")
    if a.md:
        a.md.write_text(markdown(result))
    print(markdown(result))
    return result


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
