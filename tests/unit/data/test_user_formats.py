"""Formats users bring (issue 17): ShareGPT rows, OpenAI content parts, .txt files, `save_to_disk` folders,
the hint for rows of another format, every data key declared in YAML, and the tokenizing / packing bar.

Real files in tmp dirs loaded through `datasets`, tokenized with the real v1 tokenizer; exactness is
checked against the existing messages path and, for content parts, against mistral_common.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import io
import json
from pathlib import Path

import datasets
import pytest
import yaml
from lightning.fabric.utilities.rank_zero import rank_zero_only
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.protocol.instruct.validator import ValidationMode
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer as Reference

from mistral_ft.data import DataConfig, DataError, build_datasets, collect_problems, load_split, normalize_row
from mistral_ft.tokenizer import MistralTokenizer
from mistral_ft.training.compose import available, compose_config, config_dir
from helpers.data import datasets_cache_in_tmp, tok  # noqa: F401 (fixtures)

SYSTEM, USER, ASSISTANT = "system", "user", "assistant"
CONV = [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi there"},
        {"from": "gpt", "value": "Hello!"}, {"from": "user", "value": "What is 2+2?"},
        {"from": "assistant", "value": "4"}]
MESSAGES = [{"role": role, "content": t["value"]} for role, t in zip([SYSTEM, USER, ASSISTANT, USER, ASSISTANT], CONV)]


def jsonl(path: Path, rows: list) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def one(tok, **cfg) -> dict:
    train, _, _ = build_datasets(cfg, tok)
    return train[0]


# ---- ShareGPT -------------------------------------------------------------------------------------------
def test_sharegpt_row_gives_the_ids_and_labels_of_the_messages_row(tok, tmp_path):
    conv = CONV[:3] + [dict(CONV[3]), {"from": "gpt", "value": "4", "weight": 1}]
    conv[2] = dict(conv[2], weight=0)
    msgs = [dict(m) for m in MESSAGES]
    msgs[2]["weight"] = 0
    sg = one(tok, train_file=jsonl(tmp_path / "sg.jsonl", [{"conversations": conv}]), format="sharegpt")
    ms = one(tok, train_file=jsonl(tmp_path / "m.jsonl", [{"messages": msgs}]), format="messages")
    assert sg["input_ids"] == ms["input_ids"] and sg["labels"] == ms["labels"]
    every = one(tok, train_file=jsonl(tmp_path / "all.jsonl", [{"conversations": CONV}]), format="sharegpt")
    assert every["input_ids"] == sg["input_ids"]
    assert sum(x != -100 for x in every["labels"]) > sum(x != -100 for x in sg["labels"]) > 0  # weight 0: context
    last = one(tok, train_file=jsonl(tmp_path / "sg2.jsonl", [{"chat": CONV}]), format="sharegpt",
               conversations_field="chat", train_on="last")
    assert last["labels"] == sg["labels"]


def test_sharegpt_unknown_and_tool_roles_are_refused_naming_row_and_value(tok, tmp_path):
    path = jsonl(tmp_path / "bad.jsonl", [{"conversations": CONV}, {"conversations": CONV[:2] + [{"from": "bot", "value": "yo"}]}])
    with pytest.raises(DataError) as err:
        build_datasets({"train_file": path, "format": "sharegpt"}, tok)
    msg = str(err.value)
    assert msg.startswith(f"{path}:2: field 'conversations[2].from': unknown role 'bot' (value 'yo')")
    assert "human -> user" in msg and "gpt -> assistant" in msg and "\n" not in msg
    call = {"from": "function_call", "value": '{"name": "f"}'}
    path = jsonl(tmp_path / "tool.jsonl", [{"conversations": CONV[:2] + [call]}])
    with pytest.raises(DataError, match=r"tool\.jsonl:1: field 'conversations\[2\]\.from': tool turn 'function_call'.*no call ids"):
        build_datasets({"train_file": path, "format": "sharegpt"}, tok)
    order = jsonl(tmp_path / "order.jsonl", [{"conversations": [CONV[1], CONV[3], CONV[2]]}])
    with pytest.raises(DataError, match=r"order\.jsonl:1: field 'conversations\[1\]\.from': expected 'assistant'"):
        build_datasets({"train_file": order, "format": "sharegpt"}, tok)
    empty = jsonl(tmp_path / "empty.jsonl", [{"conversations": CONV[:2] + [{"from": "gpt", "value": " "}]}])
    with pytest.raises(DataError, match=r"empty\.jsonl:1: field 'conversations\[2\]\.value': empty text"):
        build_datasets({"train_file": empty, "format": "sharegpt"}, tok)


# ---- OpenAI content parts ---------------------------------------------------------------------------------
def _parts(*texts: str) -> list[dict]:
    return [{"type": "text", "text": t} for t in texts]


def test_content_parts_are_encoded_as_mistral_common_encodes_them(tok, tmp_path):
    msgs = [{"role": SYSTEM, "content": _parts("Be brief.", "Really.")},
            {"role": USER, "content": _parts("Hi", "", "there")},  # an empty part is skipped, as mistral_common does
            {"role": ASSISTANT, "content": "Hello!"},
            {"role": USER, "content": "What is 2+2?"},  # strings and parts mixed in one file
            {"role": ASSISTANT, "content": _parts("4")}]
    path = jsonl(tmp_path / "parts.jsonl", [{"messages": msgs}, {"messages": MESSAGES}])
    train, _, _ = build_datasets({"train_file": path}, tok)
    ref = Reference.from_file(str(importlib.resources.files("mistral_common") / "data" / "tokenizer.model.v1"),
                              mode=ValidationMode.finetuning)
    expected = ref.encode_chat_completion(ChatCompletionRequest.model_validate({"messages": msgs})).tokens
    assert train[0]["input_ids"] == list(expected)
    joined = [dict(m, content="\n\n".join(p["text"] for p in m["content"] if p["text"]) if isinstance(m["content"], list)
                   else m["content"]) for m in msgs]
    plain = one(tok, train_file=jsonl(tmp_path / "plain.jsonl", [{"messages": joined}]))
    assert train[0] == plain
    assert one(tok, train_file=jsonl(tmp_path / "m.jsonl", [{"messages": MESSAGES}])) == train[1]  # "4" stays a string


def test_mixed_string_and_part_contents_load_as_written(tmp_path):
    """Arrow holds one type per column; the rows `datasets` hands back must normalize as the file's rows do."""
    call = {"id": "c1", "type": "function", "function": {"name": "add", "arguments": '{"a": 2}'}}
    tool_row = {"messages": [{"role": USER, "content": _parts("Add 2.")},
                             {"role": ASSISTANT, "content": "", "tool_calls": [call]},
                             {"role": "tool", "tool_call_id": "c1", "content": "4"},
                             {"role": ASSISTANT, "content": "4"}]}
    rows = [{"messages": MESSAGES}, tool_row, {"messages": [{"role": USER, "content": _parts("a", "b")},
                                                            {"role": ASSISTANT, "content": "007"}]}]
    cfg = DataConfig.from_mapping({"train_file": jsonl(tmp_path / "mixed.jsonl", rows)})
    loaded = load_split(cfg.train_file, cfg)
    assert [normalize_row(r, cfg) for r in loaded.dataset] == [normalize_row(r, cfg) for r in rows]


def test_non_text_content_parts_are_refused(tok, tmp_path):
    image = {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}
    msgs = [{"role": USER, "content": _parts("What is this?") + [image]}, {"role": ASSISTANT, "content": "A cat."}]
    path = jsonl(tmp_path / "img.jsonl", [{"messages": msgs}])
    with pytest.raises(DataError) as err:
        build_datasets({"train_file": path}, tok)
    assert str(err.value).startswith(f"{path}:1: field 'messages[0].content[1].type': content part of type 'image_url' "
                                     "cannot be trained")
    tool = [{"role": USER, "content": "x"}, {"role": ASSISTANT, "content": "y"}]
    tool[0]["content"] = [{"type": "text"}]
    with pytest.raises(DataError, match=r"messages\[0\]\.content\[0\]\.text': expected a string"):
        build_datasets({"train_file": jsonl(tmp_path / "notext.jsonl", [{"messages": tool}])}, tok)


# ---- .txt ---------------------------------------------------------------------------------------------------
def test_txt_is_one_document_per_blank_line_block_or_per_file(tok, tmp_path):
    path = tmp_path / "book.txt"
    path.write_bytes(b"First para,\nsecond line.\n\n \t\n\nSecond para\r\nends here.\n\n")
    train, _, info = build_datasets({"train_file": str(path), "format": "text", "val_fraction": 0.0}, tok)
    assert len(train) == 2 and info.train_source == str(path)
    assert train[0]["input_ids"] == tok.encode("First para,\nsecond line.", add_bos=True, add_eos=True)
    assert train[1]["input_ids"] == tok.encode("Second para\nends here.", add_bos=True, add_eos=True)
    whole, _, _ = build_datasets({"train_file": str(path), "format": "text", "txt_document": "file"}, tok)
    reference = datasets.load_dataset("text", data_files=str(path), sample_by="document", split="train")
    assert len(whole) == 1 and whole[0]["input_ids"] == tok.encode(reference[0]["text"], add_bos=True, add_eos=True)


def test_a_folder_of_txt_files_is_read_in_name_order(tok, tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "b.txt").write_text("Second file.\n\nIts second block.\n", encoding="utf-8")
    (folder / "a.txt").write_text("First file.\n", encoding="utf-8")
    (folder / ".hidden").write_text("not read", encoding="utf-8")
    per_file, _, info = build_datasets({"train_file": str(folder), "format": "text", "txt_document": "file"}, tok)
    assert [tok.decode(per_file[i]["input_ids"], skip_special_tokens=True) for i in range(len(per_file))] == [
        "First file.\n", "Second file.\n\nIts second block.\n"]
    assert info.train_source == str(folder)
    per_block, _, _ = build_datasets({"train_file": str(folder), "format": "text"}, tok)
    assert len(per_block) == 3
    (folder / "c.txt").write_text("", encoding="utf-8")
    with pytest.raises(DataError, match=r"c\.txt: empty file"):
        build_datasets({"train_file": str(folder), "format": "text"}, tok)


def test_txt_needs_format_text_and_names_the_block_line(tok, tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("one\n\n\ntwo\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"notes\.txt: \.txt files hold plain text .*set data\.format=text"):
        build_datasets({"train_file": str(path)}, tok)
    with pytest.raises(DataError, match=r"field 'txt_document': 'para' is not one of \['block', 'file'\]"):
        DataConfig.from_mapping({"train_file": str(path), "format": "text", "txt_document": "para"})
    cfg = DataConfig.from_mapping({"train_file": str(path), "format": "text"})
    assert load_split(cfg.train_file, cfg).locs == [f"{path}:1", f"{path}:4"]  # a block is located at its first line
    (tmp_path / "blank.txt").write_text("\n \n", encoding="utf-8")
    with pytest.raises(DataError, match=r"blank\.txt: empty file \(no rows\)"):
        build_datasets({"train_file": str(tmp_path / "blank.txt"), "format": "text"}, tok)


# ---- save_to_disk folders ------------------------------------------------------------------------------------------
def test_save_to_disk_dataset_and_datasetdict_load(tok, tmp_path):
    rows = [{"messages": MESSAGES}, {"messages": MESSAGES[1:3]}]
    ds = datasets.Dataset.from_list(rows)
    ds.save_to_disk(str(tmp_path / "one"))
    datasets.DatasetDict({"train": ds, "test": ds.select([1])}).save_to_disk(str(tmp_path / "dict"))
    expected = one(tok, train_file=jsonl(tmp_path / "rows.jsonl", rows))
    train, val, info = build_datasets({"train_file": str(tmp_path / "one"), "val_fraction": 0.5}, tok)
    assert len(train) == 1 and len(val) == 1 and info.train_source == str(tmp_path / "one")
    train, val, info = build_datasets({"train_file": str(tmp_path / "dict"), "validation_split": "test"}, tok)
    assert train[0] == expected and len(val) == 1 and info.validation_source == f"{tmp_path / 'dict'}[test]"
    with pytest.raises(DataError, match=r"dict: this saved DatasetDict has no split 'validation' \(it has \['train', 'test'\]\)"):
        build_datasets({"train_file": str(tmp_path / "dict"), "validation_file": str(tmp_path / "dict")}, tok)
    with pytest.raises(DataError, match=r"one: a saved Dataset folder is one split, so it has no validation_split 'test'"):
        build_datasets({"train_file": str(tmp_path / "one"), "validation_split": "test"}, tok)


def test_save_to_disk_bad_row_names_folder_and_row(tok, tmp_path):
    bad = [{"role": USER, "content": "Hi"}, {"role": "bot", "content": "yo"}]
    datasets.Dataset.from_list([{"messages": MESSAGES}, {"messages": bad}]).save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(DataError) as err:
        build_datasets({"train_file": str(tmp_path / "saved")}, tok)
    assert str(err.value).startswith(f"{tmp_path / 'saved'}:row 2: field 'messages[1].role': unknown role 'bot'")


# ---- the hint for rows of another format --------------------------------------------------------------------------
ALPACA = {"instruction": "Add 2 and 2.", "input": "", "output": "4"}


def test_alpaca_rows_under_messages_give_one_paragraph_naming_the_format(tok, tmp_path):
    path = jsonl(tmp_path / "alpaca.jsonl", [ALPACA] * 5)
    for extra in ({}, {"skip_invalid": True}):
        with pytest.raises(DataError) as err:
            build_datasets({"train_file": path, **extra}, tok)
        msg = str(err.value)
        assert msg.startswith(f"{path}:1: field 'messages': missing") and "set data.format=alpaca" in msg
        assert "\n" not in msg and msg.count(path) == 1
    with collect_problems() as problems, pytest.raises(DataError, match="set data.format=alpaca"):
        build_datasets({"train_file": path}, tok)
    assert problems == []  # not one line per row
    assert len(build_datasets({"train_file": path, "format": "alpaca"}, tok)[0]) == 5


@pytest.mark.parametrize(("row", "fmt", "advice"), [
    ({"conversations": CONV}, "messages", "set data.format=sharegpt"),
    ({"conversations": MESSAGES}, "messages", "set data.format=messages data.messages_field=conversations"),
    ({"messages": MESSAGES}, "sharegpt", "set data.format=messages"),
    ({"messages": CONV}, "sharegpt", "with data.conversations_field=conversations: set data.format=sharegpt "
                                     "data.conversations_field=messages"),
    ({"text": "good", "label": "pos"}, "regression", "set data.format=classification"),
    ({"prompt": "Hi", "chosen": "Hello", "rejected": "Go away"}, "alpaca", "set data.format=preference"),
])
def test_other_known_shapes_get_a_hint(tok, tmp_path, row, fmt, advice):
    path = jsonl(tmp_path / "rows.jsonl", [row, row])
    with pytest.raises(DataError, match=f"rows.jsonl:1: .*{advice}"):
        build_datasets({"train_file": path, "format": fmt}, tok)


def test_a_broken_row_of_the_right_shape_gets_no_hint_and_the_hub_path_hints_too(tok, tmp_path):
    bad = [{"role": USER, "content": "Hi"}, {"role": USER, "content": "again"}]
    path = jsonl(tmp_path / "m.jsonl", [{"messages": bad}, {"messages": MESSAGES}])
    with pytest.raises(DataError) as err:
        build_datasets({"train_file": path}, tok)
    assert "data.format" not in str(err.value)
    with collect_problems() as problems:
        build_datasets({"train_file": path}, tok)
    assert len(problems) == 1  # row by row as before
    broken = [CONV[1], {"from": "gpt", "value": ""}]
    path = jsonl(tmp_path / "sg.jsonl", [{"messages": broken}])  # already pointed at its key: a plain row error
    with pytest.raises(DataError) as err:
        build_datasets({"train_file": path, "format": "sharegpt", "conversations_field": "messages"}, tok)
    assert "messages[1].value" in str(err.value) and "data.format" not in str(err.value)
    datasets.Dataset.from_list([ALPACA] * 3).save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(DataError, match=r"saved:row 1: field 'messages': missing .*set data\.format=alpaca"):
        build_datasets({"train_file": str(tmp_path / "saved"), "skip_invalid": True}, tok)


# ---- every data key declared in YAML -----------------------------------------------------------------------------
def test_every_data_key_is_declared_with_the_dataclass_default():
    keys = yaml.safe_load((config_dir() / "data" / "base" / "keys.yaml").read_text())
    defaults = {f.name: f.default for f in dataclasses.fields(DataConfig) if f.name != "train_file"}
    assert {k: keys[k] for k in defaults} == defaults
    assert set(keys) == set(defaults) | {"train_file", "batch_size", "eval_batch_size"}
    for option in available("data"):
        group = yaml.safe_load((config_dir() / "data" / f"{option}.yaml").read_text())
        assert group["defaults"][0].startswith("base/keys@_here_"), option


def test_plain_data_overrides_of_any_key_compose():
    cfg = compose_config(["recipe=instruct_lora", "model=tiny", "data.text_field=body", "data.format=sharegpt",
                          "data.conversations_field=chat", "data.txt_document=file"])
    assert (cfg["data"]["text_field"], cfg["data"]["conversations_field"], cfg["data"]["txt_document"]) == ("body", "chat", "file")
    assert cfg["data"]["max_length"] == 128  # the group's own values still beat the base keys
    cfg = compose_config(["recipe=classify", "data.prompt_field=q"])
    assert cfg["data"]["prompt_field"] == "q" and cfg["data"]["format"] == "classification"


# ---- the progress bar ------------------------------------------------------------------------------------------------
class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("rank", [0, 1])
def test_tokenizing_and_packing_bar_on_rank_zero_terminals_only(tok, tmp_path, monkeypatch, rank):
    path = jsonl(tmp_path / "m.jsonl", [{"messages": MESSAGES}] * 4)
    monkeypatch.setattr(rank_zero_only, "rank", rank)
    terminal = _Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    build_datasets({"train_file": path, "pack": True, "max_length": 128}, tok)
    shown = terminal.getvalue()
    assert ("tokenizing:" in shown and "packing:" in shown and "/4 [" in shown) == (rank == 0), shown
    piped = io.StringIO()  # not a terminal: quiet on every rank
    monkeypatch.setattr("sys.stderr", piped)
    monkeypatch.setattr(rank_zero_only, "rank", 0)
    build_datasets({"train_file": path, "pack": True, "max_length": 128}, tok)
    assert "tokenizing" not in piped.getvalue()
