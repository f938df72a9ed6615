"""OKX's checksum check, and HTX's sequence check that ccxt does itself.

The messages go through ccxt.pro's own handlers first, as in the live
source, so that each test shows what ccxt makes of them and what is left for
Caspian's check.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
from collections.abc import AsyncIterator, Callable
from typing import Any

import ccxt.pro
import pytest
from ccxt.base.errors import ChecksumError

from caspian.catalog.builtin import builtin_markets
from caspian.codes import Stream, StreamState
from caspian.sources.integrity import IntegrityError, OkxChecksum, okx_checksum
from caspian.sources.live import BY_CODE
from tests.support.mock_htx import HtxMock
from tests.support.mock_okx import OkxMock, okx_text
from tests.support.mock_okx import okx_checksum as documented_okx_checksum
from tests.test_live import VENUES, books_since, sample, started, streaming, synced, until

MARKETS = builtin_markets()

Levels = list[tuple[str, str]]


async def exchange_with_markets(ccxt_id: str, code: str) -> Any:
    exchange = getattr(ccxt.pro, ccxt_id)()
    exchange.set_markets(
        {symbol: exchange.safe_market_structure(m) for symbol, m in MARKETS[code].items()}
    )
    return exchange


# -- OKX ---------------------------------------------------------------------------


class Okx:
    """ccxt.pro's okx fed by hand, OKX's book kept in its strings, and Caspian's check."""

    def __init__(self, exchange: Any) -> None:
        self.exchange = exchange
        self.client = exchange.client("ws://127.0.0.1:9/ws/v5/public")
        # As watch_order_book leaves it.
        self.client.subscriptions["books:BTC/USDT"] = True
        self.check = OkxChecksum.for_market(exchange.market("BTC/USDT"))
        self.bids: dict[str, str] = {}
        self.asks: dict[str, str] = {}
        self.seq_id = 1000

    def top(self) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
        bids = sorted(self.bids.items(), key=lambda level: -float(level[0]))
        asks = sorted(self.asks.items(), key=lambda level: float(level[0]))
        return bids, asks

    def message(
        self, action: str, bids: Levels, asks: Levels, *, sequenced: bool = True, events: int = 5
    ) -> Any:
        """Applies changes to OKX's book; the message OKX sends for them.

        ``events``: how far the change moves OKX's sequence.
        """
        for side, changes in ((self.bids, bids), (self.asks, asks)):
            for price, size in changes:
                if float(size):
                    side[price] = size
                else:
                    side.pop(price, None)
        data: dict[str, Any] = {
            "bids": [[price, size, "0", "1"] for price, size in bids],
            "asks": [[price, size, "0", "1"] for price, size in asks],
            "ts": "1767000000000",
            "checksum": documented_okx_checksum(*self.top()),
        }
        previous = self.seq_id
        self.seq_id += events
        if sequenced:
            data["prevSeqId"] = -1 if action == "snapshot" else previous
            data["seqId"] = self.seq_id
        return {"arg": {"channel": "books", "instId": "BTC-USDT"}, "action": action, "data": [data]}

    def snapshot(self, bids: Levels, asks: Levels) -> Any:
        self.bids.clear()
        self.asks.clear()
        return self.message("snapshot", bids, asks)

    def feed(self, message: Any) -> None:
        """What the live source does with each raw message: ccxt, then the check."""
        self.exchange.handle_message(self.client, message)
        self.check(message, self.exchange.orderbooks.get("BTC/USDT"))

    def ccxt_book(self) -> tuple[list[list[float]], list[list[float]]]:
        book = self.exchange.orderbooks["BTC/USDT"]
        return [list(level) for level in book["bids"]], [list(level) for level in book["asks"]]

    def true_book(self) -> tuple[list[list[float]], list[list[float]]]:
        bids, asks = self.top()
        return (
            [[float(p), float(s)] for p, s in bids],
            [[float(p), float(s)] for p, s in asks],
        )


@pytest.fixture
async def okx() -> AsyncIterator[Okx]:
    exchange = await exchange_with_markets("okx", "OKEX")
    try:
        yield Okx(exchange)
    finally:
        await exchange.close()


#: OKX writes plain decimals without trailing zeros: "100", not ccxt's 100.0.
BIDS: Levels = [("100", "2.5"), ("99.5", "0.00001"), ("99", "12")]
ASKS: Levels = [("100.5", "1"), ("101", "0.3"), ("102.5", "7")]


def test_okx_checksum_matches_the_documented_examples() -> None:
    # The two books of OKX's checksum documentation, with their checksums.
    bids = [("3366.1", "7"), ("3366", "6")]
    asks = [("3366.8", "9"), ("3368", "8")]
    assert okx_checksum(bids, asks) == -1881014294
    assert okx_checksum(bids[:1], [*asks, ("3372", "8")]) == 831078360
    rng = random.Random(5)
    for _ in range(50):
        sides = [
            [
                (okx_text(round(rng.uniform(1, 1e5), 1)), okx_text(round(rng.uniform(0, 9), 8)))
                for _ in range(rng.randrange(40))
            ]
            for _ in range(2)
        ]
        assert okx_checksum(*sides) == documented_okx_checksum(*sides)


async def test_okx_check_sums_ccxts_book_in_okxs_strings(okx: Okx) -> None:
    snapshot = okx.snapshot(BIDS, ASKS)
    okx.feed(snapshot)
    # ccxt's floats written back are not OKX's strings: repr gives 100.0 and 1e-05.
    floats = [[(repr(p), repr(s)) for p, s in side] for side in okx.ccxt_book()]
    assert okx_checksum(*floats) != snapshot["data"][0]["checksum"]
    okx.feed(okx.message("update", [("100", "3"), ("99.75", "0.5")], [("100.5", "0")]))
    okx.feed(okx.message("update", [], [("100.25", "4.25")]))
    # OKX's "no change for a while" message: no levels, the same seqId.
    okx.feed(okx.message("update", [], [], events=0))
    assert okx.ccxt_book() == okx.true_book()


async def test_okx_check_sums_only_the_top_25(okx: Okx) -> None:
    bids = [(okx_text(100 - i * 0.5), okx_text(1 + i)) for i in range(40)]
    asks = [(okx_text(101 + i * 0.5), okx_text(2 + i)) for i in range(3)]
    okx.feed(okx.snapshot(bids, asks))
    # The 30th bid changes: below the sum, above the channel's depth.
    okx.feed(okx.message("update", [(bids[30][0], "9")], []))
    assert okx.ccxt_book() == okx.true_book()


@pytest.mark.parametrize(
    "lose",
    [
        pytest.param("message", id="a relay dropped the sequence fields and a message"),
        pytest.param("level", id="a message lost a level"),
    ],
)
async def test_okx_lost_update_ccxt_keeps_is_caught(okx: Okx, lose: str) -> None:
    """A lost change that ccxt applies around, leaving a wrong book: only the checksum shows it."""
    okx.feed(okx.snapshot(BIDS, ASKS))
    if lose == "message":
        okx.message("update", [("99.5", "0")], [], sequenced=False)
        shows_it = okx.message("update", [], [("101", "2")], sequenced=False)
    else:
        shows_it = okx.message("update", [("99.5", "0")], [("101", "2")])
        shows_it["data"][0]["bids"] = []
    okx.exchange.handle_message(okx.client, shows_it)
    assert not okx.client.rejections, "ccxt noticed"
    assert okx.ccxt_book() != okx.true_book()
    with pytest.raises(IntegrityError) as caught:
        okx.check(shows_it, okx.exchange.orderbooks.get("BTC/USDT"))
    assert caught.value.reason == "checksum"


async def test_okx_seq_id_gap_drops_ccxts_book_and_is_a_sequence_error(okx: Okx) -> None:
    okx.feed(okx.snapshot(BIDS, ASKS))
    okx.message("update", [("99.5", "0")], [])
    shows_it = okx.message("update", [], [("101", "2")])
    with pytest.raises(IntegrityError) as caught:
        okx.feed(shows_it)
    assert caught.value.reason == "sequence"
    assert "books:BTC/USDT" in okx.client.rejections


async def test_okx_deprecated_checksum_zero_is_not_checked(okx: Okx) -> None:
    snapshot = okx.snapshot(BIDS, ASKS)
    snapshot["data"][0]["checksum"] = 0
    okx.feed(snapshot)
    update = okx.message("update", [("100", "3")], [])
    update["data"][0]["checksum"] = 0
    okx.feed(update)
    # Still checked where OKX sends one.
    update = okx.message("update", [("100", "4")], [])
    update["data"][0]["checksum"] ^= 1
    with pytest.raises(IntegrityError):
        okx.feed(update)


async def test_okx_other_messages_are_not_the_checks_business(okx: Okx) -> None:
    okx.feed(okx.snapshot(BIDS, ASKS))
    book = okx.exchange.orderbooks["BTC/USDT"]
    for message in (
        "pong",
        {"event": "subscribe", "arg": {"channel": "books", "instId": "BTC-USDT"}},
        {"arg": {"channel": "books", "instId": "ETH-USDT"}, "action": "update", "data": [{}]},
        {"arg": {"channel": "books5", "instId": "BTC-USDT"}, "data": [{"checksum": 1}]},
        {"arg": {"channel": "trades", "instId": "BTC-USDT"}, "data": [{"px": "1", "sz": "1"}]},
    ):
        okx.check(message, book)
    # A book update with no book to apply it to (ccxt drops it at a gap).
    with pytest.raises(IntegrityError) as caught:
        okx.check(okx.message("update", [("100", "1")], []), None)
    assert caught.value.reason == "sequence"


# -- HTX --------------------------------------------------------------------------


def mbp(seq: int, previous: int, bids: list[list[float]]) -> dict[str, Any]:
    return {
        "ch": "market.btcusdt.mbp.150",
        "ts": 1767000000000,
        "tick": {"seqNum": seq, "prevSeqNum": previous, "bids": bids, "asks": []},
    }


@pytest.fixture
async def htx() -> AsyncIterator[tuple[Any, Any, Callable[[], Any]]]:
    exchange = await exchange_with_markets("htx", "HUOBI")
    client = exchange.client("ws://127.0.0.1:9/feed")
    # A book synced to its req snapshot, as ccxt leaves it.
    book = exchange.order_book({"bids": [[99.0, 1.0]], "asks": [[100.0, 1.0]]}, 150)
    book["nonce"] = 500
    exchange.orderbooks["BTC/USDT"] = book
    try:
        yield exchange, client, lambda: exchange.orderbooks["BTC/USDT"]
    finally:
        await exchange.close()


async def test_htx_ccxt_follows_the_seqnum_chain(htx: tuple[Any, Any, Callable[[], Any]]) -> None:
    """Why HUOBI has no check of Caspian's: ccxt's own catches a lost update."""
    exchange, client, book = htx
    exchange.handle_message(client, mbp(517, 500, [[99.0, 2.0]]))
    # A message older than the book is dropped, not applied.
    exchange.handle_message(client, mbp(500, 483, [[99.0, 7.0]]))
    assert book()["bids"][0] == [99.0, 2.0] and book()["nonce"] == 517
    # The message after 534 is lost.
    with pytest.raises(ChecksumError):
        exchange.handle_message(client, mbp(551, 534, [[98.0, 1.0]]))
    assert [98.0, 1.0] not in book()["bids"]
    # ... which the live source counts as a sequence error.
    assert BY_CODE["HUOBI"].adapter is not None
    assert BY_CODE["HUOBI"].adapter.checksum_reason == "sequence"


# -- in the live source -------------------------------------------------------------


async def test_okx_update_lost_past_the_sequence_is_rebuilt_by_the_checksum() -> None:
    """Through a relay without seqIds ccxt would serve a wrong book; the checksum stops it."""
    venue = next(venue for venue in VENUES if venue.code == "OKEX")
    async with streaming(venue) as (source, c, mock):
        assert isinstance(mock, OkxMock)
        mock.unsequenced = True
        await started(venue, source, c, mock)
        labels = {"exchange": "OKEX", "symbol": venue.symbol, "reason": "checksum"}
        resyncs = sample("caspian_resyncs_total", **labels)
        mark = len(c.events)
        mock.lose_update(bids=[(98.0, 0.0)])
        await mock.update(asks=[(101.5, 6.0)])
        await until(lambda: c.states[Stream.DEPTH] is StreamState.DISCONNECTED)
        await mock.wait_subscribes("books", 2)
        await until(lambda: synced(c, mock) and c.all(StreamState.CONNECTED))
        assert books_since(c, mark)[0].snapshot
        assert sample("caspian_resyncs_total", **labels) == resyncs + 1


async def test_htx_pings_are_answered() -> None:
    """HTX closes a connection that leaves two pings unanswered; ccxt answers them."""
    venue = next(venue for venue in VENUES if venue.code == "HUOBI")
    venue = dataclasses.replace(venue, mock=lambda: HtxMock(ping_s=0.2))
    async with streaming(venue) as (source, c, mock):
        assert isinstance(mock, HtxMock)
        await started(venue, source, c, mock)
        await mock.wait_subscribes("trade.detail")
        pongs = mock.pongs
        await asyncio.sleep(1.0)
        # Both connections, /feed and /ws, about five times each.
        assert mock.pongs - pongs >= 6
        assert c.all(StreamState.CONNECTED)
        assert sum(mock.subscribes.values()) == 2
