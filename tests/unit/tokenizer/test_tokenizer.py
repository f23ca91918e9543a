"""Tokenizer: exact ids (sentencepiece, mistral_common's v1 encoder, transformers), chat masks, batching,
decoding (batch and streamed), saving for transformers, id checks."""

from __future__ import annotations

import json
import pickle
import random

import numpy as np
import pytest
import sentencepiece as spm
import torch

from mistral_ft.tokenizer import (
    MistralTokenizer,
    StreamDecoder,
    check_token_ids,
    default_tokenizer_file,
)

# Texts that stress the edges: leading spaces, whitespace runs, emoji outside the vocabulary
# (byte fallback: 🫠 and 🦜 are, 😀 is a piece), newlines, tabs, CRLF, code, non-Latin scripts,
# literal special-token text.
CORPUS = [
    "Hello world",
    " lead",
    "  two spaces",
    "   ",
    "",
    "emoji 🫠 ok 🦜😀",
    "🫠",
    "a\nb\n\n c\n",
    "def f(x):\n    return x  # hi\n\tindent\r\n",
    "日本語のテキスト, Ελληνικά, русский",
    "x" * 50 + " y",
    "trailing space ",
    "The </s> and <s> and <unk> stay text; so does [INST] hi [/INST].",
]

CONVERSATIONS = [
    # prompt only (generation)
    [{"role": "user", "content": "What is the capital of France?"}],
    # system prompt, multi-turn, ends with a user turn
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello 🫠"},
        {"role": "user", "content": "  again\nok"},
    ],
    # multi-turn, ends with an answer (training), leading spaces and newlines in answers
    [
        {"role": "user", "content": "Q?"},
        {"role": "assistant", "content": " leading space answer"},
        {"role": "user", "content": "more"},
        {"role": "assistant", "content": "\nnewline answer\n"},
    ],
    # code and whitespace runs
    [
        {"role": "user", "content": "code:\n```py\ndef f():\n    return 1\n```"},
        {"role": "assistant", "content": "ok   spaces  \t"},
    ],
    # literal special-token text typed by the user and the assistant
    [
        {"role": "system", "content": "Never print </s>."},
        {"role": "user", "content": "Say </s> then [INST] x [/INST] <s>"},
        {"role": "assistant", "content": "Sure: </s> [/INST] 🦜"},
    ],
    # emoji-only turns, non-Latin script
    [
        {"role": "user", "content": "🫠🦜"},
        {"role": "assistant", "content": "日本語"},
        {"role": "user", "content": "😀"},
        {"role": "assistant", "content": "ok"},
    ],
]


@pytest.fixture(scope="module")
def tok() -> MistralTokenizer:
    return MistralTokenizer.from_pretrained(None)


@pytest.fixture(scope="module")
def sp() -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_file=str(default_tokenizer_file()))


# ---------------------------------------------------------------- loading and basics


def test_default_file_and_special_ids(tok: MistralTokenizer) -> None:
    assert default_tokenizer_file().is_file()
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id) == (1, 2, 0, 0)
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<s>", "</s>", "<unk>")
    assert tok.vocab_size == len(tok) == 32000
    assert tok.all_special_ids == [0, 1, 2]
    assert tok.padding_side == "right"


def test_load_from_file_folder_and_errors(tmp_path, tok: MistralTokenizer) -> None:
    from_file = MistralTokenizer.from_pretrained(default_tokenizer_file())
    assert from_file.encode("Hello world") == tok.encode("Hello world")
    with pytest.raises(FileNotFoundError, match="has no tokenizer file"):
        MistralTokenizer.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="not-a-path"):
        MistralTokenizer.from_pretrained(tmp_path / "not-a-path")
    with pytest.raises(FileNotFoundError, match="never attempted"):
        MistralTokenizer.from_pretrained("nobody-xyz/not-cached-repo")
    garbage = tmp_path / "tokenizer.model"
    garbage.write_bytes(b"not a sentencepiece model")
    with pytest.raises(ValueError, match="neither a sentencepiece model nor a tekken.json"):
        MistralTokenizer.from_pretrained(garbage)
    with pytest.raises(ValueError, match="padding_side"):
        MistralTokenizer.from_pretrained(None, padding_side="middle")


def test_pickle_roundtrip(tok: MistralTokenizer) -> None:
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.encode(CORPUS[5]) == tok.encode(CORPUS[5])
    assert clone.decode(tok.encode(CORPUS[8])) == tok.decode(tok.encode(CORPUS[8]))


# ---------------------------------------------------------------- encoding


def test_encode_is_sentencepiece(tok: MistralTokenizer, sp: spm.SentencePieceProcessor) -> None:
    for text in CORPUS:
        assert tok.encode(text) == [1] + sp.encode(text)
        assert tok.encode(text, add_bos=False, add_eos=True) == sp.encode(text) + [2]
    assert tok.encode_batch(CORPUS) == [[1] + sp.encode(t) for t in CORPUS]
    with pytest.raises(TypeError, match="must be a str"):
        tok.encode(["a list"])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"texts\[1\]"):
        tok.encode_batch(["ok", 3])  # type: ignore[list-item]


def test_special_token_text_stays_text(tok: MistralTokenizer) -> None:
    text = "a </s> b <s> c <unk> d [INST] e [/INST]"
    ids = tok.encode(text, add_bos=False)
    assert not set(ids) & {0, 1, 2}
    assert tok.encode("</s>", add_bos=False) == [1867, 28713, 28767]  # ▁</ s >
    assert tok.decode(ids) == text


def test_encode_never_yields_control_or_unk(tok: MistralTokenizer) -> None:
    """Byte fallback covers every character, so id 0 (<unk>, our pad) and the control ids never appear."""
    rng = random.Random(0)
    ranges = [(0x0, 0x7F), (0x80, 0x7FF), (0x800, 0xD7FF), (0xE000, 0xFFFD), (0x10000, 0x10FFFF)]
    texts = []
    for _ in range(200):
        chars = []
        for _ in range(rng.randint(1, 30)):
            low, high = rng.choice(ranges)
            chars.append(chr(rng.randint(low, high)))
        texts.append("".join(chars))
    for text, ids in zip(texts, tok.encode_batch(texts, add_bos=False)):
        assert not set(ids) & {0, 1, 2}, text
        assert tok.decode(ids) == text


# ---------------------------------------------------------------- v1 chat format


def _mistral_common_ids(messages: list[dict]) -> list[int]:
    """mistral_common's v1 encoder; its finetuning mode accepts conversations ending with an answer."""
    from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.protocol.instruct.validator import ValidationMode
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer as MCTokenizer

    kinds = {"system": SystemMessage, "user": UserMessage, "assistant": AssistantMessage}
    mode = ValidationMode.finetuning if messages[-1]["role"] == "assistant" else ValidationMode.test
    encoder = MCTokenizer.from_file(str(default_tokenizer_file()), mode=mode)
    request = ChatCompletionRequest(messages=[kinds[m["role"]](content=m["content"]) for m in messages])
    return encoder.encode_chat_completion(request).tokens


@pytest.mark.parametrize("index", range(len(CONVERSATIONS)))
def test_chat_ids_match_mistral_common(tok: MistralTokenizer, index: int) -> None:
    messages = CONVERSATIONS[index]
    ids, mask = tok.encode_chat(messages)
    assert ids == _mistral_common_ids(messages)
    assert len(mask) == len(ids)


def test_chat_worked_example(tok: MistralTokenizer) -> None:
    ids, mask = tok.encode_chat([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}])
    assert ids == [1, 733, 16289, 28793, 15359, 733, 28748, 16289, 28793, 22557, 2]
    assert mask == [False] * 9 + [True, True]
    # The EOS is followed by a dummy-prefixed "▁[" (token-level rule), not the "[" of the rendered string.
    ids, _ = tok.encode_chat(CONVERSATIONS[2])
    eos = ids.index(2)
    assert tok.id_to_piece(ids[eos + 1]) == "\u2581["


def test_target_mask_covers_answers_and_eos(tok: MistralTokenizer) -> None:
    messages = [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "one"},
        {"role": "assistant", "content": "first answer 🫠"},
        {"role": "user", "content": "two"},
        {"role": "assistant", "content": "skipped answer", "weight": 0},
        {"role": "user", "content": "three"},
        {"role": "assistant", "content": "last answer", "weight": 1},
    ]
    ids, mask = tok.encode_chat(messages)
    targets = [i for i, m in zip(ids, mask) if m]
    expected = tok.encode("first answer 🫠", add_bos=False, add_eos=True) + tok.encode(
        "last answer", add_bos=False, add_eos=True
    )
    assert targets == expected
    assert mask.count(True) == len(expected)
    assert ids.count(2) == 3  # the weight-0 answer keeps its EOS as context
    assert mask[0] is False and mask[-1] is True
    # the masked tokens are exactly the contiguous answer spans
    assert tok.decode([i for i, m in zip(ids, mask) if not m]) == (
        "<s> [INST] sys\n\none [/INST] [INST] two [/INST] skipped answer</s> [INST] three [/INST]"
    )


def test_generation_prompt(tok: MistralTokenizer) -> None:
    messages = CONVERSATIONS[1]
    ids, mask = tok.encode_chat(messages, add_generation_prompt=True)
    assert tok.decode(ids[-4:]) == "[/INST]" and not any(mask[-4:])  # ▁[ / INST ]
    with pytest.raises(ValueError, match=r"messages\[3\]\.role: add_generation_prompt=True"):
        tok.encode_chat(CONVERSATIONS[2], add_generation_prompt=True)


def _u(content: str = "a", **extra) -> dict:
    return {"role": "user", "content": content, **extra}


def _a(content: str = "b", **extra) -> dict:
    return {"role": "assistant", "content": content, **extra}


def _s(content: str = "s") -> dict:
    return {"role": "system", "content": content}


@pytest.mark.parametrize(
    ("messages", "pattern"),
    [
        ([], "messages is empty"),
        ("hi", "must be a list of dicts"),
        ([{"role": "bot", "content": "x"}], r"messages\[0\]\.role must be one of"),
        ([_u(), _u()], r"messages\[1\]\.role.*two 'user'"),
        ([_a()], r"messages\[0\]\.role.*start with a user"),
        ([_s(), _a()], r"messages\[1\]\.role.*start with a user"),
        ([_u("")], r"messages\[0\]\.content is empty"),
        ([_u(None)], r"messages\[0\]\.content must be a str"),
        ([_u(), _s()], r"messages\[1\]\.role: a system message"),
        ([_s()], "only a system message"),
        ([_u(weight=1)], r"messages\[0\]\.weight is only allowed on assistant"),
        ([_u(), _a(weight=2)], r"messages\[1\]\.weight must be 0 or 1"),
        ([_u(), "oops"], r"messages\[1\] must be a dict"),
        ([_u(), _a(), _a()], r"messages\[2\]\.role.*two 'assistant'"),
    ],
)
def test_chat_validation_errors(tok: MistralTokenizer, messages, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        tok.encode_chat(messages)


def test_chat_ignores_none_fields_from_datasets(tok: MistralTokenizer) -> None:
    """``datasets`` fills missing keys with None across rows: weight None on any role means 'default'."""
    messages = [_u(weight=None, name=None), _a(weight=None)]
    assert tok.encode_chat(messages) == tok.encode_chat([_u(), _a()])


def test_chat_template_text_matches_token_rule(tok: MistralTokenizer) -> None:
    """Render the Jinja template, split at the special-token text as transformers does (legacy mode: each
    chunk gets its own dummy prefix), encode each chunk: that must be encode_chat's ids."""
    import jinja2

    def raise_exception(message: str) -> None:
        raise jinja2.TemplateError(message)

    env = jinja2.Environment()
    env.globals["raise_exception"] = raise_exception
    template = env.from_string(tok.render_chat_template())
    for messages in CONVERSATIONS[:4] + CONVERSATIONS[5:]:  # [4] has literal "</s>" text: see docstring
        text = template.render(messages=messages, bos_token="<s>", eos_token="</s>", add_generation_prompt=False)
        assert text.startswith("<s>[INST] ")
        ids = [1]
        for position, chunk in enumerate(text[len("<s>"):].split("</s>")):
            if position:
                ids.append(2)
            if chunk:
                ids += tok.encode(chunk, add_bos=False)
        assert ids == tok.encode_chat(messages)[0]
    rendered = template.render(messages=CONVERSATIONS[1], bos_token="<s>", eos_token="</s>")
    assert rendered == "<s>[INST] Be brief.\n\nHi there [/INST] Hello 🫠</s>[INST]   again\nok [/INST]"
    with pytest.raises(jinja2.TemplateError, match="alternate"):
        template.render(messages=[{"role": "assistant", "content": "a"}], bos_token="<s>", eos_token="</s>")


# ---------------------------------------------------------------- batching


def test_padding_and_masks(tok: MistralTokenizer) -> None:
    texts = ["a b c d", "e"]
    lengths = [len(tok.encode(t)) for t in texts]
    out = tok(texts, padding=True)
    assert [len(r) for r in out["input_ids"]] == [max(lengths)] * 2
    assert out["input_ids"][1] == tok.encode("e") + [0] * (lengths[0] - lengths[1])
    assert out["attention_mask"][1] == [1] * lengths[1] + [0] * (lengths[0] - lengths[1])

    left = MistralTokenizer.from_pretrained(None, padding_side="left")
    out = left(texts, padding="longest", return_tensors="pt")
    assert out["input_ids"].dtype == torch.long and out["input_ids"].shape == (2, lengths[0])
    assert out["input_ids"][1].tolist() == [0] * (lengths[0] - lengths[1]) + tok.encode("e")
    assert out["attention_mask"][1].tolist() == [0] * (lengths[0] - lengths[1]) + [1] * lengths[1]

    out = tok(texts, padding="max_length", max_length=10, return_tensors="pt")
    assert out["input_ids"].shape == (2, 10) and out["attention_mask"].sum(1).tolist() == lengths

    single = tok("a b", return_tensors="pt")
    assert single["input_ids"].shape == (1, 3)
    assert tok("a b") == {"input_ids": [1, 264, 287], "attention_mask": [1, 1, 1]}
    assert tok("a b", add_special_tokens=False)["input_ids"] == [264, 287]


def test_truncation(tok: MistralTokenizer) -> None:
    text = "one two three four five six"
    full = tok.encode(text)
    out = tok([text, "x"], truncation=True, max_length=4, padding="max_length")
    assert out["input_ids"][0] == full[:4] and out["input_ids"][0][0] == 1
    assert out["attention_mask"][1] == [1, 1, 0, 0]
    tok.add_eos_token = True
    try:
        assert tok(text, truncation=True, max_length=4)["input_ids"] == full[:3] + [2]
    finally:
        tok.add_eos_token = False


def test_batch_call_errors(tok: MistralTokenizer) -> None:
    with pytest.raises(ValueError, match="needs equal lengths"):
        tok(["a b c", "d"], return_tensors="pt")
    with pytest.raises(ValueError, match="needs max_length"):
        tok(["a"], padding="max_length")
    with pytest.raises(ValueError, match="padding must be"):
        tok(["a"], padding="shortest")
    with pytest.raises(ValueError, match="empty list"):
        tok([])
    with pytest.raises(ValueError, match="return_tensors"):
        tok(["a"], return_tensors="np")
    with pytest.raises(ValueError, match="max_length must be a positive int"):
        tok(["a"], max_length=0, truncation=True)
    with pytest.raises(TypeError, match=r"texts\[1\] is int"):
        tok(["a", 1])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="padding_side must be one of"):
        tok.padding_side = "top"


def test_batch_decode_roundtrip(tok: MistralTokenizer) -> None:
    for side in ("right", "left"):
        tok.padding_side = side
        try:
            batch = tok(CORPUS, padding=True, return_tensors="pt")["input_ids"]
        finally:
            tok.padding_side = "right"
        assert tok.batch_decode(batch, skip_special_tokens=True) == CORPUS
    assert tok.batch_decode([tok.encode("Hi"), tok.encode("there", add_eos=True)]) == ["<s> Hi", "<s> there</s>"]


# ---------------------------------------------------------------- decoding


def test_decode_conventions(tok: MistralTokenizer) -> None:
    the = 415  # "▁The"
    assert tok.decode([1, the, 2, the]) == "<s> The</s> The"
    assert tok.decode([1, the, 2, the], skip_special_tokens=True) == "The The"
    assert tok.decode([the, 0, the]) == "The<unk> The"
    assert tok.decode([28705, 1736]) == " lead"  # only the first dummy prefix is dropped
    assert tok.decode(torch.tensor([1, the])) == "<s> The"
    with pytest.raises(ValueError, match="token id 32000 at position 1 is outside the vocabulary"):
        tok.decode([the, 32000])
    with pytest.raises(ValueError, match="at position 0 must be an int"):
        tok.decode([1.5])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="must be 1-D"):
        tok.decode(torch.zeros(2, 2, dtype=torch.long))


def _random_ids(rng: random.Random, length: int) -> list[int]:
    """Mostly byte pieces (valid and broken UTF-8) mixed with ordinary and special pieces."""
    emoji = list("🫠🦜".encode())
    ids = []
    while len(ids) < length:
        choice = rng.random()
        if choice < 0.3:
            ids += [3 + b for b in emoji[: rng.randint(1, 4)]]  # possibly truncated character
        elif choice < 0.5:
            ids.append(3 + rng.randint(0, 255))
        elif choice < 0.6:
            ids.append(rng.choice([0, 1, 2]))
        elif choice < 0.7:
            ids.append(rng.choice([28705, 259, 13]))  # "▁", "▁▁", "\n"
        else:
            ids.append(rng.randint(259, 31999))
    return ids


def test_decode_matches_sentencepiece_on_random_ids(tok: MistralTokenizer, sp: spm.SentencePieceProcessor) -> None:
    rng = random.Random(1)
    for _ in range(300):
        ids = _random_ids(rng, rng.randint(0, 25))
        without_special = [i for i in ids if i > 2]
        assert tok.decode(ids, skip_special_tokens=True) == sp.decode(without_special), ids


def test_stream_decode_equals_decode(tok: MistralTokenizer) -> None:
    rng = random.Random(2)
    cases = [tok.encode(t, add_eos=True) for t in CORPUS] + [_random_ids(rng, 30) for _ in range(100)]
    for ids in cases:
        for skip in (True, False):
            pieces = list(tok.decode_stream(ids, skip_special_tokens=skip))
            assert all(pieces)
            assert "".join(pieces) == tok.decode(ids, skip_special_tokens=skip), ids


def test_stream_decoder_emits_characters_when_complete(tok: MistralTokenizer) -> None:
    ids = tok.encode("Hi 🫠\n  there", add_bos=True)
    decoder = tok.stream_decoder()
    assert isinstance(decoder, StreamDecoder)
    outputs = [decoder.put(i) for i in ids]
    assert outputs == ["", "Hi", " ", "", "", "", "🫠", "\n", " ", " there"]
    assert decoder.flush() == ""
    # a truncated character is held back, then flushed as one U+FFFD per byte (sentencepiece's rule)
    decoder = tok.stream_decoder()
    assert [decoder.put(3 + b) for b in "🫠".encode()[:3]] == ["", "", ""]
    assert decoder.flush() == "\ufffd" * 3
    # a byte that can no longer complete its character comes out at once
    decoder = tok.stream_decoder()
    assert decoder.put(3 + 0xF0) == "" and decoder.put(3 + 0x41) == "\ufffdA"


# ---------------------------------------------------------------- saving for transformers


def test_save_pretrained_files(tmp_path, tok: MistralTokenizer) -> None:
    left = MistralTokenizer.from_pretrained(None, padding_side="left", model_max_length=4096)
    written = left.save_pretrained(tmp_path)
    assert sorted(p.name for p in written) == ["special_tokens_map.json", "tokenizer.model", "tokenizer_config.json"]
    assert (tmp_path / "tokenizer.model").read_bytes() == default_tokenizer_file().read_bytes()
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "LlamaTokenizer" and config["pad_token"] == "<unk>"
    assert config["add_bos_token"] is True and config["add_eos_token"] is False and config["legacy"] is True
    assert config["chat_template"] == tok.render_chat_template()
    reloaded = MistralTokenizer.from_pretrained(tmp_path)
    assert (reloaded.padding_side, reloaded.model_max_length) == ("left", 4096)
    reloaded.save_pretrained(tmp_path)  # saving onto its own file is fine
    assert reloaded.encode(CORPUS[8]) == tok.encode(CORPUS[8])


@pytest.fixture(scope="module")
def hf_tokenizers(tmp_path_factory, tok: MistralTokenizer):
    """transformers' AutoTokenizer on our saved folders: an exported model folder (config.json of model_type
    "mistral" beside the tokenizer) and a tokenizer-only folder saved with TokenizersBackend."""
    transformers = pytest.importorskip("transformers")
    model_folder = tmp_path_factory.mktemp("hf_model")
    tok.save_pretrained(model_folder)
    (model_folder / "config.json").write_text(json.dumps({"model_type": "mistral"}))
    tokenizer_folder = tmp_path_factory.mktemp("hf_tokenizer")
    tok.save_pretrained(tokenizer_folder, hf_tokenizer_class="TokenizersBackend")
    return [transformers.AutoTokenizer.from_pretrained(f) for f in (model_folder, tokenizer_folder)]


def test_transformers_autotokenizer_gives_our_ids(hf_tokenizers, tok: MistralTokenizer) -> None:
    for hf in hf_tokenizers:
        assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (1, 2, 0)
        for text in CORPUS[:-1]:  # the last has "</s>" text, which transformers parses as a control token
            assert hf(text)["input_ids"] == tok.encode(text), text
            ids = tok.encode(text, add_eos=True)
            for skip in (False, True):
                assert hf.decode(ids, skip_special_tokens=skip) == tok.decode(ids, skip_special_tokens=skip)
        batch = hf(CORPUS[:4], padding=True)["input_ids"]
        assert batch == tok(CORPUS[:4], padding=True)["input_ids"]


def test_transformers_chat_template_gives_our_ids(hf_tokenizers, tok: MistralTokenizer) -> None:
    hf = hf_tokenizers[0]
    for messages in CONVERSATIONS[:4] + CONVERSATIONS[5:]:
        ids = hf.apply_chat_template(messages, tokenize=True)
        ids = ids["input_ids"] if not isinstance(ids, list) else ids
        assert ids == tok.encode_chat(messages)[0]


def test_transformers_llama_tokenizer_class_loads(tmp_path, hf_tokenizers, tok: MistralTokenizer) -> None:
    """The default (hub-style) tokenizer_class on a tokenizer-only folder: transformers 5 builds its own
    LlamaTokenizer, which agrees with us except on text starting with a space and on whitespace runs
    (documented in save_pretrained), so compare on text without those."""
    from transformers import AutoTokenizer

    tok.save_pretrained(tmp_path)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    assert type(hf).__name__ == "LlamaTokenizer" and hf.pad_token_id == 0
    for text in ["Hello world", "emoji 🫠 ok 🦜😀", "a\nb\n\n c\n", CORPUS[9], CORPUS[10], "trailing space "]:
        assert hf(text)["input_ids"] == tok.encode(text), text


# ---------------------------------------------------------------- id checks


def test_check_token_ids() -> None:
    assert check_token_ids([0, 5, 9], 10) is None
    assert check_token_ids([[1], [2, 3]], 10) is None
    assert check_token_ids(torch.zeros(2, 3, dtype=torch.long), 10) is None
    assert check_token_ids([], 10) is None
    with pytest.raises(ValueError, match=r"labels: token id 10 at position 2 is outside the vocabulary \[0, 10\)"):
        check_token_ids([1, 2, 10], 10, where="labels")
    with pytest.raises(ValueError, match=r"batch: token id -1 at position \(1, 0\)"):
        check_token_ids([[1, 2], [-1]], 10, where="batch")
    with pytest.raises(ValueError, match=r"token id 12 at position \(0, 1\)"):
        check_token_ids(torch.tensor([[1, 12], [3, 4]]), 10)
    with pytest.raises(ValueError, match=r"token id 99 at position 0"):
        check_token_ids(np.array([99]), 10)
    with pytest.raises(ValueError, match="must be ints"):
        check_token_ids([1, 2.5], 10)
    with pytest.raises(ValueError, match="must be integers"):
        check_token_ids(torch.tensor([1.0]), 10)
    with pytest.raises(ValueError, match="vocab_size must be a positive int"):
        check_token_ids([1], 0)
