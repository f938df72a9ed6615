"""KuCoin's level2 sequence check, alone and behind ccxt's own KuCoin book."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import ccxt.pro
import pytest

from caspian.catalog.builtin import builtin_markets
from caspian.sources.integrity import IntegrityError, KucoinSequence

SYMBOL, MARKET_ID = "BTC/USDT", "BTC-USDT"


def l2update(
    start: int,
    end: int,
    bids: Sequence[tuple[str, str]] = (),
    asks: Sequence[tuple[str, str]] = (),
    symbol: str = MARKET_ID,
) -> dict[str, Any]:
    """A ``/market/level2`` message; each change is dated with the span's end."""
    return {
        "type": "message",
        "topic": f"/market/level2:{symbol}",
        "subject": "trade.l2update",
        "data": {
            "changes": {
                "asks": [[price, size, str(end)] for price, size in asks],
                "bids": [[price, size, str(end)] for price, size in bids],
            },
            "sequenceEnd": end,
            "sequenceStart": start,
            "symbol": symbol,
            "time": 1_729_816_425_625,
        },
    }


def futures_level2(sequence: int, symbol: str = "XBTUSDTM") -> dict[str, Any]:
    return {
        "topic": f"/contractMarket/level2:{symbol}",
        "type": "message",
        "subject": "level2",
        "sn": sequence,
        "data": {"sequence": sequence, "change": "90631.2,sell,2", "timestamp": 1_731_897_467_182},
    }


SYNCED: dict[str, Any] = {"bids": [], "asks": [], "nonce": 110}
UNSYNCED: dict[str, Any] = {"bids": [], "asks": [], "nonce": None}


def test_updates_follow_one_another() -> None:
    check = KucoinSequence(MARKET_ID)
    # Whatever comes first starts the chain: ccxt caches it for its snapshot.
    check(l2update(101, 103), UNSYNCED)
    check(l2update(104, 104), UNSYNCED)
    # Numbers skipped within a span are changes of a price changed again since.
    check(l2update(105, 110), SYNCED)
    # KuCoin documents overlapping spans as following: start <= last end + 1.
    check(l2update(108, 112), SYNCED)


def test_a_lost_update_breaks_the_chain() -> None:
    check = KucoinSequence(MARKET_ID)
    check(l2update(101, 103), SYNCED)
    with pytest.raises(IntegrityError) as caught:
        check(l2update(105, 105), SYNCED)
    assert caught.value.reason == "sequence"
    assert "1 sequence numbers lost" in str(caught.value)


def test_a_hole_among_the_updates_cached_for_the_snapshot_is_caught_too() -> None:
    check = KucoinSequence(MARKET_ID)
    check(l2update(101, 101), UNSYNCED)
    with pytest.raises(IntegrityError):
        check(l2update(103, 103), UNSYNCED)


def test_a_repeated_update_is_harmless_only_once_the_book_is_synced() -> None:
    check = KucoinSequence(MARKET_ID)
    check(l2update(101, 105), SYNCED)
    # ccxt skips an update ending at or before its book's nonce.
    check(l2update(104, 105), SYNCED)
    check(l2update(106, 106), UNSYNCED)
    # Cached, it would be replayed after newer changes.
    with pytest.raises(IntegrityError):
        check(l2update(104, 106), UNSYNCED)
    with pytest.raises(IntegrityError):
        check(l2update(104, 106), None)


def test_other_messages_are_not_its_business() -> None:
    check = KucoinSequence(MARKET_ID)
    check(l2update(101, 101), SYNCED)
    check(l2update(500, 500, symbol="ETH-USDT"), SYNCED)
    check({"id": "1", "type": "ack"}, None)
    check({"id": "2", "type": "pong", "timestamp": 1}, None)
    check({"id": "public", "type": "welcome"}, None)
    match = {"sequence": "900", "symbol": MARKET_ID, "side": "buy", "type": "match"}
    check(
        {
            "type": "message",
            "topic": "/market/match:BTC-USDT",
            "subject": "trade.l3match",
            "data": match,
        },
        None,
    )
    check(futures_level2(900), SYNCED)
    check("not json", None)
    check(l2update(102, 102), SYNCED)


def test_an_update_without_sequence_numbers_is_not_trusted() -> None:
    check = KucoinSequence(MARKET_ID)
    message = l2update(101, 101)
    del message["data"]["sequenceStart"]
    with pytest.raises(IntegrityError):
        check(message, SYNCED)


def test_futures_updates_are_numbered_one_by_one() -> None:
    check = KucoinSequence.for_market({"id": "XBTUSDTM", "symbol": "BTC/USDT:USDT"})
    check(futures_level2(17), UNSYNCED)
    check(futures_level2(18), SYNCED)
    with pytest.raises(IntegrityError):
        check(futures_level2(20), SYNCED)


def test_sequence_numbers_written_as_strings_count_too() -> None:
    check = KucoinSequence(MARKET_ID)
    message = l2update(101, 101)
    message["data"]["sequenceStart"], message["data"]["sequenceEnd"] = "101", "101"
    check(message, SYNCED)
    check(l2update(102, 102), SYNCED)


# -- behind ccxt ----------------------------------------------------------------------


class Client:
    """The part of a ccxt WebSocket client that ccxt's KuCoin book handling uses."""

    def __init__(self) -> None:
        self.subscriptions: dict[str, Any] = {}
        #: Set once ccxt hands out a book, the first time after its snapshot.
        self.resolved = asyncio.Event()
        self.error: BaseException | None = None

    def resolve(self, result: Any, message_hash: str) -> None:
        self.resolved.set()

    def reject(self, error: BaseException, message_hash: str) -> None:
        self.error = error


def true_book(
    snapshot: dict[str, Any], updates: list[dict[str, Any]]
) -> dict[str, dict[float, float]]:
    """The book KuCoin documents: the snapshot, then the updates after its sequence."""
    book = {side: {float(p): float(s) for p, s in snapshot[side]} for side in ("bids", "asks")}
    for update in updates:
        if update["data"]["sequenceEnd"] <= snapshot["nonce"]:
            continue
        for side in ("bids", "asks"):
            for price, size, _ in update["data"]["changes"][side]:
                if float(size) == 0:
                    book[side].pop(float(price), None)
                else:
                    book[side][float(price)] = float(size)
    return book


def levels(book: Any) -> dict[str, dict[float, float]]:
    # ccxt keeps each change's sequence as a third value of its level.
    return {side: {level[0]: level[1] for level in book[side]} for side in ("bids", "asks")}


async def test_ccxt_alone_serves_a_book_that_lost_an_update() -> None:
    """ccxt syncs its cache with the snapshot right, then misses a hole the check catches."""
    exchange = ccxt.pro.kucoin({"asyncio_loop": asyncio.get_running_loop()})
    exchange.set_markets(
        {s: exchange.safe_market_structure(m) for s, m in builtin_markets()["KUCOIN"].items()}
    )
    snapshot = {
        "bids": [["99.0", "1.0"], ["98.5", "2.0"], ["98.0", "3.0"]],
        "asks": [["100.0", "1.0"], ["100.5", "2.0"]],
        "nonce": 103,
    }

    async def fetch_snapshot(symbol: str, limit: Any = None, params: Any = None) -> Any:
        book = exchange.parse_order_book(snapshot, symbol)
        book["nonce"] = snapshot["nonce"]
        return book

    exchange.fetch_rest_order_book_safe = fetch_snapshot
    client = Client()
    # ccxt's answer to the subscription's ack: an empty book waiting for its snapshot.
    exchange.handle_order_book_subscription(client, {}, {"symbols": [SYMBOL], "limit": None})
    check = KucoinSequence(MARKET_ID)

    def receive(message: dict[str, Any]) -> None:
        exchange.handle_message(client, message)
        check(message, exchange.orderbooks.get(SYMBOL))

    # Six updates, of which ccxt caches five then asks for the snapshot,
    # taken at 103: in the middle of the second one.
    sent = [
        l2update(100, 101, bids=[("98.5", "2.0")]),
        l2update(102, 104, bids=[("99.0", "1.5")]),
        l2update(105, 105, asks=[("100.5", "2.5")]),
        l2update(106, 106, asks=[("101.0", "4.0")]),
        l2update(107, 107, bids=[("97.5", "1.0")]),
        l2update(108, 108, asks=[("100.0", "0")]),
    ]
    for message in sent:
        receive(message)
    await asyncio.wait_for(client.resolved.wait(), 5)
    assert client.error is None
    assert levels(exchange.orderbooks[SYMBOL]) == true_book(snapshot, sent)

    receive(l2update(109, 109, bids=[("99.5", "1.0")]))
    sent.append(l2update(109, 109, bids=[("99.5", "1.0")]))
    # Lost on the way: the 98.0 bid leaves the book.
    sent.append(l2update(110, 110, bids=[("98.0", "0")]))
    late = l2update(111, 111, asks=[("100.5", "3.0")])
    sent.append(late)
    with pytest.raises(IntegrityError) as caught:
        receive(late)
    assert caught.value.reason == "sequence"
    # ccxt applied the update after the hole as if nothing were missing.
    assert exchange.orderbooks[SYMBOL]["nonce"] == 111
    ccxt_book, truth = levels(exchange.orderbooks[SYMBOL]), true_book(snapshot, sent)
    assert ccxt_book != truth
    assert ccxt_book["bids"][98.0] == 3.0 and 98.0 not in truth["bids"]
    await exchange.close()
