"""Generate the small bundled datasets under data/ (deterministic: same bytes on every run).

    python scripts/make_data.py            # writes data/*.jsonl
    python scripts/make_data.py --check    # exit 1 if the committed files differ from a fresh build

Why synthetic: the embedded default (`model=tiny`, a small random model) must show learning in about
100 CPU steps, with nothing downloaded. So the answers are short templates a small model picks up
fast (the same few phrasings, answers copied or looked up from the prompt), and the
classification texts carry strongly class-indicative words.

    instruct_{train,val}.jsonl  messages format: optional system prompt, 1-2 turns; some earlier
                                assistant turns have weight 0 (in the context, not trained on)
    classify_{train,val}.jsonl  text + label, 3 classes (sports / weather / food)
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "data"

NAMES = ["Ana", "Ben", "Cleo", "Dan", "Eva", "Finn", "Gus", "Hana", "Ivo", "Jade", "Kai", "Lea",
         "Max", "Nora", "Omar", "Pia"]
COLORS = {"sky": "blue", "grass": "green", "snow": "white", "coal": "black", "banana": "yellow", "tomato": "red"}
WORDS = ["cat", "dog", "sun", "hat", "pen", "cup", "box", "map", "egg", "bus"]
SYSTEMS = ["You are a helpful assistant.", "Answer briefly."]

# The held-out split asks prompts the training file never contains (a test checks it): sums of pairs, names
# and word triples that are held out of training. Colours (facts) and spelling (the letters of a word the
# model never saw spelled) cannot be held out this way, so they appear in training and as context only.
HELD_SUMS = {(a, b) for a in range(10) for b in range(10) if (a + 3 * b) % 5 == 0}
HELD_NAMES = {"Max", "Nora", "Omar", "Pia"}


def _held_triple(words: list[str]) -> bool:
    return sum(WORDS.index(w) * (i + 1) for i, w in enumerate(words)) % 5 == 0


def _turn(rng: random.Random, held: bool | None) -> tuple[str, str]:
    """One (question, answer) pair from one of five templates; ``held``: True = held-out items only (and only
    the three tasks that have them), False = never a held-out item, None = any (context turns of val rows)."""
    kind = rng.choice([0, 1, 4]) if held else rng.randrange(5)
    if kind == 0:
        while True:
            a, b = rng.randrange(10), rng.randrange(10)
            if held is None or ((a, b) in HELD_SUMS) == held:
                return f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."
    if kind == 1:
        while True:
            name = rng.choice(NAMES)
            if held is None or (name in HELD_NAMES) == held:
                return f"Greet {name}.", f"Hello {name}, nice to meet you!"
    if kind == 2:
        thing = rng.choice(sorted(COLORS))
        return f"What color is the {thing}?", f"The {thing} is {COLORS[thing]}."
    if kind == 3:
        word = rng.choice(WORDS)
        return f"Spell the word {word}.", " ".join(word)
    while True:
        words = rng.sample(WORDS, 3)
        if held is None or _held_triple(words) == held:
            return f"Repeat after me: {' '.join(words)}", " ".join(words)


def instruct_rows(n: int, seed: int, held: bool) -> list[dict]:
    """``held=False``: training rows (no held-out item anywhere); True: validation rows whose last
    (scored) question is held out of training."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        messages = []
        if rng.random() < 0.2:
            messages.append({"role": "system", "content": rng.choice(SYSTEMS)})
        turns = 2 if rng.random() < 0.25 else 1
        for t in range(turns):
            last = t == turns - 1
            q, a = _turn(rng, True if (held and last) else False)
            messages.append({"role": "user", "content": q})
            msg = {"role": "assistant", "content": a}
            if not last and rng.random() < 0.5:
                msg["weight"] = 0  # context only: exercises masked assistant turns
            messages.append(msg)
        rows.append({"messages": messages})
    return rows


CLASS_WORDS = {
    "sports": ["goal", "match", "team", "score", "player", "coach", "stadium", "referee"],
    "weather": ["rain", "sunny", "cloud", "storm", "wind", "snowfall", "forecast", "thunder"],
    "food": ["pizza", "bread", "soup", "cheese", "salad", "pasta", "dessert", "recipe"],
}
FILLERS = ["today", "yesterday", "this morning", "in the city", "at noon", "again", "for everyone"]
TEMPLATES = [
    "The {w1} was great {f}.",
    "Everyone talked about the {w1} and the {w2} {f}.",
    "I think the {w1} {f} beat the {w2}.",
    "{W1} and {w2} {f}.",
    "News: {w1}, {w2} {f}.",
]


def classify_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    labels = sorted(CLASS_WORDS)
    rows = []
    for i in range(n):
        label = labels[i % len(labels)]  # balanced classes
        w1, w2 = rng.sample(CLASS_WORDS[label], 2)
        text = rng.choice(TEMPLATES).format(w1=w1, W1=w1.capitalize(), w2=w2, f=rng.choice(FILLERS))
        rows.append({"text": text, "label": label})
    rng.shuffle(rows)
    return rows


def build() -> dict[str, str]:
    """File name -> JSONL text."""
    files = {
        "instruct_train.jsonl": instruct_rows(400, seed=1, held=False),
        "instruct_val.jsonl": instruct_rows(60, seed=2, held=True),
        "classify_train.jsonl": classify_rows(300, seed=3),
        "classify_val.jsonl": classify_rows(60, seed=4),
    }
    return {name: "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows) for name, rows in files.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with data/ instead of writing")
    parser.add_argument("--out", type=Path, default=OUT, help="output folder (default: data/)")
    args = parser.parse_args(argv)
    stale = []
    for name, text in build().items():
        path = args.out / name
        if args.check:
            if not path.exists() or path.read_text(encoding="utf-8") != text:
                stale.append(name)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
            print(f"wrote {path} ({text.count(chr(10))} rows, {len(text.encode())} bytes)")
    if stale:
        print(f"stale: {stale}; run python scripts/make_data.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
