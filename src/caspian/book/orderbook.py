"""An in-memory price-level order book and the top-N views sent to clients.

Pure computation, no I/O: the gateway calls it on every market event, so the
hot paths (:meth:`OrderBook.apply_diff`, :meth:`OrderBook.top` and
:func:`diff_views`) are written to stay in C-implemented builtins as much as
possible.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections.abc import Collection, Iterable
from dataclasses import dataclass

from caspian.events import Level

#: ``(price, size, side)`` with side ``"bid"`` or ``"ask"``; size 0 removes the level.
LevelChange = tuple[float, float, str]


@dataclass(frozen=True, slots=True)
class BookView:
    """The best levels of each side, best first: bids by descending price, asks ascending."""

    bids: tuple[Level, ...]
    asks: tuple[Level, ...]


EMPTY_VIEW = BookView((), ())


def _apply(by_price: dict[float, Level], prices: list[float], levels: Iterable[Level]) -> None:
    for level in levels:
        price, size = level
        if size > 0:
            if price not in by_price:
                insort(prices, price)
            # The caller's tuple is stored as is: it is immutable, views then
            # share it, and comparing unchanged levels becomes an identity check.
            by_price[price] = level
        elif by_price.pop(price, None) is not None:
            del prices[bisect_left(prices, price)]


def _apply_top(
    by_price: dict[float, Level],
    prices: list[float],
    levels: Iterable[Level],
    depth: int,
    bids: bool,
) -> list[Level]:
    """Applies ``levels`` to one side; what that changed among its best ``depth`` levels.

    A level is in the top when it is at least as good as the ``depth``-th
    best price, one comparison; only a change in the top can change it, and
    then by at most one more level crossing its edge. A resize then costs no
    search at all, an insert or removal the one binary search that places it:
    at the depth of an exchange's book each search costs cache misses.
    """
    visible: dict[float, float] = {}
    for level in levels:
        price, size = level
        count = len(prices)
        # The worst price in the top; None while the whole side is in it.
        edge = None if count < depth else prices[count - depth] if bids else prices[depth - 1]
        if size > 0:
            if price in by_price:
                by_price[price] = level
                if edge is None or (price >= edge if bids else price <= edge):
                    visible[price] = size
                continue
            insort(prices, price)
            by_price[price] = level
            if edge is None:
                visible[price] = size
            elif price > edge if bids else price < edge:
                visible[price] = size
                # The level that was last in the top is pushed out of it.
                visible[edge] = 0.0
        elif by_price.pop(price, None) is not None:
            del prices[bisect_left(prices, price)]
            if edge is None:
                visible[price] = 0.0
            elif price >= edge if bids else price <= edge:
                visible[price] = 0.0
                if count > depth:
                    # The best level outside the top enters it.
                    entering = prices[count - 1 - depth] if bids else prices[depth - 1]
                    visible[entering] = by_price[entering][1]
    # A price changed twice in one diff keeps its last state, which is all a
    # client applying the changes needs.
    return list(visible.items())


class OrderBook:
    """Both sides of one symbol's book, as price levels.

    Each side keeps a dict ``price -> level`` and a sorted list of its prices:
    resizing a level touches only the dict, and adding or removing one costs a
    binary search and a memmove, which beats tree or skip-list structures
    written in Python at the depths exchanges publish.
    """

    __slots__ = ("_ask_prices", "_asks", "_bid_prices", "_bids")

    def __init__(self) -> None:
        self._bids: dict[float, Level] = {}
        # Ascending for both sides, so the best bid is the last price and the
        # best ask the first: one slice then yields either side best first.
        self._bid_prices: list[float] = []
        self._asks: dict[float, Level] = {}
        self._ask_prices: list[float] = []

    def apply_snapshot(self, bids: Iterable[Level], asks: Iterable[Level]) -> None:
        """Replace the whole book; levels of size 0 are ignored."""
        self._bids = {level[0]: level for level in bids if level[1] > 0}
        self._bid_prices = sorted(self._bids)
        self._asks = {level[0]: level for level in asks if level[1] > 0}
        self._ask_prices = sorted(self._asks)

    def apply_diff(self, bids: Iterable[Level], asks: Iterable[Level]) -> None:
        """Set each given level's size; size 0 removes it, absent or not."""
        _apply(self._bids, self._bid_prices, bids)
        _apply(self._asks, self._ask_prices, asks)

    def apply_diff_top(
        self, bids: Collection[Level], asks: Collection[Level], depth: int
    ) -> tuple[list[Level], list[Level]]:
        """Applies a diff; the changes it made to the best ``depth`` levels of each side.

        Applying those changes, in order, to a copy of the top ``depth``
        before the diff gives the top ``depth`` after it: a level pushed out
        comes with size 0, a level that enters with its size. It costs a
        binary search per changed level, whatever the book's depth.
        """
        # Many diffs touch one side only: the other costs nothing then.
        return (
            _apply_top(self._bids, self._bid_prices, bids, depth, True) if bids else [],
            _apply_top(self._asks, self._ask_prices, asks, depth, False) if asks else [],
        )

    def clear(self) -> None:
        self._bids = {}
        self._bid_prices = []
        self._asks = {}
        self._ask_prices = []

    def top(self, n: int) -> BookView:
        """The best ``n`` levels of each side (fewer when the side is shallower)."""
        if n < 0:
            raise ValueError(f"a view needs a non-negative depth, not {n}")
        return BookView(
            tuple(map(self._bids.__getitem__, self._bid_prices[: -n - 1 : -1])),
            tuple(map(self._asks.__getitem__, self._ask_prices[:n])),
        )

    def best_bid(self) -> Level | None:
        return self._bids[self._bid_prices[-1]] if self._bid_prices else None

    def best_ask(self) -> Level | None:
        return self._asks[self._ask_prices[0]] if self._ask_prices else None

    def crossed(self) -> bool:
        """Whether the best bid is at or above the best ask, both sides having levels."""
        bid_prices = self._bid_prices
        ask_prices = self._ask_prices
        return bool(bid_prices and ask_prices and bid_prices[-1] >= ask_prices[0])

    @property
    def bid_count(self) -> int:
        return len(self._bid_prices)

    @property
    def ask_count(self) -> int:
        return len(self._ask_prices)


def _diff_side(old: tuple[Level, ...], new: tuple[Level, ...], side: str) -> list[LevelChange]:
    before = dict(old)
    # Popping each price of ``new`` both finds its old size and leaves in
    # ``before`` exactly the prices that are gone, without a second dict.
    pop = before.pop
    changes = [(price, size, side) for price, size in new if pop(price, None) != size]
    changes += [(price, 0.0, side) for price in before]
    return changes


def diff_views(old: BookView, new: BookView) -> list[LevelChange]:
    """The changes that turn a client's copy of ``old`` into ``new``.

    Every level of ``new`` that ``old`` lacks or sizes differently, with its
    new size, then every price of ``old`` that ``new`` lacks, with size 0;
    bids first. Empty when the views are equal. Each side of a view must hold
    a price at most once, as the views :meth:`OrderBook.top` makes do.
    """
    changes: list[LevelChange] = []
    # Tuple equality is checked in C and, levels being shared between views,
    # mostly by identity: most events leave at least one side's top unchanged.
    if old.bids != new.bids:
        changes += _diff_side(old.bids, new.bids, "bid")
    if old.asks != new.asks:
        changes += _diff_side(old.asks, new.asks, "ask")
    return changes
