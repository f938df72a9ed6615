"""Timestamps as the API writes them: GMT, ``YYYY-MM-DDTHH:MM:SS.mmmmmm``, no zone suffix.

Inside the service a time is an ``int`` of microseconds since the Unix epoch:
exact, cheap to compare, and free of float rounding at microsecond precision.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def now_us() -> int:
    return time.time_ns() // 1000


#: The text of recently formatted whole seconds: every Level2 message carries
#: two time stamps, the exchange's and Caspian's, and building a datetime for
#: each was a tenth of the live path's time. Remembering only the last second
#: was not enough: once the exchange's stamps lag by a few hundred milliseconds,
#: consecutive calls alternate between two seconds.
_seconds: dict[int, str] = {}
#: Enough for stamps a few seconds apart; the cache is emptied when full.
_SECONDS_KEPT = 16
#: The text up to the millisecond of recent milliseconds: a busy feed stamps
#: many events within one, and a format spec per call cost as much as the
#: rest of the call. Kept small, so that its strings live about as long as
#: the messages made of them: thousands of them, each kept for seconds, held
#: the allocator's pools and raised the soak's memory floor.
_millis: dict[int, str] = {}
_MILLIS_KEPT = 64
_DIGITS3 = tuple(f"{n:03d}" for n in range(1000))


def format_us(us: int) -> str:
    """``1528445624653000`` -> ``"2018-06-08T08:13:44.653000"``."""
    millis, micros = divmod(us, 1000)
    text = _millis.get(millis)
    if text is None:
        if len(_millis) >= _MILLIS_KEPT:
            _millis.clear()
        second, milli = divmod(millis, 1000)
        text = _millis[millis] = f"{_second_text(second)}.{_DIGITS3[milli]}"
    return text + _DIGITS3[micros]


def _second_text(second: int) -> str:
    text = _seconds.get(second)
    if text is None:
        if len(_seconds) >= _SECONDS_KEPT:
            _seconds.clear()
        text = _seconds[second] = (_EPOCH + timedelta(seconds=second)).strftime("%Y-%m-%dT%H:%M:%S")
    return text


def format_dt(dt: datetime) -> str:
    if dt.tzinfo is not None:
        dt = dt.astimezone(UTC).replace(tzinfo=None)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.%f")


def parse_us(text: str) -> int:
    """Parse an API timestamp (a zone suffix, if any, is honoured; none means GMT)."""
    dt = datetime.fromisoformat(text)
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    delta = dt - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def us_to_dt(us: int) -> datetime:
    """A naive GMT datetime, as the store keeps them."""
    return (_EPOCH + timedelta(microseconds=us)).replace(tzinfo=None)
