"""Expired dated products stay in the reference data, but are neither served nor simulated.

"Expired" is judged against the service's clock, which these tests move instead
of waiting: a product that expires while the service runs stops being served.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path

import httpx

from caspian.catalog.builtin import builtin_products
from caspian.codes import Stream, StreamState
from caspian.events import BookEvent, Event, StatusEvent
from caspian.service import Service, sim_product
from caspian.sources.simulator import Simulator
from caspian.timefmt import parse_us
from tests.support.client import StreamClient
from tests.support.service import RunningService, start_service

PRODUCTS = {product.caspian_code: product for product in builtin_products()}
FUTURE = "FUT-BTC/USDT-2023DEC29=BINANCE"
OPTION = "OPT-BTC/USD-2024JAN26-39000-C=DERIBIT"
OPTION_EXPIRES = parse_us("2024-01-26T08:00:00")


def test_expiry_is_the_expire_date() -> None:
    option = PRODUCTS[OPTION]
    assert option.expires_us == OPTION_EXPIRES
    assert not option.expired(OPTION_EXPIRES - 1)
    assert option.expired(OPTION_EXPIRES)
    spot = PRODUCTS["FX-BTC/USDT=BINANCE"]
    assert spot.expires_us is None and not spot.expired(2**62)


class Collected:
    """A sink that keeps every event and wakes whoever waits for one."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self._arrived = asyncio.Event()

    def __call__(self, event: Event) -> None:
        self.events.append(event)
        self._arrived.set()

    async def until(self, done: Callable[[], bool], within: float = 10) -> None:
        async with asyncio.timeout(within):
            while not done():
                self._arrived.clear()
                await self._arrived.wait()


async def test_the_simulator_stops_a_product_when_it_expires() -> None:
    now = [OPTION_EXPIRES - 10_000_000]
    sink = Collected()
    simulator = Simulator(
        lambda symbol: sim_product(PRODUCTS[symbol]), rate=50.0, clock=lambda: now[0]
    )
    task = asyncio.create_task(simulator.run(sink))
    try:
        simulator.watch(OPTION)
        assert simulator.watched == {OPTION}
        await sink.until(
            lambda: any(isinstance(e, BookEvent) and not e.snapshot for e in sink.events)
        )
        now[0] = OPTION_EXPIRES
        await sink.until(lambda: OPTION not in simulator.watched)
        ended = len(sink.events)
        assert sink.events[-3:] == [
            StatusEvent(OPTION, OPTION_EXPIRES, stream, StreamState.DISCONNECTED)
            for stream in (Stream.BBO, Stream.TRADE, Stream.DEPTH)
        ]
        # Watched again (a source restart re-watches every symbol): still not simulated.
        simulator.watch(OPTION)
        assert simulator.watched == frozenset()
        await asyncio.sleep(0.1)
        assert len(sink.events) == ended
    finally:
        task.cancel()


async def test_an_expired_product_is_not_simulated() -> None:
    simulator = Simulator(lambda symbol: sim_product(PRODUCTS[symbol]))
    simulator.watch(FUTURE)
    assert simulator.watched == frozenset()
    simulator.watch("FX-BTC/USDT=BINANCE")
    assert simulator.watched == {"FX-BTC/USDT=BINANCE"}


def service_of(running: RunningService) -> Service:
    service = running.listening.service
    assert isinstance(service, Service)
    return service


async def test_expired_products_are_listed_but_refused_202(tmp_path: Path) -> None:
    running = start_service(tmp_path)
    try:
        token = await asyncio.to_thread(running.token)
        async with httpx.AsyncClient(base_url=running.base_url) as rest:
            response = await rest.get(
                f"/v1/reference/products/{FUTURE}", headers={"Authorization": token}
            )
        assert response.status_code == 200
        assert response.json()["expireDate"] == "2023-12-29T08:00:00.000000"

        c = await StreamClient.open(running.stream_url, token)
        for symbol, symbol_type in ((FUTURE, "Caspian"), ("BTCUSDT231229=BINANCE", "Pseudo")):
            request_id = await c.send(
                "Subscribe", {"symbol": symbol, "type": "Level1", "symbolType": symbol_type}
            )
            answer = (await c.response(request_id))["payload"]
            assert answer["code"] == 202, answer
            assert answer["message"] == (
                f"Invalid subscription symbol: {FUTURE} expired on "
                "2023-12-29T08:00:00.000000: it is not streamed"
            )
        await c.close()
    finally:
        running.stop()


async def test_a_product_expiring_while_the_service_runs_stops_being_served(
    tmp_path: Path,
) -> None:
    running = start_service(tmp_path)
    service = service_of(running)
    now = [OPTION_EXPIRES - 60_000_000]
    service.clock = lambda: now[0]
    try:
        token = await asyncio.to_thread(running.token)
        c = await StreamClient.open(running.stream_url, token)
        level1 = await c.subscribe(OPTION, "Level1")
        first = await c.wait_for(lambda m: m.get("requestId") == level1)
        assert first["bboStream"] == "connected", first
        now[0] = OPTION_EXPIRES
        # The streaming subscription is told its market is gone...
        await c.wait_for(
            lambda m: (
                m.get("requestId") == level1
                and m["bboStream"] == m["tradeStream"] == "disconnected"
            )
        )
        # ...and a new one is refused, saying why.
        request_id = await c.send("Subscribe", {"symbol": OPTION, "type": "Level2"})
        answer = (await c.response(request_id))["payload"]
        assert answer["code"] == 202 and "expired" in answer["message"], answer
        await c.close()
    finally:
        running.stop()


async def test_a_recording_of_an_expired_product_is_still_replayed(tmp_path: Path) -> None:
    # A recording is history: the future had not expired when it was recorded.
    book = {
        "symbol": FUTURE,
        "kind": "book",
        "snapshot": True,
        "bids": [[42000.1, 1.5]],
        "asks": [[42000.5, 2.0]],
    }
    lines = [{"ts": f"2023-12-01T00:00:0{second}.000000", **book} for second in range(3)]
    recording = tmp_path / "december.jsonl"
    recording.write_text("".join(json.dumps(line) + "\n" for line in lines))
    running = start_service(tmp_path / "data", source=f"replay:{recording}", replay_loop=True)
    try:
        c = await StreamClient.open(running.stream_url, await asyncio.to_thread(running.token))
        request_id = await c.subscribe(FUTURE, "Level1")
        update = await c.wait_for(
            lambda m: m.get("requestId") == request_id and bool(m.get("payload"))
        )
        assert update["payload"]["bid"] == 42000.1, update
        await c.close()
    finally:
        running.stop()
