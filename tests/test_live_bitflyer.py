"""bitFlyer's own client: what its unnumbered JSON-RPC feed publishes, and nothing more, is trusted.

The tests every exchange shares run it from tests/test_live.py's VENUES;
these cover what is bitFlyer's own: snapshots healing lost changes, changes
before the first snapshot, itayose executions, refused subscriptions, its
product codes, and the original API's exchangeSpecificInfo end to end.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from caspian.events import TradeEvent
from caspian.sources.live.bitflyer import BitflyerConnection
from tests.support.mock_bitflyer import BitflyerMock
from tests.test_live import (
    ASKS,
    BIDS,
    DEPTH,
    PRODUCTS,
    VENUES,
    assert_lost_change_healed,
    assert_refusal_retried,
    books_since,
    connected,
    live_service,
    next_book,
    started,
    streaming,
    synced,
    until,
    went_down,
)

BITFLYER = next(venue for venue in VENUES if venue.code == "BITFLYER")


def test_products_name_bitflyers_product_codes() -> None:
    codes = {
        code: spec.native_code for code, spec in PRODUCTS.items() if spec.exchange == "BITFLYER"
    }
    assert codes["FX-BTC/JPY=BITFLYER"] == "BTC_JPY"
    assert codes["FX-ETH/BTC=BITFLYER"] == "ETH_BTC"
    # Lightning FX (now Crypto CFD) is the perpetual.
    assert codes["PERP-BTC/JPY=BITFLYER"] == "FX_BTC_JPY"


def test_live_urls_replace_the_base_address_and_keep_the_path() -> None:
    assert BitflyerConnection.from_urls({}).ws_url == "wss://ws.lightstream.bitflyer.com/json-rpc"
    moved = BitflyerConnection.from_urls({"api": {"ws": "ws://127.0.0.1:9000/"}})
    assert moved.ws_url == "ws://127.0.0.1:9000/json-rpc"


async def test_a_lost_change_is_healed_by_the_next_snapshot() -> None:
    await assert_lost_change_healed(BITFLYER, BitflyerMock.snapshot)


async def test_changes_before_the_first_snapshot_make_no_book() -> None:
    mock = BitflyerMock()
    mock.set_book(BIDS, ASKS)
    # A change the snapshot does not have: applied, it would go out as a book of its own.
    mock.before_snapshot = [
        {"mid_price": 99.5, "bids": [{"price": 99.25, "size": 4.0}], "asks": []}
    ]
    async with connected(mock, BitflyerConnection) as connection:
        # The snapshot's levels come unordered; the book is sorted.
        assert await next_book(connection, "BTC_JPY") == mock.top(100)
        await mock.update(bids=[(99.0, 0.0)], asks=[(100.0, 3.0)])
        assert await next_book(connection, "BTC_JPY") == mock.top(100)


async def test_itayose_market_orders_are_not_levels() -> None:
    """Executed market orders of a call auction come as price-0 changes."""
    async with streaming(BITFLYER) as (source, c, mock):
        await started(BITFLYER, source, c, mock)
        mark = len(c.events)
        await mock.send_changes(bids=[(0.0, 1.5), (98.0, 6.0)], asks=[(0.0, 2.0)])
        mock.apply(bids=[(98.0, 6.0)])
        await until(lambda: bool(books_since(c, mark)) and synced(c, mock))
        assert not went_down(c, mark)


async def test_executions_come_with_their_order_ids_in_order() -> None:
    async with streaming(BITFLYER) as (source, c, mock):
        await started(BITFLYER, source, c, mock)
        assert isinstance(mock, BitflyerMock)
        executions = [
            mock.execution(100.0, 0.25, "SELL"),
            mock.execution(100.5, 0.5, "BUY"),
            # An itayose execution has no taker.
            mock.execution(100.0, 1.0, ""),
        ]
        await mock.trades(executions)
        await until(lambda: len([e for e in c.events if isinstance(e, TradeEvent)]) == 3)
        trades = [e for e in c.events if isinstance(e, TradeEvent)]
        assert [(t.price, t.size, t.trade_id) for t in trades] == [
            (e["price"], e["size"], str(e["id"])) for e in executions
        ]
        for trade, execution in zip(trades, executions, strict=True):
            ids = {
                "buy_child_order_acceptance_id": execution["buy_child_order_acceptance_id"],
                "sell_child_order_acceptance_id": execution["sell_child_order_acceptance_id"],
            }
            side = {"side": execution["side"]} if execution["side"] else {}
            assert trade.info == side | ids


async def test_a_refused_subscription_is_an_outage_retried() -> None:
    """A product bitFlyer does not know: the error is an outage, retried with backoff."""
    venue = dataclasses.replace(BITFLYER, mock=lambda: BitflyerMock("ETH_BTC"))
    await assert_refusal_retried(venue, "error")


async def test_the_perpetual_streams_on_its_own_channels() -> None:
    venue = dataclasses.replace(
        BITFLYER, symbol="PERP-BTC/JPY=BITFLYER", mock=lambda: BitflyerMock("FX_BTC_JPY")
    )
    async with streaming(venue) as (source, c, mock):
        await started(venue, source, c, mock)
        assert c.view() == mock.top(DEPTH)


async def test_service_sends_bitflyers_exchange_specific_info(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The original API's Level1 example, from a bitFlyer execution through the whole service."""
    async with (
        BitflyerMock() as mock,
        live_service(tmp_path, monkeypatch, "BITFLYER", BITFLYER.urls(mock)) as c,
    ):
        mock.set_book(BIDS, ASKS)
        l1 = await c.subscribe("FX-BTC/JPY=BITFLYER", "Level1", conflation="None")
        await c.wait_for(lambda m: m["requestId"] == l1 and m.get("bboStream") == "connected")
        await mock.wait_subscribes("lightning_executions")
        raw = await mock.trade(100.5, 0.25, "BUY")
        trade = await c.wait_for(
            lambda m: m["requestId"] == l1 and m["payload"].get("tradePrice") == 100.5
        )
        assert trade["payload"]["tradeId"] == str(raw["id"])
        assert trade["payload"]["exchangeSpecificInfo"] == {
            "buy_child_order_acceptance_id": raw["buy_child_order_acceptance_id"],
            "sell_child_order_acceptance_id": raw["sell_child_order_acceptance_id"],
            "side": "BUY",
        }
        assert trade["payload"]["bid"] == 99.0 and trade["payload"]["ask"] == 100.0
