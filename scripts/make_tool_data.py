"""Write data/tools_train.jsonl: small function-calling conversations for the v3 / v7 / Tekken tokenizers.

Deterministic (fixed seed), in the OpenAI / mistral-finetune shape that `data.format=messages` reads: top-level
`tools`, assistant `tool_calls` (ids of 9 alphanumerics, as v3 requires), `tool` results with `tool_call_id`, and a
final assistant answer. Some rows make two calls in one turn; some end with a plain chat turn without tools.
Run `python scripts/make_tool_data.py` (`--check` verifies the committed file is fresh).
"""

from __future__ import annotations

import argparse
import json
import random
import string
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "data" / "tools_train.jsonl"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current temperature in a city, in Celsius",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
ADD = {"type": "function", "function": {
    "name": "add", "description": "Sum of two integers",
    "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                   "required": ["a", "b"]}}}
CITIES = ["Paris", "Rome", "Oslo", "Lima", "Kyiv", "Doha", "Bern", "Rabat", "Quito", "Hanoi", "Accra", "Riga"]


def _id(rng: random.Random) -> str:
    return "".join(rng.choice(string.ascii_letters + string.digits) for _ in range(9))


def _call(rng: random.Random, name: str, arguments: dict) -> dict:
    return {"id": _id(rng), "type": "function", "function": {"name": name, "arguments": arguments}}


def rows(seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(48):
        kind = i % 3
        if kind == 0:  # one call, its result, the answer
            city, temp = rng.choice(CITIES), rng.randint(-5, 35)
            call = _call(rng, "get_weather", {"city": city})
            messages = [{"role": "user", "content": f"What is the weather in {city}?"},
                        {"role": "assistant", "tool_calls": [call]},
                        {"role": "tool", "tool_call_id": call["id"], "content": f"{temp}"},
                        {"role": "assistant", "content": f"It is {temp} degrees Celsius in {city}."}]
        elif kind == 1:  # two calls in one turn
            a, b = rng.sample(CITIES, 2)
            ta, tb = rng.randint(-5, 35), rng.randint(-5, 35)
            ca, cb = _call(rng, "get_weather", {"city": a}), _call(rng, "get_weather", {"city": b})
            messages = [{"role": "user", "content": f"Compare the weather in {a} and {b}."},
                        {"role": "assistant", "tool_calls": [ca, cb]},
                        {"role": "tool", "tool_call_id": ca["id"], "content": f"{ta}"},
                        {"role": "tool", "tool_call_id": cb["id"], "content": f"{tb}"},
                        {"role": "assistant", "content": f"{a}: {ta} C, {b}: {tb} C."}]
        else:  # arithmetic through a tool, then a follow-up chat turn without a call
            x, y = rng.randint(1, 99), rng.randint(1, 99)
            call = _call(rng, "add", {"a": x, "b": y})
            messages = [{"role": "user", "content": f"Add {x} and {y}."},
                        {"role": "assistant", "tool_calls": [call]},
                        {"role": "tool", "tool_call_id": call["id"], "content": f"{x + y}"},
                        {"role": "assistant", "content": f"{x} + {y} = {x + y}."},
                        {"role": "user", "content": "Thanks!"},
                        {"role": "assistant", "content": "You are welcome."}]
        out.append({"tools": [WEATHER, ADD], "messages": messages})
    return out


def render() -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows())


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the committed file differs")
    args = parser.parse_args()
    if args.check:
        sys.exit(0 if OUT.read_text() == render() else 1)
    OUT.write_text(render())
    print(f"wrote {OUT} ({len(rows())} rows)")
