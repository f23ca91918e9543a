"""Row formats: validate one raw row, and turn a valid row into token ids and labels.

A raw row is whatever the file gives (a JSON object, a CSV record of strings, a parquet /
`datasets` row where a missing key reads as None). `normalize_row` checks it and returns a small
canonical dict; `tokenize_causal` / `tokenize_sequence` turn that into ids. Keeping the two apart
lets us validate a whole file before loading it through `datasets` (which would hide the line of a
bad row) and validate again, identically, the rows `datasets` hands back.

Canonical rows:
    text            {"text": str}
    alpaca          {"messages": [user, assistant]}   user = instruction + ("\\n\\n" + input if input)
    messages        {"messages": [{"role", "content", "weight" (0 | 1; 1 on non-assistant)}, ...], "tools"?: [...]}
                    assistant: optional "tool_calls" [{id, type, function: {name, arguments}}] (content
                    then may be None); tool: "tool_call_id". A content may also come as OpenAI content
                    parts [{"type": "text", "text": ...}, ...]: the texts are joined as mistral_common
                    joins text chunks ("\n\n", empty parts skipped); other part types are refused.
    sharegpt        {"messages": [...]} as above, from {"conversations": [{"from", "value"}, ...]}
                    (SHAREGPT_ROLES maps `from` to a role)
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
from mistral_ft.tokenizer.files import TOOL_VERSIONS, ChatError

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant", "tool")
# ShareGPT `from` -> our role. The names the ShareGPT dumps (FastChat, Vicuna) and LLaMA-Factory / axolotl use.
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant"}
# ShareGPT's tool turns carry no call ids, so a call and its result cannot be paired as the tool formats need.
SHAREGPT_TOOL_ROLES = ("tool", "function_call", "observation", "function", "tool_call", "tool_response")
# mistral_common's normalizer (v1..v13 requests) joins adjacent text chunks of one message with this.
TEXT_PART_JOIN = "\n\n"
_INT_RE = re.compile(r"^[+-]?\d+$")


class ChatTokenizer(Protocol):
    """What the data pipeline needs from `mistral_ft.tokenizer.MistralTokenizer`."""

    bos_token_id: int
    eos_token_id: int
    pad_token_id: int
    vocab_size: int

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = False) -> list[int]: ...

    def encode_chat(
        self, messages: list[dict[str, Any]], tools: Any = None, add_generation_prompt: bool = False
    ) -> tuple[list[int], list[bool]]: ...


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
    """Validate a conversation: roles system | user | assistant | tool, OpenAI / mistral-finetune shapes.

    Plain rows (no tool calls, no tool messages) keep the strict rule every version can encode: optional
    system first, then user/assistant alternating, user first. Tool rows follow the function-calling
    order instead (an assistant ``tool_calls`` turn, then one ``tool`` message per call, matched by
    ``tool_call_id``); whether the tokenizer can encode tools at all is checked at tokenization, where
    the version is known.
    """
    value = _maybe_json(value, name, from_csv, "a JSON list of messages")
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
        weight = msg.get("weight")
        if weight is not None and role != "assistant":
            raise RowError(f"{where}.weight", f"only allowed on assistant messages (this one is {role!r})")
        if weight is None:
            weight = 1
        elif isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight not in (0, 1):
            raise RowError(f"{where}.weight", f"expected 0 or 1, got {weight!r}")
        tool_calls = msg.get("tool_calls")
        if tool_calls is not None and role != "assistant":
            raise RowError(f"{where}.tool_calls", f"only allowed on assistant messages (this one is {role!r})")
        if tool_calls is not None and not (isinstance(tool_calls, list) and tool_calls == []):
            calls = [_tool_call(c, f"{where}.tool_calls[{j}]") for j, c in enumerate(_list(tool_calls, f"{where}.tool_calls"))]
            content = msg.get("content")
            if content is not None and not (isinstance(content, (str, list)) and not content):
                content = _content(content, f"{where}.content", role)
            else:
                content = None
            out.append({"role": role, "content": content, "tool_calls": calls, "weight": int(weight)})
            continue
        if msg.get("content") is None:
            raise RowError(f"{where}.content", "missing")
        content = _content(msg["content"], f"{where}.content", role)
        entry: dict[str, Any] = {"role": role, "content": content, "weight": int(weight)}
        if role == "tool":
            call_id = msg.get("tool_call_id")
            if not isinstance(call_id, str) or not call_id:
                raise RowError(f"{where}.tool_call_id", f"a tool message needs the id of the call it answers, got {call_id!r}")
            entry["tool_call_id"] = call_id
            if isinstance(msg.get("name"), str) and msg["name"]:
                entry["name"] = msg["name"]
        out.append(entry)
    if any(m["role"] == "tool" or "tool_calls" in m for m in out):
        _check_tool_order(out, name)
    else:
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
    if out[-1]["role"] != "assistant":
        raise RowError(name, "the conversation must end with an assistant message")
    if not any(m["role"] == "assistant" and m["weight"] != 0 for m in out):
        raise RowError(name, "no assistant message with weight != 0: nothing to learn from this row")
    return out


def _content(value: Any, name: str, role: str) -> str:
    """A message's text: a string, or OpenAI content parts [{"type": "text", "text": ...}] joined exactly as
    mistral_common joins a message's text chunks. Image / audio parts are refused: the text models this
    package trains have no input for them, and dropping them would train on a different conversation."""
    if not isinstance(value, list):
        return _text(value, name)
    if role == "tool" and len(value) > 1:  # mistral_common joins tool chunks with "" and others with "\n\n"
        raise RowError(name, "a tool message's content must be a string or a single text part")
    texts = []
    for j, part in enumerate(value):
        where = f"{name}[{j}]"
        if not isinstance(part, Mapping):
            raise RowError(where, f"expected a content part {{\"type\": \"text\", \"text\": ...}}, got {type(part).__name__}")
        kind = part.get("type")
        if kind != "text":
            raise RowError(f"{where}.type", f"content part of type {kind!r} cannot be trained: only 'text' parts are "
                                            "taken (the text models have no image or audio input); drop the part or the row")
        texts.append(_text(part.get("text"), f"{where}.text", allow_empty=True))
    return _text(TEXT_PART_JOIN.join(t for t in texts if t), name)


def _maybe_json(value: Any, name: str, from_csv: bool, what: str) -> Any:
    if from_csv and isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError as err:
            raise RowError(name, f"CSV cell is not {what} ({err.msg})") from None
    return value


def _list(value: Any, name: str) -> list[Any]:
    if not isinstance(value, list):
        raise RowError(name, f"expected a list, got {type(value).__name__}")
    return value


def _tool_call(call: Any, where: str) -> dict[str, Any]:
    """OpenAI shape {id, type: function, function: {name, arguments: JSON str | object}} -> canonical dict."""
    if not isinstance(call, Mapping):
        raise RowError(where, f"expected an object {{id, type, function}}, got {type(call).__name__}")
    call_id = call.get("id")
    if not isinstance(call_id, str) or not call_id:
        raise RowError(f"{where}.id", f"missing or not a string ({call_id!r}): tool results refer to calls by id")
    kind = call.get("type", "function")
    if kind not in (None, "function"):
        raise RowError(f"{where}.type", f"only 'function' tool calls exist, got {kind!r}")
    function = call.get("function")
    if not isinstance(function, Mapping):
        raise RowError(f"{where}.function", f"expected an object {{name, arguments}}, got {type(function).__name__}")
    fname = function.get("name")
    if not isinstance(fname, str) or not fname:
        raise RowError(f"{where}.function.name", f"missing or not a string ({fname!r})")
    arguments = function.get("arguments", {})
    if isinstance(arguments, str):
        try:
            parsed = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as err:
            raise RowError(f"{where}.function.arguments", f"not valid JSON ({err.msg})") from None
        if not isinstance(parsed, dict):
            raise RowError(f"{where}.function.arguments", f"expected a JSON object, got {type(parsed).__name__}")
    elif not isinstance(arguments, Mapping):
        raise RowError(f"{where}.function.arguments", f"expected a JSON object or string, got {type(arguments).__name__}")
    else:
        arguments = dict(arguments)
    return {"id": call_id, "type": "function", "function": {"name": fname, "arguments": arguments}}


def _check_tool_order(out: list[dict[str, Any]], name: str) -> None:
    """Function-calling order: user first (after an optional system), each tool message answers a call of
    the assistant turn before it, and every call is answered before the conversation moves on."""
    start = 1 if out[0]["role"] == "system" else 0
    if start >= len(out) or out[start]["role"] != "user":
        raise RowError(f"{name}[{start}].role", "the conversation must start with a user message (after an optional system)")
    open_calls: dict[str, int] = {}
    for i, msg in enumerate(out[start:], start):
        role = msg["role"]
        if role == "system":
            raise RowError(f"{name}[{i}].role", "a system message is only allowed first")
        if role == "tool":
            call_id = msg["tool_call_id"]
            if call_id not in open_calls:
                raise RowError(f"{name}[{i}].tool_call_id",
                               f"{call_id!r} matches no unanswered tool call of the assistant message before it")
            del open_calls[call_id]
            continue
        if open_calls:
            raise RowError(f"{name}[{i}].role", f"tool call(s) {sorted(open_calls)} have no tool result before this "
                                                f"{role!r} message")
        if "tool_calls" in msg:
            open_calls = {c["id"]: i for c in msg["tool_calls"]}
            if len(open_calls) != len(msg["tool_calls"]):
                raise RowError(f"{name}[{i}].tool_calls", "two tool calls with the same id")
    if open_calls and out[-1]["role"] != "assistant":
        raise RowError(name, f"tool call(s) {sorted(open_calls)} have no tool result")


def _tools(value: Any, name: str, from_csv: bool) -> list[dict[str, Any]]:
    """Top-level ``tools``: [{type: function, function: {name, description?, parameters?}}] (OpenAI shape)."""
    value = _maybe_json(value, name, from_csv, "a JSON list of tools")
    out = []
    for i, tool in enumerate(_list(value, name)):
        where = f"{name}[{i}]"
        if not isinstance(tool, Mapping):
            raise RowError(where, f"expected an object {{type, function}}, got {type(tool).__name__}")
        if tool.get("type", "function") != "function":
            raise RowError(f"{where}.type", f"only 'function' tools exist, got {tool.get('type')!r}")
        function = tool.get("function")
        if not isinstance(function, Mapping):
            raise RowError(f"{where}.function", f"expected an object {{name, description, parameters}}, got "
                                                f"{type(function).__name__}")
        fname = function.get("name")
        if not isinstance(fname, str) or not fname:
            raise RowError(f"{where}.function.name", f"missing or not a string ({fname!r})")
        description = function.get("description", "")
        if not isinstance(description, str):
            raise RowError(f"{where}.function.description", f"expected a string, got {type(description).__name__}")
        parameters = function.get("parameters", {})
        if not isinstance(parameters, Mapping):
            raise RowError(f"{where}.function.parameters", f"expected a JSON schema object, got {type(parameters).__name__}")
        out.append({"type": "function", "function": {"name": fname, "description": description,
                                                     "parameters": dict(parameters)}})
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


def _sharegpt(value: Any, name: str, from_csv: bool) -> list[dict[str, Any]]:
    """ShareGPT turns [{from, value, weight?}] -> messages (roles by SHAREGPT_ROLES), then the messages checks.

    Errors name the user's keys: `conversations[2].from`, not the `role` it became.
    """
    value = _maybe_json(value, name, from_csv, "a JSON list of turns")
    if not isinstance(value, list):
        raise RowError(name, f"expected a list of turns {{from, value}}, got {type(value).__name__}")
    messages = []
    for i, turn in enumerate(value):
        where = f"{name}[{i}]"
        if not isinstance(turn, Mapping):
            raise RowError(where, f"expected an object with 'from' and 'value', got {type(turn).__name__}")
        who = turn.get("from")
        if who is None:
            raise RowError(f"{where}.from", "missing")
        if who in SHAREGPT_TOOL_ROLES:
            raise RowError(f"{where}.from", f"tool turn {who!r} with value {str(turn.get('value'))!r:.80}: ShareGPT tool "
                                            "turns carry no call ids to pair a call with its result; write the row in "
                                            "format messages (assistant tool_calls + tool messages with tool_call_id)")
        if not isinstance(who, str) or who not in SHAREGPT_ROLES:
            raise RowError(f"{where}.from", f"unknown role {who!r} (value {str(turn.get('value'))!r:.80}); ShareGPT roles: "
                                            + ", ".join(f"{k} -> {v}" for k, v in SHAREGPT_ROLES.items()))
        if turn.get("value") is None:
            raise RowError(f"{where}.value", "missing")
        message = {"role": SHAREGPT_ROLES[who], "content": _text(turn["value"], f"{where}.value")}
        if turn.get("weight") is not None:
            message["weight"] = turn["weight"]
        messages.append(message)
    try:
        return _messages(messages, name, False)
    except RowError as err:  # same checks as messages rows, in the user's words
        field = err.field.replace(".role", ".from").replace(".content", ".value")
        raise RowError(field, err.problem) from None


# ---- a row that has another format's shape --------------------------------------------------------------------------------
def _guess_format(row: Mapping[str, Any]) -> Optional[tuple[str, Optional[tuple[str, str]], str]]:
    """(format, (config key, value) it also needs or None, why) for a row of a known format's shape, else None."""
    def turns(key: str) -> Optional[Mapping[str, Any]]:
        value = row.get(key)
        return value[0] if isinstance(value, list) and value and isinstance(value[0], Mapping) else None

    for key in ("conversations", "messages"):
        first = turns(key)
        if first is not None and "from" in first and "value" in first:
            return "sharegpt", ("conversations_field", key), f"'{key}' holds turns with 'from' and 'value'"
        if first is not None and "role" in first:
            return "messages", ("messages_field", key), f"'{key}' holds messages with 'role'"
    if "chosen" in row and "rejected" in row:
        return "preference", None, "it has 'chosen' and 'rejected'"
    if "instruction" in row and "output" in row:
        return "alpaca", None, "it has 'instruction' and 'output'"
    if "text" in row and "label" in row:
        label = row["label"]
        fmt = "regression" if isinstance(label, float) and not label.is_integer() else "classification"
        return fmt, None, "it has 'text' and 'label'"
    if isinstance(row.get("text"), str):
        return "text", None, "it has 'text'"
    return None


def format_hint(row: Any, cfg: DataConfig) -> Optional[str]:
    """For a first row that failed `normalize_row`: a sentence naming the format (and key) it looks like, or None.

    Only when the row has another known format's shape, or the configured format's shape under another key
    (`conversations` holding messages); a row of the configured shape that is merely broken gets no hint.
    """
    if not isinstance(row, Mapping):
        return None
    guess = _guess_format(row)
    if guess is None:
        return None
    fmt, needs, why = guess
    extra = f" data.{needs[0]}={needs[1]}" if needs is not None and getattr(cfg, needs[0]) != needs[1] else ""
    if fmt == cfg.format and not extra:
        return None
    return (f"this row looks like data.format={fmt} ({why}), not data.format={cfg.format}"
            + (f" with data.{needs[0]}={getattr(cfg, needs[0])}" if fmt == cfg.format and needs else "")
            + f": set data.format={fmt}{extra} (docs/data.md lists the row shapes). The first row already has "
            "another format's shape, so the file is refused as a whole instead of row by row")


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
    if fmt in ("messages", "sharegpt"):
        if fmt == "messages":
            messages = _messages(_field(row, cfg.messages_field), cfg.messages_field, from_csv)
        else:
            messages = _sharegpt(_field(row, cfg.conversations_field), cfg.conversations_field, from_csv)
        if cfg.train_on == "last":  # only the final answer is a target; earlier turns are context
            messages = [dict(m, weight=0) if m["role"] == "assistant" else m for m in messages[:-1]] + messages[-1:]
            if messages[-1]["weight"] == 0:
                key = cfg.messages_field if fmt == "messages" else cfg.conversations_field
                raise RowError(key, "train_on=last, but the last assistant message has weight 0")
        out: dict[str, Any] = {"messages": messages}
        tools = row.get(cfg.tools_field) if fmt == "messages" else None
        if tools is not None and tools != [] and tools != "":  # "" : an empty CSV cell
            out["tools"] = _tools(tools, cfg.tools_field, from_csv)
        return out
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
    chat: `encode_chat`'s target mask (assistant answers and tool calls with weight != 0, their EOS).
    A conversation the tokenizer's version cannot encode (tools before v3, content with tool calls on
    v3) is a `RowError` naming the message; nothing is dropped.
    """
    if "text" in row:
        ids = tokenizer.encode(row["text"], add_bos=True, add_eos=True)
        mask = [False] + [True] * (len(ids) - 1)
    else:
        messages = [_for_tokenizer(m) for m in row["messages"]]
        tools = row.get("tools")
        _check_version_can_encode(row["messages"], tools, tokenizer)
        try:
            ids, mask = tokenizer.encode_chat(messages, tools=tools) if tools else tokenizer.encode_chat(messages)
        except ChatError as err:
            raise RowError("messages", str(err)) from None
    if len(ids) != len(mask):
        raise RuntimeError(f"tokenizer returned {len(ids)} ids but {len(mask)} mask entries")
    if ids and ids[0] == tokenizer.bos_token_id:
        mask = [False] + list(mask[1:])
    labels = [tok if target else IGNORE_INDEX for tok, target in zip(ids, mask)]
    return list(ids), labels


def _for_tokenizer(message: dict[str, Any]) -> dict[str, Any]:
    """The canonical message as `encode_chat` takes it: weight only on assistant messages, no None content."""
    out = {k: v for k, v in message.items() if v is not None and (k != "weight" or message["role"] == "assistant")}
    return out


def _check_version_can_encode(messages: list[dict[str, Any]], tools: Any, tokenizer: ChatTokenizer) -> None:
    kind = getattr(tokenizer, "kind", None)
    version = kind.name if kind is not None else "v1"
    for i, m in enumerate(messages):
        if "tool_calls" in m or m["role"] == "tool" or tools:
            if not getattr(tokenizer, "supports_tools", False):
                where = "tools" if tools else f"messages[{i}]"
                raise RowError(where, f"tool calls need a tokenizer of version {', '.join(TOOL_VERSIONS)}; this "
                                      f"tokenizer is {version} (v1 has no tool format, v2 drops earlier tool calls)")
        if "tool_calls" in m and m.get("content") and version in ("v3", "tekken-v3"):
            raise RowError(f"messages[{i}]", f"an assistant message with both content and tool_calls cannot be "
                                             f"encoded by the {version} format (mistral_common refuses it; v7 "
                                             "encodes it): keep only the tool calls, or split the text into "
                                             "the next assistant turn")


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
