"""Book integrity checks of the live source: checksums, sequence numbers, crossed books.

ccxt.pro keeps each exchange's book and validates some of them itself (see
:mod:`caspian.sources.live`); the checks here cover what it leaves out. Each
check looks at one raw exchange message after ccxt has applied it, together
with ccxt's resulting book, and raises :class:`IntegrityError` when the book
can no longer be trusted. No I/O: the live source feeds them.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from decimal import Decimal
from typing import Any, Protocol


class IntegrityError(Exception):
    """The local book is wrong or may be; ``reason`` labels the resync metric."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


class BookCheck(Protocol):
    """Checks one raw message of a symbol's connection against ccxt's book after it."""

    def __call__(self, message: Any, book: Mapping[str, Any] | None) -> None: ...


def decimals(step: float | str | None, default: int) -> int:
    """Decimal places of a price or size step (``0.1`` -> 1), ``default`` when unknown."""
    if step is None:
        return default
    exponent = Decimal(str(step)).normalize().as_tuple().exponent
    return max(0, -exponent) if isinstance(exponent, int) else default


def _digits(value: float, places: int) -> str:
    return f"{value:.{places}f}".replace(".", "").lstrip("0")


def kraken_checksum(
    bids: Sequence[Sequence[float]],
    asks: Sequence[Sequence[float]],
    price_places: int,
    qty_places: int,
) -> int:
    """Kraken's CRC32 of the top 10 asks (best first) then the top 10 bids.

    Each level is its price then its quantity, written with the pair's
    precision, without the decimal point and without leading zeros.
    """
    text = "".join(
        _digits(level[0], price_places) + _digits(level[1], qty_places)
        for side in (asks, bids)
        for level in side[:10]
    )
    return zlib.crc32(text.encode()) & 0xFFFFFFFF


class KrakenChecksum:
    """Kraken WebSocket v2 ``book`` messages carry the checksum of the top 10 levels.

    ccxt's own Kraken check is off by default (it formats ccxt's floats
    wrongly), so it is done here, with the pair's precision from its market.
    """

    def __init__(self, symbol: str, price_places: int, qty_places: int) -> None:
        self._symbol = symbol
        self._price_places = price_places
        self._qty_places = qty_places

    def __call__(self, message: Any, book: Mapping[str, Any] | None) -> None:
        if not isinstance(message, dict) or message.get("channel") != "book":
            return
        for data in message.get("data") or ():
            if not isinstance(data, dict) or data.get("symbol") != self._symbol:
                continue
            expected = data.get("checksum")
            if expected is None:
                continue
            if book is None:
                raise IntegrityError("sequence", f"{self._symbol}: an update without a book")
            actual = kraken_checksum(
                book["bids"], book["asks"], self._price_places, self._qty_places
            )
            if actual != int(expected):
                raise IntegrityError(
                    "checksum", f"{self._symbol}: checksum {actual} != exchange's {expected}"
                )


class DeribitSequence:
    """Each Deribit ``book`` change names the ``change_id`` it follows (``prev_change_id``).

    ccxt applies changes without looking at either, so a lost message would
    go unnoticed there.
    """

    def __init__(self, instrument: str) -> None:
        self._instrument = instrument
        self._last: int | None = None

    def __call__(self, message: Any, book: Mapping[str, Any] | None) -> None:
        if not isinstance(message, dict) or message.get("method") != "subscription":
            return
        params = message.get("params")
        if not isinstance(params, dict) or not str(params.get("channel", "")).startswith("book."):
            return
        data = params.get("data")
        if not isinstance(data, dict) or data.get("instrument_name") != self._instrument:
            return
        change_id = data.get("change_id")
        if data.get("type") == "snapshot":
            self._last = change_id
            return
        previous = data.get("prev_change_id")
        if self._last is None or previous != self._last:
            raise IntegrityError(
                "sequence",
                f"{self._instrument}: change {change_id} follows {previous}, "
                f"the last one seen is {self._last}",
            )
        self._last = change_id


def crossed(bids: Sequence[Sequence[float]], asks: Sequence[Sequence[float]]) -> bool:
    """Whether the best bid is at or above the best ask (ccxt keeps both sides best first)."""
    return bool(bids) and bool(asks) and bids[0][0] >= asks[0][0]
