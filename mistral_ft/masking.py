"""Which config keys hold secrets, and masking their values in any text we print, log or write.

Why whole words: a substring rule ("token" anywhere) masked `pad_token_id` and `max_new_tokens` while
missing `+logger.access_key=` and `+data.hf_auth=`, whose values were then printed in clear. A key is
split into words on `.`, `_` and `-` (case-insensitive); it is secret when a word is one of

    secret(s), password, passwd, credential(s), auth, apikey

or two neighbouring words are api+key, access+key or private+key, or its *last* word is `token`
(`hf_token`, `auth_token`; not `pad_token_id`, `max_new_tokens`, `model.tokenizer`, `text_key`).
"""

from __future__ import annotations

import logging
import re
from typing import Optional

_WORDS = {"secret", "secrets", "password", "passwd", "credential", "credentials", "auth", "apikey"}
_PAIRS = {("api", "key"), ("access", "key"), ("private", "key")}
MASK = "***"


def is_secret_key(key: str) -> bool:
    """True when the (dotted) key's value must never be shown (see the module docstring)."""
    words = [w for w in re.split(r"[._\-]+", str(key).lstrip("+~").lower()) if w]
    if not words:
        return False
    if any(w in _WORDS for w in words) or any(p in _PAIRS for p in zip(words, words[1:])):
        return True
    return words[-1] == "token"


# KEY=VALUE (overrides, messages), then KEY: VALUE (YAML-like lines); a value runs to whitespace, a quote,
# a comma or a closing bracket. Two passes, so "command line: +x.access_key=v" is seen as an assignment to
# x.access_key, not as the value of "line".
_EQ = re.compile(r"(?P<key>[+~]?[A-Za-z_][\w.\-]*)(?P<sep>\s*=\s*)(?P<q>['\"]?)(?P<value>[^\s'\",)}\]]+)")
_COLON = re.compile(r"(?P<key>[A-Za-z_][\w.\-]*)(?P<sep>:\s*)(?P<q>['\"]?)(?P<value>[^\s'\",)}\]=]+)")


def _repl(m: re.Match[str]) -> str:
    if not is_secret_key(m.group("key")):
        return m.group(0)
    return f"{m.group('key')}{m.group('sep')}{m.group('q')}{MASK}"


def mask_text(text: str) -> str:
    """`text` with the value of every `secret_key=value` / `secret_key: value` replaced by ***."""
    return _COLON.sub(_repl, _EQ.sub(_repl, str(text)))


class MaskingFilter(logging.Filter):
    """Masks secret values in every record a handler writes (train.log, the console)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        masked = mask_text(message)
        if masked != message:
            record.msg, record.args = masked, None
        return True


def mask_log_handlers(logger: Optional[logging.Logger] = None) -> None:
    """Put a `MaskingFilter` on every handler of `logger` (default: root, where Hydra puts train.log's)."""
    for handler in (logger or logging.getLogger()).handlers:
        if not any(isinstance(f, MaskingFilter) for f in handler.filters):
            handler.addFilter(MaskingFilter())
