"""Secret keys are whole words of the key, so token counts and tokenizer paths are never masked."""

from __future__ import annotations

import pytest

from mistral_ft.masking import is_secret_key, mask_text
from mistral_ft.training.schema import mask_secret, strip_secrets

SECRET = ["logger.api_key", "+logger.access_key", "+logger.credentials", "+data.hf_auth", "hf_token", "WANDB_TOKEN",
          "db.password", "db.passwd", "aws.secret", "apiKey", "logger.apikey", "ssh.private_key", "auth_token",
          "my-credential", "x.secrets"]
NOT_SECRET = ["text_key", "label_key", "pad_token_id", "max_new_tokens", "model.tokenizer", "train_tokens",
              "data.prompt_key", "author", "private", "token_count", "tokens", "key", "access_log", "eos_token_id"]


@pytest.mark.parametrize("key", SECRET)
def test_secret_keys(key):
    assert is_secret_key(key)


@pytest.mark.parametrize("key", NOT_SECRET)
def test_keys_that_are_not_secret(key):
    assert not is_secret_key(key)


def test_masking_in_text_overrides_and_configs():
    text = ("unknown key (from the command line: +logger.access_key=AKIA123) and +data.hf_auth='hf_abc', "
            "credentials: s3cr3t; text_key=instruction pad_token_id=0")
    out = mask_text(text)
    for value in ("AKIA123", "hf_abc", "s3cr3t"):
        assert value not in out
    assert "+logger.access_key=***" in out and "text_key=instruction" in out and "pad_token_id=0" in out
    assert mask_secret("+logger.credentials=xyz") == "+logger.credentials=***"
    assert mask_secret("data.text_key=xyz") == "data.text_key=xyz"
    assert strip_secrets({"model": {"tokenizer": "t"}, "logger": {"access_key": "k"}, "max_new_tokens": 3}) == {
        "model": {"tokenizer": "t"}, "logger": {}, "max_new_tokens": 3}


def test_log_handlers_mask_secret_values():
    import io
    import logging

    from mistral_ft.masking import mask_log_handlers

    logger = logging.getLogger("mistral_ft.test_masking")
    logger.propagate = False
    stream = io.StringIO()
    logger.addHandler(logging.StreamHandler(stream))
    mask_log_handlers(logger)
    mask_log_handlers(logger)  # idempotent: one filter per handler
    assert len(logger.handlers[0].filters) == 1
    logger.warning("override %s and max_new_tokens=%d", "+logger.access_key=AKIA999", 8)
    assert stream.getvalue().strip() == "override +logger.access_key=*** and max_new_tokens=8"
