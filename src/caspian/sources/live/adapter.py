"""What differs between exchanges streamed through ccxt.pro, on top of its unified API.

An :class:`Adapter` is the ccxt part of an exchange's record in
:mod:`caspian.sources.live.registry`. The small functions here are the
exchanges' protocol quirks that ccxt does not handle as Caspian needs. No
ccxt import: the registry, and with it the product catalog, must stay cheap
to import.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from caspian.sources.integrity import (
    BitfinexChecksum,
    BookCheck,
    DeribitSequence,
    KrakenChecksum,
    PoloniexChain,
    decimals,
)

WatchBook = Callable[[Any, str, int | None], Awaitable[Any]]
MakeCheck = Callable[[Mapping[str, Any]], BookCheck]


async def watch_order_book(exchange: Any, symbol: str, limit: int | None) -> Any:
    return await exchange.watch_order_book(symbol, limit)


@dataclass(frozen=True, slots=True)
class Adapter:
    """How one exchange is streamed through ccxt.pro."""

    ccxt_id: str
    #: Depth asked of ccxt; None leaves the exchange's default (often full depth).
    book_limit: int | None = None
    #: Subscribes the book; ccxt's ``watch_order_book`` unless the exchange needs more.
    watch_book: WatchBook = watch_order_book
    trade_params: Mapping[str, Any] = field(default_factory=dict)
    #: Raw trade fields copied into TradeEvent.info, as the exchange names them.
    info_fields: tuple[str, ...] = ()
    #: The raw trade field that is the trade's id, where ccxt's ``id`` is not it.
    trade_id_field: str | None = None
    #: Caspian's own check of what ccxt leaves unchecked (:mod:`caspian.sources.integrity`).
    check: MakeCheck | None = None
    #: Rewrites a raw message before ccxt sees it.
    prepare: Callable[[Any], Any] | None = None
    #: What ccxt's ChecksumError means here: some ccxt exchanges raise it on
    #: update-id gaps.
    checksum_reason: str = "checksum"
    #: Where a change's check comes in a later message (Bitfinex's checksums):
    #: whether a raw message settles the book. Changes then go out only on
    #: such a message, once the check passed, not on the message making them.
    settles: Callable[[Any], bool] | None = None


async def coinbase_book(exchange: Any, symbol: str, limit: int | None) -> Any:
    """Coinbase's ``level2_batch`` channel, with heartbeats.

    ccxt subscribes to ``level2``, which Coinbase Exchange now serves to
    authenticated connections only; ``level2_batch`` is the public channel
    with the same messages, batched every 50 ms, and ccxt's handler for
    ``level2`` applies them under the same message hash.
    """
    market = exchange.market(symbol)
    message_hash = "level2:" + market["id"]
    request = {
        "type": "subscribe",
        "product_ids": [market["id"]],
        "channels": ["level2_batch", "heartbeat"],
    }
    subscription = {
        "messageHash": message_hash,
        "symbol": market["symbol"],
        "marketId": market["id"],
        "limit": limit,
    }
    book = await exchange.watch(
        exchange.urls["api"]["ws"], message_hash, request, message_hash, subscription
    )
    return book.limit()


def kraken_check(market: Mapping[str, Any]) -> BookCheck:
    precision = market.get("precision") or {}
    return KrakenChecksum(
        str(market["symbol"]),
        decimals(precision.get("price"), 8),
        decimals(precision.get("amount"), 8),
    )


def deribit_check(market: Mapping[str, Any]) -> BookCheck:
    return DeribitSequence(str(market["id"]))


def gemini_without_history(message: Any) -> Any:
    """Gemini's first ``l2_updates`` message replays recent trades with the book."""
    if (
        isinstance(message, dict)
        and message.get("type") == "l2_updates"
        and "auction_events" in message
    ):
        return {**message, "trades": []}
    return message


def poloniex_check(market: Mapping[str, Any]) -> BookCheck:
    return PoloniexChain(str(market["id"]))


def coinone_taker_side(message: Any) -> Any:
    """ccxt reads Coinone's ``is_seller_maker`` backwards: a resting seller means a buying taker."""
    if isinstance(message, dict) and message.get("channel") == "TRADE":
        data = message.get("data")
        if isinstance(data, dict) and isinstance(data.get("is_seller_maker"), bool):
            return {**message, "data": {**data, "is_seller_maker": not data["is_seller_maker"]}}
    return message


def bitfinex_check(market: Mapping[str, Any]) -> BookCheck:
    return BitfinexChecksum()


def bitfinex_without_history(message: Any) -> Any:
    """Bitfinex's ``trades`` channel opens with its latest trades: history.

    That snapshot is ``[chanId, [[id, mts, amount, price], ...]]``; a book
    snapshot's rows have three fields.
    """
    if (
        isinstance(message, list)
        and len(message) == 2
        and isinstance(message[1], list)
        and message[1]
        and isinstance(message[1][0], list)
        and len(message[1][0]) == 4
    ):
        return [message[0], []]
    return message
