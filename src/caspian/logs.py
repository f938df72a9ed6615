"""Logging that never shows an access token, a secret or a password, at any level.

At debug level the libraries under the service log what clients send them:
websockets logs each handshake's request line (``?accessToken=``) and headers
(``Authorization``), aiosqlite each statement. Redaction therefore happens
where every record is made, whatever logger made it and whatever handler
writes it: uvicorn installs handlers of its own after the service starts, and
a filter on a logger does not see records propagated from its children.

An access token is shown as ``jwt:`` and the first six characters of its
signature: enough to tell one client's token from another's in a log, nothing
that signs, forges or replays one. Secrets, passwords and anything else under
a secret's name are shown as ``[redacted]``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import Any

#: Names whose values are secret, in JSON, reprs, query strings and keyword reprs.
_NAMES = (
    r"access_?token|refresh_?token|metrics_?token|token|jwt_?secret|secret_?access_?key"
    r"|secret|password|passwd|pass|authorization"
)
#: ``"name": "value"``, ``'name': 'value'`` and ``(b'name', b'value')``.
_QUOTED = re.compile(
    rf"""(?i)(?<![\w-])(['"])({_NAMES})\1(\s*[:,]\s*b?)(['"])((?:\\.|(?!\4).)*)\4"""
)
#: ``name='value'``, as a keyword repr shows it.
_ASSIGNED_QUOTED = re.compile(rf"""(?i)(?<![\w-])({_NAMES})(=b?)(['"])((?:\\.|(?!\3).)*)\3""")
#: ``name=value``, as in a query string.
_ASSIGNED = re.compile(rf"""(?i)(?<![\w-])({_NAMES})(=)([^\s'"&#,;)}}\]]+)""")
#: An HTTP header line: ``Authorization: Bearer value``.
_HEADER = re.compile(r"""(?i)(?<![\w-])(authorization\s*:\s*)([^\s'",;)}\]][^\r\n'",;)}\]]*)""")
#: A JWT anywhere: base64url JSON header and payload (``{"`` encodes as ``eyJ``), signature.
_JWT = re.compile(r"\beyJ[\w-]+\.[\w-]+\.([\w-]+)")
#: The end of a message that websockets cut short at debug level (``'{"payload":...TAIL"}'``):
#: a TokenRefresh's tail is its token's signature.
_CUT_TAIL = re.compile(r"""\.\.\.[\w-]{12,}(?=['"])""")
#: A password or secret hash as the store keeps it.
_ARGON2 = re.compile(r"\$argon2(?:id|i|d)\$[\w$=,+/.-]+")
#: What a masked token looks like.
_MARK = re.compile(r"jwt:[\w-]{0,6}…")
_SCHEMES = ("bearer ", "basic ", "token ")
_REDACTED = "[redacted]"


def _mask(value: str) -> str:
    if value == _REDACTED or _MARK.fullmatch(value):
        # Masked already, as an argument before the whole message.
        return value
    for scheme in _SCHEMES:
        if value[: len(scheme)].lower() == scheme:
            return value[: len(scheme)] + _mask(value[len(scheme) :].strip())
    token = _JWT.fullmatch(value)
    if token is not None:
        return _jwt_mark(token)
    return _REDACTED


def _jwt_mark(match: re.Match[str]) -> str:
    return f"jwt:{match.group(1)[:6]}…"


def redact(text: str) -> str:
    """``text`` with every token, secret, password and password hash masked."""
    text = _QUOTED.sub(lambda m: f"{m[1]}{m[2]}{m[1]}{m[3]}{m[4]}{_mask(m[5])}{m[4]}", text)
    text = _ASSIGNED_QUOTED.sub(lambda m: f"{m[1]}{m[2]}{m[3]}{_mask(m[4])}{m[3]}", text)
    text = _ASSIGNED.sub(lambda m: f"{m[1]}{m[2]}{_mask(m[3])}", text)
    text = _HEADER.sub(lambda m: f"{m[1]}{_mask(m[2].strip())}", text)
    text = _JWT.sub(_jwt_mark, text)
    text = _CUT_TAIL.sub(f"...{_REDACTED}", text)
    return _ARGON2.sub(f"$argon2…{_REDACTED}", text)


_TRACEBACKS = logging.Formatter()


def redact_record(record: logging.LogRecord) -> None:
    """Mask secrets in a record's message, arguments, traceback and stack."""
    if isinstance(record.args, tuple):
        # Argument by argument first, so that formatters which read the arguments
        # (uvicorn's access log does) still find them in place.
        record.args = tuple(redact(arg) if isinstance(arg, str) else arg for arg in record.args)
    try:
        message = record.getMessage()
    except Exception:
        # A message that does not format: logging reports it when it is written.
        return
    clean = redact(message)
    if clean != message:
        record.msg, record.args = clean, None
    if record.exc_info and record.exc_info[1] is not None and not record.exc_text:
        # Formatters use a traceback already formatted rather than format it again.
        record.exc_text = redact(_TRACEBACKS.formatException(record.exc_info))
    if record.stack_info:
        record.stack_info = redact(record.stack_info)


class _RedactingFactory:
    """A log record factory that redacts what the factory before it made."""

    def __init__(self, previous: Callable[..., logging.LogRecord]) -> None:
        self.previous = previous

    def __call__(self, *args: Any, **kwargs: Any) -> logging.LogRecord:
        record = self.previous(*args, **kwargs)
        redact_record(record)
        return record


def install_redaction() -> None:
    """Redact every log record made from now on, in this process. Safe to call again."""
    current = logging.getLogRecordFactory()
    if not isinstance(current, _RedactingFactory):
        logging.setLogRecordFactory(_RedactingFactory(current))
