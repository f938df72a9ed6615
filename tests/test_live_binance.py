"""Binance's own client under load: a feed that outruns its consumer, and bursts."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from caspian.codes import StreamState
from caspian.events import BookEvent, Event
from caspian.sources.live import LiveSource
from caspian.sources.live import binance as binance_client
from tests.support.mock_exchanges import BinanceMock
from tests.test_live import (
    ASKS,
    BIDS,
    MARKETS,
    PRODUCTS,
    VENUES,
    Collector,
    books_since,
    sample,
    synced,
    until,
    went_down,
)

BINANCE = next(venue for venue in VENUES if venue.code == "BINANCE")
SYMBOL = BINANCE.symbol


class SlowCollector(Collector):
    """A consumer that needs ``cost_s`` of the event loop for every book event."""

    def __init__(self, cost_s: float) -> None:
        super().__init__()
        self.cost_s = cost_s

    def __call__(self, event: Event) -> None:
        if isinstance(event, BookEvent):
            time.sleep(self.cost_s)
        super().__call__(event)


@contextlib.asynccontextmanager
async def watching(
    collector: Collector, mock: BinanceMock, **options: Any
) -> AsyncIterator[LiveSource]:
    """A live Binance source on ``mock``, watching SYMBOL."""
    source = LiveSource(
        ["BINANCE"],
        PRODUCTS.get,
        urls={"BINANCE": BINANCE.urls(mock)},
        markets={"BINANCE": MARKETS["BINANCE"]},
        depth=10,
        backoff_initial_s=0.05,
        backoff_max_s=0.5,
        **options,
    )
    task = asyncio.create_task(source.run(collector))
    try:
        source.watch(SYMBOL)
        yield source
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@contextlib.asynccontextmanager
async def binance(collector: Collector, **options: Any) -> AsyncIterator[BinanceMock]:
    """A mock Binance and a source on it, once the source holds its book."""
    mock = BinanceMock()
    mock.set_book(BIDS, ASKS)
    await mock.start()
    try:
        async with watching(collector, mock, **options):
            await until(lambda: synced(collector, mock))
            yield mock
    finally:
        await mock.stop()


def top_changes(count: int) -> list[tuple[list[tuple[float, float]], list[tuple[float, float]]]]:
    """``count`` updates that each resize the best bid, so that each is a change to the top."""
    return [([(99.0, 1.0 + i % 7)], []) for i in range(count)]


async def test_a_feed_that_outruns_its_consumer_is_shown_down_then_sent_whole() -> None:
    collector = SlowCollector(cost_s=0.004)
    async with binance(collector, max_lag_s=0.3) as mock:
        labels = {"exchange": "BINANCE", "symbol": SYMBOL, "reason": "lag"}
        outages = sample("caspian_resyncs_total", **labels)
        mark = len(collector.events)
        # 500 changes published at once take the consumer 2 s: well past the bound.
        await mock.burst(top_changes(500))
        await until(lambda: went_down(collector, mark), within=10)
        assert sample("caspian_resyncs_total", **labels) == outages + 1
        # Shown down, the feed spends nothing on clients and catches up; the
        # first change stamped within the bound brings the whole book back.
        await asyncio.sleep(0.5)
        await mock.update(bids=[(98.5, 4.0)])
        await until(lambda: collector.all(StreamState.CONNECTED) and synced(collector, mock))
        since = [e for e in collector.since(mark) if isinstance(e, BookEvent)]
        assert len(since) < 400, "the lagging changes were not all sent"
        assert any(e.snapshot for e in since)
        assert sample("caspian_live_lag_seconds", exchange="BINANCE", symbol=SYMBOL) < 0.15


async def test_a_burst_does_not_hold_the_event_loop() -> None:
    # 0.1 ms of work per change: 5,000 changes read in one go would hold the loop 0.5 s.
    collector = SlowCollector(cost_s=0.0001)
    async with binance(collector) as mock:
        gaps: list[float] = []

        async def ticker() -> None:
            last = time.perf_counter()
            while True:
                await asyncio.sleep(0)
                now = time.perf_counter()
                gaps.append(now - last)
                last = now

        task = asyncio.create_task(ticker())
        try:
            await mock.burst(top_changes(5000))
            await until(lambda: synced(collector, mock), within=20)
        finally:
            task.cancel()
        assert max(gaps) < 0.1, f"the loop was held for {max(gaps) * 1000:.0f} ms"


async def test_a_crossed_book_is_never_sent_and_is_rebuilt() -> None:
    collector = Collector()
    async with binance(collector) as mock:
        labels = {"exchange": "BINANCE", "symbol": SYMBOL, "reason": "crossed"}
        resyncs = sample("caspian_resyncs_total", **labels)
        mark = len(collector.events)
        # A bid above the best ask, in a message whose ids follow on.
        await mock.update(bids=[(100.5, 1.0)])
        await until(lambda: sample("caspian_resyncs_total", **labels) > resyncs)
        books = [e for e in collector.since(mark) if isinstance(e, BookEvent)]
        assert not any((100.5, 1.0) in e.bids for e in books if not e.snapshot)
        # The exchange's book is crossed too: it stays so until the bid goes.
        await mock.update(bids=[(100.5, 0.0)])
        await until(lambda: collector.all(StreamState.CONNECTED) and synced(collector, mock))


async def test_a_feed_that_falls_quiet_after_a_burst_comes_back_by_itself() -> None:
    collector = SlowCollector(cost_s=0.004)
    async with binance(collector, max_lag_s=0.3) as mock:
        mark = len(collector.events)
        await mock.burst(top_changes(500))
        await until(lambda: went_down(collector, mark), within=10)
        # No change comes after the burst: the drained connection is enough,
        # within a tick (max_lag_s / 4) of the backlog being read.
        await until(
            lambda: collector.all(StreamState.CONNECTED) and synced(collector, mock), within=5
        )


async def test_requests_go_out_as_text_frames() -> None:
    async with binance(Collector()) as mock:
        assert mock.subscribes["depth"] == 1
        assert mock.binary_frames == 0


async def test_unreadable_messages_rebuild_their_symbol_and_spare_the_connection(
    caplog: pytest.LogCaptureFixture,
) -> None:
    collector = Collector()
    async with binance(collector) as mock:
        labels = {"exchange": "BINANCE", "symbol": SYMBOL, "reason": "error"}
        errors = sample("caspian_resyncs_total", **labels)
        mark = len(collector.events)
        with caplog.at_level(logging.WARNING, logger="caspian.sources.live"):
            for text in (
                "not json",
                '{"e": "depthUpdate", "s": "NOPE"}',
                '{"e": "depthUpdate", "s": "BTCUSDT", "U": 1, "u": "x", "E": 1}',
                '{"e": "trade", "s": "BTCUSDT", "p": "1", "q": "1", "t": 1, "T": 1e999}',
                '{"e": "depthUpdate", "s": "BTCUSDT", "U": 123456789012345678901234567890}',
                "[1, 2]",
            ):
                for connection in list(mock.connections):
                    await mock.send_text(connection, text)
            await until(lambda: sample("caspian_resyncs_total", **labels) > errors)
        assert "cannot be read" in caplog.text
        await mock.update(bids=[(98.5, 2.0)])
        await until(lambda: collector.all(StreamState.CONNECTED) and synced(collector, mock))
        assert books_since(collector, mark)[0].snapshot
        # The connection went on: no second subscription.
        assert mock.subscribes["depth"] == 1


async def test_events_wait_in_bounded_memory_while_the_snapshot_does_not_come(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(binance_client, "_MAX_BUFFERED", 50)
    mock = BinanceMock()
    mock.set_book(BIDS, ASKS)
    mock.snapshots_refused = True
    await mock.start()
    collector = Collector()
    try:
        async with watching(collector, mock) as source:
            await mock.wait_subscribes("depth")
            await mock.burst(top_changes(300))
            await asyncio.sleep(0.5)
            client = source._clients["BINANCE"][0]
            assert isinstance(client, binance_client.BinanceClient)
            assert len(client._connections[0].symbols["BTCUSDT"].buffer) == 50
            assert not collector.ready
            mock.snapshots_refused = False
            await mock.update(bids=[(98.5, 2.0)])
            await until(lambda: collector.all(StreamState.CONNECTED) and synced(collector, mock))
    finally:
        await mock.stop()


class OneSymbol(Collector):
    """A collector of SYMBOL's events; the other symbols' go to ``others``."""

    def __init__(self) -> None:
        super().__init__()
        self.others: list[Event] = []

    def __call__(self, event: Event) -> None:
        if event.symbol == SYMBOL:
            super().__call__(event)
        else:
            self.others.append(event)


async def test_symbols_past_a_connections_limit_open_another_connection(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Binance allows 1,024 streams a connection: a symbol past the limit is not
    dropped but carried by another connection (here the limit is one symbol),
    which closes when its last symbol is released; the first goes on undisturbed."""
    monkeypatch.setattr(binance_client, "MAX_SYMBOLS", 1)
    mock = BinanceMock()
    mock.set_book(BIDS, ASKS)
    await mock.start()
    collector = OneSymbol()
    try:
        async with watching(collector, mock) as source:
            await until(lambda: synced(collector, mock))
            assert len(mock.connections) == 1
            # The mock serves BTCUSDT alone and refuses ETHUSDT's streams, on
            # the second connection only.
            source.watch("FX-ETH/USDT=BINANCE")
            await until(lambda: len(mock.connections) == 2)
            client = source._clients["BINANCE"][0]
            assert isinstance(client, binance_client.BinanceClient)
            assert [list(c.symbols) for c in client._connections] == [["BTCUSDT"], ["ETHUSDT"]]
            assert any(e.symbol == "FX-ETH/USDT=BINANCE" for e in collector.others)
            mark = len(collector.events)
            await mock.update(bids=[(98.5, 2.0)])
            await until(lambda: synced(collector, mock) and len(collector.events) > mark)
            source.unwatch("FX-ETH/USDT=BINANCE")
            await until(lambda: len(mock.connections) == 1)
            assert [list(c.symbols) for c in client._connections] == [["BTCUSDT"]]
            assert mock.subscribes["depth"] == 1
            assert not went_down(collector, 0)
            await mock.update(bids=[(98.0, 3.0)])
            await until(lambda: synced(collector, mock))
    finally:
        await mock.stop()
