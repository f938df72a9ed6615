"""The cluster's registry of stream sessions, against the started service over real sockets."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import socket
import threading
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from caspian.store import GatewayInfo, RegisteredSession, Store, StoreUnavailable
from tests.support.cli import fails, ok
from tests.support.client import StreamClient
from tests.support.postgres import running_server
from tests.support.service import RunningService, start_service

SYMBOL = "FX-BTC/USD=GEMINI"
OTHER = "FX-ETH/USD=GEMINI"
RECHECK_S = 0.3
STALE_S = 60.0


def login(running: RunningService, type_: str, payload: dict[str, str]) -> str:
    response = httpx.post(
        f"{running.base_url}/v1/auth/authenticate",
        json={"type": type_, "payload": payload},
        timeout=30,
    )
    response.raise_for_status()
    return str(response.json()["accessToken"])


async def two_clients(running: RunningService) -> tuple[StreamClient, str, StreamClient]:
    """A stream opened with alice's key (returned with its id), and one with bob's password."""
    key_id, secret = await asyncio.to_thread(running.key, "alice")
    key_token = await asyncio.to_thread(
        login, running, "Key", {"accessKeyID": key_id, "secretAccessKey": secret}
    )
    await asyncio.to_thread(running.call, running.listening.service.store.create_user("bob", "pw"))
    bob_token = await asyncio.to_thread(login, running, "Credential", {"user": "bob", "pass": "pw"})
    alice = await StreamClient.open(running.stream_url, key_token)
    bob = await StreamClient.open(running.stream_url, bob_token)
    for client in (alice, bob):
        await client.subscribe(SYMBOL, conflation="None")
    return alice, key_id, bob


def peer(client: StreamClient) -> str:
    host, port = client.ws.local_address[:2]
    return f"{host}:{port}"


async def still_served(client: StreamClient) -> None:
    """A new Subscribe is answered and streamed: the connection is open and served now."""
    request_id = await client.subscribe(OTHER)
    await client.wait_for(lambda m: m["type"] == "Level1" and m["requestId"] == request_id)
    done = await client.send("Unsubscribe", {"subscribeRequestId": request_id})
    assert (await client.response(done))["payload"]["code"] == 300


async def closed_soon(client: StreamClient) -> int | None:
    """The close code the server sends within a recheck round (with room for a loaded machine).

    Bounded as a whole: updates keep coming until then.
    """
    return await asyncio.wait_for(client.closed_with(), RECHECK_S + 3)


async def eventually(
    read: Callable[[], Any], done: Callable[[Any], bool], within: float = 15
) -> Any:
    """Call the blocking ``read`` in a thread until ``done`` accepts what it returns."""
    deadline = time.monotonic() + within
    while True:
        value = await asyncio.to_thread(read)
        if done(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"still {value!r} after {within} s")
        await asyncio.sleep(0.1)


def warned(caplog: pytest.LogCaptureFixture, text: str) -> int:
    """How many warnings so far say ``text``."""
    return sum(
        record.levelno == logging.WARNING and text in record.getMessage()
        for record in caplog.records
    )


def registered(running: RunningService) -> Callable[[], dict[str, RegisteredSession]]:
    """Reads the registry, by peer, through the service's own store."""
    store = running.listening.service.store

    def read() -> dict[str, RegisteredSession]:
        listed = running.call(store.list_sessions(STALE_S))
        return {row.session.peer: row for row in listed}

    return read


async def both_registered(
    running: RunningService,
) -> tuple[StreamClient, StreamClient, Callable[[], dict[str, RegisteredSession]], Any]:
    """``two_clients``' streams once both are in the registry: the clients, the
    registry reader (see ``registered``) and what it read."""
    alice, _, bob = await two_clients(running)
    read = registered(running)
    rows = await eventually(read, lambda rows: len(rows) == 2)
    return alice, bob, read, rows


async def test_sessions_are_listed_and_one_ended_closes_3003(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    running = start_service(data_dir, recheck_s=RECHECK_S)
    try:
        alice, key_id, bob = await two_clients(running)

        def listed() -> dict[str, dict[str, Any]]:
            rows = json.loads(ok(data_dir, "sessions", "list", "--json"))
            return {row["peer"]: row for row in rows}

        rows = await eventually(listed, lambda rows: len(rows) == 2)
        mine, bobs = rows[peer(alice)], rows[peer(bob)]
        assert (mine["user"], mine["accessKeyID"]) == ("alice", key_id)
        assert (bobs["user"], bobs["accessKeyID"]) == ("bob", None)
        for row in (mine, bobs):
            assert re.fullmatch(r"[0-9a-f]{16}", row["id"])
            # The service runs in this very process.
            assert (row["gatewayHost"], row["gatewayPid"]) == (socket.gethostname(), os.getpid())
            assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", row["opened"])
        # Ids are what `sessions end` takes: never shortened, even in 80 columns.
        table = await asyncio.to_thread(ok, data_dir, "sessions", "list", COLUMNS="80")
        assert mine["id"] in table and bobs["id"] in table
        wide = await asyncio.to_thread(ok, data_dir, "sessions", "list", COLUMNS="200")
        assert key_id in wide and peer(bob) in wide

        ended = await asyncio.to_thread(ok, data_dir, "sessions", "end", mine["id"])
        assert ended.strip() == f"ended {mine['id']}"
        assert await closed_soon(alice) == 3003
        await still_served(bob)
        assert list(await asyncio.to_thread(listed)) == [peer(bob)]
        error = await asyncio.to_thread(fails, data_dir, "sessions", "end", mine["id"])
        assert error == f"error: no session {mine['id']}"

        await bob.close()
        await eventually(listed, lambda rows: rows == {})
        assert (await asyncio.to_thread(ok, data_dir, "sessions", "list")).strip() == "no sessions"
    finally:
        running.stop()


async def test_a_gateway_purged_as_stale_registers_its_sessions_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    running = start_service(tmp_path / "data", recheck_s=RECHECK_S)
    try:
        alice, bob, read, before = await both_registered(running)
        service = running.listening.service
        # Another instance whose limit of staleness this gateway has passed purges it.
        other = GatewayInfo("other-instance", "elsewhere", 1, datetime(2026, 1, 1))
        await asyncio.to_thread(running.call, service.store.sync_gateway(other, [], [], 0.0))

        await eventually(lambda: warned(caplog, "purged from the session registry"), bool)
        after = await eventually(read, lambda rows: len(rows) == 2)
        assert {row.session.id for row in after.values()} == {
            row.session.id for row in before.values()
        }
        assert set(after) == {peer(alice), peer(bob)}
        for client in (alice, bob):
            await still_served(client)

        # A clean shutdown takes this gateway and its sessions out of the registry.
        await asyncio.to_thread(running.stop)
        store = Store(running.settings.resolved_database_url)
        try:
            assert await store.list_sessions(STALE_S) == []
        finally:
            await store.close()
    finally:
        if running.thread.is_alive():
            running.stop()


async def test_failed_syncs_keep_every_session_open(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    running = start_service(tmp_path / "data", recheck_s=RECHECK_S)
    try:
        alice, bob, read, rows = await both_registered(running)
        gateway = running.listening.service.gateway
        working = gateway._sync_sessions
        failed = 0
        rounds = threading.Event()

        async def broken(*args: Any) -> Any:
            nonlocal failed
            failed += 1
            if failed == 4:
                rounds.set()
            raise StoreUnavailable("could not access the database (OSError)")

        gateway._sync_sessions = broken
        # Ended while the gateway cannot sync: nothing may close until it can again.
        store = running.listening.service.store
        await asyncio.to_thread(running.call, store.end_session(rows[peer(alice)].session.id))
        assert await asyncio.to_thread(rounds.wait, 10)
        for client in (alice, bob):
            await still_served(client)
        assert warned(caplog, "could not re-check stream sessions") >= 4

        gateway._sync_sessions = working
        assert await closed_soon(alice) == 3003
        await still_served(bob)
        assert set(await asyncio.to_thread(read)) == {peer(bob)}
    finally:
        running.stop()


async def test_a_store_outage_keeps_every_session_open(tmp_path: Path) -> None:
    # A server of its own: stopping the shared one would disturb other tests.
    with running_server() as server:
        running = start_service(tmp_path / "data", database_url=server.url, recheck_s=RECHECK_S)
        try:
            alice, bob, read, rows = await both_registered(running)

            await asyncio.to_thread(server.stop)
            # Several recheck rounds fail meanwhile.
            await asyncio.sleep(8 * RECHECK_S)
            for client in (alice, bob):
                await still_served(client)
            await asyncio.to_thread(server.start)

            def read_when_back() -> dict[str, RegisteredSession] | None:
                try:
                    return read()
                except StoreUnavailable:
                    return None

            back = await eventually(read_when_back, lambda rows: rows is not None)
            assert back == rows
            store = running.listening.service.store
            await asyncio.to_thread(running.call, store.end_session(back[peer(bob)].session.id))
            assert await closed_soon(bob) == 3003
            await still_served(alice)
        finally:
            running.stop()
