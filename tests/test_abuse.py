"""Hostile and careless clients against the started service: each attack is bounded.

Every test here is an attack from issue 9 that once hurt the service or its
other clients: it must be refused with a documented status or code, within
a stated time, and the others must not notice.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from sqlalchemy.pool import QueuePool

from caspian.gateway import session as session_module
from tests.support.client import StreamClient, client_frame
from tests.support.service import RunningService, start_service

SYMBOL = "FX-BTC/USD=GEMINI"


@pytest.fixture
def running(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[RunningService]:
    marker = request.node.get_closest_marker("settings")
    overrides: dict[str, Any] = dict(marker.kwargs) if marker else {}
    service = start_service(tmp_path, **overrides)
    yield service
    service.stop()


def address(service: RunningService) -> tuple[str, int]:
    host, port = service.base_url.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


async def raw(service: RunningService) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(*address(service))


async def status_of(reader: asyncio.StreamReader, within: float = 5) -> int | None:
    """The status of the response the server sends, or None if it closed without one."""
    line = await asyncio.wait_for(reader.readline(), within)
    if not line:
        return None
    return int(line.split()[1])


async def closed(reader: asyncio.StreamReader, within: float) -> bool:
    """Reads until the server closes the connection; False if it is still open after ``within``."""
    try:
        async with asyncio.timeout(within):
            while await reader.read(65_536):
                pass
    except TimeoutError:
        return False
    except ConnectionResetError:
        pass
    return True


@pytest.mark.settings(max_connections_per_address=20, handshake_timeout_s=60)
async def test_connections_per_address_are_limited_with_429(running: RunningService) -> None:
    idle = [await raw(running) for _ in range(20)]
    reader, writer = await raw(running)
    assert await status_of(reader) == 429
    assert b"Too many open connections" in await reader.read()
    writer.close()
    # Closing one frees its place.
    idle[0][1].close()
    await asyncio.sleep(0.2)
    reader, writer = await raw(running)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert await status_of(reader) == 200
    for _, w in [*idle[1:], (reader, writer)]:
        w.close()


@pytest.mark.settings(max_connections=10, handshake_timeout_s=60)
async def test_total_connections_are_limited_with_503(running: RunningService) -> None:
    idle = [await raw(running) for _ in range(10)]
    reader, writer = await raw(running)
    assert await status_of(reader) == 503
    writer.close()
    for _, w in idle:
        w.close()


@pytest.mark.settings(handshake_timeout_s=1.0)
async def test_idle_and_slowloris_connections_are_closed_408(running: RunningService) -> None:
    loop = asyncio.get_running_loop()
    silent_reader, silent = await raw(running)
    slow_reader, slow = await raw(running)
    started = loop.time()
    slow.write(b"GET /v1/reference/exchanges HTTP/1.1\r\nHost: x\r\n")

    async def trickle() -> None:
        for index in range(100):
            await asyncio.sleep(0.2)
            if slow.is_closing():
                return
            try:
                slow.write(f"X-Slow-{index}: a\r\n".encode())
                await slow.drain()
            except ConnectionError:
                return

    dribbler = asyncio.create_task(trickle())
    assert await status_of(silent_reader) == 408
    assert await status_of(slow_reader) == 408
    assert loop.time() - started < 3
    dribbler.cancel()
    # A well-behaved client is not affected.
    reader, writer = await raw(running)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert await status_of(reader) == 200
    for w in (silent, slow, writer):
        w.close()


@pytest.mark.settings(max_header_bytes=8192, max_headers=50)
@pytest.mark.parametrize(
    "head",
    [
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\n" + b"".join(b"X-%d: a\r\n" % i for i in range(60)) + b"\r\n",
        b"GET /v1/stream?accessToken=" + b"a" * 20_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    ],
    ids=["large-header", "many-headers", "long-url"],
)
async def test_request_heads_over_the_limits_get_431(running: RunningService, head: bytes) -> None:
    reader, writer = await raw(running)
    writer.write(head)
    assert await status_of(reader) == 431
    writer.close()


@pytest.mark.settings(max_header_bytes=8192)
async def test_an_endless_header_block_is_cut_off_early(running: RunningService) -> None:
    _, writer = await raw(running)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
    sent = 0
    with pytest.raises(ConnectionError):
        while sent < 50_000_000:
            writer.write(b"X-Endless: " + b"a" * 1000 + b"\r\n")
            await writer.drain()
            sent += 1013
    # Cut off long before the client could make the server hold megabytes.
    assert sent < 5_000_000
    writer.close()


@pytest.mark.settings(max_subscriptions=1000)
async def test_every_request_sent_before_the_token_check_is_answered(
    running: RunningService,
) -> None:
    token = await asyncio.to_thread(running.token)
    c = await StreamClient.open(running.stream_url, token)
    symbols = [SYMBOL, "FX-ETH/USD=GEMINI"]
    count = 800
    # All at once, before the server has answered anything.
    for index in range(count):
        payload = {"symbol": symbols[index % 2], "type": "Level1" if index < 2 else "Level2"}
        await c.send("Subscribe", payload, request_id=f"s{index}")
    answered: dict[str, int] = {}
    while len(answered) < count:
        message = await c.recv(within=20)
        if message["type"] == "ProtocolError":
            pytest.fail(f"a request was dropped: {message}")
        if message["type"] == "SubscribeResponse":
            assert message["requestId"] not in answered
            answered[message["requestId"]] = message["payload"]["code"]
    assert answered["s0"] == answered["s1"] == 200
    assert answered["s2"] == answered["s3"] == 200
    # The same symbol and type again: 204 for every later one.
    assert set(list(answered.values())[4:]) == {204}
    await c.close()


async def gaps_while(client: StreamClient, work: asyncio.Task[Any], seconds: float) -> float:
    """The longest wait between Level2 updates to ``client`` over the next ``seconds``."""
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    last = loop.time()
    longest = 0.0
    while loop.time() < end and not work.done():
        message = await client.recv(within=10)
        if message["type"] == "Level2":
            now = loop.time()
            longest = max(longest, now - last)
            last = now
    return longest


@pytest.mark.settings(
    simulator_rate=50.0,
    max_messages_per_s=5000.0,
    max_message_burst=500,
    max_token_refreshes_per_s=50.0,
)
async def test_a_token_refresh_flood_is_answered_at_a_bounded_rate_not_at_others_expense(
    running: RunningService,
) -> None:
    watcher = await StreamClient.open(running.stream_url, await asyncio.to_thread(running.token))
    await watcher.subscribe(SYMBOL, type_="Level2", conflation="None")
    token = await asyncio.to_thread(running.token, "mallory")
    flooder = await StreamClient.open(running.stream_url, token)
    count = 300
    frames = b"".join(
        client_frame(
            0x1,
            orjson.dumps(
                {"requestId": f"t{i}", "type": "TokenRefresh", "payload": {"accessToken": token}}
            ),
        )
        for i in range(count)
    )

    async def flood() -> dict[str, int]:
        flooder.ws.transport.write(frames)
        codes: dict[str, int] = {}
        while len(codes) < count:
            message = await flooder.recv(within=30)
            assert message["type"] == "TokenRefreshResponse", message
            codes[message["requestId"]] = message["payload"]["code"]
        return codes

    loop = asyncio.get_running_loop()
    started = loop.time()
    work = asyncio.create_task(flood())
    longest = await gaps_while(watcher, work, 3.0)
    codes = await asyncio.wait_for(work, 60)
    # Every one answered, no faster than the TokenRefresh rate allows.
    assert set(codes.values()) == {200}
    assert loop.time() - started >= (count - 5) / 50.0
    assert longest < 1.0, f"the watcher waited {longest:.2f} s for an update"
    # It stopped reading a stream of updates: its closing handshake would wait
    # behind them.
    watcher.ws.transport.abort()
    await flooder.close()


@pytest.mark.settings(
    max_messages_per_s=5000.0,
    max_message_burst=1000,
    max_messages_per_s_per_principal=50.0,
    max_message_burst_per_principal=20,
)
async def test_one_key_flooding_on_many_connections_shares_one_rate(
    running: RunningService,
) -> None:
    """Connections of one key are held to one rate together; another key is not slowed."""
    token = await asyncio.to_thread(running.token, "mallory")
    flooders = [await StreamClient.open(running.stream_url, token) for _ in range(3)]
    count = 40

    async def flood(client: StreamClient, tag: str) -> int:
        client.ws.transport.write(
            b"".join(
                client_frame(0x1, f'{{"requestId":"{tag}{i}"}}'.encode()) for i in range(count)
            )
        )
        for _ in range(count):
            message = await client.recv(within=30)
            assert message["type"] == "ProtocolError", message
        return count

    loop = asyncio.get_running_loop()
    started = loop.time()
    work = [asyncio.create_task(flood(client, f"f{n}-")) for n, client in enumerate(flooders)]
    await asyncio.sleep(0.2)
    other = await StreamClient.open(running.stream_url, await asyncio.to_thread(running.token))
    other_started = loop.time()
    await flood(other, "o")
    assert loop.time() - other_started < 1.0
    assert sum(await asyncio.gather(*work)) == 3 * count
    # 120 answers at 50 a second after a burst of 20; each connection alone
    # would have been answered at once.
    assert loop.time() - started >= (3 * count - 20) / 50.0 - 0.1
    for client in (*flooders, other):
        await client.close()


@pytest.mark.settings(max_streams_per_principal=3)
async def test_streams_per_key_are_limited_with_3008(running: RunningService) -> None:
    token = await asyncio.to_thread(running.token, "greedy")
    open_ = [await StreamClient.open(running.stream_url, token) for _ in range(3)]
    for c in open_:
        await c.subscribe(SYMBOL)
    extra = await StreamClient.open(running.stream_url, token)
    assert await extra.closed_with(within=5) == 3008
    # Another key is not affected, and a closed stream frees its place.
    other = await StreamClient.open(running.stream_url, await asyncio.to_thread(running.token))
    await other.subscribe(SYMBOL)
    await open_[0].close()
    await asyncio.sleep(0.2)
    again = await StreamClient.open(running.stream_url, token)
    await again.subscribe(SYMBOL)
    for c in (*open_[1:], other, again):
        await c.close()


async def test_a_flood_of_internal_errors_logs_a_summary_not_a_traceback_each(
    running: RunningService, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(self: Any, request_id: str, payload: dict[str, Any]) -> Any:
        raise RuntimeError("the unforeseen")

    monkeypatch.setitem(session_module._HANDLERS, "Unsubscribe", broken)
    c = await StreamClient.open(running.stream_url, await asyncio.to_thread(running.token))
    count = 400
    with caplog.at_level(logging.ERROR, logger="caspian"):
        for index in range(count):
            await c.send("Unsubscribe", {"subscribeRequestId": "x"}, request_id=f"u{index}")
        errors = 0
        while errors < count:
            message = await c.recv()
            assert message["type"] == "ProtocolError"
            assert message["payload"]["code"] == 199
            errors += 1
    failures = [r for r in caplog.records if "processing a stream message failed" in r.message]
    assert 1 <= len(failures) <= 2
    await c.close()


async def test_clients_dropping_during_the_token_check_leak_no_database_handle(
    running: RunningService, caplog: pytest.LogCaptureFixture
) -> None:
    token = await asyncio.to_thread(running.token)
    database = (running.settings.data_dir / "caspian.db").resolve()

    def handles() -> int:
        count = 0
        for fd in os.listdir("/proc/self/fd"):
            try:
                target = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                continue
            count += target.startswith(str(database))
        return count

    host, port = address(running)
    request = (
        f"GET /v1/stream?accessToken={token} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n"
    ).encode()

    async def drop_during_checks(count: int) -> int:
        for _ in range(count):
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(request)
            await writer.drain()
            await reader.readuntil(b"\r\n\r\n")
            # An abortive close (RST) while the server checks the token.
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
        await asyncio.sleep(1.0)
        return handles()

    before = handles()
    with caplog.at_level(logging.ERROR):
        rounds = [await drop_during_checks(200) for _ in range(4)]
    # A leaked connection is one never given back to the store's pool.
    pool = running.listening.service.store._engine.pool
    assert isinstance(pool, QueuePool)
    assert pool.checkedout() == 0, pool.status()
    # The store's connections are all open from the start, so the count is
    # exact: the leak this guards against held a handle for every few dropped
    # checks, hundreds here.
    assert rounds == [before] * 4, (before, rounds)
    assert not [r for r in caplog.records if "CancelledError" in (r.exc_text or r.message)]


@pytest.mark.settings(max_rest_in_flight=2, auth_max_failures=1000)
async def test_rest_requests_past_the_limit_in_flight_get_503_at_once(
    running: RunningService,
) -> None:
    key_id, _ = await asyncio.to_thread(running.key)
    body = {"type": "Key", "payload": {"accessKeyID": key_id, "secretAccessKey": "wrong"}}
    async with httpx.AsyncClient(base_url=running.base_url, timeout=30) as rest:
        # Each wrong secret costs an argon2 check: many are in flight at once.
        answers = await asyncio.gather(
            *(rest.post("/v1/auth/authenticate", json=body) for _ in range(30))
        )
        statuses = [answer.status_code for answer in answers]
        busy = [answer for answer in answers if answer.status_code == 503]
        assert busy and set(statuses) <= {401, 503}, statuses
        assert busy[0].json()["code"] == 503 and busy[0].headers["Retry-After"] == "1"
        # Served again once the others are done.
        assert (await rest.get("/v1/reference/exchanges")).status_code == 401
