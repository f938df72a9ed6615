"""The gateway hub: groups, the Level2 invariant, Level1 state, conflation, status."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from caspian.book import OrderBook
from caspian.codes import Stream, StreamState, SubscriptionType
from caspian.events import BookEvent, QuoteEvent, StatusEvent, TradeEvent
from caspian.gateway.hub import Hub
from caspian.gateway.session import Subscription
from caspian.sources.live.feed import SymbolFeed
from tests.test_session import GEMINI

SYMBOL = GEMINI.caspian_code


class Recorder:
    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []

    def deliver(self, prefix: bytes, tail: bytes) -> None:
        self.messages.append(orjson.loads(prefix + tail))


def level2(levels: int, conflation: str = "None", request_id: str = "r") -> Subscription:
    return Subscription(request_id, GEMINI, SubscriptionType.LEVEL2, levels, conflation)


def level1(conflation: str = "None", request_id: str = "q") -> Subscription:
    return Subscription(request_id, GEMINI, SubscriptionType.LEVEL1, 20, conflation)


def make_hub() -> tuple[Hub, list[str], list[str]]:
    watched: list[str] = []
    released: list[str] = []
    return Hub(watched.append, released.append, unwatch_grace_s=0), watched, released


def client_book(messages: list[dict[str, Any]]) -> dict[tuple[str, float], float]:
    book: dict[tuple[str, float], float] = {}
    for message in messages:
        if message["type"] != "Level2":
            continue
        for level in message["payload"]:
            key = (level["side"], level["price"])
            if level["size"] == 0:
                book.pop(key, None)
            else:
                book[key] = level["size"]
    return book


def expected(book: OrderBook, levels: int) -> dict[tuple[str, float], float]:
    view = book.top(levels)
    return {("bid", p): s for p, s in view.bids} | {("ask", p): s for p, s in view.asks}


prices = st.integers(min_value=1, max_value=60).map(float)
sizes = st.sampled_from([0.0, 0.0, 1.0, 2.0, 3.5])
side_levels = st.lists(st.tuples(prices, sizes), max_size=8)
events = st.lists(
    st.one_of(
        st.tuples(st.just("diff"), side_levels, side_levels),
        st.tuples(st.just("snapshot"), side_levels, side_levels),
        st.tuples(st.just("down"), st.just([]), st.just([])),
        st.tuples(st.just("up"), st.just([]), st.just([])),
        st.tuples(st.just("join"), st.just([]), st.just([])),
        st.tuples(st.just("leave"), st.just([]), st.just([])),
        st.tuples(st.just("tick"), st.just([]), st.just([])),
    ),
    max_size=40,
)


def tick_all(hub: Hub) -> None:
    """What the conflation timers would do next, without waiting for them."""
    for interval in list(hub._dirty):
        hub._tick(interval)


group_levels = st.lists(
    st.tuples(st.integers(1, 12), st.sampled_from(["None", "None", "1s"])),
    min_size=1,
    max_size=4,
)


class Clients:
    """Level2 subscribers of one symbol's groups, joining and leaving as events say."""

    def __init__(self, hub: Hub, levels: list[tuple[int, str]]) -> None:
        self.hub = hub
        self.levels = levels
        self.members: list[tuple[Recorder, int, Subscription]] = []
        for index, (n, conflation) in enumerate(levels):
            self._join(n, conflation, f"r{index}")

    def _join(self, n: int, conflation: str, request_id: str) -> None:
        recorder = Recorder()
        subscription = level2(n, conflation, request_id=request_id)
        self.hub.add(subscription, recorder)
        self.members.append((recorder, n, subscription))

    def act(self, kind: str, ts: int) -> None:
        """A ``join``, ``leave`` or ``tick`` event; any other kind is not theirs."""
        if kind == "join":
            n, conflation = self.levels[ts % len(self.levels)]
            self._join(n, conflation, f"late{ts}")
        elif kind == "leave" and len(self.members) > 1:
            self.hub.remove(self.members.pop(ts % len(self.members))[2])
        elif kind == "tick":
            tick_all(self.hub)

    def hold(self, book: OrderBook, conflated_too: bool) -> None:
        """Each client's book is its top N of ``book`` while depth is up.

        Unconflated clients hold it after every event; conflated ones after
        their next update. While depth is down there is no book to hold: a
        newcomer gets none, there being none to trust.
        """
        ready = self.hub.symbols[SYMBOL].book_ready
        for recorder, n, subscription in self.members:
            if ready and (conflated_too or subscription.interval is None):
                assert client_book(recorder.messages) == expected(book, n)
            for message in recorder.messages:
                assert sum(1 for lv in message["payload"] if lv["side"] == "bid") <= 2 * n


def uncrossed(
    bids: list[tuple[float, float]], asks: list[tuple[float, float]]
) -> tuple[list[tuple[float, float]], list[tuple[float, float]]]:
    """Bids below 30, asks above it, as a sane source keeps them."""
    return [(p, s) for p, s in bids if p < 30], [(p + 30, s) for p, s in asks]


@settings(max_examples=300, deadline=None)
@given(events=events, levels=group_levels)
def test_level2_invariant_holds_for_every_client(
    events: list[tuple[str, list[tuple[float, float]], list[tuple[float, float]]]],
    levels: list[tuple[int, str]],
) -> None:
    """Whatever happens upstream, each client's book is its group's top N of the hub's book.

    Clients joining and leaving change the deepest top the hub follows
    level by level.
    """

    async def run() -> None:
        hub, _, _ = make_hub()
        clients = Clients(hub, levels)
        for ts, (kind, bids, asks) in enumerate(events, start=2):
            if kind in ("diff", "snapshot"):
                hub.on_event(BookEvent(SYMBOL, ts, kind == "snapshot", *uncrossed(bids, asks)))
            elif kind in ("down", "up"):
                state = StreamState.DISCONNECTED if kind == "down" else StreamState.CONNECTED
                hub.on_event(StatusEvent(SYMBOL, ts, Stream.DEPTH, state))
            clients.act(kind, ts)
            clients.hold(hub.symbols[SYMBOL].book, conflated_too=False)
        tick_all(hub)
        clients.hold(hub.symbols[SYMBOL].book, conflated_too=True)

    asyncio.run(run())


class PublishingSource:
    """One symbol's live feed in the hub's process, publishing the top the hub asks for."""

    def __init__(self, depth: int) -> None:
        self.hub = Hub(lambda _: None, lambda _: None, 0, self.publish_depth)
        self.feed = SymbolFeed(
            "GEMINI", SYMBOL, self.hub.on_event, depth=depth, max_lag_s=60.0, clock=self.clock
        )
        self.asked: list[int] = []
        self.now = 0

    def clock(self) -> int:
        self.now += 1
        return self.now

    def publish_depth(self, symbol: str, depth: int) -> OrderBook:
        assert symbol == SYMBOL
        self.asked.append(depth)
        self.feed.publish(depth)
        return self.feed.book


@settings(max_examples=300, deadline=None)
@given(events=events, levels=group_levels)
def test_a_source_publishing_the_hubs_top_gives_every_client_the_exchanges_top(
    events: list[tuple[str, list[tuple[float, float]], list[tuple[float, float]]]],
    levels: list[tuple[int, str]],
) -> None:
    """With the source ranking the top the hub serves, and no ranking in the hub, each
    client holds its top N of the source's whole book, whoever joins or leaves."""

    async def run() -> None:
        source = PublishingSource(depth=12)
        hub, feed = source.hub, source.feed
        clients = Clients(hub, levels)
        state = hub.symbols[SYMBOL]
        assert state.shared and state.book is feed.book
        for ts, (kind, bids, asks) in enumerate(events):
            if kind == "diff":
                feed.diff(*uncrossed(bids, asks))
            elif kind == "snapshot":
                feed.snapshot(*uncrossed(bids, asks))
            elif kind == "down":
                feed.down("test", "gone")
            clients.act(kind, ts)
            assert source.asked[-1] == state.depth == max(n for _, n, _ in clients.members)
            clients.hold(feed.book, conflated_too=False)
        tick_all(hub)
        clients.hold(feed.book, conflated_too=True)
        feed.stop()

    asyncio.run(run())


async def test_a_hub_sharing_the_sources_book_reads_any_top_of_it_at_once() -> None:
    source = PublishingSource(depth=10)
    first = Recorder()
    source.hub.add(level2(2), first)
    assert source.asked == [1, 2]
    assert source.feed.published == 2
    bids = [(float(100 - i), 1.0) for i in range(8)]
    source.feed.snapshot(bids, [(101.0, 1.0)])
    sent = len(first.messages)
    source.feed.diff([(96.0, 5.0)], [])
    assert len(first.messages) == sent, "a change below every client's top is not sent"
    late = Recorder()
    deeper = level2(5, request_id="late")
    source.hub.add(deeper, late)
    assert source.asked[-1] == 5 and source.feed.published == 5
    assert len(first.messages) == sent, "a deeper top disturbs no one"
    assert client_book(late.messages) == expected(source.feed.book, 5)
    source.feed.diff([(100.0, 0.0)], [])
    for recorder, n in ((first, 2), (late, 5)):
        assert client_book(recorder.messages) == expected(source.feed.book, n)
    source.hub.remove(deeper)
    assert source.asked[-1] == 2 and source.feed.published == 2
    source.feed.diff([(95.0, 0.0), (99.0, 0.0), (98.0, 0.0)], [])
    newcomer = Recorder()
    source.hub.add(level2(2, "1s", request_id="new"), newcomer)
    assert client_book(newcomer.messages) == expected(source.feed.book, 2)
    assert client_book(first.messages) == expected(source.feed.book, 2)
    # A source gone down empties its book: a conflated group waiting to read
    # it holds what it sent until the next whole book, rather than emptying.
    shallow = Recorder()
    source.hub.add(level2(1, "1s", request_id="shallow"), shallow)
    source.feed.diff([(97.0, 0.0)], [])
    kept = client_book(shallow.messages)
    source.feed.down("test", "gone")
    tick_all(source.hub)
    assert client_book(shallow.messages) == kept
    source.feed.snapshot(bids, [(101.0, 1.0)])
    tick_all(source.hub)
    assert client_book(shallow.messages) == expected(source.feed.book, 1)
    source.hub.close()
    source.feed.stop()


async def test_first_level2_message_is_whole_top_n_and_newcomers_get_it() -> None:
    hub, watched, _ = make_hub()
    first = Recorder()
    hub.add(level2(2), first)
    assert watched == [SYMBOL]
    assert first.messages[0]["payload"] == []
    assert first.messages[0]["depthStream"] == "disconnected"
    hub.on_event(
        BookEvent(SYMBOL, 10, True, [(9.0, 1.0), (8.0, 2.0), (7.0, 1.0)], [(11.0, 1.0)], 5)
    )
    snapshot = next(m for m in first.messages if m["payload"])
    assert snapshot["depthStream"] == "connected"
    assert {(lv["side"], lv["price"]) for lv in snapshot["payload"]} == {
        ("bid", 9.0),
        ("bid", 8.0),
        ("ask", 11.0),
    }
    assert snapshot["exchangeTimestamp"] == "1970-01-01T00:00:00.000005"
    assert snapshot["caspianTimestamp"] == "1970-01-01T00:00:00.000010"
    late = Recorder()
    hub.add(level2(2, request_id="late"), late)
    assert late.messages[0]["requestId"] == "late"
    assert len(late.messages[0]["payload"]) == 3
    # A level pushed out of the top 2 is sent with size 0; the one entering, with its size.
    hub.on_event(BookEvent(SYMBOL, 11, False, [(9.5, 4.0)], []))
    change = first.messages[-1]["payload"]
    assert {"price": 9.5, "size": 4.0, "side": "bid"} in change
    assert {"price": 8.0, "size": 0.0, "side": "bid"} in change


async def test_diff_before_any_snapshot_is_ignored() -> None:
    hub, _, _ = make_hub()
    recorder = Recorder()
    hub.add(level2(5), recorder)
    hub.on_event(BookEvent(SYMBOL, 1, False, [(1.0, 1.0)], []))
    assert len(recorder.messages) == 1
    assert not hub.symbols[SYMBOL].book.best_bid()


async def test_reconnect_sends_whole_top_n_again() -> None:
    hub, _, _ = make_hub()
    recorder = Recorder()
    hub.add(level2(3), recorder)
    hub.on_event(BookEvent(SYMBOL, 1, True, [(9.0, 1.0), (8.0, 1.0)], [(11.0, 1.0)]))
    hub.on_event(StatusEvent(SYMBOL, 2, Stream.DEPTH, StreamState.DISCONNECTED))
    assert recorder.messages[-1]["depthStream"] == "disconnected"
    assert recorder.messages[-1]["payload"] == []
    # Diffs while disconnected are not applied to a book with no known base.
    hub.on_event(BookEvent(SYMBOL, 3, False, [(9.0, 5.0)], []))
    assert recorder.messages[-1]["depthStream"] == "disconnected"
    hub.on_event(StatusEvent(SYMBOL, 4, Stream.DEPTH, StreamState.CONNECTED))
    hub.on_event(BookEvent(SYMBOL, 5, True, [(9.0, 1.0), (7.0, 2.0)], [(11.0, 1.0)]))
    last = recorder.messages[-1]
    assert last["depthStream"] == "connected"
    # Unchanged levels are sent too: the whole top-N, and size 0 for what left it.
    assert {(lv["side"], lv["price"], lv["size"]) for lv in last["payload"]} == {
        ("bid", 9.0, 1.0),
        ("bid", 7.0, 2.0),
        ("ask", 11.0, 1.0),
        ("bid", 8.0, 0.0),
    }


async def test_level1_from_book_and_trades_and_quotes() -> None:
    hub, _, _ = make_hub()
    recorder = Recorder()
    hub.add(level1(), recorder)
    initial = recorder.messages[0]
    assert initial == {
        "requestId": "q",
        "type": "Level1",
        "bboStream": "disconnected",
        "tradeStream": "disconnected",
        "payload": {},
    }
    hub.on_event(BookEvent(SYMBOL, 1_000_000, True, [(9.0, 1.0)], [(11.0, 2.0)], 999_000))
    bbo = recorder.messages[-1]
    assert bbo["bboStream"] == "connected"
    assert bbo["payload"] == {
        "ask": 11.0,
        "askSize": 2.0,
        "bid": 9.0,
        "bidSize": 1.0,
        "bboExchangeTimestamp": "1970-01-01T00:00:00.999000",
        "bboCaspianTimestamp": "1970-01-01T00:00:01.000000",
    }
    count = len(recorder.messages)
    # A change deeper in the book does not change Level1.
    hub.on_event(BookEvent(SYMBOL, 2_000_000, False, [(8.0, 1.0)], []))
    assert len(recorder.messages) == count
    hub.on_event(TradeEvent(SYMBOL, 3_000_000, 10.5, 0.25, "t1", {"side": "BUY"}))
    trade = recorder.messages[-1]
    assert trade["tradeStream"] == "connected"
    assert trade["payload"]["tradePrice"] == 10.5
    assert trade["payload"]["tradeId"] == "t1"
    assert trade["payload"]["exchangeSpecificInfo"] == {"side": "BUY"}
    assert "tradeExchangeTimestamp" not in trade["payload"]
    assert trade["payload"]["bid"] == 9.0
    # Once quotes arrive they, not the book, give the BBO.
    hub.on_event(QuoteEvent(SYMBOL, 4_000_000, 9.5, 3.0, 10.0, 4.0))
    assert recorder.messages[-1]["payload"]["bid"] == 9.5
    hub.on_event(BookEvent(SYMBOL, 5_000_000, False, [(9.9, 1.0)], []))
    assert recorder.messages[-1]["payload"]["bid"] == 9.5


async def test_conflation_sends_net_change_once_per_interval() -> None:
    hub, _, _ = make_hub()
    recorder = Recorder()
    hub.add(level2(5, "250ms"), recorder)
    l1 = Recorder()
    hub.add(level1("250ms"), l1)
    hub.on_event(BookEvent(SYMBOL, 1, True, [(9.0, 1.0)], [(11.0, 1.0)]))
    # The status change (disconnected -> connected) goes at once, with the whole
    # book it came back with, whatever the conflation.
    first = recorder.messages[-1]
    assert first["depthStream"] == "connected"
    assert sorted(first["payload"], key=lambda lv: lv["price"]) == [
        {"price": 9.0, "size": 1.0, "side": "bid"},
        {"price": 11.0, "size": 1.0, "side": "ask"},
    ]
    for size in (2.0, 3.0, 4.0):
        hub.on_event(BookEvent(SYMBOL, 2, False, [(9.0, size)], []))
    hub.on_event(BookEvent(SYMBOL, 3, False, [(8.0, 1.0)], []))
    hub.on_event(BookEvent(SYMBOL, 4, False, [(8.0, 0.0)], []))
    before = len(recorder.messages)
    await asyncio.sleep(0.35)
    conflated = recorder.messages[before:]
    assert len(conflated) == 1
    assert conflated[0]["payload"] == [{"price": 9.0, "size": 4.0, "side": "bid"}]
    # Nothing changed: nothing is sent.
    await asyncio.sleep(0.35)
    assert len(recorder.messages) == before + 1
    assert l1.messages[-1]["payload"]["bidSize"] == 4.0
    hub.close()


async def test_release_after_last_subscriber() -> None:
    hub, _, released = make_hub()
    first, second = level2(5, request_id="a"), level1(request_id="b")
    hub.add(first, Recorder())
    hub.add(second, Recorder())
    hub.remove(first)
    assert released == []
    hub.remove(second)
    assert released == [SYMBOL]
    assert SYMBOL not in hub.symbols
    hub.on_event(BookEvent(SYMBOL, 1, True, [(1.0, 1.0)], []))
    assert SYMBOL not in hub.symbols


async def test_grace_period_keeps_symbol_watched() -> None:
    watched: list[str] = []
    released: list[str] = []
    hub = Hub(watched.append, released.append, unwatch_grace_s=0.1)
    subscription = level1()
    hub.add(subscription, Recorder())
    hub.remove(subscription)
    hub.add(level1(request_id="again"), Recorder())
    await asyncio.sleep(0.2)
    assert released == [] and watched == [SYMBOL]
    hub.remove(next(iter(hub.symbols[SYMBOL].level1["None"].members)))
    await asyncio.sleep(0.2)
    assert released == [SYMBOL]


async def test_declared_bbo_outage_is_not_undone_by_depth() -> None:
    hub, _, _ = make_hub()
    recorder = Recorder()
    hub.add(level1(), recorder)
    hub.on_event(StatusEvent(SYMBOL, 1, Stream.BBO, StreamState.CONNECTED))
    hub.on_event(BookEvent(SYMBOL, 2, True, [(9.0, 1.0)], [(11.0, 1.0)]))
    hub.on_event(StatusEvent(SYMBOL, 3, Stream.BBO, StreamState.DISCONNECTED))
    assert recorder.messages[-1]["bboStream"] == "disconnected"
    # Depth goes on; the best bid moves, but the BBO feed is still declared down.
    hub.on_event(BookEvent(SYMBOL, 4, False, [(9.5, 1.0)], []))
    assert recorder.messages[-1]["payload"]["bid"] == 9.5
    assert recorder.messages[-1]["bboStream"] == "disconnected"
    hub.on_event(StatusEvent(SYMBOL, 5, Stream.BBO, StreamState.CONNECTED))
    assert recorder.messages[-1]["bboStream"] == "connected"


async def test_undeclared_bbo_is_connected_by_data() -> None:
    hub, _, _ = make_hub()
    recorder = Recorder()
    hub.add(level1(), recorder)
    hub.on_event(BookEvent(SYMBOL, 1, True, [(9.0, 1.0)], [(11.0, 1.0)]))
    assert recorder.messages[-1]["bboStream"] == "connected"
