"""Row formats: validate one raw row, and turn a valid row into token ids and labels.

A raw row is whatever the file gives (a JSON object, a CSV record of strings, a parquet /
`datasets` row where a missing key reads as None). `normalize_row` checks it and returns a small
canonical dict; `tokenize_causal` / `tokenize_sequence` turn that into ids. Keeping the two apart
lets us validate a whole file before loading it through `datasets` (which would hide the line of a
bad row) and validate again, identically, the rows `datasets` hands back.

Canonical rows:
    text            {"text": str}
    alpaca          {"messages": [user, assistant]}   user = instruction + ("\\n\\n" + input if input)
    messages        {"messages": [{"role", "content", "weight" (0 | 1; 1 on non-assistant)}, ...]}
    classification  {"text": str, "label": str | int}  (name or id; ids are resolved later)
    regression      {"text": str, "label": float}
    preference      {"prompt": [messages ending with user], "chosen": str, "rejected": str}  (see normalize_pair)
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Any, Optional, Protocol

from mistral_ft.data.config import DataConfig
from mistral_ft.data.errors import RowError

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant")
_INT_RE = re.compile(r"^[+-]?\d+$")


class ChatTokenizer(Protocol):
    """What the data pipeline needs from `mistral_ft.tokenizer.MistralTokenizer`."""

    bos_token_id: int
    eos_token_id: int
    pad_token_id: int

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = False) -> list[int]: ...

    def encode_chat(self, messages: list[dict[str, Any]]) -> tuple[list[int], list[bool]]: ...


def _field(row: Mapping[str, Any], name: str) -> Any:
    if name not in row:
        present = ", ".join(sorted(map(str, row.keys()))) or "none"
        raise RowError(name, f"missing (fields present: {present})")
    value = row[name]
    if value is None:
        raise RowError(name, "missing (null)")
    return value


def _text(value: Any, name: str, *, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise RowError(name, f"expected a string, got {type(value).__name__} {value!r:.60}")
    if not allow_empty and not value.strip():
        raise RowError(name, "empty text")
    return value


def _messages(value: Any, name: str, from_csv: bool) -> list[dict[str, Any]]:
    if from_csv and isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise RowError(name, f"CSV cell is not a JSON list of messages ({err.msg})") from None
    if not isinstance(value, list):
        raise RowError(name, f"expected a list of messages, got {type(value).__name__}")
    if not value:
        raise RowError(name, "empty list of messages")
    out: list[dict[str, Any]] = []
    for i, msg in enumerate(value):
        where = f"{name}[{i}]"
        if not isinstance(msg, Mapping):
            raise RowError(where, f"expected an object with 'role' and 'content', got {type(msg).__name__}")
        role = msg.get("role")
        if role is None:
            raise RowError(f"{where}.role", "missing")
        if not isinstance(role, str) or role not in ROLES:
            raise RowError(f"{where}.role", f"unknown role {role!r} (expected one of {list(ROLES)})")
        if msg.get("content") is None:
            raise RowError(f"{where}.content", "missing")
        content = _text(msg["content"], f"{where}.content")
        weight = msg.get("weight")
        if weight is not None and role != "assistant":
            raise RowError(f"{where}.weight", f"only allowed on assistant messages (this one is {role!r})")
        if weight is None:
            weight = 1
        elif isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight not in (0, 1):
            raise RowError(f"{where}.weight", f"expected 0 or 1, got {weight!r}")
        out.append({"role": role, "content": content, "weight": int(weight)})
    # v1 [INST] format: optional system first, then user/assistant strictly alternating, user first.
    turns = out[1:] if out[0]["role"] == "system" else out
    for i, msg in enumerate(turns):
        idx = i + (len(out) - len(turns))
        expected = "user" if i % 2 == 0 else "assistant"
        if msg["role"] != expected:
            raise RowError(
                f"{name}[{idx}].role",
                f"expected {expected!r} here, got {msg['role']!r} (optional system first, then user/assistant alternating)",
            )
    if not turns or turns[-1]["role"] != "assistant":
        raise RowError(name, "the conversation must end with an assistant message")
    if not any(m["role"] == "assistant" and m["weight"] != 0 for m in turns):
        raise RowError(name, "no assistant message with weight != 0: nothing to learn from this row")
    return out


def _class_label(value: Any, name: str, from_csv: bool) -> str | int:
    if from_csv and isinstance(value, str) and _INT_RE.match(value.strip()):
        return int(value)
    if isinstance(value, bool):
        raise RowError(name, f"expected a label name (string) or id (int), got bool {value!r}")
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        if not value.strip():
            raise RowError(name, "empty label name")
        return value
    raise RowError(name, f"expected a label name (string) or id (int), got {type(value).__name__} {value!r:.60}")


def _float_target(value: Any, name: str, from_csv: bool) -> float:
    if from_csv and isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise RowError(name, f"expected a number, got {value!r:.60}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RowError(name, f"expected a number, got {type(value).__name__} {value!r:.60}")
    if not math.isfinite(value):
        raise RowError(name, f"expected a finite number, got {value!r}")
    return float(value)


def normalize_row(row: Any, cfg: DataConfig, *, from_csv: bool = False) -> dict[str, Any]:
    """Validate one raw row for `cfg.format`; return its canonical form or raise `RowError`.

    `from_csv`: cells are strings, so messages are parsed as JSON, integer-looking labels become
    ids and regression targets are parsed as floats.
    """
    if not isinstance(row, Mapping):
        raise RowError("<row>", f"expected a JSON object, got {type(row).__name__}")
    fmt = cfg.format
    if fmt == "text":
        return {"text": _text(_field(row, cfg.text_field), cfg.text_field)}
    if fmt == "alpaca":
        instruction = _text(_field(row, cfg.instruction_field), cfg.instruction_field)
        extra = row.get(cfg.input_field)
        extra = "" if extra is None else _text(extra, cfg.input_field, allow_empty=True)
        output = _text(_field(row, cfg.output_field), cfg.output_field)
        user = instruction + ("\n\n" + extra if extra.strip() else "")
        return {
            "messages": [
                {"role": "user", "content": user, "weight": 1},
                {"role": "assistant", "content": output, "weight": 1},
            ]
        }
    if fmt == "messages":
        return {"messages": _messages(_field(row, cfg.messages_field), cfg.messages_field, from_csv)}
    if fmt == "classification":
        text = _text(_field(row, cfg.text_field), cfg.text_field)
        return {"text": text, "label": _class_label(_field(row, cfg.label_field), cfg.label_field, from_csv)}
    if fmt == "regression":
        text = _text(_field(row, cfg.text_field), cfg.text_field)
        return {"text": text, "label": _float_target(_field(row, cfg.label_field), cfg.label_field, from_csv)}
    if fmt == "preference":
        return normalize_pair(row, cfg, from_csv)
    raise ValueError(f"unknown format {fmt!r}")  # DataConfig.validate rules this out


# ---- preference pairs (tokenized and batched in data/preference.py) ---------------------------------------------------------------------------------------
def _prompt_messages(value: Any, name: str, from_csv: bool) -> list[dict[str, Any]]:
    if isinstance(value, str) and not (from_csv and value.lstrip().startswith("[")):
        return [{"role": "user", "content": _text(value, name)}]
    if from_csv and isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise RowError(name, f"CSV cell is not a string prompt nor a JSON list of messages ({err.msg})") from None
    if not isinstance(value, list) or not value:
        raise RowError(name, f"expected a string or a non-empty list of messages, got {type(value).__name__}")
    last = value[-1].get("role") if isinstance(value[-1], Mapping) else None
    if last in ("assistant", "system"):
        raise RowError(f"{name}[{len(value) - 1}].role", f"a prompt must end with a user message, got {last!r}")
    # the message checks of format "messages", on the prompt plus a placeholder answer
    return _messages(list(value) + [{"role": "assistant", "content": "-"}], name, False)[:-1]


def _answer(value: Any, name: str, from_csv: bool) -> str:
    if from_csv and isinstance(value, str) and value.lstrip().startswith("["):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            pass  # a plain answer that happens to start with "["
    if isinstance(value, list):  # TRL's conversational form: [{"role": "assistant", "content": ...}]
        if len(value) != 1 or not isinstance(value[0], Mapping):
            raise RowError(name, f"expected one assistant message, got a list of {len(value)} items")
        if value[0].get("role") != "assistant":
            raise RowError(f"{name}[0].role", f"expected 'assistant', got {value[0].get('role')!r}")
        if value[0].get("content") is None:
            raise RowError(f"{name}[0].content", "missing")
        return _text(value[0]["content"], f"{name}[0].content")
    return _text(value, name)


def normalize_pair(row: Mapping[str, Any], cfg: DataConfig, from_csv: bool = False) -> dict[str, Any]:
    """One raw preference row -> {"prompt": [messages], "chosen": str, "rejected": str}, or `RowError`."""
    cf, rf = cfg.chosen_field, cfg.rejected_field
    if row.get(cfg.prompt_field) is not None:
        prompt = _prompt_messages(row[cfg.prompt_field], cfg.prompt_field, from_csv)
        chosen, rejected = _answer(_field(row, cf), cf, from_csv), _answer(_field(row, rf), rf, from_csv)
    else:  # (a null prompt counts as absent: `datasets` fills a field missing in some rows with None)
        conv_c = _messages(_field(row, cf), cf, from_csv)
        conv_r = _messages(_field(row, rf), rf, from_csv)
        key = lambda m: (m["role"], m["content"])  # noqa: E731
        shared = next((i for i, (a, b) in enumerate(zip(conv_c, conv_r)) if key(a) != key(b)), min(len(conv_c), len(conv_r)))
        if len(conv_c) != len(conv_r) or shared < len(conv_c) - 1:
            raise RowError(
                f"{rf}[{shared}]",
                f"differs from {cf}[{shared}]: chosen and rejected conversations must share every message "
                "but the last (the prompt), and end with one assistant answer each",
            )
        prompt = [{"role": m["role"], "content": m["content"], "weight": m["weight"]} for m in conv_c[:-1]]
        chosen, rejected = conv_c[-1]["content"], conv_r[-1]["content"]
    if chosen == rejected:
        raise RowError(rf, "identical to the chosen answer: a pair must prefer one answer over a different one")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}



def tokenize_causal(row: dict[str, Any], tokenizer: ChatTokenizer) -> tuple[list[int], list[int]]:
    """Canonical causal row -> (input_ids, labels), labels UNSHIFTED (the model shifts by one).

    labels[i] = input_ids[i] where token i is a target, else -100. BOS is never a target.
    text: every token after BOS is a target, EOS included (the model must learn to stop).
    chat: `encode_chat`'s target mask (assistant answers with weight != 0 and their EOS).
    """
    if "text" in row:
        ids = tokenizer.encode(row["text"], add_bos=True, add_eos=True)
        mask = [False] + [True] * (len(ids) - 1)
    else:
        # weight only on assistant messages: that is where the tokenizer accepts (and uses) it
        messages = [
            {"role": m["role"], "content": m["content"], **({"weight": m["weight"]} if m["role"] == "assistant" else {})}
            for m in row["messages"]
        ]
        ids, mask = tokenizer.encode_chat(messages)
    if len(ids) != len(mask):
        raise RuntimeError(f"tokenizer returned {len(ids)} ids but {len(mask)} mask entries")
    if ids and ids[0] == tokenizer.bos_token_id:
        mask = [False] + list(mask[1:])
    labels = [tok if target else IGNORE_INDEX for tok, target in zip(ids, mask)]
    return list(ids), labels


def tokenize_sequence(row: dict[str, Any], tokenizer: ChatTokenizer) -> list[int]:
    """Classification / regression text -> ids with BOS, no EOS (the head pools the last real token)."""
    return tokenizer.encode(row["text"], add_bos=True, add_eos=False)


def build_label_map(
    raw_labels: list[str | int], given: Optional[list[str]]
) -> tuple[list[str], bool]:
    """Label names in id order, and whether the train split used int ids.

    `given` (the config's `labels:`) wins; otherwise names are the sorted distinct names of the
    train split, or, when the split uses int ids, "0".."max". Sorting makes the mapping
    independent of row order, so the same data always gives the same head.
    """
    if given is not None:
        return list(given), False
    if not raw_labels:
        return [], False
    ints = [x for x in raw_labels if isinstance(x, int)]
    if ints and len(ints) == len(raw_labels):
        top = max(ints)
        return [str(i) for i in range(top + 1)], True
    return sorted({str(x) for x in raw_labels}), False


def resolve_label(value: str | int, names: list[str], field: str, from_ids: bool) -> int:
    """Label name or id -> id, with the errors a user can act on."""
    if isinstance(value, int):
        if not 0 <= value < len(names):
            raise RowError(field, f"label id {value} out of range [0, {len(names)}) (labels: {names})")
        return value
    if from_ids and value not in names:
        raise RowError(field, f"label name {value!r} given, but the train split uses int ids 0..{len(names) - 1}")
    try:
        return names.index(value)
    except ValueError:
        raise RowError(field, f"unknown label name {value!r} (known: {names})") from None
