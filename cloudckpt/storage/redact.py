"""Keeping credentials out of everything cloudckpt prints or logs.

One function, ``redact``, used by the command line's output, by the logging
filter the command line attaches under ``--debug`` (botocore's DEBUG log
prints request headers, canonical requests and signed URLs), and by the
retry module's error texts. It removes:

* the values of secret-looking environment variables (``AWS_SECRET_ACCESS_KEY``,
  ``AWS_SESSION_TOKEN``, ``*TOKEN*``, ``*PASSWORD*``,
  ...), wherever they appear;
* credential headers and fields, in any of the forms the libraries print
  (``Authorization: ...``, ``'X-Amz-Security-Token': b'...'``,
  ``x-amz-security-token:...`` in a canonical request, ``"access_token": "..."``);
* signed-URL query parameters (``X-Amz-Signature``, ``X-Amz-Credential``,
  ``X-Goog-Signature``, ``X-Goog-Credential``, ``access_token``, ...);
* AWS access key ids (``AKIA...``/``ASIA...``) except their last four
  characters, which is how error messages name credentials.

Redaction is by pattern, so it errs on the side of hiding: a field merely
named like a secret loses its value too.
"""

from __future__ import annotations

import logging
import os
import re

MASK = "***"

#: Environment variable names whose values are secrets (matched as substrings).
_SECRET_ENV_WORDS = ("SECRET", "TOKEN", "PASSWORD", "PASSWD", "CREDENTIAL", "API_KEY")
#: Variables naming files or places, not secrets.
_NOT_SECRET_SUFFIXES = ("_FILE", "_PATH", "_DIR", "_URL", "_URI", "_ENDPOINT", "_HOST")
#: Shorter values are not redacted by value (they would blank out ordinary words).
_MIN_SECRET_LEN = 12

# Names of headers and fields whose values are credentials.
_SECRET_NAME = (
    r"(?:proxy-)?authorization|x-amz-security-token|x-amz-credential|x-amz-signature"
    r"|x-goog-(?:[a-z0-9-]*-)?(?:token|auth|authorization|credential|signature|key|secret)"
    r"(?:-[a-z0-9-]*)?"
    r"|cookie|set-cookie|secret[_-]?access[_-]?key|aws[_-]?secret[_-]?access[_-]?key"
    r"|(?:aws[_-]?)?session[_-]?token|security[_-]?token|access[_-]?token|refresh[_-]?token"
    r"|id[_-]?token|client[_-]?secret|private[_-]?key(?:[_-]?id)?|password|api[_-]?key"
)
# 'Name': b'value'  /  "name": "value"  /  name='value'  (quoted values, up to the quote)
_QUOTED_FIELD = re.compile(
    rf"(?P<head>(?<![A-Za-z0-9_-])['\"]?(?:{_SECRET_NAME})['\"]?\s*[:=]\s*b?(?P<q>['\"]))"
    r"(?P<value>(?:\\.|(?!(?P=q)).)*)",
    re.IGNORECASE,
)
# Authorization: value  /  x-amz-security-token:value  (unquoted, up to the end of the line)
_BARE_FIELD = re.compile(
    rf"(?P<head>(?<![A-Za-z0-9_?&;-])(?:{_SECRET_NAME})\s*[:=][ \t]*)"
    r"(?P<value>[^'\"\s][^\r\n]*)",
    re.IGNORECASE,
)
# ?X-Amz-Signature=...&  (signed URLs, OAuth tokens in query strings)
_QUERY_PARAM = re.compile(
    r"(?P<head>(?:[?&;]|&amp;)(?:x-amz-signature|x-amz-credential|x-amz-security-token"
    r"|x-goog-signature|x-goog-credential|signature|sig|access_token|token|key"
    r"|awsaccesskeyid|googleaccessid|client_secret)=)(?P<value>[^&\s'\"#<>]*)",
    re.IGNORECASE,
)
_ACCESS_KEY_ID = re.compile(r"\b(?:AKIA|ASIA|AROA|AIDA)[A-Z0-9]{12}(?P<tail>[A-Z0-9]{4})\b")


def secret_values(environ: os._Environ[str] | dict[str, str] | None = None) -> list[str]:
    """Values of secret-looking environment variables, longest first."""
    env = os.environ if environ is None else environ
    found = set()
    for name, value in env.items():
        upper = name.upper()
        if not any(w in upper for w in _SECRET_ENV_WORDS) or upper.endswith(_NOT_SECRET_SUFFIXES):
            continue
        if len(value) >= _MIN_SECRET_LEN and not value.startswith(
            ("/", "~", "http://", "https://")
        ):
            found.add(value)
    return sorted(found, key=len, reverse=True)


def redact(text: str, secrets: list[str] | None = None) -> str:
    """``text`` with credentials replaced by ``***`` (see the module docstring).

    Args:
        text: Anything about to be printed or logged.
        secrets: Literal values to remove; default: ``secret_values()`` now.
    """
    for secret in secret_values() if secrets is None else secrets:
        if secret in text:
            text = text.replace(secret, MASK)
    text = _QUERY_PARAM.sub(lambda m: m["head"] + MASK, text)
    text = _QUOTED_FIELD.sub(lambda m: m["head"] + MASK, text)
    text = _BARE_FIELD.sub(lambda m: m["head"] + MASK, text)
    return _ACCESS_KEY_ID.sub(lambda m: "..." + m["tail"], text)


class RedactingFilter(logging.Filter):
    """Rewrites each record's message (and traceback) through ``redact``; drops nothing."""

    def __init__(self) -> None:
        super().__init__()
        self._secrets = secret_values()
        self._formatter = logging.Formatter()

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a broken format string: show it raw, still redacted
            message = f"{record.msg} {record.args}"
        record.msg, record.args = redact(message, self._secrets), None
        if record.exc_info and not record.exc_text:
            record.exc_text = self._formatter.formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text, self._secrets)
        if record.stack_info:
            record.stack_info = redact(record.stack_info, self._secrets)
        return True
