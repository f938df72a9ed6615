"""Benchmark of the order-book engine against a book built on ``sortedcontainers``.

Run as ``python bench/bench_book.py``. Both books get the same 2,000-level
snapshot per side and the same seeded stream of diffs; every figure is the best
of several repeats because shared machines are noisy, and each comes with the
ratio ours/baseline so runs on different machines stay comparable.
"""

from __future__ import annotations

import gc
import os
import platform
import random
import time
import timeit
from collections.abc import Callable, Iterable
from datetime import date
from typing import Protocol

from sortedcontainers import SortedDict, SortedList

from caspian.book import BookView, OrderBook, diff_views
from caspian.events import Level

DEPTH = 2_000
#: Prices are whole ticks of 0.01 divided by 100, the same floats JSON parsing gives.
TICKS_PER_UNIT = 100
MID_TICK = 3_000_000
DIFFS = 200_000
VIEW_DEPTH = 20
REPEATS = 5
SEED = 20240601

Diff = tuple[list[Level], list[Level]]


class Book(Protocol):
    def apply_snapshot(self, bids: Iterable[Level], asks: Iterable[Level]) -> None: ...
    def apply_diff(self, bids: Iterable[Level], asks: Iterable[Level]) -> None: ...
    def top(self, n: int) -> BookView: ...


class SortedDictBook:
    """The baseline: one ``SortedDict`` per side, both ascending by price."""

    def __init__(self) -> None:
        self._bids = SortedDict()
        self._asks = SortedDict()

    def apply_snapshot(self, bids: Iterable[Level], asks: Iterable[Level]) -> None:
        self._bids = SortedDict((price, size) for price, size in bids if size > 0)
        self._asks = SortedDict((price, size) for price, size in asks if size > 0)

    def apply_diff(self, bids: Iterable[Level], asks: Iterable[Level]) -> None:
        for side, levels in ((self._bids, bids), (self._asks, asks)):
            for price, size in levels:
                if size > 0:
                    side[price] = size
                else:
                    side.pop(price, None)

    def top(self, n: int) -> BookView:
        # Slicing the keys view was the fastest of the ways sortedcontainers
        # offers (item islice, reversed irange) when this benchmark was written.
        bid_prices = self._bids.keys()[-n:]
        bid_prices.reverse()
        ask_prices = self._asks.keys()[:n]
        return BookView(
            tuple(zip(bid_prices, map(self._bids.__getitem__, bid_prices), strict=True)),
            tuple(zip(ask_prices, map(self._asks.__getitem__, ask_prices), strict=True)),
        )


def _price(tick: int) -> float:
    return tick / TICKS_PER_UNIT


def _size(rng: random.Random) -> float:
    return round(rng.uniform(0.001, 5.0), 3)


def make_market(rng: random.Random) -> tuple[Diff, list[Diff]]:
    """A snapshot of ``DEPTH`` levels per side and ``DIFFS`` diffs that keep depth steady.

    Each diff has 1 to 3 changes: 70% resize an existing level, 15% add one and
    15% remove one, all near the top of the book where exchanges' activity
    concentrates (rank or distance drawn from an exponential of mean 10).
    """
    # Gaps in the tick grid leave room for new levels inside the book.
    bid_ticks = SortedList(rng.sample(range(MID_TICK - 2_400, MID_TICK - 2), DEPTH))
    ask_ticks = SortedList(rng.sample(range(MID_TICK + 2, MID_TICK + 2_400), DEPTH))
    snapshot: Diff = (
        [(_price(tick), _size(rng)) for tick in reversed(bid_ticks)],
        [(_price(tick), _size(rng)) for tick in ask_ticks],
    )

    def near_top() -> int:
        return min(int(rng.expovariate(0.1)), DEPTH // 2)

    diffs: list[Diff] = []
    for _ in range(DIFFS):
        diff: Diff = ([], [])
        touched: set[tuple[bool, int]] = set()
        for _ in range(rng.randint(1, 3)):
            is_bid = rng.random() < 0.5
            ticks = bid_ticks if is_bid else ask_ticks
            # Adding and removing in turn keeps the depth steady.
            kind = "resize" if rng.random() < 0.70 else "add" if len(ticks) <= DEPTH else "remove"
            if kind == "add":
                away = near_top()
                # A new best may improve the side up to one tick short of the other side.
                if is_bid:
                    tick = min(bid_ticks[-1] - away + 1, ask_ticks[0] - 1)
                    while tick in ticks:
                        tick -= 1
                else:
                    tick = max(ask_ticks[0] + away - 1, bid_ticks[-1] + 1)
                    while tick in ticks:
                        tick += 1
            else:
                rank = near_top()
                tick = ticks[-1 - rank] if is_bid else ticks[rank]
            # One change per level and diff keeps the generator's model exact.
            if (is_bid, tick) in touched:
                continue
            touched.add((is_bid, tick))
            if kind == "remove":
                ticks.remove(tick)
                size = 0.0
            else:
                if kind == "add":
                    ticks.add(tick)
                size = _size(rng)
            diff[0 if is_bid else 1].append((_price(tick), size))
        diffs.append(diff)
    return snapshot, diffs


def time_diffs(factory: Callable[[], Book], snapshot: Diff, diffs: list[Diff]) -> float:
    """Best time in seconds to apply the whole stream to a freshly loaded book."""
    best = float("inf")
    for _ in range(REPEATS):
        book = factory()
        book.apply_snapshot(*snapshot)
        apply_diff = book.apply_diff
        gc.disable()
        start = time.perf_counter()
        for bids, asks in diffs:
            apply_diff(bids, asks)
        best = min(best, time.perf_counter() - start)
        gc.enable()
    return best


def time_call(call: Callable[[], object]) -> float:
    """Best time in microseconds of one call."""
    number = 100_000
    return min(timeit.repeat(call, number=number, repeat=REPEATS)) / number * 1e6


def loaded(factory: Callable[[], Book], snapshot: Diff, diffs: list[Diff]) -> Book:
    book = factory()
    book.apply_snapshot(*snapshot)
    for bids, asks in diffs:
        book.apply_diff(bids, asks)
    return book


def machine() -> str:
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"nproc {cpus}, {model}, Python {platform.python_version()}"


def main() -> None:
    rng = random.Random(SEED)
    snapshot, diffs = make_market(rng)
    changes = sum(len(bids) + len(asks) for bids, asks in diffs)
    print(f"{date.today().isoformat()}, {machine()}")
    print(
        f"{DEPTH} levels per side, {len(diffs)} diffs ({changes} level changes), best of {REPEATS}"
    )

    ours = loaded(OrderBook, snapshot, diffs)
    baseline = loaded(SortedDictBook, snapshot, diffs)
    if ours.top(DEPTH) != baseline.top(DEPTH):
        raise SystemExit("the two books disagree: the comparison would be meaningless")
    book_depth = (len(ours.top(DEPTH).bids), len(ours.top(DEPTH).asks))

    ours_s = time_diffs(OrderBook, snapshot, diffs)
    base_s = time_diffs(SortedDictBook, snapshot, diffs)
    ours_top = time_call(lambda: ours.top(VIEW_DEPTH))
    base_top = time_call(lambda: baseline.top(VIEW_DEPTH))
    # What the gateway pays per event and subscription group on top of the above.
    before = ours.top(VIEW_DEPTH)
    ours.apply_diff([(before.bids[0][0], before.bids[0][1] + 1.0)], [])
    after = ours.top(VIEW_DEPTH)
    diff_us = time_call(lambda: diff_views(before, after))

    print(f"depth after the stream: {book_depth[0]} bids, {book_depth[1]} asks")
    print(
        f"apply_diff: ours {len(diffs) / ours_s:,.0f} diffs/s, "
        f"SortedDict {len(diffs) / base_s:,.0f} diffs/s, "
        f"ratio ours/baseline {base_s / ours_s:.2f}x throughput"
    )
    print(
        f"top({VIEW_DEPTH}): ours {ours_top:.2f} µs, SortedDict {base_top:.2f} µs, "
        f"ratio ours/baseline {ours_top / base_top:.2f} of the time"
    )
    print(f"diff_views of two top-{VIEW_DEPTH} views differing by one bid: {diff_us:.2f} µs")


if __name__ == "__main__":
    main()
