"""Secrets never reach a log line: passwords in URLs, bearer tokens, JWTs, configured secrets.

Two layers. Code that logs a URL logs ``redact_url(url)``. And the CLI's log handler formats
through ``RedactingFormatter``, which runs ``redact`` over every finished line, traceback
included, so a secret that arrives inside a library's exception text is caught as well: URL
credentials (``scheme://user:password@`` and ``password=``/``token=`` query values), the token
after ``Bearer``, anything shaped like a JWT (three base64url parts, the first two starting
``eyJ``), and the values registered with ``add_secret`` (the HS256 secret, read from the
environment at start-up).
"""

from __future__ import annotations

import logging
import re
from urllib.parse import urlsplit, urlunsplit

MASK = "***"
MIN_SECRET_CHARS = 6
"""Registered secrets shorter than this are not searched for (they would mask ordinary words)."""

_URL_CREDENTIALS = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<user>[^\s:@/]*):(?P<password>[^\s@/]*)@")
_QUERY_SECRET = re.compile(r"(?i)(?P<key>[?&;](?:password|passwd|pwd|token|secret|access_token|api_key)=)[^&;\s#]*")
_BEARER = re.compile(r"(?i)(?P<key>bearer\s+)[A-Za-z0-9._~+/=-]+")
_JWT = re.compile(r"eyJ[A-Za-z0-9_-]*\.eyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]*")

_secrets: set[str] = set()


def add_secret(value: str) -> None:
    """Mask ``value`` wherever it appears in a log line from now on."""
    if value and len(value) >= MIN_SECRET_CHARS:
        _secrets.add(value)


def redact(text: str) -> str:
    """``text`` with every secret this module recognises replaced by ``***``."""
    text = _URL_CREDENTIALS.sub(lambda m: f"{m['scheme']}{m['user']}:{MASK}@", text)
    text = _QUERY_SECRET.sub(lambda m: f"{m['key']}{MASK}", text)
    text = _BEARER.sub(lambda m: f"{m['key']}{MASK}", text)
    text = _JWT.sub(MASK, text)
    for secret in _secrets:
        if secret in text:
            text = text.replace(secret, MASK)
    return text


def redact_url(url: str) -> str:
    """``url`` without its password (user names stay: they help and are not secret)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return redact(url)
    if parts.password is None:
        return redact(url)
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    netloc = f"{parts.username or ''}:{MASK}@{host}"
    return redact(urlunsplit(parts._replace(netloc=netloc)))


class RedactingFormatter(logging.Formatter):
    """A ``logging.Formatter`` whose output (message, arguments, traceback) passes ``redact``."""

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))
