"""Function-calling rows (assistant tool_calls, role tool, top-level tools) through the data pipeline:
ids and labels equal to mistral_common's encoding, train_on, per-row errors naming the row and field,
the no-truncation rule for tool rows, the max-id check."""

from __future__ import annotations

import importlib.resources
import json
from pathlib import Path

import pytest

from mistral_ft.data import build_datasets
from mistral_ft.data.errors import DataError, collect_problems
from mistral_ft.data.formats import IGNORE_INDEX
from mistral_ft.tokenizer import MistralTokenizer

DATA = Path(str(importlib.resources.files("mistral_common") / "data"))
_toks: dict[str, MistralTokenizer] = {}


def tok(name: str):
    files = {"v1": "tokenizer.model.v1", "v2": "mistral_instruct_tokenizer_240216.model.v2",
             "v3": "mistral_instruct_tokenizer_240323.model.v3", "v7": "mistral_instruct_tokenizer_241114.model.v7"}
    if name not in _toks:
        _toks[name] = MistralTokenizer.from_pretrained(DATA / files[name])
    return _toks[name]


@pytest.fixture(autouse=True)
def _datasets_cache_in_tmp(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path_factory.mktemp("hf_datasets_cache")))


WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}


def tool_row(**over) -> dict:
    row = {
        "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "tool_calls": [{"id": "abc123XYZ", "type": "function",
                                                  "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
            {"role": "tool", "tool_call_id": "abc123XYZ", "content": "20C"},
            {"role": "assistant", "content": "It is 20C."},
        ],
        "tools": [WEATHER],
    }
    row.update(over)
    return row


def run(tmp_path: Path, rows: list, tokenizer, **cfg):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return build_datasets({"train_file": str(path), "format": "messages", "max_length": 512, **cfg}, tokenizer)


def test_tool_row_labels_are_the_tokenizer_mask(tmp_path: Path) -> None:
    row = tool_row()
    train, _, _ = run(tmp_path, [row], tok("v3"))
    example = train[0]
    ids, mask = tok("v3").encode_chat(row["messages"], tools=row["tools"])
    assert list(example["input_ids"]) == ids
    assert list(example["labels"]) == [i if m else IGNORE_INDEX for i, m in zip(ids, mask)]
    target_text = tok("v3").decode([i for i in example["labels"] if i != IGNORE_INDEX])
    assert "[TOOL_CALLS]" in target_text and "It is 20C." in target_text and "Weather in Paris" not in target_text


def test_train_on_last_trains_only_the_final_answer(tmp_path: Path) -> None:
    row = tool_row()
    all_train, _, _ = run(tmp_path, [row], tok("v3"))
    last_train, _, _ = run(tmp_path, [row], tok("v3"), train_on="last")
    targets_all = [i for i in all_train[0]["labels"] if i != IGNORE_INDEX]
    targets_last = [i for i in last_train[0]["labels"] if i != IGNORE_INDEX]
    assert tok("v3").decode(targets_last) == tok("v3").decode(tok("v3").encode("It is 20C.", add_bos=False) + [2])
    assert len(targets_all) > len(targets_last) and 5 in targets_all and 5 not in targets_last
    assert list(all_train[0]["input_ids"]) == list(last_train[0]["input_ids"])
    with pytest.raises(DataError, match="train_on"):
        run(tmp_path, [row], tok("v3"), train_on="first")


def test_content_with_tool_calls_refused_on_v3_encoded_on_v7(tmp_path: Path) -> None:
    row = tool_row()
    row["messages"][1]["content"] = "Let me check."
    with pytest.raises(DataError, match=r"train.jsonl:1: field 'messages\[1\]'.*both content and tool_calls.*v3"):
        run(tmp_path, [row], tok("v3"))
    train, _, _ = run(tmp_path, [row], tok("v7"))
    assert "Let me check." in tok("v7").decode([i for i in train[0]["labels"] if i != IGNORE_INDEX])


@pytest.mark.parametrize("name", ["v1", "v2"])
def test_tools_need_v3_or_later(tmp_path: Path, name: str) -> None:
    with pytest.raises(DataError, match=r"train.jsonl:1: field 'tools': tool calls need a tokenizer of version v3"):
        run(tmp_path, [tool_row()], tok(name))
    no_tools = tool_row()
    del no_tools["tools"]
    with pytest.raises(DataError, match=r"field 'messages\[1\]'.*v3, v7"):
        run(tmp_path, [no_tools], tok(name))


BAD_ROWS = [
    (lambda r: r["messages"][2].update(tool_call_id="zzz999zzz"), r"messages\[2\].tool_call_id.*'zzz999zzz' matches no"),
    (lambda r: r["messages"][2].pop("tool_call_id"), r"messages\[2\].tool_call_id.*needs the id"),
    (lambda r: r["messages"][1]["tool_calls"][0]["function"].update(arguments="{not json"), r"function.arguments.*not valid JSON"),
    (lambda r: r["messages"][1]["tool_calls"][0]["function"].pop("name"), r"tool_calls\[0\].function.name"),
    (lambda r: r["messages"][1]["tool_calls"][0].pop("id"), r"tool_calls\[0\].id"),
    (lambda r: r.update(tools=[{"type": "function", "function": {"description": "x"}}]), r"field 'tools\[0\].function.name'"),
    (lambda r: r.update(tools=[{"type": "function", "function": {"name": "f", "parameters": [1]}}]), r"tools\[0\].function.parameters"),
    (lambda r: r.update(tools={"name": "f"}), r"field 'tools': expected a list"),
    (lambda r: r["messages"].pop(2), r"no tool result"),
    (lambda r: r["messages"][0].update(tool_calls=[]) or r["messages"][0].update(role="user", tool_calls=[{"id": "a"}]),
     r"messages\[0\].tool_calls.*only allowed on assistant"),
]


@pytest.mark.parametrize("index", range(len(BAD_ROWS)))
def test_bad_tool_rows_name_row_and_field(tmp_path: Path, index: int) -> None:
    mutate, pattern = BAD_ROWS[index]
    row = tool_row()
    mutate(row)
    with pytest.raises(DataError, match="train.jsonl:2: .*" + pattern):
        run(tmp_path, [tool_row(), row], tok("v3"))


def test_validate_collects_every_bad_tool_row(tmp_path: Path) -> None:
    bad = [tool_row() for _ in BAD_ROWS]
    for row, (mutate, _) in zip(bad, BAD_ROWS):
        mutate(row)
    with collect_problems() as problems:
        run(tmp_path, [tool_row()] + bad, tok("v3"))
    assert len(problems) == len(BAD_ROWS)
    assert [p.split(":")[1] for p in problems] == [str(i + 2) for i in range(len(BAD_ROWS))]


def test_tool_rows_are_never_truncated(tmp_path: Path) -> None:
    long_row = tool_row()
    long_row["messages"][-1]["content"] = "word " * 200
    with pytest.raises(DataError, match=r"train.jsonl:1: a tool conversation of \d+ tokens exceeds max_length=150"):
        run(tmp_path, [long_row], tok("v3"), max_length=150)
    train, _, _ = run(tmp_path, [long_row, tool_row()], tok("v3"), max_length=150, skip_invalid=True)
    assert len(train) == 1
    plain = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "word " * 200}]}
    train, _, _ = run(tmp_path, [plain], tok("v3"), max_length=150)  # plain rows are cut as before
    assert len(train[0]["input_ids"]) == 150


class _Shrunk:
    """A real tokenizer claiming a smaller vocabulary than the ids it produces (a mismatched pair)."""

    def __init__(self, inner) -> None:
        self._inner = inner

    def __getattr__(self, name):
        return getattr(self._inner, name)

    vocab_size = 1000


def test_ids_outside_the_vocabulary_name_the_row(tmp_path: Path) -> None:
    row = {"messages": [{"role": "user", "content": "antidisestablishmentarianism"},
                        {"role": "assistant", "content": "ok"}]}
    with pytest.raises(DataError, match=r"train.jsonl:1: token id \d+ is outside the vocabulary \[0, 1000\)"):
        run(tmp_path, [row], _Shrunk(tok("v3")))
