"""Paxos's own client, serving ITBIT: split snapshots, replayed executions, addresses, market ids.

The tests every exchange shares run it from tests/test_live.py's VENUES.
"""

from __future__ import annotations

import asyncio
import dataclasses

from caspian.codes import Stream, StreamState
from caspian.events import TradeEvent
from caspian.sources.live.paxos import PaxosConnection
from tests.support.mock_paxos import PaxosMock
from tests.test_live import (
    ASKS,
    BIDS,
    PRODUCTS,
    VENUES,
    assert_refusal_retried,
    connected,
    next_book,
    started,
    streaming,
    until,
)

PAXOS = next(venue for venue in VENUES if venue.code == "ITBIT")


def test_itbit_products_name_paxos_markets() -> None:
    assert PRODUCTS["FX-BTC/USD=ITBIT"].native_code == "BTCUSD"
    assert PRODUCTS["FX-PAXG/USD=ITBIT"].native_code == "PAXGUSD"


def test_live_urls_replace_the_base_address_and_keep_the_paths() -> None:
    default = PaxosConnection.from_urls({})
    assert default.address("book", "BTCUSD") == "wss://ws.paxos.com/marketdata/BTCUSD"
    assert default.address("trades", "BTCUSD") == "wss://ws.paxos.com/executiondata/BTCUSD"
    moved = PaxosConnection.from_urls({"api": {"ws": "ws://127.0.0.1:9000/"}})
    assert moved.address("book", "ETHEUR") == "ws://127.0.0.1:9000/marketdata/ETHEUR"


async def test_a_snapshot_in_parts_makes_one_book() -> None:
    mock = PaxosMock()
    mock.set_book(BIDS, ASKS)
    mock.snapshot_parts = 3
    async with connected(mock, PaxosConnection) as connection:
        assert await next_book(connection, "BTCUSD") == mock.top(100)


async def test_the_execution_replayed_on_reconnecting_is_not_sent_again() -> None:
    async with streaming(PAXOS) as (source, c, mock):
        await started(PAXOS, source, c, mock)
        assert isinstance(mock, PaxosMock)
        await mock.trade(100.0, 0.5)
        await until(lambda: any(isinstance(e, TradeEvent) for e in c.events))
        mock.drop()
        await mock.wait_subscribes("executiondata", 2)
        await until(lambda: c.states[Stream.TRADE] is StreamState.CONNECTED)
        await asyncio.sleep(0.2)
        await mock.trade(100.5, 0.25)
        await until(lambda: len([e for e in c.events if isinstance(e, TradeEvent)]) >= 2)
        await asyncio.sleep(0.1)
        trades = [e for e in c.events if isinstance(e, TradeEvent)]
        assert [(t.price, t.size) for t in trades] == [(100.0, 0.5), (100.5, 0.25)]


async def test_an_unknown_market_is_an_outage_retried() -> None:
    # Paxos closes the connection to a market it does not list.
    venue = dataclasses.replace(PAXOS, mock=lambda: PaxosMock("ETHUSD"))
    await assert_refusal_retried(venue, "disconnect")
