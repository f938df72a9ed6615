"""Typed views of what the service sends, parsed without I/O.

Every object keeps the message it came from in ``raw``, and fields the
original documentation does not name in ``extra``: the documentation says new
fields may appear without notice, and a client must neither reject nor drop
them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

try:
    import orjson

    def loads(data: str | bytes) -> Any:
        return orjson.loads(data)

except ImportError:  # orjson is optional: the standard library reads the same JSON.

    def loads(data: str | bytes) -> Any:
        return json.loads(data)


def dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


def timestamp(value: Any) -> datetime | None:
    """A documented timestamp (GMT, ``YYYY-MM-DDTHH:MM:SS.mmmmmm``, no zone) as an aware
    UTC datetime; None when absent or not a timestamp (the raw text stays in ``raw``)."""
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


def format_timestamp(value: datetime) -> str:
    """A time in the API's own format (GMT, ``YYYY-MM-DDTHH:MM:SS.mmmmmm``)."""
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _extra(raw: Mapping[str, Any], known: frozenset[str]) -> dict[str, Any]:
    return {name: value for name, value in raw.items() if name not in known}


@dataclass(frozen=True)
class Exchange:
    code: str
    name: str
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """As the API sends it (unknown fields included)."""
        return {"name": self.name, "code": self.code, **self.extra}

    @classmethod
    def parse(cls, raw: Mapping[str, Any]) -> Exchange:
        return cls(
            code=str(raw["code"]),
            name=str(raw.get("name", raw["code"])),
            extra=_extra(raw, frozenset({"code", "name"})),
        )


# The original's product fields, in its order, with their Python names.
PRODUCT_FIELDS = {
    "toraCode": "tora_code",
    "toraMarket": "tora_market",
    "caspianCode": "caspian_code",
    "lotSize": "lot_size",
    "pseudoCode": "pseudo_code",
    "createdTime": "created_time",
    "updatedTime": "updated_time",
    "ccyFrom": "ccy_from",
    "ccyTo": "ccy_to",
    "nativeCode": "native_code",
    "tickRule": "tick_rule",
    "description": "description",
    "exchange": "exchange",
    "multiplier": "multiplier",
    "lastTradingDate": "last_trading_date",
    "expireDate": "expire_date",
    "type": "type",
    "strike": "strike",
    "underlyingCaspianCode": "underlying_caspian_code",
    "nativeCode_v2": "native_code_v2",
}


@dataclass(frozen=True)
class Product:
    """A product with every field of the original documentation, as the strings it
    defines (None when the server left one out); ``created``/``updated`` parsed."""

    caspian_code: str
    exchange: str | None = None
    tora_code: str | None = None
    tora_market: str | None = None
    lot_size: str | None = None
    pseudo_code: str | None = None
    created_time: str | None = None
    updated_time: str | None = None
    ccy_from: str | None = None
    ccy_to: str | None = None
    native_code: str | None = None
    tick_rule: str | None = None
    description: str | None = None
    multiplier: str | None = None
    last_trading_date: str | None = None
    expire_date: str | None = None
    type: str | None = None
    strike: str | None = None
    underlying_caspian_code: str | None = None
    native_code_v2: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def created(self) -> datetime | None:
        return timestamp(self.created_time)

    @property
    def updated(self) -> datetime | None:
        return timestamp(self.updated_time)

    def to_dict(self) -> dict[str, Any]:
        """As the API sends it: the fields it has, by their API names, and unknown ones."""
        fields = {wire: getattr(self, name) for wire, name in PRODUCT_FIELDS.items()}
        return {wire: value for wire, value in fields.items() if value is not None} | self.extra

    @classmethod
    def parse(cls, raw: Mapping[str, Any]) -> Product:
        values = {name: _text(raw.get(wire)) for wire, name in PRODUCT_FIELDS.items()}
        values["caspian_code"] = str(raw["caspianCode"])
        return cls(**values, extra=_extra(raw, frozenset(PRODUCT_FIELDS)))  # type: ignore[arg-type]


# Level1 payload fields and their Python names.
LEVEL1_FIELDS = {
    "ask": "ask",
    "askSize": "ask_size",
    "bid": "bid",
    "bidSize": "bid_size",
    "bboExchangeTimestamp": "bbo_exchange_timestamp",
    "bboCaspianTimestamp": "bbo_caspian_timestamp",
    "tradePrice": "trade_price",
    "tradeSize": "trade_size",
    "tradeExchangeTimestamp": "trade_exchange_timestamp",
    "tradeCaspianTimestamp": "trade_caspian_timestamp",
    "tradeId": "trade_id",
    "exchangeSpecificInfo": "exchange_specific_info",
}
_LEVEL1_NUMBERS = frozenset({"ask", "askSize", "bid", "bidSize", "tradePrice", "tradeSize"})
_LEVEL1_TIMES = frozenset(
    {
        "bboExchangeTimestamp",
        "bboCaspianTimestamp",
        "tradeExchangeTimestamp",
        "tradeCaspianTimestamp",
    }
)
_ENVELOPE = frozenset({"requestId", "type", "payload"})


@dataclass(frozen=True)
class Level1:
    """The current Level1 state of a subscription: every field the updates so far
    carried, each from the latest update that had it (an update may carry only part
    of them). ``raw`` is the latest message itself."""

    symbol: str
    bbo_stream: str | None = None
    trade_stream: str | None = None
    ask: float | None = None
    ask_size: float | None = None
    bid: float | None = None
    bid_size: float | None = None
    bbo_exchange_timestamp: datetime | None = None
    bbo_caspian_timestamp: datetime | None = None
    trade_price: float | None = None
    trade_size: float | None = None
    trade_exchange_timestamp: datetime | None = None
    trade_caspian_timestamp: datetime | None = None
    trade_id: str | None = None
    exchange_specific_info: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The merged state by the API's names (timestamps in its format), for JSON."""
        result: dict[str, Any] = {"symbol": self.symbol}
        for wire, name in (("bboStream", "bbo_stream"), ("tradeStream", "trade_stream")):
            if getattr(self, name) is not None:
                result[wire] = getattr(self, name)
        for wire, name in LEVEL1_FIELDS.items():
            value = getattr(self, name)
            if isinstance(value, datetime):
                value = format_timestamp(value)
            if value is not None and value != {}:
                result[wire] = value
        return result | self.extra

    def merge(self, message: Mapping[str, Any]) -> Level1:
        """This state with one Level1 message applied."""
        payload = message.get("payload")
        payload = payload if isinstance(payload, Mapping) else {}
        values: dict[str, Any] = {}
        for wire, name in LEVEL1_FIELDS.items():
            if wire not in payload:
                continue
            value = payload[wire]
            if wire in _LEVEL1_NUMBERS:
                values[name] = _number(value)
            elif wire in _LEVEL1_TIMES:
                values[name] = timestamp(value)
            elif wire == "exchangeSpecificInfo":
                values[name] = (
                    {str(k): str(v) for k, v in value.items()} if isinstance(value, Mapping) else {}
                )
            else:
                values[name] = _text(value)
        for wire, name in (("bboStream", "bbo_stream"), ("tradeStream", "trade_stream")):
            if wire in message:
                values[name] = _text(message[wire])
        known = frozenset(LEVEL1_FIELDS)
        envelope = frozenset({"bboStream", "tradeStream"}) | _ENVELOPE
        extra = dict(self.extra)
        extra.update(_extra(payload, known))
        extra.update(_extra(message, envelope))
        return replace(self, **values, extra=extra, raw=dict(message))


@dataclass(frozen=True)
class LevelChange:
    """One entry of a Level2 payload: size 0 removes the price level."""

    side: str
    price: float
    size: float

    @classmethod
    def parse(cls, raw: Any) -> LevelChange:
        if not isinstance(raw, Mapping):
            raise ValueError(f"a Level2 entry is not an object: {raw!r}")
        side = raw.get("side")
        price, size = _number(raw.get("price")), _number(raw.get("size"))
        if side not in ("bid", "ask") or price is None or size is None:
            raise ValueError(f"a Level2 entry without side, price and size: {raw!r}")
        return cls(side, price, size)


@dataclass(frozen=True)
class Level2Message:
    """One Level2 message as sent: its stream status, timestamps and changes."""

    request_id: str
    depth_stream: str | None
    exchange_timestamp: datetime | None
    caspian_timestamp: datetime | None
    changes: tuple[LevelChange, ...]
    extra: dict[str, Any]
    raw: dict[str, Any]

    @classmethod
    def parse(cls, raw: Mapping[str, Any]) -> Level2Message:
        payload = raw.get("payload")
        entries = payload if isinstance(payload, list) else []
        known = _ENVELOPE | {"exchangeTimestamp", "caspianTimestamp", "depthStream"}
        return cls(
            request_id=str(raw.get("requestId")),
            depth_stream=_text(raw.get("depthStream")),
            exchange_timestamp=timestamp(raw.get("exchangeTimestamp")),
            caspian_timestamp=timestamp(raw.get("caspianTimestamp")),
            changes=tuple(LevelChange.parse(entry) for entry in entries),
            extra=_extra(raw, known),
            raw=dict(raw),
        )


@dataclass(frozen=True)
class Token:
    """An access token and when it expires (as the server's clock counts)."""

    access_token: str
    expiration: datetime | None
    #: Seconds the token is good for from when it was received; None if not known.
    lifetime_s: float | None
