"""The normalized market events every source produces and every gateway consumes.

They are the vocabulary of CONTRACT.md section 6; :func:`to_json` and
:func:`from_json` convert to and from one line of that replay format, which is
also what the NATS bus carries.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

from caspian.codes import Stream, StreamState
from caspian.timefmt import format_us, parse_us

Level = tuple[float, float]


@dataclass(slots=True)
class BookEvent:
    """A whole book (``snapshot``) or a diff: each level's new size, 0 removing it."""

    symbol: str
    ts: int
    snapshot: bool
    bids: list[Level]
    asks: list[Level]
    exchange_ts: int | None = None


@dataclass(slots=True)
class TradeEvent:
    symbol: str
    ts: int
    price: float
    size: float
    trade_id: str | None = None
    info: dict[str, str] = field(default_factory=dict)
    exchange_ts: int | None = None


@dataclass(slots=True)
class QuoteEvent:
    """Best bid and offer published by an exchange apart from its depth."""

    symbol: str
    ts: int
    bid: float | None
    bid_size: float | None
    ask: float | None
    ask_size: float | None
    exchange_ts: int | None = None


@dataclass(slots=True)
class StatusEvent:
    symbol: str
    ts: int
    stream: Stream
    state: StreamState


def every_stream(symbol: str, ts: int, state: StreamState) -> list[Event]:
    """``state`` for each of the symbol's streams: what a lost feed may have carried is
    any of a book change, a quote or a trade."""
    return [StatusEvent(symbol, ts, stream, state) for stream in Stream]


Event = BookEvent | TradeEvent | QuoteEvent | StatusEvent


class EventFormatError(ValueError):
    """A line that is not a valid event of the replay format."""


def to_dict(event: Event) -> dict[str, Any]:
    out: dict[str, Any] = {"ts": format_us(event.ts)}
    exchange_ts = getattr(event, "exchange_ts", None)
    if exchange_ts is not None:
        out["exchangeTs"] = format_us(exchange_ts)
    out["symbol"] = event.symbol
    if isinstance(event, BookEvent):
        out.update(
            kind="book",
            snapshot=event.snapshot,
            bids=[list(level) for level in event.bids],
            asks=[list(level) for level in event.asks],
        )
    elif isinstance(event, TradeEvent):
        out.update(kind="trade", price=event.price, size=event.size)
        if event.trade_id is not None:
            out["tradeId"] = event.trade_id
        if event.info:
            out["info"] = event.info
    elif isinstance(event, QuoteEvent):
        out["kind"] = "quote"
        for key, value in (
            ("bid", event.bid),
            ("bidSize", event.bid_size),
            ("ask", event.ask),
            ("askSize", event.ask_size),
        ):
            if value is not None:
                out[key] = value
    else:
        out.update(kind="status", stream=event.stream.value, state=event.state.value)
    return out


def to_json(event: Event) -> bytes:
    return orjson.dumps(to_dict(event))


def _number(raw: dict[str, Any], key: str, required: bool = True) -> float | None:
    value = raw.get(key)
    if value is None and not required:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise EventFormatError(f"{key!r} must be a number")
    number = float(value)
    if number != number or number in (float("inf"), float("-inf")) or number < 0:
        raise EventFormatError(f"{key!r} must be a finite, non-negative number")
    return number


_INF = float("inf")


def _levels(raw: dict[str, Any], key: str) -> list[Level]:
    """``[[price, size], ...]``: prices positive, sizes non-negative, both finite.

    The hottest path of replay and the NATS bus, so one loop with exact type
    checks (``bool`` is not a number here) rather than a call per number.
    """
    value = raw.get(key, [])
    if not isinstance(value, list):
        raise EventFormatError(f"{key!r} must be a list of [price, size] pairs")
    levels: list[Level] = []
    append = levels.append
    for item in value:
        if type(item) is not list or len(item) < 2:
            raise EventFormatError(f"{key!r} must be a list of [price, size] pairs")
        price, size = item[0], item[1]
        if (type(price) is not float and type(price) is not int) or (
            type(size) is not float and type(size) is not int
        ):
            raise EventFormatError(f"{key!r} has a price or size that is not a number")
        if not 0 < price < _INF or not 0 <= size < _INF:
            raise EventFormatError(
                f"{key!r} needs finite positive prices and finite non-negative sizes"
            )
        append((float(price), float(size)))
    return levels


def _time(raw: dict[str, Any], key: str, required: bool) -> int | None:
    value = raw.get(key)
    if value is None:
        if required:
            raise EventFormatError(f"{key!r} is missing")
        return None
    if not isinstance(value, str):
        raise EventFormatError(f"{key!r} must be a timestamp string")
    try:
        return parse_us(value)
    except ValueError as exc:
        raise EventFormatError(f"{key!r} is not a timestamp: {value!r}") from exc


def from_dict(raw: Any) -> Event:
    if not isinstance(raw, dict):
        raise EventFormatError("an event must be a JSON object")
    symbol = raw.get("symbol")
    if not isinstance(symbol, str) or not symbol:
        raise EventFormatError("'symbol' must be a non-empty string")
    ts = _time(raw, "ts", required=True)
    assert ts is not None
    exchange_ts = _time(raw, "exchangeTs", required=False)
    kind = raw.get("kind")
    if kind == "book":
        snapshot = raw.get("snapshot", False)
        if not isinstance(snapshot, bool):
            raise EventFormatError("'snapshot' must be true or false")
        return BookEvent(
            symbol, ts, snapshot, _levels(raw, "bids"), _levels(raw, "asks"), exchange_ts
        )
    if kind == "trade":
        price = _number(raw, "price")
        size = _number(raw, "size")
        assert price is not None and size is not None
        trade_id = raw.get("tradeId")
        if trade_id is not None and (
            isinstance(trade_id, bool) or not isinstance(trade_id, str | int)
        ):
            raise EventFormatError("'tradeId' must be a string")
        info = raw.get("info") or {}
        if not isinstance(info, dict):
            raise EventFormatError("'info' must be an object")
        return TradeEvent(
            symbol,
            ts,
            price,
            size,
            None if trade_id is None else str(trade_id),
            {str(k): str(v) for k, v in info.items()},
            exchange_ts,
        )
    if kind == "quote":
        return QuoteEvent(
            symbol,
            ts,
            _number(raw, "bid", required=False),
            _number(raw, "bidSize", required=False),
            _number(raw, "ask", required=False),
            _number(raw, "askSize", required=False),
            exchange_ts,
        )
    if kind == "status":
        try:
            stream = Stream(str(raw.get("stream")))
            state = StreamState(str(raw.get("state")))
        except ValueError as exc:
            raise EventFormatError(
                "'stream' must be bbo, trade or depth and 'state' connected or disconnected"
            ) from exc
        return StatusEvent(symbol, ts, stream, state)
    raise EventFormatError(f"unknown kind {kind!r}")


def from_json(line: bytes | str) -> Event:
    try:
        raw = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        raise EventFormatError(f"not JSON: {exc}") from exc
    return from_dict(raw)
