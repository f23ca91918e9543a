"""Pre-train the embedded default base (``model=tiny``) once on generated plain text; writes the shipped safetensors.

    nice -n 5 python scripts/build_tiny_base.py            # writes mistral_ft/model/tiny_base/ (~20 min, 2 cores)
    python scripts/build_tiny_base.py --steps 200 --out /tmp/b   # a quick experiment

Why a pre-trained base: a LoRA on a *random* tiny model cannot learn in minutes to copy a held-out name or word
from the prompt into its answer (measured: 0 % exact match). Copying from context (an "induction" circuit) is
what this plain-text pre-training teaches; the chat fine-tune then only has to learn the answer templates.
Why shipped rather than rebuilt on first use: float results differ across CPU types, so a rebuild would not give
the same bytes, and it costs minutes. The checksum of the shipped file is in tests/unit/model/test_tiny.py.

The corpus (:func:`corpus`) is plain English-like text over the bundled chats' names and words: word lists
that repeat, short stories in which names recur. It never contains the chat format (no ``[INST]``, no special
tokens in the text; each document is encoded as the ``text`` data format encodes it: BOS + text + EOS), never a
validation prompt, and never a validation answer (a document containing one is dropped), so the held-out
answers cannot be memorised here; tests/unit/model/test_tiny_base.py checks all three.

Model: the tiny shape of mistral_ft/model/tiny.py (hidden 64, 2 layers, GQA 4/2, sliding window 32, the
32000-piece v1 vocabulary) with tied embeddings, stored in bfloat16 (4 MB). Training: AdamW, cosine schedule,
64-token windows; the loss is a softmax over the pieces the corpus uses (the 32000-way softmax costs ~10x the
two layers, and a piece that never occurs is the target of no token), then for the last ``--full-steps`` over
the full vocabulary (so the pieces the corpus never uses are pushed down as they are in any LM).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from make_data import NAMES, WORDS, instruct_rows  # noqa: E402  (the chats' vocabulary, one list)

from mistral_ft.model.tiny import TINY_BASE_DIR, TINY_BASE_OVERRIDES, TINY_CONFIG  # noqa: E402

SEED = 20261202
PLACES = ["park", "shop", "school", "beach", "farm", "lake", "market", "garden", "station", "zoo"]
VERBS = ["saw", "found", "had", "took", "liked", "wanted", "made", "lost", "got", "drew"]
LINKS = ["{s}. {s}.", "{s}, {s}.", "I said {s} and you said {s}.", "first {s}, then {s} again.",
         "The list is {s}. Once more: {s}.", "{s}? Yes, {s}.", "We sang {s}, then {s}, then {s}."]
STORIES = [
    "{A} met {B} at the {p}. {B} said hello to {A}.",
    "This is {A}. {A} {v} a {w} at the {p}.",
    "{A} and {B} went to the {p}. {A} {v} a {w} and {B} {v} a {x}.",
    "Hello, said {A}. Nice to see you, {B}. {B} smiled at {A}.",
    "{A} wrote a letter to {B}: dear {B}, I {v} a {w}. Love, {A}.",
    "Who is at the door? It is {A}. Come in, {A}!",
    "{A} asked {B} for a {w}. {B} gave {A} the {w}.",
    "My name is {A}. Please call me {A}. It was nice to meet {B} today.",
    "Good morning, {A}! Good morning, {B}! said {A}.",
]


def _words(rng: random.Random) -> list[str]:
    pool = WORDS if rng.random() < 0.7 else WORDS + NAMES + PLACES
    return rng.sample(pool, rng.randint(2, 6))


def document(rng: random.Random) -> str:
    """One short plain-text document: a repeated word list (copying) or a story in which names recur."""
    if rng.random() < 0.6:
        return rng.choice(LINKS).format(s=" ".join(_words(rng)))  # not capitalised: the copy must be token for token
    a, b = rng.sample(NAMES, 2)
    w, x = rng.sample(WORDS, 2)
    return rng.choice(STORIES).format(A=a, B=b, p=rng.choice(PLACES), v=rng.choice(VERBS), w=w, x=x)


def forbidden_strings() -> list[str]:
    """What the corpus must never contain: the chat format, special tokens, and every validation prompt and answer."""
    out = ["[INST]", "[/INST]", "<s>", "</s>", "<unk>"]
    for row in instruct_rows(60, seed=2, held=True):  # the validation split, as make_data.py builds it
        out += [m["content"] for m in row["messages"] if m["role"] != "system"]
    return sorted(set(out))


def corpus(n_docs: int, seed: int = SEED) -> list[str]:
    """``n_docs`` documents (seeded); any containing a forbidden string is dropped and redrawn."""
    rng = random.Random(seed)
    banned = forbidden_strings()
    docs = []
    while len(docs) < n_docs:
        d = document(rng)
        if not any(b in d for b in banned):
            docs.append(d)
    return docs


def token_stream(docs: list[str], tok) -> torch.Tensor:
    """The documents encoded as the ``text`` data format does (BOS + text + EOS), concatenated."""
    ids: list[int] = []
    for d in docs:
        ids += tok.encode(d, add_bos=True, add_eos=True)
    return torch.tensor(ids, dtype=torch.long)


def save(model, out: Path) -> None:
    """The model as a bfloat16 HF folder (config.json, generation_config.json, model.safetensors)."""
    import copy

    out.parent.mkdir(parents=True, exist_ok=True)
    shipped = copy.deepcopy(model).eval().to(torch.bfloat16)
    shipped.config.torch_dtype = "bfloat16"
    shipped.save_pretrained(out)


def train(args) -> dict:
    from mistral_ft.model.config import MistralConfig
    from mistral_ft.model.modeling import MistralForCausalLM
    from mistral_ft.tokenizer import MistralTokenizer

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    tok = MistralTokenizer.from_pretrained(None)
    t0 = time.time()
    stream = token_stream(corpus(args.docs, args.seed), tok)
    active = torch.unique(stream)  # the pieces the corpus uses
    remap = torch.full((TINY_CONFIG["vocab_size"],), -1, dtype=torch.long)
    remap[active] = torch.arange(len(active))
    config = MistralConfig(**{**TINY_CONFIG, **TINY_BASE_OVERRIDES})
    model = MistralForCausalLM(config)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01)
    L, B = args.seq, args.batch
    n_windows = (len(stream) - 1) // L
    gen = torch.Generator().manual_seed(args.seed)
    full_from = args.steps - args.full_steps
    log = []
    print(f"corpus: {args.docs} docs, {len(stream)} tokens, {len(active)} distinct pieces; {n_windows} windows of {L}",
          flush=True)
    for step in range(args.steps):
        lr = args.lr * min(1.0, (step + 1) / args.warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / args.steps)))
        for g in opt.param_groups:
            g["lr"] = lr
        b = B if step < full_from else args.full_batch
        starts = torch.randint(0, n_windows, (b,), generator=gen) * L
        x = torch.stack([stream[s:s + L] for s in starts])
        y = torch.stack([stream[s + 1:s + L + 1] for s in starts])
        h = model.model(x).last_hidden_state
        if step < full_from:
            logits = h @ model.lm_head.weight[active].T
            loss = F.cross_entropy(logits.flatten(0, 1), remap[y].flatten())
        else:
            loss = F.cross_entropy(model.lm_head(h).flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step} loss {loss.item():.3f} ({'active' if step < full_from else 'full'}) "
                  f"{time.time() - t0:.0f}s", flush=True)
            log.append((step, round(loss.item(), 4)))
        if args.snapshot_every and step and step % args.snapshot_every == 0:  # for experiments while it runs
            save(model, Path(f"{args.out}.step{step}"))
    out = Path(args.out)
    save(model, out)
    info = {"seed": args.seed, "steps": args.steps, "batch": B, "seq": L, "lr": args.lr, "docs": args.docs,
            "full_steps": args.full_steps, "full_batch": args.full_batch, "corpus_tokens": len(stream), "active_pieces": len(active),
            "seconds": round(time.time() - t0), "threads": args.threads, "loss_log": log,
            "torch": torch.__version__}
    (out / "build_info.json").write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {out} in {info['seconds']} s", flush=True)
    return info


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(TINY_BASE_DIR))
    p.add_argument("--steps", type=int, default=4500)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--docs", type=int, default=60000)
    p.add_argument("--full-steps", type=int, default=40, help="last steps with the 32000-way softmax")
    p.add_argument("--full-batch", type=int, default=8, help="their batch (the full softmax costs ~10x a step)")
    p.add_argument("--threads", type=int, default=1, help="1: on a shared CPU two threads spin-wait on each other (measured 10x slower)")
    p.add_argument("--seed", type=int, default=SEED)
    p.add_argument("--snapshot-every", type=int, default=0, help="also save OUT.stepN every N steps")
    train(p.parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
