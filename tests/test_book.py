"""The order-book engine, against hand-worked cases and a plain-dict reference model."""

from __future__ import annotations

from dataclasses import FrozenInstanceError
from typing import Literal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from caspian.book import EMPTY_VIEW, BookView, LevelChange, OrderBook, diff_views
from caspian.events import Level

# --- unit tests -------------------------------------------------------------


def make_book(bids: list[Level], asks: list[Level]) -> OrderBook:
    book = OrderBook()
    book.apply_snapshot(bids, asks)
    return book


def test_empty_book() -> None:
    book = OrderBook()
    assert book.top(10) == EMPTY_VIEW
    assert book.best_bid() is None
    assert book.best_ask() is None
    assert not book.crossed()
    assert (book.bid_count, book.ask_count) == (0, 0)


def test_snapshot_orders_each_side_best_first() -> None:
    book = make_book([(99.0, 1.0), (101.0, 2.0), (100.0, 3.0)], [(104.0, 1.0), (102.0, 2.0)])
    assert book.top(10) == BookView(
        bids=((101.0, 2.0), (100.0, 3.0), (99.0, 1.0)),
        asks=((102.0, 2.0), (104.0, 1.0)),
    )
    assert book.best_bid() == (101.0, 2.0)
    assert book.best_ask() == (102.0, 2.0)
    assert (book.bid_count, book.ask_count) == (3, 2)


def test_snapshot_ignores_empty_levels() -> None:
    book = make_book([(100.0, 0.0), (99.0, 1.0)], [(101.0, 0.0)])
    assert book.top(5) == BookView(bids=((99.0, 1.0),), asks=())
    assert (book.bid_count, book.ask_count) == (1, 0)


def test_snapshot_replaces_the_whole_book() -> None:
    book = make_book([(100.0, 1.0), (99.0, 1.0)], [(101.0, 1.0)])
    book.apply_snapshot([(98.0, 5.0)], [(103.0, 6.0), (102.0, 7.0)])
    assert book.top(5) == BookView(bids=((98.0, 5.0),), asks=((102.0, 7.0), (103.0, 6.0)))
    assert (book.bid_count, book.ask_count) == (1, 2)


def test_diff_resizes_adds_and_removes() -> None:
    book = make_book([(100.0, 1.0), (99.0, 1.0)], [(101.0, 1.0), (102.0, 1.0)])
    book.apply_diff([(100.0, 4.0), (99.5, 2.0)], [(101.0, 0.0), (103.0, 3.0)])
    assert book.top(5) == BookView(
        bids=((100.0, 4.0), (99.5, 2.0), (99.0, 1.0)),
        asks=((102.0, 1.0), (103.0, 3.0)),
    )
    assert (book.bid_count, book.ask_count) == (3, 2)


def test_diff_removing_an_absent_level_is_a_no_op() -> None:
    book = make_book([(100.0, 1.0)], [(101.0, 1.0)])
    book.apply_diff([(98.0, 0.0)], [(105.0, 0.0)])
    assert book.top(5) == BookView(bids=((100.0, 1.0),), asks=((101.0, 1.0),))
    assert (book.bid_count, book.ask_count) == (1, 1)


def test_diff_on_an_empty_book_builds_it() -> None:
    book = OrderBook()
    book.apply_diff([(100.0, 1.0), (100.0, 0.0), (99.0, 2.0)], [(101.0, 3.0)])
    assert book.top(5) == BookView(bids=((99.0, 2.0),), asks=((101.0, 3.0),))


def test_removing_the_best_level_exposes_the_next() -> None:
    book = make_book([(100.0, 1.0), (99.0, 2.0)], [(101.0, 1.0), (102.0, 2.0)])
    book.apply_diff([(100.0, 0.0)], [(101.0, 0.0)])
    assert book.best_bid() == (99.0, 2.0)
    assert book.best_ask() == (102.0, 2.0)


def test_clear() -> None:
    book = make_book([(100.0, 1.0)], [(101.0, 1.0)])
    book.clear()
    assert book.top(5) == EMPTY_VIEW
    assert (book.bid_count, book.ask_count) == (0, 0)
    book.apply_diff([(50.0, 1.0)], [])
    assert book.top(5) == BookView(bids=((50.0, 1.0),), asks=())


@pytest.mark.parametrize(
    ("bid", "ask", "crossed"),
    [(100.0, 101.0, False), (101.0, 101.0, True), (102.0, 101.0, True)],
)
def test_crossed(bid: float, ask: float, crossed: bool) -> None:
    assert make_book([(bid, 1.0)], [(ask, 1.0)]).crossed() is crossed


def test_a_one_sided_book_is_not_crossed() -> None:
    assert not make_book([(100.0, 1.0)], []).crossed()
    assert not make_book([], [(100.0, 1.0)]).crossed()


def test_top_depths() -> None:
    book = make_book([(100.0, 1.0), (99.0, 2.0), (98.0, 3.0)], [(101.0, 1.0), (102.0, 2.0)])
    assert book.top(1) == BookView(bids=((100.0, 1.0),), asks=((101.0, 1.0),))
    assert book.top(2) == BookView(bids=((100.0, 1.0), (99.0, 2.0)), asks=book.top(10).asks)
    assert book.top(10) == book.top(3)
    assert len(book.top(3).bids) == 3
    assert book.top(0) == EMPTY_VIEW
    with pytest.raises(ValueError, match="depth"):
        book.top(-1)


def test_views_do_not_change_with_the_book() -> None:
    book = make_book([(100.0, 1.0)], [(101.0, 1.0)])
    view = book.top(5)
    book.apply_diff([(100.0, 9.0), (99.0, 1.0)], [(101.0, 0.0)])
    assert view == BookView(bids=((100.0, 1.0),), asks=((101.0, 1.0),))
    with pytest.raises(FrozenInstanceError):
        view.bids = ()  # type: ignore[misc]


def test_diff_views_of_equal_views_is_empty() -> None:
    view = BookView(bids=((100.0, 1.0),), asks=((101.0, 2.0),))
    assert diff_views(view, view) == []
    assert diff_views(view, BookView(bids=((100.0, 1.0),), asks=((101.0, 2.0),))) == []
    assert diff_views(EMPTY_VIEW, EMPTY_VIEW) == []


def test_diff_views_sends_resized_new_and_gone_levels() -> None:
    old = BookView(bids=((100.0, 1.0), (99.0, 1.0)), asks=((101.0, 1.0), (102.0, 1.0)))
    new = BookView(bids=((100.0, 3.0), (99.0, 1.0)), asks=((100.5, 2.0), (101.0, 1.0)))
    assert sorted(diff_views(old, new)) == [
        (100.0, 3.0, "bid"),
        (100.5, 2.0, "ask"),
        (102.0, 0.0, "ask"),
    ]


def test_diff_views_from_and_to_empty() -> None:
    view = BookView(bids=((100.0, 1.0),), asks=((101.0, 2.0),))
    assert sorted(diff_views(EMPTY_VIEW, view)) == [(100.0, 1.0, "bid"), (101.0, 2.0, "ask")]
    assert sorted(diff_views(view, EMPTY_VIEW)) == [(100.0, 0.0, "bid"), (101.0, 0.0, "ask")]


def test_diff_views_keeps_sides_apart() -> None:
    # The same price moving from one side to the other is two changes, not none.
    old = BookView(bids=((100.0, 1.0),), asks=())
    new = BookView(bids=(), asks=((100.0, 1.0),))
    assert sorted(diff_views(old, new)) == [(100.0, 0.0, "bid"), (100.0, 1.0, "ask")]


def test_a_level_pushed_out_of_the_top_is_removed() -> None:
    book = make_book([(100.0, 1.0), (99.0, 1.0)], [])
    before = book.top(2)
    book.apply_diff([(100.5, 4.0)], [])
    assert diff_views(before, book.top(2)) == [(100.5, 4.0, "bid"), (99.0, 0.0, "bid")]


def test_a_level_entering_the_top_is_sent_with_its_size() -> None:
    book = make_book([], [(101.0, 1.0), (102.0, 1.0), (103.0, 7.0)])
    before = book.top(2)
    book.apply_diff([], [(101.0, 0.0)])
    assert diff_views(before, book.top(2)) == [(103.0, 7.0, "ask"), (101.0, 0.0, "ask")]


# --- property tests against a reference model -------------------------------

Side = dict[float, float]
Op = tuple[Literal["snapshot", "diff", "clear"], list[Level], list[Level]]

# A narrow grid of prices, shared by both sides, so that updates and removals of
# existing levels are common and books often cross.
prices = st.integers(9_990, 10_030).map(lambda tick: tick / 100)
# Few sizes, with 0 frequent: removals happen and a level is often "resized" to
# the size it already has, which must not show up as a change.
sizes = st.sampled_from([0.0, 0.0, 0.5, 1.0, 2.5])
levels = st.lists(st.tuples(prices, sizes), max_size=12)
ops = st.lists(
    st.one_of(
        st.tuples(st.just("diff"), levels, levels),
        st.tuples(st.just("diff"), levels, levels),
        st.tuples(st.just("diff"), levels, levels),
        st.tuples(st.just("snapshot"), st.lists(st.tuples(prices, sizes), max_size=40), levels),
        st.tuples(st.just("clear"), st.just([]), st.just([])),
    ),
    max_size=20,
)
# Small depths are drawn often, so that levels cross the edge of the view.
depths = st.one_of(st.integers(1, 6), st.integers(1, 100))


class ReferenceBook:
    """One plain dict per side, sorted whenever asked."""

    def __init__(self) -> None:
        self.bids: Side = {}
        self.asks: Side = {}

    def apply(self, op: Op) -> None:
        kind, bids, asks = op
        if kind != "diff":
            self.bids, self.asks = {}, {}
        for side, side_levels in ((self.bids, bids), (self.asks, asks)):
            for price, size in side_levels:
                if size > 0:
                    side[price] = size
                elif kind == "diff":
                    side.pop(price, None)

    def top(self, n: int) -> BookView:
        return BookView(
            bids=tuple(sorted(self.bids.items(), reverse=True)[:n]),
            asks=tuple(sorted(self.asks.items())[:n]),
        )


def apply(book: OrderBook, op: Op) -> None:
    kind, bids, asks = op
    if kind == "snapshot":
        book.apply_snapshot(bids, asks)
    elif kind == "diff":
        book.apply_diff(bids, asks)
    else:
        book.clear()


@settings(max_examples=200, deadline=None)
@given(ops)
def test_book_matches_the_reference(sequence: list[Op]) -> None:
    book = OrderBook()
    reference = ReferenceBook()
    for op in sequence:
        apply(book, op)
        reference.apply(op)
        everything = reference.top(1_000)
        assert book.top(1_000) == everything
        assert book.best_bid() == (everything.bids[0] if everything.bids else None)
        assert book.best_ask() == (everything.asks[0] if everything.asks else None)
        assert (book.bid_count, book.ask_count) == (len(reference.bids), len(reference.asks))
        assert book.crossed() == bool(
            reference.bids and reference.asks and max(reference.bids) >= min(reference.asks)
        )


@settings(max_examples=200, deadline=None)
@given(ops, depths)
def test_top_matches_the_reference(sequence: list[Op], n: int) -> None:
    book = OrderBook()
    reference = ReferenceBook()
    for op in sequence:
        apply(book, op)
        reference.apply(op)
        assert book.top(n) == reference.top(n)


def as_map(view: BookView) -> dict[tuple[str, float], float]:
    return {("bid", price): size for price, size in view.bids} | {
        ("ask", price): size for price, size in view.asks
    }


def expected_changes(old: BookView, new: BookView) -> set[LevelChange]:
    before, after = as_map(old), as_map(new)
    changed = {(price, size, side) for (side, price), size in after.items()}
    changed -= {(price, size, side) for (side, price), size in before.items()}
    gone = {(price, 0.0, side) for (side, price) in before.keys() - after.keys()}
    return changed | gone


@settings(max_examples=150, deadline=None)
@given(ops, ops, depths)
def test_diff_views_is_exactly_the_net_change(first: list[Op], then: list[Op], n: int) -> None:
    book = OrderBook()
    for op in first:
        apply(book, op)
    old = book.top(n)
    for op in then:
        apply(book, op)
    new = book.top(n)
    changes = diff_views(old, new)
    assert len(changes) == len(set(changes)), "a level was sent twice"
    assert set(changes) == expected_changes(old, new)
    assert all(side in ("bid", "ask") for _, _, side in changes)


@settings(max_examples=200, deadline=None)
@given(ops, depths)
def test_a_client_applying_the_diffs_always_holds_the_top_n(sequence: list[Op], n: int) -> None:
    book = OrderBook()
    client: dict[tuple[str, float], float] = {}
    sent = EMPTY_VIEW
    for op in sequence:
        apply(book, op)
        view = book.top(n)
        for price, size, side in diff_views(sent, view):
            if size == 0:
                del client[(side, price)]
            else:
                client[(side, price)] = size
        assert client == as_map(view)
        sent = view


@settings(max_examples=300, deadline=None)
@given(ops, depths)
def test_diffs_applied_to_the_top_give_the_next_top(sequence: list[Op], n: int) -> None:
    """What apply_diff_top returns keeps a copy of the top N exact, and says every net change."""
    book = OrderBook()
    client: dict[tuple[str, float], float] = {}
    for op in sequence:
        kind, bids, asks = op
        before = book.top(n)
        if kind != "diff":
            apply(book, op)
            client = as_map(book.top(n))
            continue
        bid_changes, ask_changes = book.apply_diff_top(bids, asks, n)
        for side, changes in (("bid", bid_changes), ("ask", ask_changes)):
            assert len({price for price, _ in changes}) == len(changes), "a price sent twice"
            for price, size in changes:
                if size == 0:
                    client.pop((side, price), None)
                else:
                    client[(side, price)] = size
        after = book.top(n)
        assert client == as_map(after)
        sent = {(price, size, "bid") for price, size in bid_changes}
        sent |= {(price, size, "ask") for price, size in ask_changes}
        assert expected_changes(before, after) <= sent


def test_apply_diff_top_sends_a_change_below_the_top_as_nothing() -> None:
    book = OrderBook()
    book.apply_snapshot([(99.0, 1.0), (98.0, 1.0), (97.0, 1.0)], [(100.0, 1.0), (101.0, 1.0)])
    assert book.apply_diff_top([(97.0, 5.0), (96.0, 1.0)], [], 2) == ([], [])
    # A new best bid pushes 98 out; removing the best ask brings 101 in.
    assert book.apply_diff_top([(99.5, 2.0)], [(100.0, 0.0)], 2) == (
        [(99.5, 2.0), (98.0, 0.0)],
        [(100.0, 0.0)],
    )
    assert book.top(2) == BookView(((99.5, 2.0), (99.0, 1.0)), ((101.0, 1.0),))
