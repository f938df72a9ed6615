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


class KucoinSequence:
    """KuCoin's level2 updates chain by the book's sequence numbers.

    A spot update (``/market/level2``) spans ``sequenceStart`` to
    ``sequenceEnd``; KuCoin's documented rule is that it follows the last one
    when ``sequenceStart <= last sequenceEnd + 1`` (the sequence of each
    change only dates that price's last change, so spans may skip numbers
    within but never between updates). A futures update
    (``/contractMarket/level2``) carries one ``sequence``, one more than the
    last one's.

    ccxt caches the updates until its REST snapshot, replays those after the
    snapshot's sequence, then applies each update without comparing it with
    the last: a lost update leaves a wrong book. The chain is followed from
    the connection's first update, so that a hole among the cached updates,
    which ccxt replays unchecked too, shows as well.
    """

    def __init__(self, market_id: str) -> None:
        self._market_id = market_id
        self._futures_topic = f"/contractMarket/level2:{market_id}"
        self._last: int | None = None

    @classmethod
    def for_market(cls, market: Mapping[str, Any]) -> KucoinSequence:
        """The check of a ccxt market."""
        return cls(str(market["id"]))

    def __call__(self, message: Any, book: Mapping[str, Any] | None) -> None:
        if not isinstance(message, dict) or message.get("type") != "message":
            return
        data = message.get("data")
        if not isinstance(data, dict):
            return
        if message.get("subject") == "trade.l2update" and data.get("symbol") == self._market_id:
            start, end = _sequence(data.get("sequenceStart")), _sequence(data.get("sequenceEnd"))
        elif message.get("topic") == self._futures_topic:
            start = end = _sequence(data.get("sequence"))
        else:
            return
        if start is None or end is None:
            raise IntegrityError("sequence", f"{self._market_id}: an update without sequence")
        last = self._last
        if last is None:
            self._last = end
            return
        if start > last + 1:
            raise IntegrityError(
                "sequence",
                f"{self._market_id}: update {start}-{end} after {last}: "
                f"{start - last - 1} sequence numbers lost",
            )
        if end > last:
            self._last = end
            return
        # An update already covered. ccxt drops it once its book is synced
        # (it skips updates ending at or before the book's nonce); before
        # that it caches the update and may replay it over newer changes.
        nonce = None if book is None else book.get("nonce")
        if nonce is None:
            raise IntegrityError(
                "sequence", f"{self._market_id}: update {start}-{end} repeats {last}"
            )


def _sequence(value: Any) -> int | None:
    """A sequence number as KuCoin writes them, a JSON number or a string of digits."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.isdigit():
        return int(value)
    return None


#: Levels a side in OKX's checksum.
_OKX_DEPTH = 25


def okx_checksum(bids: Sequence[Sequence[str]], asks: Sequence[Sequence[str]]) -> int:
    """OKX's checksum of a book: the CRC32 of its top 25 levels a side, as a signed int32.

    The levels go best bid, best ask, second bid, second ask, ... (the shorter
    side just ends early), each as ``price:size`` in the strings OKX sent, all
    joined by colons.
    """
    fields: list[str] = []
    for i in range(_OKX_DEPTH):
        for side in (bids, asks):
            if i < len(side):
                fields += side[i][:2]
    crc = zlib.crc32(":".join(fields).encode())
    return crc - (1 << 32) if crc >= 1 << 31 else crc


class OkxChecksum:
    """Each OKX ``books`` message carries the checksum of the top 25 levels after it.

    ccxt follows the ``seqId``/``prevSeqId`` chain, dropping its book at a
    hole (seen here as an update with no book), but sums nothing: a relay
    that drops the sequence fields, or a message that lost a level, leaves
    it a wrong book. OKX sums its price and size strings as sent (``"100"``
    where ccxt's float writes ``100.0``, ``"0.00001"`` where it writes
    ``1e-05``), so the check keeps OKX's strings of each level ccxt may hold,
    by price, and writes ccxt's own top 25 with them. OKX announced it sends
    0 once it deprecates the checksum (23 June 2026 in production): 0 is not
    checked.
    """

    def __init__(self, inst_id: str) -> None:
        self._inst_id = inst_id
        # Bids, then asks: by price as ccxt keys it, OKX's two strings and the size.
        self._texts: tuple[dict[float, tuple[str, str, float]], ...] = ({}, {})

    @classmethod
    def for_market(cls, market: Mapping[str, Any]) -> OkxChecksum:
        """The check of a ccxt market."""
        return cls(str(market["id"]))

    def __call__(self, message: Any, book: Mapping[str, Any] | None) -> None:
        if not isinstance(message, dict):
            return
        arg = message.get("arg")
        if (
            not isinstance(arg, dict)
            or arg.get("channel") != "books"
            or arg.get("instId") != self._inst_id
        ):
            return
        data = message.get("data")
        if not isinstance(data, list) or not data:
            return
        if message.get("action") == "snapshot":
            for texts in self._texts:
                texts.clear()
        if book is None:
            raise IntegrityError(
                "sequence", f"{self._inst_id}: a book message, and ccxt holds no book after it"
            )
        for entry in data:
            self._record(entry)
        sides = (book["bids"], book["asks"])
        for levels, texts in zip(sides, self._texts, strict=True):
            # ccxt cuts its book to the channel's depth, and OKX need not
            # delete the levels that leave it: forget such levels now and then.
            if len(texts) > 2 * len(levels) + _OKX_DEPTH:
                kept = {level[0] for level in levels}
                for gone in [price for price in texts if price not in kept]:
                    del texts[gone]
        expected = data[-1].get("checksum") if isinstance(data[-1], dict) else None
        if expected is None or int(expected) == 0:
            return
        written = [
            self._written(levels, texts) for levels, texts in zip(sides, self._texts, strict=True)
        ]
        actual = okx_checksum(*written)
        if actual != int(expected):
            raise IntegrityError(
                "checksum", f"{self._inst_id}: checksum {actual} != exchange's {expected}"
            )

    def _record(self, entry: Any) -> None:
        if not isinstance(entry, dict):
            return
        for key, texts in zip(("bids", "asks"), self._texts, strict=True):
            for level in entry.get(key) or ():
                price, size = str(level[0]), str(level[1])
                amount = float(size)
                if amount:
                    texts[float(price)] = (price, size, amount)
                else:
                    texts.pop(float(price), None)

    def _written(
        self, levels: Sequence[Sequence[float]], texts: Mapping[float, tuple[str, str, float]]
    ) -> list[tuple[str, str]]:
        """ccxt's top 25 of a side, in OKX's strings."""
        written: list[tuple[str, str]] = []
        for level in levels[:_OKX_DEPTH]:
            text = texts.get(level[0])
            if text is None or text[2] != level[1]:
                raise IntegrityError(
                    "checksum",
                    f"{self._inst_id}: ccxt holds {level[1]} at {level[0]}, which OKX never sent",
                )
            written.append((text[0], text[1]))
        return written


class PoloniexChain:
    """Each Poloniex ``book_lv2`` message names the ``id`` of the one before it in ``lastId``.

    ccxt applies updates without looking at either, so a lost update would
    go unnoticed there.
    """

    def __init__(self, symbol_id: str) -> None:
        self._symbol_id = symbol_id
        self._last: int | None = None

    def __call__(self, message: Any, book: Mapping[str, Any] | None) -> None:
        if not isinstance(message, dict) or message.get("channel") != "book_lv2":
            return
        action = message.get("action")
        for item in message.get("data") or ():
            if not isinstance(item, dict) or item.get("symbol") != self._symbol_id:
                continue
            if action == "update" and (self._last is None or item.get("lastId") != self._last):
                raise IntegrityError(
                    "sequence",
                    f"{self._symbol_id}: update {item.get('id')} follows {item.get('lastId')}, "
                    f"the last one seen is {self._last}",
                )
            self._last = item.get("id")


def _js_text(value: float) -> str:
    """A number as Bitfinex's JSON, written by JavaScript, has it: ``100``, ``99.5``."""
    return format(Decimal(repr(float(value))).normalize(), "f")


def bitfinex_checksum(bids: Sequence[Sequence[float]], asks: Sequence[Sequence[float]]) -> int:
    """Bitfinex's signed CRC32 of the top 25 bids and asks, interleaved.

    Bid price, bid amount, ask price, ask amount (negative), level by level,
    joined by colons.
    """
    parts: list[str] = []
    for i in range(25):
        if i < len(bids):
            parts += [_js_text(bids[i][0]), _js_text(bids[i][1])]
        if i < len(asks):
            parts += [_js_text(asks[i][0]), _js_text(-asks[i][1])]
    crc = zlib.crc32(":".join(parts).encode())
    return crc - 2**32 if crc >= 2**31 else crc


def is_bitfinex_checksum(message: Any) -> bool:
    """Whether a raw message is a ``book`` checksum, ``[chanId, "cs", n]``."""
    return (
        isinstance(message, list)
        and len(message) == 3
        and message[1] == "cs"
        and isinstance(message[2], int)
    )


class BitfinexChecksum:
    """Bitfinex sends a book's checksum in a message of its own, after the changes.

    ccxt checks it too, but then only drops its book and rejects the book
    watcher, so that the session would end a message later; this check ends
    it on the checksum message itself.
    """

    def __call__(self, message: Any, book: Mapping[str, Any] | None) -> None:
        if not is_bitfinex_checksum(message):
            return
        if book is None:
            raise IntegrityError("checksum", f"checksum {message[2]} failed: ccxt dropped its book")
        actual = bitfinex_checksum(book["bids"], book["asks"])
        if actual != message[2]:
            raise IntegrityError("checksum", f"checksum {actual} != exchange's {message[2]}")
