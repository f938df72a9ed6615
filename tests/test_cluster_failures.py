"""Cluster failures as an operator meets them, each bounded in time: a source killed
(alone, or with a standby), a gateway killed.

What is killed runs as its own `caspian serve` process, killed with SIGKILL
as an operator's host would lose it, over a real NATS server (with
JetStream, for the source election).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import nats
import orjson
import pytest
from nats.aio.msg import Msg

from caspian.bus.liveness import SourceLiveness
from tests.support.cli import cli_env, ok
from tests.support.client import Message, StreamClient, apply_level2
from tests.support.nats import NatsServer
from tests.support.service import RunningService, start_service
from tests.test_nats import drain

SYMBOL = "FX-BTC/USD=GEMINI"
TIMEOUT_S = 1.0


def test_liveness_counts_from_the_join_and_forgets_old_epochs() -> None:
    now = [0.0]
    liveness = SourceLiveness(3.0, clock=lambda: now[0])
    assert liveness.alive("a", since=0.0)
    now[0] = 2.0
    liveness.heard("a")
    now[0] = 4.9
    assert liveness.alive("a", since=0.0) and not liveness.alive("b", since=1.0)
    assert liveness.alive("b", since=2.0)
    assert liveness.sources() == {"a": pytest.approx(2.9)}
    now[0] = 5.1
    assert not liveness.alive("a", since=0.0)
    assert liveness.sources() == {}
    now[0] = 100.0
    liveness.heard("c")
    assert liveness.sources() == {"c": 0.0}


class ServeProcess:
    """`caspian serve` on the bus, in a process of its own (a source unless told otherwise)."""

    def __init__(self, data_dir: Path, nats_url: str, **env: str) -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        settings = {
            "CASPIAN_BUS": nats_url,
            "CASPIAN_PORT": "0",
            "CASPIAN_MAINTENANCE": "off",
            "CASPIAN_SIMULATOR_RATE": "40",
            "CASPIAN_SOURCE_TIMEOUT_S": str(TIMEOUT_S),
            "CASPIAN_LOG_LEVEL": "warning",
        }
        self.process = subprocess.Popen(
            [sys.executable, "-m", "caspian", "serve"],
            env=cli_env(data_dir, **(settings | env)),
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            start_new_session=True,
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        assert "Caspian REST API" in line, line
        self.rest_url = line.split()[-1]
        self.stream_url = self.process.stdout.readline().split()[-1]

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(10)


@pytest.fixture
def gateway(nats_server: NatsServer, tmp_path: Path) -> Iterator[RunningService]:
    running = start_service(
        tmp_path / "gateway", bus=nats_server.url, source="none", source_timeout_s=TIMEOUT_S
    )
    yield running
    running.stop()


async def next_state(client: StreamClient, kind: str, predicate: Any, within: float) -> Message:
    return await client.wait_for(lambda m: m["type"] == kind and predicate(m), within)


async def level1_and_level2(gateway: RunningService) -> tuple[StreamClient, StreamClient]:
    """Two clients of the gateway, on SYMBOL's Level1 and its top 10, once both stream."""
    token = await asyncio.to_thread(gateway.token)
    level1 = await StreamClient.open(gateway.stream_url, token)
    level2 = await StreamClient.open(gateway.stream_url, token)
    await level1.subscribe(SYMBOL, "Level1", conflation="None")
    await level2.subscribe(SYMBOL, "Level2", numberOfLevels=10, conflation="None")
    await next_state(level1, "Level1", lambda m: "bid" in m["payload"], 20)
    await next_state(level2, "Level2", lambda m: m["payload"], 20)
    return level1, level2


async def seen_down(level1: StreamClient, level2: StreamClient, within: float) -> None:
    await next_state(level2, "Level2", lambda m: m["depthStream"] == "disconnected", within)
    await next_state(
        level1,
        "Level1",
        lambda m: m["bboStream"] == "disconnected" and m["tradeStream"] == "disconnected",
        within,
    )


async def whole_again(level2: StreamClient, within: float) -> dict[Any, float]:
    """A whole, connected top 10 again, and the book it makes with the next 30 updates."""
    whole = await next_state(
        level2,
        "Level2",
        lambda m: m["depthStream"] == "connected" and len(m["payload"]) >= 20,
        within,
    )
    book: dict[Any, float] = {}
    apply_level2(book, whole)
    for _ in range(30):
        message = await next_state(level2, "Level2", lambda m: True, 10)
        assert message["depthStream"] == "connected"
        apply_level2(book, message)
    assert sum(1 for side, _ in book if side == "bid") == 10
    assert sum(1 for side, _ in book if side == "ask") == 10
    return book


async def test_a_killed_source_is_shown_to_every_client_within_the_timeout(
    nats_server: NatsServer, gateway: RunningService, tmp_path: Path
) -> None:
    source = await asyncio.to_thread(ServeProcess, tmp_path / "source", nats_server.url)
    restarted: ServeProcess | None = None
    try:
        level1, level2 = await level1_and_level2(gateway)
        loop = asyncio.get_running_loop()
        killed_at = loop.time()
        await asyncio.to_thread(source.kill)
        await seen_down(level1, level2, 10)
        assert loop.time() - killed_at <= TIMEOUT_S + 1

        # A source back: a whole top-N, the streams up again, and a book that stays whole.
        restarted = await asyncio.to_thread(ServeProcess, tmp_path / "again", nats_server.url)
        book = await whole_again(level2, 20)
        best_bid = max(price for side, price in book if side == "bid")
        best_ask = min(price for side, price in book if side == "ask")
        assert best_bid < best_ask
        await next_state(
            level1,
            "Level1",
            lambda m: m["bboStream"] == "connected" and m["tradeStream"] == "connected",
            20,
        )
        await level1.close()
        await level2.close()
    finally:
        source.kill()
        if restarted is not None:
            restarted.kill()


async def test_a_quiet_symbol_is_not_taken_for_a_dead_source(
    nats_server: NatsServer, gateway: RunningService, tmp_path: Path
) -> None:
    source = start_service(
        tmp_path / "quiet",
        bus=nats_server.url,
        simulator_rate=0.2,
        source_timeout_s=TIMEOUT_S,
    )
    try:
        client = await StreamClient.open(gateway.stream_url, await asyncio.to_thread(gateway.token))
        await client.subscribe(SYMBOL, "Level2", conflation="None")
        await next_state(client, "Level2", lambda m: m["payload"], 20)
        # Several timeouts with hardly an event: nothing may say disconnected.
        with contextlib.suppress(TimeoutError):
            message = await next_state(
                client, "Level2", lambda m: m["depthStream"] == "disconnected", 4 * TIMEOUT_S
            )
            pytest.fail(f"a quiet symbol was marked down: {message}")
        await client.close()
    finally:
        source.stop()


async def test_a_standby_source_takes_over_from_a_killed_one(
    nats_server: NatsServer, gateway: RunningService, tmp_path: Path
) -> None:
    epochs: list[str] = []
    beating: list[str] = []
    watcher = await nats.connect(nats_server.url)

    async def on_event(msg: Msg) -> None:
        epoch = orjson.loads(msg.data)["epoch"]
        if not epochs or epochs[-1] != epoch:
            epochs.append(epoch)

    async def on_heartbeat(msg: Msg) -> None:
        epoch = orjson.loads(msg.data)["epoch"]
        if epoch not in beating:
            beating.append(epoch)

    async def started(name: str) -> tuple[ServeProcess, str]:
        """A source process, and its epoch: the first heartbeat not heard before."""
        # Counted before the start: the process may beat before it prints its address.
        known = len(beating)
        process = await asyncio.to_thread(ServeProcess, tmp_path / name, nats_server.url)
        for _ in range(100):
            if len(beating) > known:
                return process, beating[known]
            await asyncio.sleep(0.05)
        raise AssertionError("the source never beat")

    await watcher.subscribe("caspian.md.>", cb=on_event)
    await watcher.subscribe("caspian.heartbeat", cb=on_heartbeat)
    first, first_epoch = await started("first")
    second, second_epoch = await started("second")
    try:
        token = await asyncio.to_thread(gateway.token)
        client = await StreamClient.open(gateway.stream_url, token)
        await client.subscribe(SYMBOL, "Level2", numberOfLevels=10, conflation="None")
        book: dict[Any, float] = {}
        apply_level2(book, await next_state(client, "Level2", lambda m: m["payload"], 20))
        for _ in range(20):
            apply_level2(book, await next_state(client, "Level2", lambda m: True, 10))
        # One instance serves the symbol; which one, the events' epoch tells.
        assert len(epochs) == 1, epochs
        kv = await watcher.jetstream().key_value("caspian_sources")
        leader = (await kv.get("GEMINI")).value
        assert leader is not None and leader.decode() == epochs[0]
        serving, standby, standby_epoch = (
            (first, second, second_epoch)
            if epochs[0] == first_epoch
            else (second, first, first_epoch)
        )

        loop = asyncio.get_running_loop()
        killed_at = loop.time()
        await asyncio.to_thread(serving.kill)
        down = await next_state(client, "Level2", lambda m: m["depthStream"] == "disconnected", 10)
        apply_level2(book, down)
        assert loop.time() - killed_at <= TIMEOUT_S + 1
        whole = await next_state(
            client, "Level2", lambda m: m["depthStream"] == "connected" and m["payload"], 15
        )
        took_over = loop.time() - killed_at
        apply_level2(book, whole)
        assert took_over <= TIMEOUT_S + 5, took_over
        assert epochs[1:] == [standby_epoch], epochs
        metrics = (await asyncio.to_thread(httpx.get, f"{gateway.base_url}/metrics")).text
        assert "caspian_bus_source_changes_total 0.0" not in metrics
        assert f'caspian_bus_source_silence_seconds{{epoch="{standby_epoch}"}}' in metrics
        for _ in range(20):
            apply_level2(book, await next_state(client, "Level2", lambda m: True, 10))
        # Freeze the market, then the book must be exactly what a newcomer is given.
        await asyncio.to_thread(standby.kill)
        await next_state(client, "Level2", lambda m: m["depthStream"] == "disconnected", 10)
        await drain(client, book)
        newcomer = await StreamClient.open(gateway.stream_url, token)
        await newcomer.subscribe(SYMBOL, "Level2", numberOfLevels=10, conflation="None")
        fresh: dict[Any, float] = {}
        apply_level2(fresh, await next_state(newcomer, "Level2", lambda m: m["payload"], 10))
        assert book == fresh
        assert len(epochs) == 2, epochs
        await client.close()
        await newcomer.close()
    finally:
        first.kill()
        second.kill()
        await watcher.close()


async def test_a_source_that_loses_its_lease_says_so_and_serves_again_once_free(
    nats_server: NatsServer, gateway: RunningService, tmp_path: Path
) -> None:
    """A source whose exchange's lease is taken from it stops serving the exchange but
    still beats: before, its gateways' clients saw the feed go quiet, still connected."""
    source = start_service(
        tmp_path / "source", bus=nats_server.url, simulator_rate=40.0, source_timeout_s=TIMEOUT_S
    )
    intruder = await nats.connect(nats_server.url)
    try:
        level1, level2 = await level1_and_level2(gateway)
        kv = await intruder.jetstream().key_value("caspian_sources")
        loop = asyncio.get_running_loop()
        taken_at = loop.time()
        await kv.put("GEMINI", b"another instance")
        # Within one renewal (a third of the timeout) and the delivery.
        await seen_down(level1, level2, 5)
        assert loop.time() - taken_at <= TIMEOUT_S + 1

        # The other instance lets go: the source wins it back, and clients a whole top-N.
        await kv.delete("GEMINI")
        await whole_again(level2, 10)
        await next_state(level1, "Level1", lambda m: m["bboStream"] == "connected", 10)
        await level1.close()
        await level2.close()
    finally:
        await intruder.close()
        source.stop()


async def test_clients_of_a_killed_gateway_resume_on_another_with_the_same_token(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    source = start_service(tmp_path / "source", bus=nats_server.url, source_timeout_s=TIMEOUT_S)
    shared = tmp_path / "gateways"
    gateways: list[ServeProcess] = []
    try:
        # Two gateway-only instances on one store and signing key, as a cluster shares them.
        for _ in range(2):
            gateways.append(
                await asyncio.to_thread(
                    ServeProcess, shared, nats_server.url, CASPIAN_SOURCE="none"
                )
            )
        first, second = gateways
        key = orjson.loads(ok(shared, "keys", "create", "--user", "alice", "--json"))
        login = {
            "type": "Key",
            "payload": {
                "accessKeyID": key["accessKeyID"],
                "secretAccessKey": key["secretAccessKey"],
            },
        }
        response = await asyncio.to_thread(
            httpx.post, f"{first.rest_url}/auth/authenticate", json=login, timeout=30
        )
        token = response.json()["accessToken"]
        client = await StreamClient.open(first.stream_url, token)
        await client.subscribe(SYMBOL, "Level2", numberOfLevels=10, conflation="None")
        await next_state(client, "Level2", lambda m: m["payload"], 20)

        await asyncio.to_thread(first.kill)
        # The connection ends without a close frame: the client knows at once.
        assert await client.closed_with(within=5) is None
        again = await StreamClient.open(second.stream_url, token)
        await again.subscribe(SYMBOL, "Level2", numberOfLevels=10, conflation="None")
        whole = await next_state(again, "Level2", lambda m: len(m["payload"]) >= 20, 20)
        assert whole["depthStream"] == "connected"
        await next_state(again, "Level2", lambda m: m["payload"], 10)
        await again.close()
    finally:
        for gateway in gateways:
            gateway.kill()
        source.stop()
