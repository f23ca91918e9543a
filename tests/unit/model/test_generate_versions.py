"""generate --chat / --prompt on v3 and Tekken models: the prompt ids are mistral_common's (test mode, ending
with the user turn), the streamed text equals the decode of the generated ids; no v1 fallback."""

from __future__ import annotations

import importlib.resources
import io
from pathlib import Path

import pytest
import torch
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.protocol.instruct.validator import ValidationMode
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer as Reference

from mistral_ft.model.tiny import build_tiny
from mistral_ft.tokenizer import MistralTokenizer

DATA = Path(str(importlib.resources.files("mistral_common") / "data"))


def _folder(tmp_path: Path, file: str, vocab_size: int) -> Path:
    folder = build_tiny(tmp_path / "model", overrides={"vocab_size": vocab_size})
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        (folder / name).unlink(missing_ok=True)
    MistralTokenizer.from_pretrained(DATA / file).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("file, vocab_size", [("mistral_instruct_tokenizer_240323.model.v3", 32768),
                                              ("tekken_240718.json", 131072)])
def test_cli_chat_uses_the_models_own_format(tmp_path, capsys, monkeypatch, file, vocab_size):
    from mistral_ft import MistralForCausalLM
    from mistral_ft.generate import main

    folder = _folder(tmp_path, file, vocab_size)
    monkeypatch.setattr("sys.stdin", io.StringIO("Hi there\nTell me more 🙂\n/exit\n"))
    assert main(["--model", str(folder), "--chat", "--system", "Be brief.", "--max-new-tokens", "6"]) == 0
    out = capsys.readouterr().out
    model = MistralForCausalLM.from_pretrained(folder)
    reference = Reference.from_file(str(DATA / file), mode=ValidationMode.test)
    ours = MistralTokenizer.from_pretrained(folder)
    messages, replies = [{"role": "system", "content": "Be brief."}], []
    for user in ["Hi there", "Tell me more 🙂"]:
        messages.append({"role": "user", "content": user})
        ids = reference.encode_chat_completion(ChatCompletionRequest.model_validate({"messages": messages})).tokens
        new = model.generate(torch.tensor([ids]), max_new_tokens=6)[0, len(ids):]
        replies.append(ours.decode(new, skip_special_tokens=True))
        if replies[-1].strip():
            messages.append({"role": "assistant", "content": replies[-1]})
        else:
            messages.pop()
    assert out == "".join(r + "\n" for r in replies)


def test_folder_without_tokenizer_and_non_v1_vocab_is_refused(tmp_path, capsys):
    from mistral_ft.generate import main

    folder = build_tiny(tmp_path / "model", overrides={"vocab_size": 32768})
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        (folder / name).unlink(missing_ok=True)
    assert main(["--model", str(folder), "--prompt", "Hi", "--max-new-tokens", "2"]) == 2
    assert "no tokenizer file" in capsys.readouterr().err
