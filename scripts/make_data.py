"""Generate the small bundled datasets under data/ (deterministic: same bytes on every run).

    python scripts/make_data.py            # writes data/*.jsonl
    python scripts/make_data.py --check    # exit 1 if the committed files differ from a fresh build

Why synthetic: the embedded default (`model=tiny`, a 4 M-parameter base pre-trained on plain text by
scripts/build_tiny_base.py) must visibly learn in a few CPU minutes, with nothing downloaded. So the answers
are short templates whose content is copied from the prompt (greetings, repetitions), and the
classification texts carry strongly class-indicative words.

    instruct_{train,val}.jsonl  messages format: optional system prompt, 1-2 turns; some earlier
                                assistant turns have weight 0 (in the context, not trained on); the
                                validation rows' last question is held out of training
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

NAMES = ["Ana", "Ben", "Cleo", "Dan", "Eva", "Finn", "Gus", "Hana", "Ivo", "Jade", "Kai", "Lea", "Max", "Nora",
         "Omar", "Pia", "Rosa", "Sam", "Tara", "Uma", "Vera", "Will", "Yara", "Zoe", "Alan", "Bella", "Carl",
         "Dora", "Emil", "Fay", "Greta", "Hugo", "Iris", "Jon", "Kim", "Luca", "Mia", "Nils", "Olga", "Paul",
         "Rita", "Tom", "Ugo", "Vince", "Wanda", "Xena", "Yves", "Zack"]
WORDS = ["cat", "dog", "sun", "hat", "pen", "cup", "box", "map", "egg", "bus", "tree", "fish", "bird", "cake",
         "door", "lamp", "ship", "star", "rain", "milk", "book", "ball", "coat", "road", "moon", "shoe", "bell",
         "rock", "leaf", "ring", "sock", "fork"]
COLORS = {"sky": "blue", "grass": "green", "snow": "white", "coal": "black", "banana": "yellow", "tomato": "red"}
SYSTEMS = ["You are a helpful assistant.", "Answer briefly."]

# The held-out split's scored question is one the training file never contains (a test checks it): a greeting of
# a name that no training chat mentions, or a repetition of a word triple that no training chat asks for. Both
# are copying tasks: the answer is built from the prompt, so a base that learned to copy from plain text
# (scripts/build_tiny_base.py) can learn the answer template from the training chats and fill in unseen content.
# The colour facts are trained on but not scored (a fact cannot be held out and still be known).
HELD_NAMES = set(NAMES[3::4])  # 12 of 48


def held_triple(words: list[str]) -> bool:
    return sum(WORDS.index(w) * (i + 1) for i, w in enumerate(words)) % 5 == 0


def _turn(rng: random.Random, held: bool | None) -> tuple[str, str]:
    """One (question, answer) pair; ``held``: True = a held-out item (greeting or repetition only),
    False = never a held-out item, None = any (context turns of val rows)."""
    kind = rng.choice([0, 1]) if held else rng.choice([0, 0, 1, 1, 2])
    if kind == 0:
        while True:
            name = rng.choice(NAMES)
            if held is None or (name in HELD_NAMES) == held:
                return f"Greet {name}.", f"Hello {name}, nice to meet you!"
    if kind == 1:
        while True:
            words = rng.sample(WORDS, 3)
            if held is None or held_triple(words) == held:
                return f"Repeat after me: {' '.join(words)}", " ".join(words)
    thing = rng.choice(sorted(COLORS))
    return f"What color is the {thing}?", f"The {thing} is {COLORS[thing]}."


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
