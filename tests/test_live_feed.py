"""SymbolFeed, the rules every live client follows, without a socket: a clock is passed in."""

from __future__ import annotations

import logging

import pytest
from prometheus_client import REGISTRY

from caspian.book import BookView, OrderBook
from caspian.codes import StreamState
from caspian.events import BookEvent, StatusEvent, TradeEvent
from caspian.sources.live.feed import SymbolFeed
from tests.test_live import Collector

SYMBOL = "FX-BTC/USDT=BINANCE"
BIDS = [(100.0 - i, 1.0) for i in range(10)]
ASKS = [(101.0 + i, 1.0) for i in range(10)]


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000_000_000

    def __call__(self) -> int:
        return self.now


class Client(Collector):
    """Applies the feed's events as the gateway does."""

    def up(self) -> bool:
        return self.all(StreamState.CONNECTED)

    def downs(self) -> int:
        return sum(
            1
            for e in self.events
            if isinstance(e, StatusEvent) and e.state is StreamState.DISCONNECTED
        )


def lag_outages() -> float:
    labels = {"exchange": "BINANCE", "symbol": SYMBOL, "reason": "lag"}
    return REGISTRY.get_sample_value("caspian_resyncs_total", labels) or 0.0


def make(depth: int = 5, max_lag_s: float = 2.0) -> tuple[SymbolFeed, Client, Clock]:
    clock = Clock()
    client = Client()
    feed = SymbolFeed("BINANCE", SYMBOL, client, depth=depth, max_lag_s=max_lag_s, clock=clock)
    return feed, client, clock


def test_snapshot_sends_the_top_then_connected_then_changes_to_the_top() -> None:
    feed, client, _ = make()
    feed.snapshot(BIDS, ASKS)
    first = client.events[0]
    assert isinstance(first, BookEvent) and first.snapshot
    assert (first.bids, first.asks) == (BIDS[:5], ASKS[:5])
    assert client.up()
    mark = len(client.events)
    feed.diff([(93.0, 5.0)], [])
    assert client.events[mark:] == [], "a change below the top is not sent"
    feed.diff([(100.5, 2.0)], [])
    (diff,) = client.events[mark:]
    assert isinstance(diff, BookEvent) and diff.bids == [(100.5, 2.0), (96.0, 0.0)]
    assert client.book.top(5) == feed.book.top(5)


def test_view_sends_what_changed_in_a_library_kept_top() -> None:
    feed, client, _ = make(depth=3)
    feed.snapshot(BIDS[:3], ASKS[:3])
    mark = len(client.events)
    feed.view(
        BookView(
            ((100.0, 1.0), (99.0, 1.0), (98.0, 1.0)), ((101.0, 1.0), (102.0, 1.0), (103.0, 1.0))
        )
    )
    assert client.events[mark:] == []
    feed.view(
        BookView(
            ((100.0, 3.0), (99.0, 1.0), (97.5, 1.0)), ((101.0, 1.0), (102.0, 1.0), (103.0, 1.0))
        )
    )
    (diff,) = client.events[mark:]
    assert isinstance(diff, BookEvent)
    assert sorted(diff.bids) == [(97.5, 1.0), (98.0, 0.0), (100.0, 3.0)] and diff.asks == []
    assert client.book.top(3) == feed.book.top(3)


def test_down_sends_disconnected_once_and_the_next_book_is_a_snapshot(
    caplog: pytest.LogCaptureFixture,
) -> None:
    feed, client, _ = make()
    feed.snapshot(BIDS, ASKS)
    with caplog.at_level(logging.WARNING, logger="caspian.sources.live"):
        feed.down("sequence", "a hole")
        feed.down("disconnect", "and then the connection")
    assert client.downs() == 3, "the streams go down once"
    assert "sequence" in caplog.text and "a hole" in caplog.text
    mark = len(client.events)
    feed.diff([(100.0, 9.0)], [])
    feed.trade(100.0, 1.0, "1", {}, None)
    assert client.events[mark:] == [], "nothing goes out without a book"
    feed.snapshot(BIDS, ASKS)
    first = client.events[mark]
    assert isinstance(first, BookEvent) and first.snapshot and client.up()


def test_a_stopped_feed_emits_nothing() -> None:
    feed, client, _ = make()
    feed.snapshot(BIDS, ASKS)
    count = len(client.events)
    feed.stop()
    feed.diff([(100.0, 2.0)], [])
    feed.down("disconnect", "gone")
    assert len(client.events) == count
    labels = {"exchange": "BINANCE", "symbol": SYMBOL, "stream": "depth"}
    assert REGISTRY.get_sample_value("caspian_stream_state", labels) is None


def test_a_feed_behind_the_bound_is_disconnected_then_sent_whole_when_caught_up(
    caplog: pytest.LogCaptureFixture,
) -> None:
    feed, client, clock = make(max_lag_s=2.0)
    outages = lag_outages()
    feed.snapshot(BIDS, ASKS)
    # The exchange's clock runs 7 s behind this one: a constant skew is no lag.
    skew = 7_000_000
    feed.diff([(100.0, 2.0)], [], clock.now - skew)
    clock.now += 1_000_000
    feed.diff([(100.0, 3.0)], [], clock.now - skew)
    assert client.up() and feed.lag_us == 0

    # The feed falls behind: events stamped 1.5 s, then 2.5 s before they are read.
    clock.now += 1_000_000
    feed.diff([(99.0, 4.0)], [], clock.now - skew - 1_500_000)
    assert client.up()
    with caplog.at_level(logging.WARNING, logger="caspian.sources.live"):
        clock.now += 1_000_000
        feed.diff([(98.0, 5.0)], [], clock.now - skew - 2_500_000)
    assert not client.up() and client.downs() == 3
    assert lag_outages() == outages + 1
    assert "behind the exchange" in caplog.text
    lag = REGISTRY.get_sample_value(
        "caspian_live_lag_seconds", {"exchange": "BINANCE", "symbol": SYMBOL}
    )
    assert lag == pytest.approx(2.5)

    # While behind, the book is kept but nothing of it goes out, nor trades.
    mark = len(client.events)
    feed.diff([(100.0, 0.0)], [(101.0, 7.0)], clock.now - skew - 1_500_000)
    feed.trade(100.0, 1.0, "1", {}, clock.now - skew - 1_500_000)
    assert client.events[mark:] == []

    # Caught up past half the bound: the whole top, then connected.
    feed.diff([(97.0, 6.0)], [], clock.now - skew - 900_000)
    snapshot = client.events[mark]
    assert isinstance(snapshot, BookEvent) and snapshot.snapshot
    assert client.up()
    assert client.book.top(5) == feed.book.top(5)
    assert (100.0, 3.0) not in client.book.top(5).bids
    assert lag_outages() == outages + 1
    # And it goes on with diffs.
    feed.trade(100.0, 1.0, "2", {}, clock.now - skew)
    assert isinstance(client.events[-1], TradeEvent)


class TickingClock(Clock):
    """Every reading a microsecond after the last, as a real clock between two reads."""

    def __call__(self) -> int:
        self.now += 1
        return self.now


def test_events_are_never_stamped_before_the_ones_sent_ahead_of_them() -> None:
    # A change is stamped with the lag check's reading of the clock; when that
    # check sends the whole book first, the change must not carry an earlier time.
    clock = TickingClock()
    client = Client()
    feed = SymbolFeed("BINANCE", SYMBOL, client, depth=5, max_lag_s=2.0, clock=clock)
    feed.snapshot(BIDS, ASKS, clock.now)
    feed.diff([(100.0, 2.0)], [], clock.now)
    feed.diff([(99.0, 3.0)], [], clock.now - 2_500_000)
    assert not client.up()
    feed.diff([(98.0, 4.0)], [], clock.now)
    assert client.up()
    stamps = [event.ts for event in client.events]
    assert stamps == sorted(stamps)
    assert isinstance(client.events[-1], BookEvent) and not client.events[-1].snapshot


def test_a_drained_connection_brings_a_lagging_feed_back_whole() -> None:
    feed, client, clock = make(max_lag_s=2.0)
    feed.snapshot(BIDS, ASKS)
    feed.drained()
    assert client.up() and len(client.events) == 4, "drained changes nothing on a current feed"
    feed.diff([(100.0, 2.0)], [], clock.now)
    clock.now += 3_000_000
    feed.diff([(99.0, 5.0)], [], clock.now - 2_500_000)
    assert not client.up()
    mark = len(client.events)
    feed.drained()
    snapshot = client.events[mark]
    assert isinstance(snapshot, BookEvent) and snapshot.snapshot
    assert client.up() and client.book.top(5) == feed.book.top(5)


def test_a_shallower_published_top_sends_its_changes_only() -> None:
    feed, client, _ = make(depth=5)
    feed.publish(2)
    feed.snapshot(BIDS, ASKS)
    first = client.events[0]
    assert isinstance(first, BookEvent) and (first.bids, first.asks) == (BIDS[:2], ASKS[:2])
    mark = len(client.events)
    feed.diff([(97.0, 3.0)], [])
    assert len(client.events) == mark, "a change below the published top is not sent"
    feed.diff([(100.0, 0.0)], [])
    change = client.events[-1]
    assert isinstance(change, BookEvent) and not change.snapshot
    assert change.bids == [(100.0, 0.0), (98.0, 1.0)], "the level entering the top comes too"
    assert client.book.top(5) == feed.book.top(2)


def test_a_deeper_published_top_sends_its_changes_from_the_next_event_on() -> None:
    feed, client, _ = make(depth=5)
    feed.publish(2)
    feed.snapshot(BIDS, ASKS)
    mark = len(client.events)
    feed.publish(4)
    assert len(client.events) == mark, "whoever reads deeper reads the feed's book"
    feed.diff([(97.0, 3.0)], [])
    (change,) = client.events[mark:]
    assert isinstance(change, BookEvent) and change.bids == [(97.0, 3.0)]
    feed.publish(9)
    assert feed.published == 5, "never deeper than the book kept"


def test_a_book_handed_in_is_the_one_kept() -> None:
    book = OrderBook()
    feed = SymbolFeed("BINANCE", SYMBOL, Client(), depth=5, max_lag_s=2.0, book=book)
    feed.snapshot(BIDS, ASKS)
    assert book.top(1) == BookView((BIDS[0],), (ASKS[0],))
    feed.diff([(100.0, 0.0)], [])
    assert book.best_bid() == BIDS[1], "the book holds each change as it goes out"


def test_a_library_kept_top_sends_the_changes_to_the_published_top_only() -> None:
    feed, client, _ = make(depth=3)
    feed.publish(1)
    feed.snapshot(BIDS[:3], ASKS[:3])
    mark = len(client.events)
    feed.view(BookView(((100.0, 1.0), (99.0, 4.0), (97.5, 1.0)), tuple(ASKS[:3])))
    assert client.events[mark:] == [], "nothing changed at the best levels"
    feed.view(BookView(((99.0, 4.0), (97.5, 1.0)), tuple(ASKS[:3])))
    (diff,) = client.events[mark:]
    assert isinstance(diff, BookEvent)
    assert diff.bids == [(100.0, 0.0), (99.0, 4.0)] and diff.asks == []
    assert client.book.top(3) == feed.book.top(1)
