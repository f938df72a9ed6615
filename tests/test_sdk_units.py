"""The SDK's pure logic (clients/python): books, message parsing, backoff, codes."""

from __future__ import annotations

import random
import re
import subprocess
import sys
import tomllib
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from caspian_client import Backoff, BookKeeper, Level1, Level2Message, Product
from caspian_client.client import _base_urls
from caspian_client.errors import (
    CLOSE_CODES,
    PROTOCOL_ERRORS,
    REST_CODES,
    SUBSCRIBE_CODES,
    TOKEN_REFRESH_CODES,
    UNSUBSCRIBE_CODES,
    ProtocolError,
    SubscriptionError,
    TokenRefreshError,
)
from caspian_client.models import PRODUCT_FIELDS, timestamp
from hypothesis import given
from hypothesis import strategies as st

# The error-code table at the end of the original documentation.
ORIGINAL_CODES = {
    100: "Request not properly formatted as JSON",
    101: "No requestId found in the message",
    102: "No type found in the message",
    103: "Unknown type",
    104: "No accessToken found in the message",
    105: "No subscribeRequestId found in the message",
    199: "Server could not process the request",
    200: "All OK",
    201: "Duplicated Request ID",
    202: "Invalid subscription symbol",
    203: "Invalid subscription type",
    204: "Another subscription already exists",
    205: "Not authorized",
    206: "Subscription limit reached",
    207: "Invalid symbol type",
    208: "Invalid number of levels",
    209: "Symbol type not currently supported",
    300: "All OK",
    301: "Subscription not found",
    302: "Duplicated requestId",
    400: "Bad Request",
    401: "Unauthorized",
    500: "Internal Server Error",
    3000: "Access token not found",
    3001: "Supplied token is not valid",
    3002: "Token has expired",
    3003: "The handler for this session was not found",
    3004: "Internal issue",
    3006: "Pong message not received",
    3007: "Message queue limit reached",
    4000: "Request is not properly formatted",
    4001: "Authentication type not found",
    4002: "Authentication details not found",
    4003: "Unsupported authentication type",
}


def level2(payload: list[dict[str, Any]], depth: str = "connected", **extra: Any) -> Level2Message:
    return Level2Message.parse(
        {
            "requestId": "r",
            "type": "Level2",
            "caspianTimestamp": "2018-06-08T08:13:46.683000",
            "depthStream": depth,
            "payload": payload,
            **extra,
        }
    )


def entry(side: str, price: float, size: float) -> dict[str, Any]:
    return {"side": side, "price": price, "size": size}


# -- codes -------------------------------------------------------------------


def test_every_documented_code_has_its_meaning() -> None:
    tables = [
        PROTOCOL_ERRORS,
        SUBSCRIBE_CODES,
        UNSUBSCRIBE_CODES,
        REST_CODES,
        CLOSE_CODES,
    ]
    for code, meaning in ORIGINAL_CODES.items():
        assert any(table.get(code) == meaning for table in tables), code
    # TokenRefreshResponse reuses numbers with meanings of its own.
    assert TOKEN_REFRESH_CODES[203] == "Access Token has expired"
    error = SubscriptionError(206, "limit is 100")
    assert (error.code, error.meaning, error.message) == (
        206,
        "Subscription limit reached",
        "limit is 100",
    )
    assert str(error) == "206 Subscription limit reached: limit is 100"
    assert TokenRefreshError(204).meaning == "Request ID is duplicated"
    assert ProtocolError(777).meaning == "undocumented code 777"


# -- the book ----------------------------------------------------------------


def test_the_book_starts_at_the_first_whole_top_n_and_applies_changes() -> None:
    keeper = BookKeeper("FX-BTC/USD=GEMINI")
    # The first Level2 may be a status alone: nothing to show yet.
    assert keeper.apply(level2([])) is None
    whole = keeper.apply(
        level2(
            [entry("ask", 101, 1), entry("bid", 99, 2), entry("bid", 98, 3), entry("ask", 102, 4)]
        )
    )
    assert whole is not None and whole.whole
    assert [level.price for level in whole.book.bids] == [99, 98]
    assert [level.price for level in whole.book.asks] == [101, 102]
    assert whole.book.best_bid is not None and whole.book.best_bid.size == 2
    assert whole.book.caspian_timestamp == datetime(2018, 6, 8, 8, 13, 46, 683000, tzinfo=UTC)
    change = keeper.apply(level2([entry("bid", 99, 0), entry("bid", 100, 5), entry("ask", 101, 7)]))
    assert change is not None and not change.whole
    assert change.book.levels() == {
        ("bid", 100): 5,
        ("bid", 98): 3,
        ("ask", 101): 7,
        ("ask", 102): 4,
    }
    assert [c.price for c in change.changes] == [99, 100, 101]
    # A status-only update is yielded with the book as it is.
    quiet = keeper.apply(level2([]))
    assert quiet is not None and quiet.book.levels() == change.book.levels()


def test_a_restarted_book_waits_for_the_next_whole_top_n() -> None:
    keeper = BookKeeper("S")
    keeper.apply(level2([entry("bid", 1, 1), entry("ask", 2, 1)]))
    keeper.restart()
    assert keeper.apply(level2([])) is None
    again = keeper.apply(level2([entry("bid", 10, 1), entry("ask", 11, 1)]))
    assert again is not None and again.whole
    assert again.book.levels() == {("bid", 10): 1, ("ask", 11): 1}


def test_after_the_depth_stream_was_disconnected_the_next_top_n_replaces_the_book() -> None:
    keeper = BookKeeper("S")
    keeper.apply(level2([entry("bid", 1, 1), entry("ask", 2, 1), entry("ask", 3, 1)]))
    down = keeper.apply(level2([], depth="disconnected"))
    assert down is not None and down.book.depth_stream == "disconnected"
    # Sent whole again; with or without size 0 for the levels that are gone.
    back = keeper.apply(level2([entry("bid", 5, 1), entry("ask", 6, 2), entry("ask", 2, 0)]))
    assert back is not None and back.whole and back.book.depth_stream == "connected"
    assert back.book.levels() == {("bid", 5): 1, ("ask", 6): 2}
    later = keeper.apply(level2([entry("ask", 7, 1)]))
    assert later is not None and not later.whole and ("ask", 6) in later.book.levels()


@given(
    st.lists(
        st.lists(
            st.tuples(st.sampled_from(["bid", "ask"]), st.integers(1, 30), st.integers(0, 3)),
            max_size=8,
        ),
        max_size=40,
    )
)
def test_the_book_holds_what_applying_every_change_in_order_gives(
    changes: list[list[tuple[str, int, int]]],
) -> None:
    keeper = BookKeeper("S")
    expected: dict[tuple[str, float], float] = {}
    keeper.apply(level2([entry("bid", 0.5, 1)]))
    expected[("bid", 0.5)] = 1
    for batch in changes:
        update = keeper.apply(level2([entry(side, price, size) for side, price, size in batch]))
        for side, price, size in batch:
            if size == 0:
                expected.pop((side, price), None)
            else:
                expected[(side, price)] = size
        assert update is not None and update.book.levels() == expected
        bids = [level.price for level in update.book.bids]
        asks = [level.price for level in update.book.asks]
        assert bids == sorted(bids, reverse=True) and asks == sorted(asks)


def test_a_malformed_level_is_an_error_not_a_silent_skip() -> None:
    with pytest.raises(ValueError, match="side, price and size"):
        level2([{"side": "middle", "price": 1, "size": 1}])


# -- messages ----------------------------------------------------------------


def test_level1_merges_partial_updates_and_keeps_unknown_fields() -> None:
    state = Level1("S")
    state = state.merge(
        {
            "requestId": "r",
            "type": "Level1",
            "bboStream": "connected",
            "tradeStream": "disconnected",
            "payload": {
                "bid": 1.5,
                "bidSize": 2,
                "bboCaspianTimestamp": "2018-06-08T08:13:44.683000",
            },
        }
    )
    state = state.merge(
        {
            "requestId": "r",
            "type": "Level1",
            "tradeStream": "connected",
            "venueLatency": 3,
            "payload": {
                "tradePrice": 1.6,
                "tradeId": 77,
                "exchangeSpecificInfo": {"side": "BUY"},
                "newField": "kept",
            },
        }
    )
    assert (state.bid, state.bid_size, state.trade_price, state.trade_id) == (1.5, 2.0, 1.6, "77")
    assert (state.bbo_stream, state.trade_stream) == ("connected", "connected")
    assert state.bbo_caspian_timestamp == datetime(2018, 6, 8, 8, 13, 44, 683000, tzinfo=UTC)
    assert state.exchange_specific_info == {"side": "BUY"}
    assert state.extra == {"venueLatency": 3, "newField": "kept"}
    assert state.raw["payload"]["tradePrice"] == 1.6


def test_a_product_has_every_field_of_the_original_and_keeps_new_ones() -> None:
    raw: dict[str, Any] = {wire: f"value of {wire}" for wire in PRODUCT_FIELDS}
    raw["createdTime"] = "2018-01-18T03:13:55.000000"
    raw["brandNew"] = {"a": 1}
    product = Product.parse(raw)
    for wire, name in PRODUCT_FIELDS.items():
        assert getattr(product, name) == raw[wire]
    assert product.extra == {"brandNew": {"a": 1}}
    assert product.created == datetime(2018, 1, 18, 3, 13, 55, tzinfo=UTC)
    sparse = Product.parse({"caspianCode": "FX-ETH/USD=GEMINI", "exchange": "GEMINI"})
    assert sparse.strike is None and sparse.updated is None


def test_level2_message_keeps_unknown_fields() -> None:
    message = level2([entry("bid", 1, 1)], sequence=12)
    assert message.extra == {"sequence": 12}
    assert message.exchange_timestamp is None
    assert timestamp("not a time") is None


@pytest.mark.parametrize(
    ("url", "rest", "stream"),
    [
        ("http://127.0.0.1:8080", "http://127.0.0.1:8080/v1", "ws://127.0.0.1:8080/v1/stream"),
        ("https://md.example/v1/", "https://md.example/v1", "wss://md.example/v1/stream"),
        (
            "wss://md.example/api/v1/stream",
            "https://md.example/api/v1",
            "wss://md.example/api/v1/stream",
        ),
    ],
)
def test_service_urls(url: str, rest: str, stream: str) -> None:
    assert _base_urls(url) == (rest, stream)


def test_a_url_that_is_no_service_url_is_refused() -> None:
    with pytest.raises(ValueError, match="not a Caspian service URL"):
        _base_urls("127.0.0.1:8080")


# -- backoff -----------------------------------------------------------------


def test_backoff_grows_to_its_cap_with_jitter_and_resets() -> None:
    highest = Backoff(initial=0.5, maximum=4, jitter=0.5, rand=lambda: 0.0)
    assert [highest.next_delay() for _ in range(6)] == [0.5, 1, 2, 4, 4, 4]
    lowest = Backoff(initial=0.5, maximum=4, jitter=0.5, rand=lambda: 1.0)
    assert [lowest.next_delay() for _ in range(5)] == [0.25, 0.5, 1, 2, 2]
    lowest.reset()
    assert lowest.next_delay() == 0.25
    # A server's Retry-After is a floor.
    assert lowest.next_delay(at_least=3) == 3
    spread = Backoff(initial=1, maximum=1, rand=random.Random(7).random)
    delays = {round(spread.next_delay(), 6) for _ in range(50)}
    assert len(delays) > 40 and all(0.5 <= d <= 1 for d in delays)
    with pytest.raises(ValueError):
        Backoff(initial=0)
    assert highest.attempt == 6


# -- the distribution ------------------------------------------------------------

SERVER_ONLY = ["caspian", "ccxt", "sqlalchemy", "fastapi", "nats", "uvicorn", "pydantic", "typer"]


def test_the_client_needs_none_of_the_server_s_dependencies() -> None:
    client = Path(__file__).resolve().parents[1] / "clients" / "python"
    project = tomllib.loads((client / "pyproject.toml").read_text())["project"]
    names = {re.split(r"[<>=\[ ]", requirement)[0] for requirement in project["dependencies"]}
    assert names == {"httpx", "websockets", "rich"}
    assert set(project["scripts"]) == {
        "caspian-watch",
        "caspian-tail",
        "caspian-exchanges",
        "caspian-products",
    }
    # Imported with the server's packages made unimportable, every module loads.
    blocker = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        f"        if name.split('.')[0] in {SERVER_ONLY!r}:\n"
        "            raise ImportError('server-only package: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import caspian_client, caspian_client.cli, caspian_client.sync\n"
        "print(len(caspian_client.__all__))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", blocker], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert (client / "src" / "caspian_client" / "py.typed").exists()
