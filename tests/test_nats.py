"""Two service instances on a real NATS server: one runs the source, the other only a gateway."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import nats
import orjson
import pytest

from caspian.bus.nats import NatsBus, symbol_token
from caspian.events import BookEvent, TradeEvent
from caspian.settings import Settings
from caspian.timefmt import now_us
from tests.support.client import StreamClient, apply_level2
from tests.support.nats import NatsServer
from tests.support.ports import free_port
from tests.support.service import RunningService, start_service

SYMBOL = "FX-BTC/USD=GEMINI"


@pytest.fixture
def cluster(
    nats_server: NatsServer, tmp_path: Path
) -> Iterator[tuple[RunningService, RunningService]]:
    source = start_service(tmp_path / "a", bus=nats_server.url, simulator_rate=40.0)
    gateway = start_service(tmp_path / "b", bus=nats_server.url, source="none")
    yield source, gateway
    gateway.stop()
    source.stop()


def bus_of(running: RunningService) -> NatsBus:
    bus = running.listening.service.bus
    assert isinstance(bus, NatsBus)
    return bus


def source_book(running: RunningService, symbol: str, levels: int) -> dict[Any, float]:
    """The book as the source side of the bus holds it, top ``levels`` per side."""

    async def read() -> dict[Any, float]:
        side = bus_of(running)._source_side
        assert side is not None
        book: dict[Any, float] = {}
        for event in side._tracker.catch_up(symbol):
            if isinstance(event, BookEvent) and event.snapshot:
                bids = sorted(event.bids, reverse=True)[:levels]
                asks = sorted(event.asks)[:levels]
                book = {("bid", p): s for p, s in bids} | {("ask", p): s for p, s in asks}
        return book

    return running.call(read())


async def drain(client: StreamClient, book: dict[Any, float]) -> None:
    while True:
        try:
            message = await client.recv(0.5)
        except TimeoutError:
            return
        if message["type"] == "Level2":
            apply_level2(book, message)


async def test_a_gateway_without_source_streams_the_other_instances_book(
    cluster: tuple[RunningService, RunningService],
) -> None:
    source, gateway = cluster
    token = await asyncio.to_thread(gateway.token)
    client = await StreamClient.open(gateway.stream_url, token)
    await client.subscribe(SYMBOL, "Level2", numberOfLevels=10, conflation="None")
    book: dict[Any, float] = {}
    for _ in range(60):
        message = await client.wait_for(lambda m: m["type"] == "Level2")
        apply_level2(book, message)
    assert sum(1 for side, _ in book if side == "bid") == 10
    # The source instance watches the symbol only because the gateway asked.
    simulator = source.listening.service.source
    assert SYMBOL in simulator.watched  # type: ignore[union-attr]
    # Stop the market, then the client's book must be the source's top 10.
    source.loop.call_soon_threadsafe(simulator.unwatch, SYMBOL)  # type: ignore[union-attr]
    await asyncio.sleep(0.3)
    await drain(client, book)
    expected = await asyncio.to_thread(source_book, source, SYMBOL, 10)
    assert expected and book == expected
    await client.close()


async def test_interest_follows_the_gateways_clients(
    cluster: tuple[RunningService, RunningService],
) -> None:
    source, gateway = cluster
    simulator = source.listening.service.source
    client = await StreamClient.open(gateway.stream_url, await asyncio.to_thread(gateway.token))
    request_id = await client.subscribe(SYMBOL, "Level1", conflation="None")
    await client.wait_for(lambda m: m["type"] == "Level1" and "bid" in m["payload"])
    unsubscribe = await client.send("Unsubscribe", {"subscribeRequestId": request_id})
    await client.response(unsubscribe)
    for _ in range(50):
        if SYMBOL not in simulator.watched:  # type: ignore[union-attr]
            break
        await asyncio.sleep(0.1)
    assert SYMBOL not in simulator.watched  # type: ignore[union-attr]
    await client.close()


async def test_a_sequence_gap_resyncs_with_a_whole_book(
    cluster: tuple[RunningService, RunningService], nats_server: NatsServer
) -> None:
    source, gateway = cluster
    client = await StreamClient.open(gateway.stream_url, await asyncio.to_thread(gateway.token))
    await client.subscribe(SYMBOL, "Level2", numberOfLevels=5, conflation="None")
    book: dict[Any, float] = {}
    for _ in range(20):
        apply_level2(book, await client.wait_for(lambda m: m["type"] == "Level2"))
    side = bus_of(source)._source_side
    assert side is not None
    # A message numbered far ahead, as if others had been lost on the way.
    intruder = await nats.connect(nats_server.url)
    await intruder.publish(
        f"caspian.md.{symbol_token(SYMBOL)}",
        orjson.dumps(
            {
                "ts": "2026-01-01T00:00:00.000000",
                "symbol": SYMBOL,
                "kind": "trade",
                "price": 1.0,
                "size": 1.0,
                "seq": 10**9,
                "epoch": side.epoch,
            }
        ),
    )
    await intruder.flush()
    await intruder.close()
    gone = await client.wait_for(
        lambda m: m["type"] == "Level2" and m["depthStream"] == "disconnected", within=5
    )
    apply_level2(book, gone)
    back = await client.wait_for(
        lambda m: m["type"] == "Level2" and m["depthStream"] == "connected" and bool(m["payload"]),
        within=5,
    )
    apply_level2(book, back)
    # The resync message holds the whole top 5 of both sides.
    assert sum(1 for level in back["payload"] if level["size"] > 0) == 10
    assert bus_of(gateway).resyncs >= 1
    simulator = source.listening.service.source
    source.loop.call_soon_threadsafe(simulator.unwatch, SYMBOL)  # type: ignore[union-attr]
    await asyncio.sleep(0.3)
    await drain(client, book)
    assert book == await asyncio.to_thread(source_book, source, SYMBOL, 5)
    await client.close()


async def level1_through_an_outage(
    gateway: RunningService, nats_server: NatsServer, conflation: str
) -> StreamClient:
    """A Level1 client of the gateway, once it has seen quotes and then NATS stop."""
    client = await StreamClient.open(gateway.stream_url, await asyncio.to_thread(gateway.token))
    await client.subscribe(SYMBOL, "Level1", conflation=conflation)
    await client.wait_for(lambda m: m["bboStream"] == "connected" and "bid" in m["payload"])
    await asyncio.to_thread(nats_server.stop)
    await client.wait_for(lambda m: m["bboStream"] == "disconnected", within=10)
    return client


async def test_nats_outage_is_visible_and_recovers(
    cluster: tuple[RunningService, RunningService], nats_server: NatsServer
) -> None:
    _, gateway = cluster
    client = await level1_through_an_outage(gateway, nats_server, "1s")
    # Each stream's change goes out at once, one message each.
    await client.wait_for(lambda m: m["tradeStream"] == "disconnected", within=5)
    await asyncio.to_thread(nats_server.start)
    await client.wait_for(lambda m: m["bboStream"] == "connected", within=20)
    await client.close()


async def test_events_flow_again_after_an_outage_that_overflowed_the_publish_buffer(
    cluster: tuple[RunningService, RunningService], nats_server: NatsServer
) -> None:
    """nats-py refuses a publish once its buffer for the reconnect is full: that error
    ended the source's publishing for good, while its heartbeat went on, so gateways'
    clients got a connected feed that never moved again."""
    source, gateway = cluster
    client = await level1_through_an_outage(gateway, nats_server, "None")

    async def busy_feed() -> None:
        """Over 2 MiB of trades while NATS is away, as a busy exchange would send."""
        side = bus_of(source)._source_side
        assert side is not None
        for number in range(20_000):
            side.publish(TradeEvent(SYMBOL, now_us(), 1.0, 1.0, f"t{number:0100d}"))
            if number % 500 == 0:
                await asyncio.sleep(0)

    await asyncio.to_thread(source.call, busy_feed())
    await asyncio.sleep(0.5)
    await asyncio.to_thread(nats_server.start)
    await client.wait_for(lambda m: m["bboStream"] == "connected", within=20)
    # Not only the snapshot of the reconnect: the feed moves again.
    stamps: set[str] = set()
    while len(stamps) < 10:
        update = await client.wait_for(
            lambda m: m["type"] == "Level1" and "bboCaspianTimestamp" in m["payload"], within=5
        )
        stamps.add(update["payload"]["bboCaspianTimestamp"])
    metrics = (await asyncio.to_thread(httpx.get, f"{source.base_url}/metrics")).text
    assert 'caspian_bus_publish_failures_total{error="OutboundBufferLimitError"}' in metrics
    await client.close()


async def test_instances_on_one_host_share_a_port(nats_server: NatsServer, tmp_path: Path) -> None:
    """One source instance and one gateway-only instance on the same port: the
    kernel spreads the connections over both, and every client is served."""
    port = free_port()
    shared = {"port": port, "reuse_port": True, "bus": nats_server.url}
    # One store and one signing key (the same data directory), so a token works on both.
    source = start_service(tmp_path, simulator_rate=40.0, **shared)
    gateway = start_service(tmp_path, source="none", **shared)
    try:
        assert source.stream_url == gateway.stream_url
        token = await asyncio.to_thread(source.token)
        clients = [await StreamClient.open(source.stream_url, token) for _ in range(24)]
        for client in clients:
            await client.subscribe(SYMBOL, conflation="None")
        for running in (source, gateway):
            assert running.listening.service.gateway.connections, "one instance got none"
        for client in clients:
            update = await client.wait_for(
                lambda m: m["type"] == "Level1" and "bid" in m["payload"]
            )
            assert update["payload"]["bid"] < update["payload"]["ask"]
            await client.close()
    finally:
        gateway.stop()
        source.stop()


def test_a_gateway_without_source_needs_nats(tmp_path: Path) -> None:
    from caspian.service import Service

    with pytest.raises(ValueError, match="nats"):
        Service(Settings(data_dir=tmp_path, source="none", maintenance="off"))
