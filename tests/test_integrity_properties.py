"""Random diff sequences with lost messages: a correct book or a resync, never a wrong book."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from caspian.sources.integrity import DeribitSequence, IntegrityError

INSTRUMENT = "BTC-PERPETUAL"
Book = dict[tuple[str, float], float]

levels = st.lists(
    st.tuples(
        st.sampled_from(["bids", "asks"]),
        st.integers(1, 30).map(float),
        st.sampled_from([0.0, 1.0, 2.5, 4.0]),
    ),
    min_size=1,
    max_size=5,
)
# Each step: the exchange's diff, and whether the message is lost on the way.
steps = st.lists(st.tuples(levels, st.booleans()), max_size=60)


def _message(kind: str, change_id: int, previous: int | None, book: Book) -> dict[str, Any]:
    data: dict[str, Any] = {
        "type": kind,
        "instrument_name": INSTRUMENT,
        "change_id": change_id,
        "bids": [["new", p, s] for (side, p), s in book.items() if side == "bids"],
        "asks": [["new", p, s] for (side, p), s in book.items() if side == "asks"],
    }
    if previous is not None:
        data["prev_change_id"] = previous
    return {
        "method": "subscription",
        "params": {"channel": f"book.{INSTRUMENT}.100ms", "data": data},
    }


def _apply(book: Book, diff: list[tuple[str, float, float]]) -> None:
    for side, price, size in diff:
        if size == 0:
            book.pop((side, price), None)
        else:
            book[(side, price)] = size


@settings(max_examples=300, deadline=None)
@given(steps=steps)
def test_deribit_chain_never_serves_a_wrong_book(
    steps: list[tuple[list[tuple[str, float, float]], bool]],
) -> None:
    exchange: Book = {}
    change_id = 100
    check = DeribitSequence(INSTRUMENT)
    check(_message("snapshot", change_id, None, exchange), None)
    consumer: Book = dict(exchange)
    resyncs = 0
    for diff, lost in steps:
        change_id += 1
        _apply(exchange, diff)
        if lost:
            continue
        message = _message("change", change_id, change_id - 1, {})
        message["params"]["data"]["bids"] = [["change", p, z] for s, p, z in diff if s == "bids"]
        message["params"]["data"]["asks"] = [["change", p, z] for s, p, z in diff if s == "asks"]
        try:
            check(message, None)
        except IntegrityError as error:
            assert error.reason == "sequence"
            # Resync: a fresh snapshot of the exchange's book, and the chain starts again.
            resyncs += 1
            consumer = dict(exchange)
            check(_message("snapshot", change_id, None, exchange), None)
        else:
            _apply(consumer, diff)
        # What the consumer would serve now is the exchange's book, exactly.
        assert consumer == exchange
    if not any(lost for _, lost in steps):
        assert resyncs == 0


def test_a_lost_message_is_caught_at_the_next_one() -> None:
    check = DeribitSequence(INSTRUMENT)
    check(_message("snapshot", 1, None, {}), None)
    check(_message("change", 2, 1, {}), None)
    try:
        check(_message("change", 4, 3, {}), None)
    except IntegrityError as error:
        assert error.reason == "sequence"
    else:
        raise AssertionError("a skipped change went unnoticed")
