"""The live source against local servers speaking each exchange's own message format.

Every exchange family gets the same checks: the book follows the exchange
(snapshot, then only changed levels), trades carry the exchange's own fields,
a dropped connection shows at once and heals with a fresh snapshot, a book
that cannot be trusted is rebuilt instead of served, and a silent connection
is noticed. The end-to-end test runs the real service with ``live:GDAX``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import ccxt.pro
import pytest
from prometheus_client import REGISTRY
from websockets.exceptions import ConnectionClosed

from caspian.book import BookView, OrderBook
from caspian.catalog.builtin import builtin_markets, builtin_products
from caspian.catalog.exchanges import EXCHANGES
from caspian.codes import Stream, StreamState
from caspian.events import BookEvent, Event, Level, StatusEvent, TradeEvent
from caspian.sources.integrity import (
    DeribitSequence,
    IntegrityError,
    KrakenChecksum,
    kraken_checksum,
)
from caspian.sources.live import (
    BY_CODE,
    LIVE_URLS_ENV,
    LiveSource,
    backoff_delay,
    parse_exchanges,
    urls_from_env,
)
from caspian.sources.live import (
    EXCHANGES as RECORDS,
)
from caspian.sources.live.bitmex import BitmexConnection
from caspian.sources.live.ccxt_pro import SymbolSessions, _Session, _Symbol
from caspian.sources.live.feed import SymbolFeed
from caspian.sources.live.native import NativeConnection
from tests.support.client import StreamClient, apply_level2
from tests.support.mock_bitfinex import BitfinexMock
from tests.support.mock_bitflyer import BitflyerMock
from tests.support.mock_bithumb import BithumbMock
from tests.support.mock_bitstamp import BitstampMock
from tests.support.mock_coinone import CoinoneMock
from tests.support.mock_exchanges import (
    BinanceMock,
    BitmexMock,
    CoinbaseMock,
    DeribitMock,
    GeminiMock,
    KrakenMock,
    Message,
    MockExchange,
)
from tests.support.mock_exchanges import kraken_checksum as documented_kraken_checksum
from tests.support.mock_hitbtc import HitbtcMock
from tests.support.mock_htx import HtxMock
from tests.support.mock_korbit import KorbitMock
from tests.support.mock_kucoin import KucoinMock
from tests.support.mock_okx import OkxMock
from tests.support.mock_paxos import PaxosMock
from tests.support.mock_poloniex import PoloniexMock
from tests.support.ports import free_port
from tests.support.service import start_service

_C = TypeVar("_C", bound=NativeConnection)

PRODUCTS = {product.caspian_code: product for product in builtin_products()}
MARKETS = builtin_markets()
DEPTH = 10
#: 20 levels a side around 100, more than DEPTH so that levels enter and leave the top.
BIDS = [(round(99.0 - i * 0.5, 1), round(1.0 + i * 0.25, 2)) for i in range(20)]
ASKS = [(round(100.0 + i * 0.5, 1), round(2.0 + i * 0.25, 2)) for i in range(20)]


@dataclass(frozen=True)
class Venue:
    code: str
    symbol: str
    mock: Callable[[], MockExchange]
    urls: Callable[[Any], dict[str, Any]]
    book_channel: str
    trade_channel: str
    #: Publishes one live trade at 100.0 for 0.5, the taker buying; the raw message.
    trade: Callable[[Any], Awaitable[Message]]
    #: TradeEvent.info expected for that raw message.
    info: Callable[[Message], dict[str, str]]
    #: How the exchange's own integrity check is broken, and the resync reason.
    breakage: str
    reason: str
    #: False where one update of the mock's book takes several messages (BitMEX
    #: sends each action apart), so that it may show as several diffs.
    one_message_per_update: bool = True
    #: False where a resync of one symbol fetches a snapshot on the same
    #: subscription (Binance) instead of subscribing again.
    resubscribes_on_resync: bool = True
    #: The trade id TradeEvent.trade_id must carry for the raw message, where checked.
    trade_id: Callable[[Message], str] | None = None


VENUES = [
    Venue(
        "GDAX",
        "FX-BTC/USD=GDAX",
        CoinbaseMock,
        lambda m: {"api": {"ws": m.ws_url}},
        "level2_batch",
        "matches",
        # Coinbase names the maker's side: a sell maker means a buying taker.
        lambda m: m.trade(100.0, 0.5, "sell"),
        lambda raw: {
            "side": "BUY",
            "maker_order_id": raw["maker_order_id"],
            "taker_order_id": raw["taker_order_id"],
            "sequence": str(raw["sequence"]),
        },
        "cross",
        "crossed",
    ),
    Venue(
        "BINANCE",
        "FX-BTC/USDT=BINANCE",
        BinanceMock,
        lambda m: {
            "api": {"ws": {"spot": m.ws_url + "/stream/ws"}, "public": m.http_url + "/api/v3"}
        },
        "depth",
        "trade",
        lambda m: m.trade(100.0, 0.5, buyer_is_maker=False),
        lambda raw: {"side": "BUY"},
        "lose",
        "sequence",
        resubscribes_on_resync=False,
    ),
    Venue(
        "KRAKEN",
        "FX-BTC/USD=KRAKEN",
        KrakenMock,
        lambda m: {"api": {"ws": {"publicV2": m.ws_url + "/v2"}}},
        "book",
        "trade",
        lambda m: m.trade(100.0, 0.5, "buy"),
        lambda raw: {"side": "BUY", "ord_type": raw["ord_type"]},
        "lose",
        "checksum",
    ),
    Venue(
        "GEMINI",
        "FX-BTC/USD=GEMINI",
        GeminiMock,
        lambda m: {"api": {"ws": m.ws_url}},
        "l2",
        "l2",
        lambda m: m.trade(100.0, 0.5, "buy"),
        lambda raw: {"side": "BUY"},
        "cross",
        "crossed",
    ),
    Venue(
        "DERIBIT",
        "PERP-BTC/USDT=DERIBIT",
        DeribitMock,
        lambda m: {"api": {"ws": m.ws_url}},
        "book",
        "trades",
        lambda m: m.trade(100.0, 0.5, "buy"),
        lambda raw: {
            "side": "BUY",
            "trade_seq": str(raw["trade_seq"]),
            "tick_direction": str(raw["tick_direction"]),
            "mark_price": str(raw["mark_price"]),
            "index_price": str(raw["index_price"]),
        },
        "lose",
        "sequence",
    ),
    Venue(
        "BITMEX",
        "PERP-BTC/USD=BITMEX",
        BitmexMock,
        lambda m: {"api": {"ws": m.ws_url + "/realtime"}},
        "orderBookL2",
        "trade",
        lambda m: m.trade(100.0, 0.5, "Buy"),
        lambda raw: {"side": "BUY", "tickDirection": raw["tickDirection"]},
        "cross",
        "crossed",
        one_message_per_update=False,
    ),
    Venue(
        "KUCOIN",
        "FX-BTC/USDT=KUCOIN",
        KucoinMock,
        # The WebSocket address comes from the token request, on the REST API.
        lambda m: {"api": {"public": m.http_url}},
        "level2",
        "match",
        lambda m: m.trade(100.0, 0.5, "buy"),
        lambda raw: {
            "side": "BUY",
            "makerOrderId": raw["makerOrderId"],
            "takerOrderId": raw["takerOrderId"],
            "sequence": raw["sequence"],
        },
        "lose",
        "sequence",
    ),
    Venue(
        "COINONE",
        "FX-BTC/KRW=COINONE",
        CoinoneMock,
        lambda m: {"api": {"ws": m.ws_url}},
        "ORDERBOOK",
        "TRADE",
        # The seller's order was resting: the taker bought.
        lambda m: m.trade(100.0, 0.5, seller_is_maker=True),
        lambda raw: {"side": "BUY"},
        "cross",
        "crossed",
    ),
    Venue(
        "HITBTC",
        "FX-BTC/USDT=HITBTC",
        HitbtcMock,
        lambda m: {"api": {"ws": {"public": m.ws_url + "/api/3/ws/public"}}},
        "orderbook/full",
        "trades",
        lambda m: m.trade(100.0, 0.5, "buy"),
        lambda raw: {"side": "BUY"},
        # HitBTC promises only growing sequence numbers: only a crossed book shows.
        "cross",
        "crossed",
    ),
    Venue(
        "POLONIEX",
        "FX-BTC/USDT=POLONIEX",
        PoloniexMock,
        lambda m: {"api": {"ws": {"public": m.ws_url + "/ws/public"}}},
        "book_lv2",
        "trades",
        lambda m: m.trade(100.0, 0.5, "buy"),
        lambda raw: {"side": "BUY"},
        "lose",
        "sequence",
    ),
    Venue(
        "OKEX",
        "FX-BTC/USDT=OKEX",
        OkxMock,
        lambda m: {"api": {"ws": m.ws_url + "/ws/v5"}},
        "books",
        "trades",
        lambda m: m.trade(100.0, 0.5, "buy"),
        lambda raw: {"side": "BUY", "count": raw["count"]},
        # ccxt follows the seqId chain; Caspian's checksum check, which a lost
        # message the chain misses needs, is tested in test_integrity_okx_htx.
        "lose",
        "sequence",
    ),
    Venue(
        "HUOBI",
        "FX-BTC/USDT=HUOBI",
        HtxMock,
        lambda m: {
            "api": {
                "ws": {"api": {"spot": {"public": m.ws_url + "/ws", "feed": m.ws_url + "/feed"}}}
            }
        },
        "mbp.150",
        "trade.detail",
        lambda m: m.trade(100.0, 0.5, "buy"),
        lambda raw: {"side": "BUY", "tradeId": str(raw["tradeId"])},
        # ccxt raises ChecksumError when a prevSeqNum is past its book's seqNum.
        "lose",
        "sequence",
        # Not the legacy id, which is wider than 64 bits and ccxt reads as a float.
        trade_id=lambda raw: str(raw["tradeId"]),
    ),
    Venue(
        "BITFINEX",
        "FX-BTC/USD=BITFINEX",
        BitfinexMock,
        lambda m: {"api": {"ws": {"public": m.ws_url}}},
        "book",
        "trades",
        lambda m: m.trade(100.0, 0.5, "buy"),
        lambda raw: {"side": "BUY"},
        # ccxt asks for checksums (conf flag 131072); one follows each change.
        "lose",
        "checksum",
        # Bitfinex sends each changed level in a message of its own.
        one_message_per_update=False,
    ),
    Venue(
        "BITSTAMP",
        "FX-BTC/USD=BITSTAMP",
        BitstampMock,
        lambda m: {"api": {"ws": m.ws_url, "public": m.http_url + "/api"}},
        "diff_order_book",
        "live_trades",
        lambda m: m.trade(100.0, 0.5, "buy"),
        lambda raw: {"side": "BUY"},
        # Microtimestamps order the changes but show no gap: only a crossed book shows.
        "cross",
        "crossed",
    ),
    Venue(
        "BITHUMB",
        "FX-BTC/KRW=BITHUMB",
        BithumbMock,
        # ccxt's generation 2, its default: Bithumb's current public WebSocket.
        lambda m: {"api": {"ws": {"publicGen2": m.ws_url + "/websocket/v1"}}},
        "orderbook",
        "trade",
        lambda m: m.trade(100.0, 0.5, "buy"),
        lambda raw: {"side": "BUY"},
        # Every message is the whole top of the book: only a crossed one shows.
        "cross",
        "crossed",
    ),
    Venue(
        "BITFLYER",
        "FX-BTC/JPY=BITFLYER",
        BitflyerMock,
        # The base address replaces bitFlyer's; the client keeps its path.
        lambda m: {"api": {"ws": m.ws_url}},
        "lightning_board_snapshot",
        "lightning_executions",
        lambda m: m.trade(100.0, 0.5, "BUY"),
        lambda raw: {
            "side": "BUY",
            "buy_child_order_acceptance_id": raw["buy_child_order_acceptance_id"],
            "sell_child_order_acceptance_id": raw["sell_child_order_acceptance_id"],
        },
        # Nothing is numbered: a lost change is healed by the next snapshot
        # (test_live_bitflyer), only a crossed book forces a rebuild.
        "cross",
        "crossed",
    ),
    Venue(
        "KORBIT",
        "FX-BTC/KRW=KORBIT",
        KorbitMock,
        # The base address replaces Korbit's; the client keeps its path.
        lambda m: {"api": {"ws": m.ws_url}},
        "orderbook",
        "trade",
        lambda m: m.trade(100.0, 0.5, "buy"),
        lambda raw: {"side": "BUY"},
        # Every message is the whole top 30: only a crossed one shows.
        "cross",
        "crossed",
    ),
    Venue(
        "ITBIT",
        "FX-BTC/USD=ITBIT",
        PaxosMock,
        # The base address replaces Paxos's; the client keeps the feeds' paths.
        lambda m: {"api": {"ws": m.ws_url}},
        "marketdata",
        "executiondata",
        lambda m: m.trade(100.0, 0.5),
        # Paxos names no taker side.
        lambda raw: {"match_number": raw["match_number"]},
        # Nothing is numbered: only a crossed book shows.
        "cross",
        "crossed",
        # One UPDATE per changed level.
        one_message_per_update=False,
    ),
]


def by_code(venue: Venue) -> str:
    return venue.code


class Collector:
    """The source's sink: keeps every event and a book applied the way the gateway applies it."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.book = OrderBook()
        self.ready = False
        self.states = dict.fromkeys(Stream, StreamState.DISCONNECTED)

    def __call__(self, event: Event) -> None:
        self.events.append(event)
        if isinstance(event, BookEvent):
            if event.snapshot:
                self.book.apply_snapshot(event.bids, event.asks)
                self.ready = True
            else:
                # A diff without a base would be a bug of the source.
                assert self.ready, f"a diff with no snapshot before it: {event}"
                self.book.apply_diff(event.bids, event.asks)
        elif isinstance(event, StatusEvent):
            self.states[event.stream] = event.state
            if event.stream is Stream.DEPTH and event.state is StreamState.DISCONNECTED:
                self.ready = False

    def view(self, n: int = DEPTH) -> tuple[list[Level], list[Level]]:
        top = self.book.top(n)
        return list(top.bids), list(top.asks)

    def all(self, state: StreamState) -> bool:
        return all(value is state for value in self.states.values())

    def since(self, mark: int) -> list[Event]:
        return self.events[mark:]


def books_since(collector: Collector, mark: int) -> list[BookEvent]:
    return [e for e in collector.since(mark) if isinstance(e, BookEvent)]


def went_down(collector: Collector, mark: int) -> bool:
    """Whether the depth stream was set ``disconnected`` since event ``mark``."""
    return any(
        isinstance(e, StatusEvent)
        and e.stream is Stream.DEPTH
        and e.state is StreamState.DISCONNECTED
        for e in collector.since(mark)
    )


def synced(collector: Collector, mock: MockExchange) -> bool:
    return collector.ready and collector.view() == mock.top(DEPTH)


def diffed_and_synced(collector: Collector, mock: MockExchange, mark: int) -> bool:
    return bool(books_since(collector, mark)) and synced(collector, mock)


async def until(predicate: Callable[[], object], within: float = 5.0) -> None:
    """Polls: the conditions span the source's events and the mock's state."""
    async with asyncio.timeout(within):
        while True:
            if predicate():
                return
            await asyncio.sleep(0.01)


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


@contextlib.asynccontextmanager
async def streaming(
    venue: Venue, **options: Any
) -> AsyncIterator[tuple[LiveSource, Collector, MockExchange]]:
    mock = venue.mock()
    mock.set_book(BIDS, ASKS)
    await mock.start()
    collector = Collector()
    settings: dict[str, Any] = {
        "depth": DEPTH,
        "backoff_initial_s": 0.05,
        "backoff_max_s": 0.5,
        "stall_timeout_s": 30.0,
        "seed": 7,
    }
    settings.update(options)
    source = LiveSource(
        [venue.code],
        PRODUCTS.get,
        urls={venue.code: venue.urls(mock)},
        markets={venue.code: MARKETS[venue.code]},
        **settings,
    )
    task = asyncio.create_task(source.run(collector))
    try:
        yield source, collector, mock
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await mock.stop()


async def started(venue: Venue, source: LiveSource, c: Collector, mock: MockExchange) -> None:
    """Watches the venue's symbol and waits for its book and both subscriptions."""
    source.watch(venue.symbol)
    await mock.wait_subscribes(venue.book_channel)
    await mock.wait_subscribes(venue.trade_channel)
    await until(lambda: synced(c, mock))


async def assert_lost_change_healed(venue: Venue, heal: Callable[[Any], Awaitable[object]]) -> None:
    """A change lost on an exchange that numbers nothing is healed by the message ``heal`` sends.

    Healed in place: a diff, no outage.
    """
    async with streaming(venue) as (source, c, mock):
        await started(venue, source, c, mock)
        mark = len(c.events)
        mock.lose_update(bids=[(99.0, 0.0), (99.5, 3.0)])  # type: ignore[attr-defined]
        await asyncio.sleep(0.1)
        assert not synced(c, mock)
        await heal(mock)
        await until(lambda: synced(c, mock))
        books = books_since(c, mark)
        assert books and not any(book.snapshot for book in books)
        assert not went_down(c, mark)


async def assert_refusal_retried(venue: Venue, reason: str) -> None:
    """``venue``'s mock refuses its symbol: an outage with ``reason``, retried, and no book."""
    async with streaming(venue) as (source, c, _):
        labels = {"exchange": venue.code, "symbol": venue.symbol, "reason": reason}
        before = sample("caspian_resyncs_total", **labels)
        source.watch(venue.symbol)
        await until(lambda: sample("caspian_resyncs_total", **labels) >= before + 2)
        assert c.states[Stream.DEPTH] is StreamState.DISCONNECTED
        assert not [e for e in c.events if isinstance(e, BookEvent)]


@contextlib.asynccontextmanager
async def connected(mock: MockExchange, kind: type[_C]) -> AsyncIterator[_C]:
    """Starts ``mock`` and a connection of ``kind`` to it, outside any source."""
    await mock.start()
    connection = kind.from_urls({"api": {"ws": mock.ws_url}})
    try:
        yield connection
    finally:
        await connection.close()
        await mock.stop()


async def next_book(connection: NativeConnection, symbol: str) -> tuple[list[Level], list[Level]]:
    """The connection's next book of ``symbol``, whole."""
    book = await asyncio.wait_for(connection.watch_order_book(symbol), 5)
    return book["bids"], book["asks"]


# -- per exchange family -----------------------------------------------------------


@pytest.mark.parametrize("venue", VENUES, ids=by_code)
async def test_book_follows_the_exchange(venue: Venue) -> None:
    async with streaming(venue) as (source, c, mock):
        await started(venue, source, c, mock)
        first = [e for e in c.events if isinstance(e, BookEvent)]
        assert len(first) == 1 and first[0].snapshot
        # The snapshot holds the top DEPTH levels only.
        assert (first[0].bids, first[0].asks) == mock.top(DEPTH)
        assert c.all(StreamState.CONNECTED)

        steps: list[tuple[list[Level], list[Level], list[Level], list[Level]]] = [
            # (bids, asks) sent, then the diff expected: one resized level.
            ([(98.0, 7.5)], [], [(98.0, 7.5)], []),
            # A new best bid pushes the 10th bid out of the top: sent with size 0.
            ([(99.5, 1.0)], [], [(99.5, 1.0), (94.5, 0.0)], []),
            # The best ask goes: the 11th ask enters the top.
            ([], [(100.0, 0.0)], [], [(100.0, 0.0), (105.0, 4.5)]),
            # A change below the top is not worth an event.
            ([(90.0, 3.0)], [], [], []),
            ([(97.0, 0.0)], [(100.5, 9.0)], [(97.0, 0.0), (94.5, 3.25)], [(100.5, 9.0)]),
        ]
        for bids, asks, want_bids, want_asks in steps:
            mark = len(c.events)
            await mock.update(bids, asks)
            if not want_bids and not want_asks:
                # Nothing may come; give it the time a diff would take.
                await asyncio.sleep(0.2)
                assert not books_since(c, mark)
                continue
            await until(functools.partial(diffed_and_synced, c, mock, mark))
            diffs = books_since(c, mark)
            assert not any(diff.snapshot for diff in diffs)
            assert len(diffs) == 1 or not venue.one_message_per_update
            assert sorted(level for diff in diffs for level in diff.bids) == sorted(want_bids)
            assert sorted(level for diff in diffs for level in diff.asks) == sorted(want_asks)
        assert source.watched == {venue.symbol}


@pytest.mark.parametrize("venue", VENUES, ids=by_code)
async def test_every_change_goes_out_however_fast_they_come(venue: Venue) -> None:
    """Changes published back to back each reach the sink, none merged into the next."""
    async with streaming(venue) as (source, c, mock):
        await started(venue, source, c, mock)
        mark = len(c.events)
        sizes = [1.5 + i * 0.25 for i in range(30)]
        for size in sizes:
            await mock.update(bids=[(99.0, size)])
        await until(lambda: synced(c, mock))
        seen = [size for e in books_since(c, mark) for price, size in e.bids if price == 99.0]
        assert seen == sizes


@pytest.mark.parametrize("venue", VENUES, ids=by_code)
async def test_trades_carry_the_exchange_fields(venue: Venue) -> None:
    async with streaming(venue) as (source, c, mock):
        await started(venue, source, c, mock)
        # Whatever the exchange replayed on subscribing happened before: none of it is sent.
        await asyncio.sleep(0.2)
        assert not [e for e in c.events if isinstance(e, TradeEvent)]
        before_ms = time.time_ns() // 1_000_000
        raw = await venue.trade(mock)
        await until(lambda: any(isinstance(e, TradeEvent) for e in c.events))
        trades = [e for e in c.events if isinstance(e, TradeEvent)]
        assert len(trades) == 1
        trade = trades[0]
        assert (trade.symbol, trade.price, trade.size) == (venue.symbol, 100.0, 0.5)
        assert trade.trade_id is not None and trade.trade_id != ""
        if venue.trade_id is not None:
            assert trade.trade_id == venue.trade_id(raw)
        assert trade.info == venue.info(raw)
        assert trade.exchange_ts is not None
        assert abs(trade.exchange_ts // 1000 - before_ms) < 5_000


@pytest.mark.parametrize("venue", VENUES, ids=by_code)
async def test_dropped_connection_shows_at_once_and_heals(venue: Venue) -> None:
    async with streaming(venue) as (source, c, mock):
        await started(venue, source, c, mock)
        labels = {"exchange": venue.code, "symbol": venue.symbol}
        reconnects = sample("caspian_upstream_reconnects_total", **labels)
        resyncs = sample("caspian_resyncs_total", **labels, reason="disconnect")
        assert sample("caspian_stream_state", **labels, stream="depth") == 1
        mark = len(c.events)
        dropped = time.monotonic()
        mock.drop()
        # The market moves while the connection is down.
        mock.apply(bids=[(99.5, 4.0)], asks=[(101.0, 0.0)])
        await until(lambda: c.all(StreamState.DISCONNECTED), within=1.5)
        assert time.monotonic() - dropped < 1.5
        assert sample("caspian_stream_state", **labels, stream="trade") == 0
        downs = [e for e in c.since(mark) if isinstance(e, StatusEvent)]
        assert {(e.stream, e.state) for e in downs[:3]} == {
            (stream, StreamState.DISCONNECTED) for stream in Stream
        }
        await mock.wait_subscribes(venue.book_channel, 2)
        await until(lambda: synced(c, mock) and c.all(StreamState.CONNECTED))
        books = books_since(c, mark)
        assert books and books[0].snapshot
        assert sample("caspian_upstream_reconnects_total", **labels) == reconnects + 1
        assert sample("caspian_resyncs_total", **labels, reason="disconnect") == resyncs + 1
        assert sample("caspian_stream_state", **labels, stream="depth") == 1
        # And it streams again.
        await mock.update(bids=[(98.5, 0.0)])
        await until(lambda: synced(c, mock))


@pytest.mark.parametrize("venue", VENUES, ids=by_code)
async def test_untrustworthy_book_is_rebuilt_not_served(venue: Venue) -> None:
    async with streaming(venue) as (source, c, mock):
        await started(venue, source, c, mock)
        labels = {"exchange": venue.code, "symbol": venue.symbol, "reason": venue.reason}
        resyncs = sample("caspian_resyncs_total", **labels)
        mark = len(c.events)
        if venue.breakage == "lose":
            # A change whose message is lost, then one that shows the hole.
            mock.lose_update(bids=[(98.0, 0.0)])  # type: ignore[attr-defined]
            await mock.update(asks=[(101.5, 6.0)])
        else:
            # A corrupt message: a bid above the best ask.
            await mock.send_changes(bids=[(100.5, 1.0)])
        # Seen in the events: a resync without a reconnect may be over before a poll.
        await until(lambda: went_down(c, mark))
        if venue.resubscribes_on_resync:
            await mock.wait_subscribes(venue.book_channel, 2)
        await until(lambda: synced(c, mock) and c.all(StreamState.CONNECTED))
        books = books_since(c, mark)
        # Nothing of the broken book went out: the next book is the fresh snapshot.
        assert books[0].snapshot
        assert sample("caspian_resyncs_total", **labels) == resyncs + 1


@pytest.mark.parametrize("venue", VENUES, ids=by_code)
async def test_watchdog_resubscribes_a_silent_connection(venue: Venue) -> None:
    async with streaming(venue, stall_timeout_s=1.0) as (source, c, mock):
        source.watch(venue.symbol)
        await until(lambda: synced(c, mock))

        async def market() -> None:
            # Keeps exchanges without heartbeats talking until the stall.
            for i in range(1000):
                await mock.update(bids=[(80.0, 1.0 + i % 2)])
                await asyncio.sleep(0.1)

        ticker = asyncio.create_task(market())
        try:
            await asyncio.sleep(1.5)
            assert c.all(StreamState.CONNECTED), "the watchdog fired on a talking connection"
            labels = {"exchange": venue.code, "symbol": venue.symbol, "reason": "stall"}
            stalls = sample("caspian_resyncs_total", **labels)
            stalled = time.monotonic()
            mock.stall()
            await until(lambda: c.all(StreamState.DISCONNECTED), within=3.0)
            assert 0.8 < time.monotonic() - stalled < 2.5
            await mock.wait_subscribes(venue.book_channel, 2)
            await until(lambda: synced(c, mock) and c.all(StreamState.CONNECTED))
            assert sample("caspian_resyncs_total", **labels) == stalls + 1
        finally:
            ticker.cancel()


async def test_reconnects_back_off_while_the_exchange_is_down() -> None:
    venue = VENUES[0]
    async with streaming(venue, backoff_initial_s=0.05, backoff_max_s=0.4) as (source, c, mock):
        await started(venue, source, c, mock)
        labels = {"exchange": venue.code, "symbol": venue.symbol}
        reconnects = sample("caspian_upstream_reconnects_total", **labels)
        mock.refusing = True
        handshakes = mock.handshakes
        mock.drop()
        await asyncio.sleep(2.0)
        attempts = mock.handshakes - handshakes
        # Delays of about 0.05, 0.1, 0.2, then 0.4 at most (halved at worst by the
        # jitter): 2 s hold a handful of attempts, not a storm, nor none.
        assert 4 <= attempts <= 14, attempts
        assert c.all(StreamState.DISCONNECTED)
        # One more when sampled between a reconnect's count and its handshake.
        counted = sample("caspian_upstream_reconnects_total", **labels) - reconnects
        assert attempts <= counted <= attempts + 1
        mock.refusing = False
        await until(lambda: synced(c, mock) and c.all(StreamState.CONNECTED))


async def test_trades_from_before_the_session_are_not_sent() -> None:
    """Some exchanges replay old trades on subscribing; they were sent in an earlier session."""
    venue = VENUES[0]
    async with streaming(venue) as (source, c, mock):
        await started(venue, source, c, mock)
        old = datetime.fromtimestamp(time.time() - 60, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        assert isinstance(mock, CoinbaseMock)
        await mock.trade(99.0, 1.0, "sell", at=old)
        await mock.trade(100.0, 0.5, "sell")
        await until(lambda: any(isinstance(e, TradeEvent) for e in c.events))
        await asyncio.sleep(0.1)
        assert [e.price for e in c.events if isinstance(e, TradeEvent)] == [100.0]


async def test_a_book_woken_after_its_session_failed_is_not_sent() -> None:
    """ccxt wakes the book watcher with the book of the message whose check then failed."""
    loop = asyncio.get_running_loop()
    session = _Session(loop)
    events: list[Event] = []

    async def book_then_failed_check(exchange: Any, symbol: str, limit: int | None) -> Any:
        assert not session.over, "watched again after the session ended"
        session.end("checksum", IntegrityError("checksum", "the message just applied"))
        return {"bids": [[99.0, 1.0]], "asks": [[100.0, 1.0]], "timestamp": None}

    kraken = BY_CODE["KRAKEN"].adapter
    assert kraken is not None
    adapter = dataclasses.replace(kraken, watch_book=book_then_failed_check)
    sessions = SymbolSessions(LiveSource(["KRAKEN"], PRODUCTS.get), "KRAKEN", adapter)
    feed = SymbolFeed("KRAKEN", "FX-BTC/USD=KRAKEN", events.append, depth=DEPTH, max_lag_s=2.0)
    book = BookView(((99.0, 1.0),), ((100.0, 1.0),))
    await _Symbol(sessions, feed, "BTC/USD")._books(None, session, lambda: (book, None))
    assert events == []


# -- BitMEX, streamed without ccxt ------------------------------------------------------

BITMEX = next(venue for venue in VENUES if venue.code == "BITMEX")


async def test_bitmex_pings_keep_a_quiet_connection_up() -> None:
    async with streaming(BITMEX, stall_timeout_s=1.0) as (source, c, mock):
        await started(BITMEX, source, c, mock)
        assert isinstance(mock, BitmexMock)
        labels = {"exchange": "BITMEX", "symbol": BITMEX.symbol, "reason": "stall"}
        stalls = sample("caspian_resyncs_total", **labels)
        # No market data for longer than the watchdog's limit: only pongs.
        await asyncio.sleep(1.6)
        assert mock.pings >= 3
        assert c.all(StreamState.CONNECTED)
        assert sample("caspian_resyncs_total", **labels) == stalls
        assert mock.subscribes["orderBookL2"] == 1


async def test_bitmex_change_to_an_unknown_level_rebuilds_the_book() -> None:
    """A lost insert shows when its level changes: BitMEX has no sequence numbers."""
    async with streaming(BITMEX) as (source, c, mock):
        await started(BITMEX, source, c, mock)
        assert isinstance(mock, BitmexMock)
        labels = {"exchange": "BITMEX", "symbol": BITMEX.symbol, "reason": "sequence"}
        resyncs = sample("caspian_resyncs_total", **labels)
        mark = len(c.events)
        mock.lose_update(bids=[(99.25, 1.0)])
        await mock.update(bids=[(99.25, 2.0)])
        await until(lambda: c.states[Stream.DEPTH] is StreamState.DISCONNECTED)
        await mock.wait_subscribes("orderBookL2", 2)
        await until(lambda: synced(c, mock) and c.all(StreamState.CONNECTED))
        assert books_since(c, mark)[0].snapshot
        assert sample("caspian_resyncs_total", **labels) == resyncs + 1


async def test_bitmex_changes_before_the_partial_are_ignored() -> None:
    """BitMEX may send a table's changes before its partial: they are already in it."""
    mock = BitmexMock()
    mock.set_book(BIDS, ASKS)
    mock.before_partial = [
        {
            "table": "orderBookL2",
            "action": "update",
            "data": [{"symbol": "XBTUSD", "id": mock.level_id(99.0), "size": 5}],
        },
        {"table": "orderBookL2", "action": "delete", "data": [{"symbol": "XBTUSD", "id": 1}]},
    ]
    async with connected(mock, BitmexConnection) as connection:
        assert await next_book(connection, "XBTUSD") == mock.top(100)
        await mock.update(bids=[(99.0, 0.0)], asks=[(100.0, 3.0)])
        assert await next_book(connection, "XBTUSD") == mock.top(100)
        mock.drop()
        with pytest.raises(ConnectionClosed):
            await next_book(connection, "XBTUSD")


# -- watching ---------------------------------------------------------------------


async def test_only_watched_symbols_are_streamed_and_unwatch_releases_them() -> None:
    venue = VENUES[0]
    async with streaming(venue) as (source, c, mock):
        await asyncio.sleep(0.2)
        assert not mock.connections
        # A product of an exchange this source does not stream, and no product at all.
        source.watch("FX-BTC/USD=KRAKEN")
        source.watch("FX-NOPE/USD=GDAX")
        await asyncio.sleep(0.2)
        assert not mock.connections and not c.events and source.watched == frozenset()

        await started(venue, source, c, mock)
        labels = {"exchange": venue.code, "symbol": venue.symbol, "stream": "depth"}
        assert sample("caspian_stream_state", **labels) == 1
        source.unwatch(venue.symbol)
        await until(lambda: not mock.connections, within=1.0)
        mark = len(c.events)
        await asyncio.sleep(0.2)
        assert not c.since(mark)
        assert REGISTRY.get_sample_value("caspian_stream_state", labels) is None

        # Watching again starts from a fresh snapshot.
        source.watch(venue.symbol)
        await mock.wait_subscribes(venue.book_channel, 2)
        await until(lambda: any(isinstance(e, BookEvent) and e.snapshot for e in c.since(mark)))


async def test_symbol_missing_from_the_markets_is_not_retried(
    caplog: pytest.LogCaptureFixture,
) -> None:
    venue = VENUES[0]
    mock = CoinbaseMock()
    await mock.start()
    markets = {k: v for k, v in MARKETS["GDAX"].items() if k != "BTC/USD"}
    source = LiveSource(
        ["GDAX"], PRODUCTS.get, urls={"GDAX": venue.urls(mock)}, markets={"GDAX": markets}
    )
    events: list[Event] = []
    task = asyncio.create_task(source.run(events.append))
    try:
        with caplog.at_level(logging.ERROR, logger="caspian.sources.live"):
            source.watch(venue.symbol)
            await until(lambda: "has no market" in caplog.text)
        await asyncio.sleep(0.2)
        assert not mock.connections and not events
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await mock.stop()


# -- configuration -----------------------------------------------------------------


def test_every_exchange_is_streamed_or_says_why_not() -> None:
    # One record per exchange of the contract, in its order, and the catalog's list from them.
    assert [(e.name, e.code) for e in RECORDS] == list(EXCHANGES)
    assert len(RECORDS) == 22
    for record in RECORDS:
        assert record.live or record.notes, record.code
        if record.adapter is not None:
            assert record.adapter.ccxt_id in ccxt.pro.exchanges, record.code
        if record.live:
            assert record.checks, f"{record.code} says which checks run"
    # The reasons hold for this ccxt: none of them has a ccxt.pro exchange, nor
    # BitMEX, which is streamed natively.
    for missing in ("bitflyer", "bitmex", "bittrex", "btcc", "itbit", "korbit", "liquid"):
        assert missing not in ccxt.pro.exchanges


def test_parse_exchanges() -> None:
    assert parse_exchanges(" gdax, KRAKEN ") == ["GDAX", "KRAKEN"]
    assert parse_exchanges("bitmex") == ["BITMEX"]
    with pytest.raises(ValueError, match="authenticated connections"):
        parse_exchanges("CEX")
    with pytest.raises(ValueError, match="unknown exchange"):
        parse_exchanges("NYSE")
    with pytest.raises(ValueError, match="name the exchanges"):
        parse_exchanges(" , ")


def test_urls_from_env() -> None:
    urls = {"gdax": {"api": {"ws": "ws://127.0.0.1:1"}}}
    assert urls_from_env({LIVE_URLS_ENV: json.dumps(urls)}) == {"GDAX": urls["gdax"]}
    assert urls_from_env({}) == {}
    with pytest.raises(ValueError, match="not JSON"):
        urls_from_env({LIVE_URLS_ENV: "{"})
    with pytest.raises(ValueError, match="must map"):
        urls_from_env({LIVE_URLS_ENV: '{"GDAX": "ws://x"}'})


def test_backoff_grows_with_jitter_up_to_its_cap() -> None:
    import random

    rng = random.Random(3)
    delays = [backoff_delay(attempt, 0.5, 30.0, rng) for attempt in range(12)]
    for attempt, delay in enumerate(delays):
        ceiling = min(30.0, 0.5 * 2**attempt)
        assert ceiling / 2 <= delay <= ceiling
    assert len({round(d, 6) for d in delays[8:]}) > 1, "capped delays must still be jittered"


# -- integrity checks by themselves ---------------------------------------------------


def test_kraken_checksum_matches_the_documented_algorithm() -> None:
    bids = [(45283.5, 0.1), (45283.4, 1.2), (45282.1, 0.4)]
    asks = [(45285.2, 0.001), (45286.4, 1.5), (45289.6, 0.05)]
    assert kraken_checksum(bids, asks, 1, 8) == documented_kraken_checksum(bids, asks, 1, 8)
    # The documented string of the first ask level.
    assert documented_kraken_checksum([], [(45285.2, 0.001)], 1, 8) == kraken_checksum(
        [], [(45285.2, 0.001)], 1, 8
    )
    import zlib

    assert kraken_checksum([], [(45285.2, 0.001)], 1, 8) == zlib.crc32(b"452852100000")


def test_kraken_check_compares_the_book_after_the_message() -> None:
    check = KrakenChecksum("BTC/USD", 1, 8)
    book = {"bids": [[100.0, 1.0]], "asks": [[101.0, 2.0]]}
    good = kraken_checksum(book["bids"], book["asks"], 1, 8)
    data: dict[str, Any] = {"symbol": "BTC/USD", "checksum": good}
    message = {"channel": "book", "type": "update", "data": [data]}
    check(message, book)
    data["checksum"] = good ^ 1
    with pytest.raises(IntegrityError) as caught:
        check(message, book)
    assert caught.value.reason == "checksum"
    # Other symbols' and channels' messages are not its business.
    check({"channel": "book", "data": [{"symbol": "ETH/USD", "checksum": 1}]}, book)
    check({"channel": "heartbeat"}, None)


def test_deribit_check_follows_change_ids() -> None:
    check = DeribitSequence("BTC-PERPETUAL")

    def book(kind: str, change: int, previous: int | None = None) -> dict[str, Any]:
        data: dict[str, Any] = {"type": kind, "instrument_name": "BTC-PERPETUAL"}
        data["change_id"] = change
        if previous is not None:
            data["prev_change_id"] = previous
        return {
            "method": "subscription",
            "params": {"channel": "book.BTC-PERPETUAL.100ms", "data": data},
        }

    with pytest.raises(IntegrityError):
        check(book("change", 11, 10), None)
    check(book("snapshot", 10), None)
    check(book("change", 11, 10), None)
    check(book("change", 14, 11), None)
    with pytest.raises(IntegrityError) as caught:
        check(book("change", 16, 15), None)
    assert caught.value.reason == "sequence"


# -- the real service -------------------------------------------------------------------


@contextlib.asynccontextmanager
async def live_service(
    data_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    code: str,
    urls: dict[str, Any],
) -> AsyncIterator[StreamClient]:
    """The real service streaming ``code`` live from ``urls`` (a mock's), and a client of it."""
    async with live_clients(data_dir, monkeypatch, code, urls, 1) as (c,):
        yield c


@contextlib.asynccontextmanager
async def live_clients(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch, code: str, urls: dict[str, Any], count: int
) -> AsyncIterator[tuple[StreamClient, ...]]:
    """The real service streaming ``code`` live from ``urls``, and ``count`` clients of it."""
    monkeypatch.setenv(LIVE_URLS_ENV, json.dumps({code: urls}))
    running = await asyncio.to_thread(start_service, data_dir, source=f"live:{code}")
    try:
        token = await asyncio.to_thread(running.token)
        clients = [await StreamClient.open(running.stream_url, token) for _ in range(count)]
        yield tuple(clients)
        for c in clients:
            await c.close()
    finally:
        await asyncio.to_thread(running.stop)


async def follow_top(
    c: StreamClient,
    request_id: str,
    book: dict[tuple[str, float], float],
    top: Callable[[], tuple[list[Level], list[Level]]],
) -> None:
    """Applies ``request_id``'s Level2 messages to ``book`` until it is ``top()``."""

    def wanted() -> dict[tuple[str, float], float]:
        bids, asks = top()
        return {("bid", p): s for p, s in bids} | {("ask", p): s for p, s in asks}

    async with asyncio.timeout(10):
        while book != wanted():
            message = await c.recv()
            if message["type"] == "Level2" and message["requestId"] == request_id:
                apply_level2(book, message)


async def test_a_deeper_subscription_gets_the_deeper_top_whole_and_no_one_else_is_disturbed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The in-process live source publishes the top the gateway serves: a deeper
    subscription has it send that top, a shallower one none of the levels below."""
    venue = next(venue for venue in VENUES if venue.code == "BINANCE")
    mock = venue.mock()
    mock.set_book(BIDS, ASKS)
    await mock.start()
    try:
        async with live_clients(tmp_path / "data", monkeypatch, "BINANCE", venue.urls(mock), 2) as (
            first,
            second,
        ):
            shallow = await first.subscribe(
                venue.symbol, "Level2", numberOfLevels=3, conflation="None"
            )
            book3: dict[tuple[str, float], float] = {}
            await follow_top(first, shallow, book3, lambda: mock.top(3))
            await mock.update(bids=[(96.0, 9.0)])
            await mock.update(bids=[(99.0, 4.0)])
            await follow_top(first, shallow, book3, lambda: mock.top(3))
            deep = await second.subscribe(
                venue.symbol, "Level2", numberOfLevels=12, conflation="None"
            )
            first_message = await second.wait_for(
                lambda m: m["requestId"] == deep and bool(m["payload"])
            )
            book12: dict[tuple[str, float], float] = {}
            apply_level2(book12, first_message)
            bids, asks = mock.top(12)
            assert book12 == {("bid", p): s for p, s in bids} | {("ask", p): s for p, s in asks}
            assert (("bid", 96.0), 9.0) in book12.items(), "a change made below the served top"
            await mock.update(bids=[(99.0, 0.0), (94.5, 7.0)], asks=[(100.0, 0.0)])
            await follow_top(second, deep, book12, lambda: mock.top(12))
            await follow_top(first, shallow, book3, lambda: mock.top(3))
            unsubscribe = await second.send("Unsubscribe", {"subscribeRequestId": deep})
            assert (await second.response(unsubscribe))["payload"]["code"] == 300
            await mock.update(bids=[(98.5, 0.0), (98.0, 0.0)], asks=[(100.5, 3.0)])
            await follow_top(first, shallow, book3, lambda: mock.top(3))
    finally:
        await mock.stop()


async def test_service_streams_gdax_to_a_level2_client(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with (
        CoinbaseMock() as mock,
        # The service loads its markets from the mock's REST API, as from Coinbase's.
        live_service(
            tmp_path / "data",
            monkeypatch,
            "GDAX",
            {"api": {"ws": mock.ws_url, "public": mock.http_url}},
        ) as c,
    ):
        mock.set_book(BIDS, ASKS)
        l2 = await c.subscribe("FX-BTC/USD=GDAX", "Level2", numberOfLevels=5, conflation="None")
        l1 = await c.subscribe("FX-BTC/USD=GDAX", "Level1", conflation="None")
        book: dict[tuple[str, float], float] = {}

        def expected() -> dict[tuple[str, float], float]:
            bids, asks = mock.top(5)
            return {("bid", p): s for p, s in bids} | {("ask", p): s for p, s in asks}

        async def follow(predicate: Callable[[dict[str, Any]], bool] | None = None) -> None:
            """Applies Level2 messages until the client's book is the exchange's top 5."""
            seen = predicate is None
            async with asyncio.timeout(10):
                while not (seen and book == expected()):
                    message = await c.recv()
                    if message["type"] != "Level2" or message["requestId"] != l2:
                        continue
                    apply_level2(book, message)
                    seen = seen or bool(predicate and predicate(message))

        await follow()
        await mock.wait_subscribes("matches")
        await mock.update(bids=[(99.5, 2.0)], asks=[(100.0, 0.0)])
        await mock.update(bids=[(97.0, 0.0)])
        await follow()

        raw = await mock.trade(100.5, 0.25, "buy")
        trade = await c.wait_for(
            lambda m: m["requestId"] == l1 and m["payload"].get("tradePrice") == 100.5
        )
        assert trade["payload"]["tradeSize"] == 0.25
        assert trade["payload"]["exchangeSpecificInfo"] == {
            "side": "SELL",
            "maker_order_id": raw["maker_order_id"],
            "taker_order_id": raw["taker_order_id"],
            "sequence": str(raw["sequence"]),
        }

        # An upstream drop reaches the client at once, then a whole top-N heals it.
        mock.drop()
        mock.apply(bids=[(99.5, 0.0), (99.0, 5.0)])
        await follow(lambda m: m["depthStream"] == "disconnected")
        await mock.wait_subscribes("level2_batch", 2)


@pytest.mark.parametrize(
    ("code", "urls"),
    [
        ("BINANCE", lambda url: {"api": {"ws": {"spot": url}}}),
        ("BITFLYER", lambda url: {"api": {"ws": url}}),
        ("KORBIT", lambda url: {"api": {"ws": url}}),
        ("ITBIT", lambda url: {"api": {"ws": url}}),
    ],
)
async def test_a_failed_connection_is_logged_with_its_address_and_cause(
    code: str, urls: Callable[[str], dict[str, Any]], caplog: pytest.LogCaptureFixture
) -> None:
    """Caspian's own clients: the socket's error alone ("Connect call failed") would
    not say which address failed."""
    url = f"ws://127.0.0.1:{free_port()}/ws"
    source = LiveSource(
        [code],
        PRODUCTS.get,
        urls={code: urls(url)},
        markets={code: MARKETS[code]},
        backoff_initial_s=0.05,
    )
    symbol = next(venue.symbol for venue in VENUES if venue.code == code)
    with caplog.at_level(logging.WARNING, logger="caspian.sources.live"):
        task = asyncio.create_task(source.run(Collector()))
        try:
            source.watch(symbol)
            await until(lambda: "resubscribing (disconnect)" in caplog.text)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    line = next(r.getMessage() for r in caplog.records if "(disconnect)" in r.getMessage())
    assert url in line and "Connect call failed" in line
