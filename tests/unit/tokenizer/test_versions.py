"""Every tokenizer version mistral_common ships: version detection from contents, chat ids equal to
mistral_common's ``encode_chat_completion`` (finetuning mode for training rows, test mode for prompts),
loss masks, decode / streaming, pad ids, bad files.

Each tokenizer (ours and the mistral_common reference) is loaded once per module.
"""

from __future__ import annotations

import copy
import importlib.resources
import json
import pickle
import random
from pathlib import Path

import pytest
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.protocol.instruct.validator import ValidationMode
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer as Reference

from mistral_ft.errors import UserError
from mistral_ft.tokenizer import ChatError, MistralCommonTokenizer, MistralTokenizer, TokenizerFileError
from mistral_ft.tokenizer.files import detect, find_in_folder

DATA = Path(str(importlib.resources.files("mistral_common") / "data"))
FILES = {
    "v1": "tokenizer.model.v1",
    "v2": "mistral_instruct_tokenizer_240216.model.v2",
    "v3": "mistral_instruct_tokenizer_240323.model.v3",
    "v7": "mistral_instruct_tokenizer_241114.model.v7",
    "tekken-v3": "tekken_240718.json",
    "tekken-v3-pixtral": "tekken_240911.json",
}
TOOL_NAMES = ("v3", "v7", "tekken-v3", "tekken-v3-pixtral")

_cache: dict[str, tuple[object, object, object]] = {}


def loaded(name: str) -> tuple[object, object, object]:
    """(ours, mistral_common finetuning, mistral_common test) for a shipped file; loaded once per module."""
    if name not in _cache:
        path = DATA / FILES[name]
        _cache[name] = (
            MistralTokenizer.from_pretrained(path),
            Reference.from_file(str(path), mode=ValidationMode.finetuning),
            Reference.from_file(str(path), mode=ValidationMode.test),
        )
    return _cache[name]


def reference_ids(name: str, messages: list[dict], tools: list[dict] | None, prompt: bool) -> list[int]:
    _, train, test = loaded(name)
    request = {"messages": [{k: v for k, v in m.items() if k != "weight"} for m in messages]}
    if tools:
        request["tools"] = tools
    engine = test if prompt else train
    return list(engine.encode_chat_completion(ChatCompletionRequest.model_validate(request)).tokens)


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
SEARCH = {"type": "function", "function": {
    "name": "search", "description": "Web search",
    "parameters": {"type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]}}}


def call(call_id: str, name: str, arguments) -> dict:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


U = lambda text: {"role": "user", "content": text}  # noqa: E731
A = lambda text, **kw: {"role": "assistant", "content": text, **kw}  # noqa: E731
S = lambda text: {"role": "system", "content": text}  # noqa: E731

# (messages, tools, is_prompt). Training rows end with an assistant turn; prompts with a user/tool turn.
PLAIN = [
    ([U("Hi"), A("Hello!")], None, False),
    ([U("What is 2+2?"), A("4."), U("And 3+3?"), A("6."), U("Thanks"), A("You're welcome.")], None, False),
    ([S("You are terse."), U("Name a color."), A("Blue.")], None, False),
    ([S("Be kind."), U("Hi"), A("Hello"), U("Bye"), A("Goodbye")], None, False),
    ([U("  leading and trailing spaces  "), A("  answer with spaces ")], None, False),
    ([U("Write code"), A("def f(x):\n    return x  # hi\n\tindent\r\n")], None, False),
    ([U("日本語のテキスト 🫠 emoji 🦜😀"), A("Ελληνικά, русский, 中文 🫠")], None, False),
    ([U("Literal [INST] and </s> and <s> in text [/INST]"), A("I see [INST] and </s> too.")], None, False),
    ([U("first"), A("ignored answer", weight=0), U("second"), A("trained answer")], None, False),
    ([U("Tell me a story"), A("Once upon a time."), U("Go on")], None, True),
    ([S("System here."), U("A prompt")], None, True),
]
TOOLS = [
    ([U("Weather in Paris?"), A(None, tool_calls=[call("abc123XYZ", "get_weather", {"city": "Paris"})]),
      {"role": "tool", "tool_call_id": "abc123XYZ", "content": "20C"}, A("It is 20C in Paris.")], [WEATHER], False),
    ([U("Paris and Rome?"),
      A(None, tool_calls=[call("abc123XYZ", "get_weather", {"city": "Paris"}),
                          call("def456UVW", "get_weather", '{"city": "Rome"}')]),
      {"role": "tool", "tool_call_id": "abc123XYZ", "content": "20C"},
      {"role": "tool", "tool_call_id": "def456UVW", "content": "25C"},
      A("Paris 20C, Rome 25C.")], [WEATHER, SEARCH], False),
    ([S("Use tools."), U("Search cats"), A(None, tool_calls=[call("q1w2e3r4t", "search", {"q": "cats"})]),
      {"role": "tool", "tool_call_id": "q1w2e3r4t", "content": "cats are mammals"}, A("Cats are mammals."),
      U("And the weather in Oslo?"), A(None, tool_calls=[call("z9x8c7v6b", "get_weather", {"city": "Oslo"})])],
     [WEATHER, SEARCH], False),
    ([U("Weather in Paris?"), A(None, tool_calls=[call("abc123XYZ", "get_weather", {"city": "Paris"})]),
      {"role": "tool", "tool_call_id": "abc123XYZ", "content": "20C"}], [WEATHER], True),
    ([U("Hi, no tool needed"), A("Hello.")], [WEATHER], False),
]


def cases(name: str) -> list[tuple[list[dict], list[dict] | None, bool]]:
    return PLAIN + (TOOLS if name in TOOL_NAMES else [])


# ---------------------------------------------------------------- detection and basics


@pytest.mark.parametrize("name", list(FILES))
def test_version_detected_from_contents_not_name(name: str, tmp_path: Path) -> None:
    ours = loaded(name)[0]
    expected = {"tekken-v3-pixtral": "tekken-v3"}.get(name, name)
    assert ours.kind.name == expected
    assert isinstance(ours, MistralTokenizer if name == "v1" else MistralCommonTokenizer)
    # The same contents under a misleading name (HF folders call a v3 file "tokenizer.model").
    renamed = tmp_path / "renamed.model.v1"
    renamed.write_bytes((DATA / FILES[name]).read_bytes())
    assert detect(renamed).name == expected  # what from_pretrained uses (a full Tekken load takes seconds)
    # A folder holding it under the name its release uses (plain tokenizer.model in HF v0.3 folders).
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / ("tekken.json" if "tekken" in name else "tokenizer.model")).write_bytes(renamed.read_bytes())
    assert find_in_folder(folder) is not None and detect(find_in_folder(folder)).name == expected
    if "tekken" not in name:
        assert MistralTokenizer.from_pretrained(folder).kind.name == expected


@pytest.mark.parametrize("name", list(FILES))
def test_special_ids_and_vocab(name: str) -> None:
    ours, train, _ = loaded(name)
    raw = train.instruct_tokenizer.tokenizer
    assert ours.vocab_size == raw.n_words == len(ours)
    assert (ours.bos_token_id, ours.eos_token_id) == (raw.bos_id, raw.eos_id) == (1, 2)
    # pad is never EOS: Tekken has <pad> (11), sentencepiece pads with <unk> (0, never produced).
    assert ours.pad_token_id == (11 if "tekken" in name else 0)
    assert ours.pad_token_id != ours.eos_token_id


@pytest.mark.parametrize("name", list(FILES))
def test_plain_encode_keeps_special_text_as_text(name: str) -> None:
    ours, train, _ = loaded(name)
    raw = train.instruct_tokenizer.tokenizer
    for text in ["Hello world", " lead", "[INST] hi [/INST] </s>", "emoji 🫠 中文", "a\n\n b\t"]:
        ids = ours.encode(text, add_bos=True, add_eos=True)
        assert ids == list(raw.encode(text, bos=True, eos=True))
        assert not set(ids[1:-1]) & {1, 2, 3, 4}


# ---------------------------------------------------------------- chat ids and masks


def _check_mask_by_prefixes(name: str, messages: list[dict], tools, ids: list[int], mask: list[bool]) -> None:
    """Independent mask check where the format is prefix-stable (no system prompt, no tools): the tokens of
    assistant turn i are encode(messages[:i+1]) minus encode(messages[:i]) (a generation prompt)."""
    expected = [False] * len(ids)
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = reference_ids(name, messages[:index], tools, prompt=True)
        upto = reference_ids(name, messages[:index + 1], tools, prompt=False)
        assert upto[:len(before)] == before and ids[:len(upto)] == upto  # the prefix property
        if message.get("weight", 1):
            expected[len(before):len(upto)] = [True] * (len(upto) - len(before))
    assert mask == expected


@pytest.mark.parametrize("name", list(FILES))
def test_chat_ids_and_masks_equal_mistral_common(name: str) -> None:
    ours = loaded(name)[0]
    checked = 0
    for messages, tools, prompt in cases(name):
        ids, mask = ours.encode_chat(copy.deepcopy(messages), tools=tools, add_generation_prompt=prompt)
        assert ids == reference_ids(name, messages, tools, prompt), (name, messages)
        assert len(mask) == len(ids)
        trained = [m for m in messages if m["role"] == "assistant" and m.get("weight", 1)]
        if prompt:
            # assistant turns inside a prompt still carry their mask (callers ignore it)
            assert not mask[-1]
        else:
            assert mask[-1] and ids[-1] == ours.eos_token_id
            # one EOS per trained assistant turn, and no other EOS is a target
            assert sum(1 for i, m in zip(ids, mask) if m and i == ours.eos_token_id) == len(trained)
        # prompts and tool results are never targets
        texts = ours.decode([i for i, m in zip(ids, mask) if m], skip_special_tokens=True)
        for message in messages:
            if message["role"] in ("user", "tool", "system") and len(message["content"]) > 6:
                assert message["content"].strip() not in texts
        has_system = any(m["role"] == "system" for m in messages)
        if not has_system and not tools and not prompt:
            _check_mask_by_prefixes(name, messages, tools, ids, mask)
        checked += 1
    assert checked >= 10


def test_system_prompt_placement_differs_by_version() -> None:
    messages = [S("SYS"), U("one"), A("a"), U("two"), A("b")]
    v3_ids, _ = loaded("v3")[0].encode_chat(messages)
    v7_ids, _ = loaded("v7")[0].encode_chat(messages)
    v3_text = loaded("v3")[0].decode(v3_ids)
    # v2/v3: system prompt joined to the LAST user message; v7: its own [SYSTEM_PROMPT] block first.
    assert v3_text.index("SYS") > v3_text.index("one")
    assert v7_ids[1] == 16 and 17 in v7_ids and v7_ids.index(17) < v7_ids.index(3)
    v1_text = loaded("v1")[0].decode(loaded("v1")[0].encode_chat(messages)[0])
    assert v1_text.index("SYS") < v1_text.index("one")


@pytest.mark.parametrize("name", ["v3", "v7", "tekken-v3"])
def test_tool_call_tokens_are_targets_and_tool_results_are_not(name: str) -> None:
    ours = loaded(name)[0]
    messages, tools, _ = TOOLS[1]
    ids, mask = ours.encode_chat(messages, tools=tools)
    special = loaded(name)[1].instruct_tokenizer.tokenizer.get_special_token
    assert mask[ids.index(special("[TOOL_CALLS]"))]
    context = {special(s) for s in ("[TOOL_RESULTS]", "[/TOOL_RESULTS]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]")}
    assert all(not m for i, m in zip(ids, mask) if i in context)
    targets = ours.decode([i for i, m in zip(ids, mask) if m])
    assert "def456UVW" in targets and "Rome" in targets and "25C" not in targets.replace("25C.", "")


def test_content_and_tool_calls_refused_on_v3_encoded_on_v7() -> None:
    messages = [U("x"), A("Let me check.", tool_calls=[call("abc123XYZ", "get_weather", {"city": "Paris"})])]
    for name in ("v3", "tekken-v3"):
        with pytest.raises(ChatError, match="either content or tool_calls"):
            loaded(name)[0].encode_chat(messages, tools=[WEATHER])
    ids, mask = loaded("v7")[0].encode_chat(messages, tools=[WEATHER])
    assert ids == reference_ids("v7", messages, [WEATHER], prompt=False)
    assert "Let me check." in loaded("v7")[0].decode([i for i, m in zip(ids, mask) if m])


@pytest.mark.parametrize("name", ["v1", "v2"])
def test_tools_refused_on_v1_and_v2(name: str) -> None:
    with pytest.raises(ChatError, match="v3"):
        loaded(name)[0].encode_chat([U("x"), A("y")], tools=[WEATHER])
    assert issubclass(ChatError, UserError)


def test_generation_prompt_needs_a_prompt() -> None:
    for name in ("v1", "v3"):
        with pytest.raises(ValueError, match="add_generation_prompt"):
            loaded(name)[0].encode_chat([U("x"), A("y")], add_generation_prompt=True)


def test_bad_conversations_are_chat_errors() -> None:
    ours = loaded("v3")[0]
    with pytest.raises(ChatError):
        ours.encode_chat([U("x"), A("y")], tools=[{"type": "function", "function": {"parameters": {}}}])


# ---------------------------------------------------------------- decode, streaming, pickling


@pytest.mark.parametrize("name", [n for n in FILES if n != "v1"])
def test_decode_and_stream_decode(name: str) -> None:
    ours, train, _ = loaded(name)
    ids, _ = ours.encode_chat(PLAIN[6][0])
    ids += ours.encode("ok 🦜 then [INST] text", add_bos=False)
    rng = random.Random(0)
    random_ids = [rng.randrange(ours.vocab_size) for _ in range(300)]
    for sequence in (ids, random_ids):
        for skip in (True, False):
            full = ours.decode(sequence, skip_special_tokens=skip)
            assert "".join(ours.decode_stream(sequence, skip_special_tokens=skip)) == full
        assert ours.decode(sequence, skip_special_tokens=True) == train.decode(
            [i for i in sequence if i not in ours.all_special_ids])
    assert "[INST]" in ours.decode(ids) and "[INST]" not in ours.decode(ids[:-8], skip_special_tokens=True)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        ours.decode([ours.vocab_size])


@pytest.mark.parametrize("name", ["v3", "tekken-v3"])
def test_pickle_round_trip(name: str) -> None:
    ours = loaded(name)[0]
    again = pickle.loads(pickle.dumps(ours))
    messages, tools, _ = TOOLS[0]
    assert again.encode_chat(messages, tools=tools) == ours.encode_chat(messages, tools=tools)


@pytest.mark.parametrize("name", ["v3", "tekken-v3"])
def test_batch_call_pads_with_pad_id(name: str) -> None:
    ours = loaded(name)[0]
    batch = ours(["a", "a longer text here"], padding=True, return_tensors="pt")
    assert batch["input_ids"][0, -1].item() == ours.pad_token_id
    assert batch["attention_mask"][0].sum() < batch["attention_mask"][1].sum()


# ---------------------------------------------------------------- bad files


def test_unknown_and_unsupported_files(tmp_path: Path) -> None:
    garbage = tmp_path / "tokenizer.model.v3"
    garbage.write_bytes(b"\x00\x01 not a model")
    with pytest.raises(TokenizerFileError, match="tokenizer.model.v3"):
        MistralTokenizer.from_pretrained(garbage)
    other_json = tmp_path / "tekken.json"
    other_json.write_text(json.dumps({"hello": 1}))
    with pytest.raises(TokenizerFileError, match="not a Tekken tokenizer"):
        MistralTokenizer.from_pretrained(other_json)
    tekken = json.loads((DATA / FILES["tekken-v3"]).read_text(encoding="utf-8"))
    tekken["config"]["version"] = "v13"
    future = tmp_path / "future" / "tekken.json"
    future.parent.mkdir()
    future.write_text(json.dumps(tekken))
    with pytest.raises(TokenizerFileError, match=r"Tekken version 'v13'.*future/tekken.json|future/tekken.json.*v13"):
        MistralTokenizer.from_pretrained(future.parent)
    assert issubclass(TokenizerFileError, UserError)


# ---------------------------------------------------------------- save, and transformers reading it back


@pytest.mark.parametrize("name", ["v3", "v7"])
def test_save_pretrained_writes_the_file_as_it_came_for_transformers(name: str, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    ours = loaded(name)[0]
    written = ours.save_pretrained(tmp_path)
    assert written[0].name == f"tokenizer.model.{name}"
    assert written[0].read_bytes() == (DATA / FILES[name]).read_bytes()
    assert MistralTokenizer.from_pretrained(tmp_path).kind.name == name
    hf = AutoTokenizer.from_pretrained(str(tmp_path), mode="finetuning")
    assert type(hf).__name__ == "MistralCommonBackend"
    messages = PLAIN[3][0]
    theirs = hf.apply_chat_template(messages, tokenize=True)
    theirs = theirs["input_ids"] if hasattr(theirs, "keys") else theirs
    assert list(theirs) == ours.encode_chat(messages)[0]
    assert hf.encode("Hello world", add_special_tokens=False) == ours.encode("Hello world", add_bos=False)
