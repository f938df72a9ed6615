"""Failure test 1: a 3-node NATS cluster loses, to ``kill -9``, the node a gateway uses.

A source instance and a gateway-only instance are both given the whole server list
(``CASPIAN_BUS=nats://a,nats://b,nats://c``). The gateway's clients must see a short
``disconnected`` spell, then updates again, and end with the source's book.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.client import StreamClient, apply_level2
from tests.support.nats import NatsCluster, running_cluster
from tests.support.service import RunningService, start_service
from tests.test_nats import bus_of, drain, source_book

SYMBOL = "FX-BTC/USD=GEMINI"
LEVELS = 10
#: The longest disconnected spell accepted: nats-py moves to another node at once
#: (tens of milliseconds measured); the rest is the gateway's snapshot round trip.
MAX_SPELL_S = 5.0


@pytest.fixture
def cluster() -> Iterator[NatsCluster]:
    with running_cluster() as nats_cluster:
        yield nats_cluster


def node_port(running: RunningService) -> int:
    nc = bus_of(running)._nc
    assert nc is not None and nc.connected_url is not None
    port = nc.connected_url.port
    assert port is not None
    return port


async def test_kill_9_of_the_gateways_nats_node(
    cluster: NatsCluster, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="caspian.bus.nats")
    source = await asyncio.to_thread(start_service, tmp_path, bus=cluster.urls, simulator_rate=40.0)
    gateway: RunningService | None = None
    try:
        # One data directory: one store and signing key, so the token works on both.
        gateway = await asyncio.to_thread(start_service, tmp_path, bus=cluster.urls, source="none")
        async with asyncio.timeout(90):
            await check_kill_9(cluster, source, gateway, caplog)
    finally:
        if gateway is not None:
            await asyncio.to_thread(gateway.stop)
        await asyncio.to_thread(source.stop)


async def check_kill_9(
    cluster: NatsCluster,
    source: RunningService,
    gateway: RunningService,
    caplog: pytest.LogCaptureFixture,
) -> None:
    token = await asyncio.to_thread(gateway.token)
    level1 = await StreamClient.open(gateway.stream_url, token)
    level2 = await StreamClient.open(gateway.stream_url, token)
    await level1.subscribe(SYMBOL, "Level1", conflation="None")
    await level2.subscribe(SYMBOL, "Level2", numberOfLevels=LEVELS, conflation="None")
    book: dict[Any, float] = {}
    while True:
        message = await level2.recv()
        apply_level2(book, message)
        if message["depthStream"] == "connected" and message["payload"]:
            break
    await level1.wait_for(lambda m: m["bboStream"] == "connected" and "bid" in m["payload"])
    assert bus_of(gateway).connection_state == "connected"
    reconnects_before = bus_of(gateway).resyncs

    node = cluster.server_on(node_port(gateway))
    await asyncio.to_thread(node.kill)
    killed = time.monotonic()

    # Level2: down at once, then a whole top-N, then updates again.
    down_at: float | None = None
    while True:
        message = await level2.recv(within=MAX_SPELL_S + 5)
        apply_level2(book, message)
        if message["depthStream"] == "disconnected" and down_at is None:
            down_at = time.monotonic()
        if down_at is not None and message["depthStream"] == "connected" and message["payload"]:
            break
    spell = time.monotonic() - down_at
    assert spell < MAX_SPELL_S, spell
    assert down_at - killed < MAX_SPELL_S
    whole = [level for level in message["payload"] if level["size"] > 0]
    assert len(whole) == 2 * LEVELS, message
    for _ in range(20):
        message = await level2.recv(within=5)
        apply_level2(book, message)
        assert message["depthStream"] == "connected"

    # Level1: the same spell, then quotes again.
    await level1.wait_for(lambda m: m["bboStream"] == "disconnected", within=5)
    await level1.wait_for(
        lambda m: m["bboStream"] == "connected" and "bid" in m["payload"], within=MAX_SPELL_S + 5
    )

    # The gateway now speaks to another node; the killed one stays dead.
    assert node_port(gateway) != node.port
    assert bus_of(gateway).resyncs > reconnects_before
    assert f"NATS: disconnected from nats://127.0.0.1:{node.port}" in caplog.text
    assert f"NATS: reconnected to nats://127.0.0.1:{node_port(gateway)}" in caplog.text

    # No wrong book: stop the market, and the client's book is the source's.
    simulator = source.listening.service.source
    source.loop.call_soon_threadsafe(simulator.unwatch, SYMBOL)  # type: ignore[union-attr]
    await asyncio.sleep(0.3)
    await drain(level2, book)
    expected = await asyncio.to_thread(source_book, source, SYMBOL, LEVELS)
    assert expected and book == expected
    await level1.close()
    await level2.close()
