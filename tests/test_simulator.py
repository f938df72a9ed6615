"""The market simulator: a pure per-symbol core and the asyncio driver around it."""

from __future__ import annotations

import asyncio
import gc
import itertools
import random
import time
import weakref
from collections.abc import Callable

import pytest

from caspian.codes import Stream, StreamState
from caspian.events import BookEvent, Event, StatusEvent, TradeEvent
from caspian.sources.simulator import (
    DEPTH_MIN,
    SimProduct,
    Simulator,
    SymbolSimulator,
    option_value,
    start_price,
    usd_value,
)

BTC = SimProduct("FX-BTC/USD=GEMINI", "BTC", "USD", "FX", 0.01, 0.00001)
DOGE_BTC = SimProduct("FX-DOGE/BTC=BINANCE", "DOGE", "BTC", "FX", 1e-8, 1.0)
BTC_KRW = SimProduct("FX-BTC/KRW=BITHUMB", "BTC", "KRW", "FX", 1000.0, 0.0001)
PERP = SimProduct("PERP-BTC/USD=BITMEX", "XBT", "USD", "PERP", 0.5, 1.0)
ITM_CALL = SimProduct(
    "OPT-BTC/USD-2019MAR29-4000-C=DERIBIT", "BTC", "USD", "OPT", 0.0001, 0.1, 4000.0, True
)
OTM_PUT = SimProduct(
    "OPT-BTC/USD-2019MAR29-4000-P=DERIBIT", "BTC", "USD", "OPT", 0.0001, 0.1, 4000.0, False
)
OTM_CALL = SimProduct(
    "OPT-BTC/USD-2019MAR29-90000-C=DERIBIT", "BTC", "USD", "OPT", 0.5, 0.1, 90000.0, True
)
ALL = (BTC, DOGE_BTC, BTC_KRW, PERP, ITM_CALL, OTM_PUT, OTM_CALL)
CATALOG = {product.symbol: product for product in ALL}

T0 = 1_700_000_000_000_000
TICK_US = 50_000


def on_grid(value: float, step: float) -> bool:
    multiple = value / step
    return abs(multiple - round(multiple)) <= 1e-6 + 1e-9 * abs(multiple)


def run(sim: SymbolSimulator, steps: int) -> list[Event]:
    events = sim.start(T0)
    for n in range(1, steps + 1):
        events.extend(sim.step(T0 + n * TICK_US))
    return events


class ReplayBook:
    """What a client holds after applying the events in order."""

    def __init__(self) -> None:
        self.bids: dict[float, float] = {}
        self.asks: dict[float, float] = {}
        self.swept: set[float] = set()  # levels trades emptied since the last diff

    def apply(self, event: BookEvent) -> None:
        if event.snapshot:
            self.bids = dict(event.bids)
            self.asks = dict(event.asks)
        else:
            for side, levels in ((self.bids, event.bids), (self.asks, event.asks)):
                for price, size in levels:
                    if size == 0:
                        assert price in side or price in self.swept, f"{price} was never shown"
                        side.pop(price, None)
                    else:
                        side[price] = size
        self.swept.clear()

    def take(self, trade: TradeEvent) -> None:
        """Check that a trade hits the best level and take its size from it."""
        buy = trade.info["side"] == "BUY"
        side = self.asks if buy else self.bids
        best = min(side) if buy else max(side)
        assert trade.price == best, (trade, best)
        assert trade.size <= side[best] + 1e-9
        left = side[best] - trade.size
        if left <= 1e-9:
            del side[best]
            self.swept.add(best)
        else:
            side[best] = left


def assert_sane(book: ReplayBook) -> None:
    assert book.bids and book.asks
    assert max(book.bids) < min(book.asks)
    assert min(book.bids) > 0


def test_same_seed_same_events_and_different_seed_different_events() -> None:
    first = run(SymbolSimulator(BTC, seed=3), 300)
    again = run(SymbolSimulator(BTC, seed=3), 300)
    other = run(SymbolSimulator(BTC, seed=4), 300)
    assert first == again
    assert first != other


def test_events_of_a_symbol_do_not_depend_on_other_symbols() -> None:
    alone = run(SymbolSimulator(BTC, seed=3), 200)
    sim, neighbour = SymbolSimulator(BTC, seed=3), SymbolSimulator(PERP, seed=3)
    together = sim.start(T0)
    neighbour.start(T0)
    for n in range(1, 201):
        neighbour.step(T0 + n * TICK_US)
        together.extend(sim.step(T0 + n * TICK_US))
    assert together == alone
    assert run(SymbolSimulator(BTC, seed=3), 50) != run(
        SymbolSimulator(SimProduct("FX-BTC/USD=KRAKEN", "BTC", "USD", "FX", 0.01, 0.00001), 3), 50
    )


@pytest.mark.parametrize("product", ALL, ids=lambda p: p.symbol)
def test_start_is_connected_streams_then_a_deep_book_on_the_grid(product: SimProduct) -> None:
    events = SymbolSimulator(product, seed=1).start(T0)
    assert events[:3] == [
        StatusEvent(product.symbol, T0, stream, StreamState.CONNECTED)
        for stream in (Stream.BBO, Stream.TRADE, Stream.DEPTH)
    ]
    snapshot = events[3]
    assert isinstance(snapshot, BookEvent) and snapshot.snapshot and len(events) == 4
    assert len(snapshot.bids) >= 100 and len(snapshot.asks) >= 100
    bid_prices = [price for price, _ in snapshot.bids]
    ask_prices = [price for price, _ in snapshot.asks]
    assert bid_prices == sorted(bid_prices, reverse=True) and len(set(bid_prices)) == len(
        bid_prices
    )
    assert ask_prices == sorted(ask_prices) and len(set(ask_prices)) == len(ask_prices)
    assert 0 < bid_prices[0] < ask_prices[0]
    for price, size in snapshot.bids + snapshot.asks:
        assert price > 0 and on_grid(price, product.tick), price
        assert size >= product.lot and on_grid(size, product.lot), size
    assert snapshot.exchange_ts is not None and T0 - 100_000 < snapshot.exchange_ts < T0


def test_on_grid_rejects_values_off_the_grid() -> None:
    assert on_grid(60056.86, 0.01) and on_grid(1.99e-06, 1e-8) and on_grid(82114000, 1000)
    assert not on_grid(60056.865, 0.01) and not on_grid(82114500, 1000)


def test_starting_prices_follow_usd_values() -> None:
    def mid(product: SimProduct) -> float:
        snapshot = SymbolSimulator(product, seed=1).start(T0)[3]
        assert isinstance(snapshot, BookEvent)
        return (snapshot.bids[0][0] + snapshot.asks[0][0]) / 2

    assert mid(BTC) == pytest.approx(usd_value("BTC"), rel=0.01)
    assert mid(BTC_KRW) == pytest.approx(usd_value("BTC") / usd_value("KRW"), rel=0.01)
    assert mid(DOGE_BTC) == pytest.approx(usd_value("DOGE") / usd_value("BTC"), rel=0.05)
    unknown = SimProduct("FX-ZZZ/USDT=KUCOIN", "ZZZ", "USDT", "FX", 0.0001, 0.01)
    assert mid(unknown) == pytest.approx(1.0, rel=0.01)
    assert usd_value("eth") == usd_value("ETH") != 1.0


@pytest.mark.parametrize("product", [BTC, DOGE_BTC, ITM_CALL], ids=lambda p: p.symbol)
def test_a_long_run_replays_into_a_sane_book(product: SimProduct) -> None:
    events = run(SymbolSimulator(product, seed=11), 2_000)
    book = ReplayBook()
    mids: list[float] = []
    trade_ids: list[int] = []
    books = 0
    for event in events:
        if isinstance(event, BookEvent):
            books += 1
            assert books == 1 or not event.snapshot
            book.apply(event)
            assert_sane(book)
            assert len(book.bids) >= DEPTH_MIN - 10 and len(book.asks) >= DEPTH_MIN - 10
            for price, size in event.bids + event.asks:
                assert on_grid(price, product.tick) and on_grid(size, product.lot)
            mids.append((max(book.bids) + min(book.asks)) / 2)
        elif isinstance(event, TradeEvent):
            book.take(event)
            assert event.trade_id is not None
            trade_ids.append(int(event.trade_id))
            assert on_grid(event.size, product.lot) and event.size >= product.lot
        else:
            assert isinstance(event, StatusEvent) and event.state is StreamState.CONNECTED
            continue
        assert event.exchange_ts is not None
        assert event.ts - 100_000 < event.exchange_ts < event.ts
    assert books == 2_001
    assert trade_ids == list(range(1, len(trade_ids) + 1)) and len(trade_ids) > 200
    assert max(mids) - min(mids) >= 2 * product.tick
    assert max(mids) / min(mids) < 1.2


def test_the_mid_walks() -> None:
    sim = SymbolSimulator(BTC, seed=11)
    mids = []
    for n in range(1, 2_001):
        sim.step(T0 + n * TICK_US)
        mids.append(sim.mid)
    assert max(mids) / min(mids) > 1.0005
    assert min(mids) > 0
    moves = [abs(b / a - 1) for a, b in itertools.pairwise(mids)]
    # Volatility comes in bursts: some stretches move far more than the typical one.
    windows = sorted(sum(moves[i : i + 100]) for i in range(0, len(moves), 100))
    assert windows[-1] > 2 * windows[len(windows) // 2]


def test_trades_are_on_both_sides_and_some_sweep_a_whole_level() -> None:
    events = run(SymbolSimulator(BTC, seed=5), 2_000)
    sides = {event.info["side"] for event in events if isinstance(event, TradeEvent)}
    assert sides == {"BUY", "SELL"}
    book = ReplayBook()
    swept = 0
    for event in events:
        if isinstance(event, BookEvent):
            book.apply(event)
        elif isinstance(event, TradeEvent):
            before = len(book.asks) + len(book.bids)
            book.take(event)
            swept += len(book.asks) + len(book.bids) < before
    assert swept > 10


def test_option_values() -> None:
    spot, strike, years, vol = 60_000.0, 55_000.0, 0.1, 0.7
    call = option_value(spot, strike, True, years, vol)
    put = option_value(spot, strike, False, years, vol)
    assert call - put == pytest.approx(spot - strike)
    assert call > spot - strike and put > 0


def test_option_start_prices_are_intrinsic_plus_time_value() -> None:
    spot = usd_value("BTC")
    for seed in range(50):
        # The venue offset moves the spot by up to 0.1%.
        assert start_price(ITM_CALL, random.Random(seed)) > 0.999 * spot - 4000.0
        far_put = start_price(OTM_PUT, random.Random(seed))
        assert 0 < far_put < 0.01 * spot


@pytest.mark.parametrize("product", [ITM_CALL, OTM_PUT, OTM_CALL], ids=lambda p: p.symbol)
def test_option_books_stay_positive_and_plausible(product: SimProduct) -> None:
    assert product.strike is not None
    spot = usd_value(product.ccy_from)
    intrinsic = max(0.0, spot - product.strike if product.call else product.strike - spot)
    snapshot = SymbolSimulator(product, seed=2).start(T0)[3]
    assert isinstance(snapshot, BookEvent)
    mid = (snapshot.bids[0][0] + snapshot.asks[0][0]) / 2
    assert intrinsic * 0.98 < mid < intrinsic + 0.1 * spot
    for event in run(SymbolSimulator(product, seed=2), 500):
        if isinstance(event, BookEvent):
            assert all(price > 0 for price, _ in event.bids + event.asks)
        elif isinstance(event, TradeEvent):
            assert event.price > 0


def test_forced_outages_disconnect_reconnect_and_resend_the_book() -> None:
    sim = SymbolSimulator(BTC, seed=9, outage_probability=1.0)
    events = run(sim, 300)
    down: set[Stream] = set()
    transitions: dict[Stream, list[StreamState]] = {stream: [] for stream in Stream}
    awaiting_snapshot = False
    snapshots_after_reconnect = 0
    book = ReplayBook()
    for event in events[4:]:
        if isinstance(event, StatusEvent):
            transitions[event.stream].append(event.state)
            if event.state is StreamState.DISCONNECTED:
                assert event.stream not in down
                down.add(event.stream)
            else:
                down.remove(event.stream)
                awaiting_snapshot = awaiting_snapshot or event.stream is Stream.DEPTH
        elif isinstance(event, BookEvent):
            assert Stream.DEPTH not in down
            assert event.snapshot == awaiting_snapshot
            if event.snapshot:
                snapshots_after_reconnect += 1
                awaiting_snapshot = False
                assert len(event.bids) >= 100 and len(event.asks) >= 100
            book.apply(event)
            assert_sane(book)
        else:
            assert Stream.TRADE not in down
    for states in transitions.values():
        assert len(states) >= 4
        assert states[::2] == [StreamState.DISCONNECTED] * len(states[::2])
        assert states[1::2] == [StreamState.CONNECTED] * len(states[1::2])
    assert snapshots_after_reconnect >= 2


def test_without_outage_probability_streams_never_drop() -> None:
    events = run(SymbolSimulator(BTC, seed=9), 1_000)
    assert not [
        e for e in events if isinstance(e, StatusEvent) and e.state is StreamState.DISCONNECTED
    ]


def test_unusable_products_are_refused() -> None:
    with pytest.raises(ValueError):
        SymbolSimulator(SimProduct("FX-A/B=X", "A", "B", "FX", 0.0, 1.0), seed=1)
    with pytest.raises(ValueError):
        SymbolSimulator(SimProduct("FX-A/B=X", "A", "B", "FX", 0.01, float("nan")), seed=1)


# The asyncio driver.


def of(events: list[Event], symbol: str) -> list[Event]:
    return [event for event in events if event.symbol == symbol]


class Driver:
    """A running :class:`Simulator` and everything it delivered to its sink."""

    def __init__(
        self,
        sim: Simulator,
        fail_at: int | None = None,
        also: Callable[[Event], None] | None = None,
    ) -> None:
        self.sim = sim
        self.events: list[Event] = []
        self._fail_at = fail_at
        self._also = also
        self._arrived = asyncio.Event()
        self.task = asyncio.create_task(sim.run(self._sink))

    def _sink(self, event: Event) -> None:
        self.events.append(event)
        self._arrived.set()
        if self._also is not None:
            self._also(event)
        if len(self.events) == self._fail_at:
            raise RuntimeError("a consumer bug")

    async def until(self, condition: Callable[[list[Event]], bool]) -> None:
        async with asyncio.timeout(2.0):
            while not condition(self.events):
                self._arrived.clear()
                await self._arrived.wait()

    async def stop(self) -> None:
        self.task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await self.task


async def test_watch_streams_start_events_promptly_then_ticks() -> None:
    driver = Driver(Simulator(CATALOG.get, seed=1, rate=50.0))
    try:
        await asyncio.sleep(0.05)
        loop = asyncio.get_running_loop()
        started = loop.time()
        driver.sim.watch(BTC.symbol)
        await driver.until(lambda events: len(events) >= 4)
        assert loop.time() - started < 0.015
        assert [type(e) for e in driver.events[:4]] == [StatusEvent] * 3 + [BookEvent]
        await asyncio.sleep(0.4)
        diffs = [e for e in driver.events if isinstance(e, BookEvent) and not e.snapshot]
        # 50 ticks a second: about 20 in 0.4 s, never a burst of catch-up ticks.
        assert 5 <= len(diffs) <= 25
        assert all(e.symbol == BTC.symbol for e in driver.events)
    finally:
        await driver.stop()


async def test_unwatch_stops_a_symbol_and_drops_its_state() -> None:
    driver = Driver(Simulator(CATALOG.get, rate=100.0))
    sim = driver.sim
    try:
        sim.watch(BTC.symbol)
        sim.watch(PERP.symbol)
        await driver.until(lambda events: len(of(events, PERP.symbol)) > 10)
        state = weakref.ref(sim._symbols[PERP.symbol])
        sim.unwatch(PERP.symbol)
        assert sim.watched == {BTC.symbol}
        gc.collect()
        assert state() is None
        seen = len(of(driver.events, PERP.symbol))
        btc_seen = len(of(driver.events, BTC.symbol))
        await asyncio.sleep(0.15)
        assert len(of(driver.events, PERP.symbol)) == seen
        assert len(of(driver.events, BTC.symbol)) > btc_seen
        sim.watch(PERP.symbol)
        await driver.until(lambda events: len(of(events, PERP.symbol)) >= seen + 4)
        restart = of(driver.events, PERP.symbol)[seen : seen + 4]
        assert [type(e) for e in restart] == [StatusEvent] * 3 + [BookEvent]
    finally:
        await driver.stop()


async def test_a_symbol_unwatched_by_the_sink_gets_no_more_events() -> None:
    everything = [product.symbol for product in ALL]
    after: list[Event] = []

    def unwatch_all(event: Event) -> None:
        if after or (isinstance(event, BookEvent) and not event.snapshot):
            after.append(event)
            for symbol in everything:
                driver.sim.unwatch(symbol)

    # Seven symbols over the driver's four phases: some share one, so the
    # sink unwatches symbols of the very phase being ticked.
    driver = Driver(Simulator(CATALOG.get, rate=100.0), also=unwatch_all)
    try:
        for symbol in everything:
            driver.sim.watch(symbol)
        await driver.until(lambda events: bool(after))
        await asyncio.sleep(0.1)
        assert len(after) == 1
    finally:
        await driver.stop()


async def test_an_overloaded_loop_skips_ticks_instead_of_catching_up() -> None:
    arrivals: list[float] = []

    def slow_once(event: Event) -> None:
        if isinstance(event, BookEvent) and not event.snapshot:
            if not arrivals:
                time.sleep(0.2)
            arrivals.append(time.monotonic())

    driver = Driver(Simulator(CATALOG.get, rate=100.0), also=slow_once)
    try:
        driver.sim.watch(BTC.symbol)
        await driver.until(lambda events: len(arrivals) > 1)
        await asyncio.sleep(0.1)
        # 100 ticks a second: about 10 in 0.1 s, not the 20 missed while blocked on top.
        soon_after = [t for t in arrivals[1:] if t < arrivals[1] + 0.1]
        assert len(soon_after) <= 13
    finally:
        await driver.stop()


async def test_unknown_symbols_are_ignored() -> None:
    driver = Driver(Simulator(CATALOG.get, rate=100.0))
    try:
        driver.sim.watch("FX-NOPE/USD=NOWHERE")
        driver.sim.unwatch("FX-NOPE/USD=NOWHERE")
        driver.sim.watch("FX-NOPE/USD=NOWHERE")
        await asyncio.sleep(0.1)
        assert driver.sim.watched == frozenset()
        assert driver.events == []
    finally:
        await driver.stop()


async def test_a_failing_sink_does_not_stop_the_market() -> None:
    driver = Driver(Simulator(CATALOG.get, rate=100.0), fail_at=2)
    try:
        driver.sim.watch(BTC.symbol)
        await driver.until(lambda events: len(events) > 10)
        assert not driver.task.done()
    finally:
        await driver.stop()


async def test_driver_outages_reach_the_sink() -> None:
    driver = Driver(Simulator(CATALOG.get, rate=100.0, outages=True, outage_probability=1.0))
    expected = [StreamState.CONNECTED, StreamState.DISCONNECTED, StreamState.CONNECTED]
    try:
        driver.sim.watch(BTC.symbol)
        await driver.until(
            lambda events: (
                [
                    e.state
                    for e in events
                    if isinstance(e, StatusEvent) and e.stream is Stream.DEPTH
                ][:3]
                == expected
            )
        )
    finally:
        await driver.stop()


def test_driver_arguments_are_checked() -> None:
    with pytest.raises(ValueError):
        Simulator(CATALOG.get, rate=0.0)
    with pytest.raises(ValueError):
        Simulator(CATALOG.get, outages=True, outage_probability=1.5)


async def test_a_long_phase_lets_the_loop_run_between_its_symbols() -> None:
    """A tick's phase is stepped in turns of the loop of bounded length, so the
    clients of the symbols stepped first are served before the rest are: a
    key subscribing to many symbols makes phases long, not others' updates late."""
    turns = 0

    async def count_turns() -> None:
        nonlocal turns
        while True:
            turns += 1
            await asyncio.sleep(0)

    seen_in_turn: dict[int, set[str]] = {}

    def slow_consumer(event: Event) -> None:
        # Longer per event than a turn may take, so every symbol ends a turn.
        time.sleep(0.0005)
        if isinstance(event, BookEvent) and not event.snapshot:
            seen_in_turn.setdefault(turns, set()).add(event.symbol)

    counter = asyncio.create_task(count_turns())
    # Seven symbols over four phases: some share one.
    driver = Driver(Simulator(CATALOG.get, rate=100.0), also=slow_consumer)
    try:
        for product in ALL:
            driver.sim.watch(product.symbol)
        await driver.until(lambda events: sum(len(s) for s in seen_in_turn.values()) >= 60)
        assert all(len(symbols) == 1 for symbols in seen_in_turn.values()), seen_in_turn
    finally:
        await driver.stop()
        counter.cancel()
