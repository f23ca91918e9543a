"""Generate the bundled preference pairs data/preference_{train,val}.jsonl from the bundled instruct chats.

    python scripts/make_preference_data.py            # writes the two files (same bytes on every run)
    python scripts/make_preference_data.py --check    # exit 1 if the committed files differ from a fresh build

chosen = the chat's correct last answer; rejected = a wrong one: every other row an unhelpful reply (one of
a few fixed phrases: a surface signal a tiny random model learns in a few dozen CPU steps), the others a
wrong answer in the same template (a sum off by one or more, another name, another colour, the letters or
words in another order: a signal that needs the prompt, learnt far more slowly). Half of the rows use the conversation shape
({"chosen": [messages], "rejected": [messages]}), half the explicit one ({"prompt", "chosen", "rejected"},
the prompt a string when it is a single user message), so both shapes of format "preference" are exercised.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data"
NAMES = ["Ana", "Ben", "Cleo", "Dan", "Eva", "Finn", "Gus", "Hana", "Ivo", "Jade", "Kai", "Lea"]
COLORS = ["blue", "green", "white", "black", "yellow", "red"]
UNHELPFUL = ["I do not know.", "Sorry, I cannot help with that.", "Ask someone else."]


def wrong(answer: str, rng: random.Random) -> str:
    """A wrong answer in the same template as `answer` (never equal to it)."""
    if m := re.fullmatch(r"(\d) plus (\d) is (\d+)\.", answer):
        total = int(m[3])
        off = rng.choice([d for d in (-3, -2, -1, 1, 2, 3) if total + d >= 0])
        return f"{m[1]} plus {m[2]} is {total + off}."
    if m := re.fullmatch(r"Hello (\w+), nice to meet you!", answer):
        return f"Hello {rng.choice([n for n in NAMES if n != m[1]])}, nice to meet you!"
    if m := re.fullmatch(r"The (\w+) is (\w+)\.", answer):
        return f"The {m[1]} is {rng.choice([c for c in COLORS if c != m[2]])}."
    words = answer.split(" ")
    if len(set(words)) > 1:
        shuffled = words[:]
        while shuffled == words:
            rng.shuffle(shuffled)
        return " ".join(shuffled)
    return answer + " " + answer  # a one-letter spelling: repeated is wrong


def pairs(source: Path, n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = [json.loads(line) for line in source.read_text().splitlines() if line.strip()][:n]
    out = []
    for i, row in enumerate(rows):
        msgs = [{k: v for k, v in m.items() if k != "weight"} for m in row["messages"]]
        prompt, answer = msgs[:-1], msgs[-1]["content"]
        bad = rng.choice(UNHELPFUL) if i % 4 in (1, 2) else wrong(answer, rng)
        if i % 2 == 0:
            out.append({"chosen": msgs, "rejected": prompt + [{"role": "assistant", "content": bad}]})
        else:
            simple = len(prompt) == 1 and prompt[0]["role"] == "user"
            out.append({"prompt": prompt[0]["content"] if simple else prompt, "chosen": answer, "rejected": bad})
    return out


def build() -> dict[str, str]:
    files = {"preference_train.jsonl": pairs(DATA / "instruct_train.jsonl", 200, 0),
             "preference_val.jsonl": pairs(DATA / "instruct_val.jsonl", 40, 1)}
    return {name: "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows) for name, rows in files.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only compare with the committed files")
    args = parser.parse_args()
    stale = []
    for name, text in build().items():
        path = DATA / name
        if args.check:
            if not path.is_file() or path.read_text() != text:
                stale.append(name)
        else:
            path.write_text(text)
    if stale:
        print(f"stale: {stale}; run python scripts/make_preference_data.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
