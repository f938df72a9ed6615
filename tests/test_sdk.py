"""The Python SDK (clients/python) against the real service, started by the tests."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
from caspian_client import (
    AuthenticationError,
    Backoff,
    Client,
    Connected,
    Disconnected,
    Event,
    HTTPError,
    Lapsed,
    Level2Subscription,
    Reconnecting,
    RequestTimeout,
    StatusChanged,
    Stream,
    StreamClosed,
    SubscriptionError,
    SyncClient,
    TokenRefreshed,
    Unreachable,
)
from caspian_client.models import PRODUCT_FIELDS, timestamp
from websockets.asyncio.server import ServerConnection, serve

from caspian.codes import CloseCode
from caspian.gateway.connection import StreamConnection
from caspian.maintenance import MaintenanceWindow
from tests.support.client import StreamClient
from tests.support.ports import free_port
from tests.support.service import RunningService, start_service

SYMBOL = "FX-BTC/USD=GEMINI"
OTHER = "FX-ETH/USD=GEMINI"
# Quick reconnects: the tests wait for them.
MEANINGS = {
    3003: "The handler for this session was not found",
    3004: "Internal issue",
    3006: "Pong message not received",
}
QUICK = Backoff(initial=0.05, maximum=0.5)


def client_for(running: RunningService, **options: Any) -> Client:
    key_id, secret = running.key()
    return Client(running.base_url, key_id=key_id, secret=secret, **options)


class EventLog:
    """Every event of a stream, collected as they come."""

    def __init__(self, stream: Stream) -> None:
        self.events: list[Event] = []
        self._seen = asyncio.Event()
        self._task = asyncio.create_task(self._collect(stream))

    async def _collect(self, stream: Stream) -> None:
        async for event in stream.events():
            self.events.append(event)
            self._seen.set()

    async def wait_for(self, match: Callable[[Event], bool], within: float = 15) -> Event:
        deadline = time.monotonic() + within
        checked = 0
        while True:
            for event in self.events[checked:]:
                if match(event):
                    return event
            checked = len(self.events)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no such event within {within} s: {self.events}")
            self._seen.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._seen.wait(), remaining)

    def stop(self) -> None:
        self._task.cancel()


@contextlib.asynccontextmanager
async def logged_stream(client: Client, **options: Any) -> AsyncIterator[tuple[Stream, EventLog]]:
    stream = client.stream(backoff=Backoff(QUICK.initial, QUICK.maximum), **options)
    log = EventLog(stream)
    async with stream:
        yield stream, log
    log.stop()


class BookRecorder:
    """Reads an SDK Level2 subscription in the background, keeping its book as it stood
    at each caspianTimestamp, and every update."""

    def __init__(self, subscription: Level2Subscription) -> None:
        self.by_time: dict[datetime, dict[tuple[str, float], float]] = {}
        self.wholes = 0
        self.updates = 0
        self.latest: datetime | None = None
        self._task = asyncio.create_task(self._read(subscription))

    async def _read(self, subscription: Level2Subscription) -> None:
        async for update in subscription:
            book = update.book
            self.updates += 1
            self.wholes += update.whole
            # Never a crossed or unsorted book, whatever happened to the connection.
            bids = [level.price for level in book.bids]
            asks = [level.price for level in book.asks]
            assert bids == sorted(bids, reverse=True) and asks == sorted(asks)
            if bids and asks:
                assert bids[0] < asks[0], book
            if book.caspian_timestamp is not None:
                self.by_time[book.caspian_timestamp] = book.levels()
                self.latest = book.caspian_timestamp

    async def until(self, done: Callable[[], bool], within: float = 30) -> None:
        deadline = time.monotonic() + within
        while not done():
            if self._task.done():
                self._task.result()
                raise AssertionError("the subscription ended")
            assert time.monotonic() < deadline, "the SDK's book did not get there in time"
            await asyncio.sleep(0.02)

    def stop(self) -> None:
        self._task.cancel()


async def agrees_with_fresh_subscription(
    running: RunningService, recorder: BookRecorder, levels: int
) -> None:
    """A new connection's whole top-N equals the SDK's book as it stood at the same
    caspianTimestamp."""
    fresh = await StreamClient.open(running.stream_url, await asyncio.to_thread(running.token))
    try:
        await fresh.subscribe(SYMBOL, "Level2", numberOfLevels=levels)
        whole = await fresh.wait_for(lambda m: m["type"] == "Level2" and bool(m["payload"]), 30)
    finally:
        await fresh.close()
    at = timestamp(whole["caspianTimestamp"])
    assert at is not None
    expected = {
        (level["side"], float(level["price"])): float(level["size"])
        for level in whole["payload"]
        if level["size"] != 0
    }
    await recorder.until(lambda: recorder.latest is not None and recorder.latest >= at)
    assert recorder.by_time.get(at) == expected


def server_close(running: RunningService, code: CloseCode) -> None:
    """The server closes every open stream with ``code``, as it would itself."""

    def close_all() -> None:
        for connection in list(running.listening.service.gateway.connections):
            connection.close(code)

    running.loop.call_soon_threadsafe(close_all)


def server_closing(running: RunningService) -> bool:
    return any(
        cast(StreamConnection, connection)._closing
        for connection in running.listening.service.gateway.connections
    )


# -- reference data ------------------------------------------------------------


async def test_reference_data_has_every_field_of_the_original(service: RunningService) -> None:
    async with client_for(service) as client:
        exchanges = await client.exchanges()
        assert "GEMINI" in {exchange.code for exchange in exchanges}
        products = await client.products(["GEMINI"])
        assert products and {product.exchange for product in products} == {"GEMINI"}
        product = await client.product(SYMBOL)
        token = await client.token()
    async with httpx.AsyncClient() as http:
        answer = await http.get(
            f"{service.base_url}/v1/reference/products/{SYMBOL}", headers={"Authorization": token}
        )
    raw = answer.json()
    for wire, name in PRODUCT_FIELDS.items():
        assert getattr(product, name) == raw.get(wire), wire
    assert product.extra == {k: v for k, v in raw.items() if k not in PRODUCT_FIELDS}
    assert product.created is not None and product.created.tzinfo is not None
    assert product in products


async def test_credentials_and_environment(
    service: RunningService, monkeypatch: pytest.MonkeyPatch
) -> None:
    service.call(service.listening.service.store.create_user("carol", "a long password"))
    async with Client(service.base_url, user="carol", password="a long password") as client:
        assert await client.exchanges()
    key_id, secret = service.key()
    monkeypatch.setenv("CASPIAN_URL", f"{service.base_url}/v1")
    monkeypatch.setenv("CASPIAN_KEY_ID", key_id)
    monkeypatch.setenv("CASPIAN_KEY_SECRET", secret)
    async with Client() as client:
        assert (await client.product(OTHER)).caspian_code == OTHER


async def test_errors_carry_their_code_and_meaning(service: RunningService) -> None:
    key_id, _ = service.key()
    async with Client(service.base_url, key_id=key_id, secret="wrong") as client:
        with pytest.raises(AuthenticationError) as refused:
            await client.exchanges()
        assert (refused.value.status, refused.value.code) == (401, 401)
        assert refused.value.meaning == "Unauthorized"
    async with client_for(service) as client:
        with pytest.raises(HTTPError) as unknown:
            await client.product("FX-NOPE/USD=GEMINI")
        assert unknown.value.status == 404
        with pytest.raises(HTTPError) as empty:
            await client.products([])
        assert empty.value.status == 400 and empty.value.message
        with pytest.raises(TypeError):
            await client.products("GEMINI")
    with pytest.raises(ValueError, match="no login"):
        Client(service.base_url, key_id=key_id)


# -- the stream -----------------------------------------------------------------


async def test_level1_merged_and_level2_book_agree_with_the_server(
    service: RunningService,
) -> None:
    async with client_for(service) as client, logged_stream(client) as (stream, log):
        level1 = stream.level1(SYMBOL, conflation="250ms")
        first = await anext(level1)
        assert first.symbol == SYMBOL and first.bbo_stream == "connected"
        assert first.bid is not None and first.ask is not None and first.bid < first.ask
        assert first.bbo_caspian_timestamp is not None
        book = stream.level2(SYMBOL, levels=10, conflation="None")
        recorder = BookRecorder(book)
        await recorder.until(lambda: recorder.updates > 20)
        assert recorder.wholes == 1
        await agrees_with_fresh_subscription(service, recorder, 10)
        assert stream.connections == 1
        await log.wait_for(
            lambda e: (
                isinstance(e, StatusChanged)
                and (e.stream, e.status) == ("depthStream", "connected")
            )
        )
        await book.close()
        await recorder.until(lambda: recorder._task.done())
        # Level1 goes on after the Level2 is gone; the merged state keeps what it knew.
        later = await anext(level1)
        assert later.bid is not None and later.bbo_caspian_timestamp is not None
        recorder.stop()


async def test_refused_subscriptions_raise_their_code(service: RunningService) -> None:
    async with client_for(service) as client, logged_stream(client) as (stream, _):
        with pytest.raises(SubscriptionError) as unknown:
            await anext(stream.level1("FX-NOPE/USD=GEMINI"))
        assert (unknown.value.code, unknown.value.meaning) == (202, "Invalid subscription symbol")
        cases = {
            207: stream.level1(SYMBOL, symbol_type="Bogus"),
            208: stream.level2(SYMBOL, levels=1000),
        }
        for code, subscription in cases.items():
            with pytest.raises(SubscriptionError) as refused:
                await subscription.subscribed()
            assert refused.value.code == code, refused.value
        ok = stream.level2(OTHER, levels=5)
        await ok.subscribed()
        again = stream.level2(OTHER, levels=3)
        with pytest.raises(SubscriptionError) as duplicate:
            await again.subscribed()
        assert (duplicate.value.code, duplicate.value.meaning) == (
            204,
            "Another subscription already exists",
        )


async def test_a_whole_universe_subscribed_at_once_is_all_answered(tmp_path: Path) -> None:
    running = start_service(tmp_path, simulator_rate=5.0, max_subscriptions=60)
    try:
        catalog = running.listening.service.catalog
        # Spot products: dated ones of the catalog may have expired (202).
        symbols = [p.caspian_code for p in catalog if p.caspian_code.startswith("FX-")]
        assert len(symbols) > 61
        async with client_for(running) as client, logged_stream(client) as (stream, _):
            subscriptions = [stream.level1(symbol, conflation="1s") for symbol in symbols[:61]]
            results = await asyncio.gather(
                *(subscription.subscribed() for subscription in subscriptions),
                return_exceptions=True,
            )
        refused = [result for result in results if isinstance(result, BaseException)]
        assert len(refused) == 1 and isinstance(refused[0], SubscriptionError)
        assert (refused[0].code, refused[0].meaning) == (206, "Subscription limit reached")
    finally:
        running.stop()


async def test_an_unanswered_subscribe_raises(service: RunningService) -> None:
    async def silent(connection: ServerConnection) -> None:
        async for _ in connection:
            pass

    async with serve(silent, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        async with client_for(service) as client:
            client.stream_url = f"ws://127.0.0.1:{port}/v1/stream"
            async with logged_stream(client, request_timeout=0.5) as (stream, _):
                started = time.monotonic()
                with pytest.raises(RequestTimeout) as late:
                    await anext(stream.level1(SYMBOL))
                assert 0.4 < time.monotonic() - started < 5
                assert "Subscribe" in str(late.value)


@pytest.mark.parametrize(
    "code",
    [CloseCode.PONG_NOT_RECEIVED, CloseCode.SESSION_NOT_FOUND, CloseCode.INTERNAL],
    ids=["3006", "3003", "3004"],
)
async def test_forced_disconnects_reconnect_with_a_book_restarted_whole(
    service: RunningService, code: CloseCode
) -> None:
    async with client_for(service) as client, logged_stream(client) as (stream, log):
        level1 = stream.level1(OTHER)
        recorder = BookRecorder(stream.level2(SYMBOL, levels=8, conflation="None"))
        await recorder.until(lambda: recorder.wholes == 1)
        server_close(service, code)
        closed = await log.wait_for(lambda e: isinstance(e, Disconnected))
        assert isinstance(closed, Disconnected) and closed.code == code
        assert closed.meaning == MEANINGS[code]
        await log.wait_for(lambda e: isinstance(e, Reconnecting))
        await log.wait_for(lambda e: isinstance(e, Connected) and e.reconnect)
        await recorder.until(lambda: recorder.wholes == 2)
        await agrees_with_fresh_subscription(service, recorder, 8)
        assert (await anext(level1)).bid is not None
        assert stream.connections == 2
        recorder.stop()


def address(running: RunningService) -> tuple[str, int]:
    host, port = running.base_url.removeprefix("http://").split(":")
    return host, int(port)


class Proxy:
    """A TCP relay between the SDK and the service whose connections the test can cut,
    as a network failure would."""

    def __init__(self, target: tuple[str, int], window: int | None = None) -> None:
        self.target = target
        #: Socket buffer sizes on both legs, for a path that fills up quickly.
        self.window = window
        self.writers: list[asyncio.StreamWriter] = []

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        port: int = self.server.sockets[0].getsockname()[1]
        return port

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream = socket.socket()
        if self.window is not None:
            upstream.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.window)
            downstream = writer.get_extra_info("socket")
            downstream.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.window)
            writer.transport.set_write_buffer_limits(self.window)
        upstream.connect(self.target)
        upstream.setblocking(False)
        upstream_reader, upstream_writer = await asyncio.open_connection(sock=upstream)
        self.writers += [writer, upstream_writer]

        async def pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            sink.close()

        await asyncio.gather(pump(reader, upstream_writer), pump(upstream_reader, writer))

    def cut(self) -> None:
        for writer in self.writers:
            writer.transport.abort()
        self.writers.clear()

    async def stop(self) -> None:
        self.cut()
        self.server.close()


async def test_a_network_failure_reconnects(service: RunningService) -> None:
    proxy = Proxy(address(service))
    port = await proxy.start()
    try:
        key_id, secret = service.key()
        client = Client(f"http://127.0.0.1:{port}", key_id=key_id, secret=secret)
        async with client, logged_stream(client) as (stream, log):
            recorder = BookRecorder(stream.level2(SYMBOL, levels=5, conflation="None"))
            await recorder.until(lambda: recorder.wholes == 1)
            proxy.cut()
            lost = await log.wait_for(lambda e: isinstance(e, Disconnected))
            assert isinstance(lost, Disconnected) and lost.code == 1006
            await recorder.until(lambda: recorder.wholes == 2)
            await agrees_with_fresh_subscription(service, recorder, 5)
            recorder.stop()
    finally:
        await proxy.stop()


async def test_a_server_restart_on_the_same_port(tmp_path: Path) -> None:
    port = free_port()
    running = start_service(tmp_path, simulator_rate=50.0, port=port)
    try:
        async with client_for(running) as client, logged_stream(client) as (stream, log):
            recorder = BookRecorder(stream.level2(SYMBOL, levels=5, conflation="None"))
            level1 = stream.level1(OTHER)
            await recorder.until(lambda: recorder.wholes == 1)
            await asyncio.to_thread(running.stop)
            gone = await log.wait_for(lambda e: isinstance(e, Disconnected))
            assert isinstance(gone, Disconnected) and (gone.code, gone.reason) == (
                1001,
                "Server shutting down",
            )
            # While it is down, connecting fails and is tried again, less and less often.
            await log.wait_for(lambda e: isinstance(e, Reconnecting) and e.attempt >= 4)
            tries = [e for e in log.events if isinstance(e, Reconnecting)]
            assert all(e.error for e in tries[1:]) and "Connect" in str(tries[-1].error)
            assert all(e.delay <= QUICK.maximum for e in tries)
            running = await asyncio.to_thread(
                start_service, tmp_path, simulator_rate=50.0, port=port
            )
            await log.wait_for(lambda e: isinstance(e, Connected) and e.reconnect, within=30)
            await recorder.until(lambda: recorder.wholes == 2)
            await agrees_with_fresh_subscription(running, recorder, 5)
            assert (await anext(level1)).bid is not None
            recorder.stop()
    finally:
        running.stop()


async def test_the_token_is_refreshed_on_the_live_connection(tmp_path: Path) -> None:
    running = start_service(tmp_path, simulator_rate=20.0, token_ttl_s=3)
    try:
        async with client_for(running) as client, logged_stream(client) as (stream, log):
            level1 = stream.level1(SYMBOL, conflation="250ms")
            started = time.monotonic()
            while time.monotonic() - started < 7:
                await asyncio.wait_for(anext(level1), 5)
            refreshed = [e for e in log.events if isinstance(e, TokenRefreshed)]
            assert len(refreshed) >= 3, log.events
            assert not [e for e in log.events if isinstance(e, Disconnected)]
            assert stream.connections == 1
    finally:
        running.stop()


async def test_a_slow_consumer_closed_3007_gets_a_whole_book_again(tmp_path: Path) -> None:
    running = start_service(tmp_path, simulator_rate=100.0, max_queue=100)
    # Small socket buffers on the way, so that the server's queue fills in a second.
    proxy = Proxy(address(running), window=4096)
    port = await proxy.start()
    try:
        catalog = running.listening.service.catalog
        symbols = [p.caspian_code for p in catalog if p.caspian_code.startswith("FX-")][:20]
        key_id, secret = running.key()
        client = Client(f"http://127.0.0.1:{port}", key_id=key_id, secret=secret)
        async with client, logged_stream(client) as (stream, log):
            books = [stream.level2(s, levels=100, conflation="None") for s in symbols]
            first = await anext(books[0])
            assert first.whole
            # A consumer that keeps the event loop busy (here: blocks it) stops all
            # reading: the server's queue for the connection fills and it closes it.
            # (The service runs in a thread of its own, so it goes on meanwhile.)
            deadline = time.monotonic() + 30
            while not server_closing(running) and time.monotonic() < deadline:
                time.sleep(0.05)  # noqa: ASYNC251
            closed = await log.wait_for(lambda e: isinstance(e, Disconnected), within=60)
            assert isinstance(closed, Disconnected) and closed.code == 3007
            assert closed.meaning == "Message queue limit reached"
            await log.wait_for(lambda e: isinstance(e, Connected) and e.reconnect)
            # What was left from the old connection is read, then a whole book again.
            while not (update := await anext(books[0])).whole:
                pass
            assert update.book.bids and update.book.asks
    finally:
        await proxy.stop()
        running.stop()


async def test_a_consumer_behind_its_buffer_restarts_from_a_whole_book(
    service: RunningService,
) -> None:
    async with client_for(service) as client, logged_stream(client, buffer=5) as (stream, log):
        read = stream.level2(SYMBOL, levels=5, conflation="None")
        unread = stream.level2(OTHER, levels=5, conflation="None")
        assert (await anext(read)).whole
        await log.wait_for(lambda e: isinstance(e, Lapsed) and e.symbol == OTHER)
        # The other subscription is read on all along: one that is behind stops nothing.
        for _ in range(20):
            await asyncio.wait_for(anext(read), 5)
        first = await asyncio.wait_for(anext(unread), 10)
        assert first.whole and first.book.bids and first.book.asks
        assert stream.connections == 1
        # Lapsed again, it closes without a word from the server about it.
        await log.wait_for(
            lambda e: sum(isinstance(e, Lapsed) and e.symbol == OTHER for e in log.events) == 2
        )
        await unread.close()
        with pytest.raises(StopAsyncIteration):
            await anext(unread)


async def test_the_maintenance_window_is_waited_out(tmp_path: Path) -> None:
    running = start_service(tmp_path, simulator_rate=50.0)
    try:
        async with client_for(running) as client, logged_stream(client) as (stream, log):
            recorder = BookRecorder(stream.level2(SYMBOL, levels=5, conflation="None"))
            await recorder.until(lambda: recorder.wholes == 1)
            week_s = (time.time() + 3 * 86_400) % (7 * 86_400)
            running.listening.service._window = MaintenanceWindow(int(week_s), 4)
            closed = await log.wait_for(lambda e: isinstance(e, Disconnected))
            assert isinstance(closed, Disconnected)
            assert (closed.code, closed.reason) == (1001, "Service maintenance")
            refused = await log.wait_for(
                lambda e: isinstance(e, Reconnecting) and e.error is not None
            )
            assert isinstance(refused, Reconnecting) and "503" in str(refused.error)
            await log.wait_for(lambda e: isinstance(e, Connected) and e.reconnect, within=30)
            await recorder.until(lambda: recorder.wholes == 2)
            await agrees_with_fresh_subscription(running, recorder, 5)
            recorder.stop()
    finally:
        running.stop()


def test_the_sync_wrapper(service: RunningService) -> None:
    key_id, secret = service.key()
    with SyncClient(service.base_url, key_id=key_id, secret=secret) as client:
        assert "GEMINI" in {exchange.code for exchange in client.exchanges()}
        assert client.product(SYMBOL).pseudo_code == "BTCUSD=GEMINI"
        with client.stream() as stream:
            quotes = stream.level1(SYMBOL)
            assert next(quotes).bid is not None
            books = stream.level2(SYMBOL, levels=3)
            update = next(books)
            assert update.whole and len(update.book.bids) == 3


def test_the_readme_example_as_written(service: RunningService, tmp_path: Path) -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    start = readme.index("\n## A first session\n")
    section = readme[start : readme.index("\n## ", start + 1)]
    examples = re.findall(r"^```python\n(.*?)^```$", section, re.MULTILINE | re.DOTALL)
    (example,) = [code for code in examples if "caspian_client" in code]
    script = tmp_path / "sdk.py"
    script.write_text(example.replace("http://127.0.0.1:8080", service.base_url))
    key_id, secret = service.key()
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "KEY": json.dumps({"accessKeyID": key_id, "secretAccessKey": secret}),
    }
    process = subprocess.Popen(
        [sys.executable, str(script)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert process.stdout is not None
        seen: list[str] = []
        while not {"Level1", "Level2"} <= {line.split()[0] for line in seen if line.strip()}:
            line = process.stdout.readline()
            assert line, process.stderr.read() if process.stderr else ""
            seen.append(line)
        assert seen[0].startswith("Bitcoin - US Dollar")
        level2 = next(line for line in seen if line.startswith("Level2 connected bids ["))
        assert level2.count(",") >= 8
    finally:
        process.send_signal(signal.SIGINT)
        _, errors = process.communicate(timeout=30)
    assert process.returncode == 0, errors


async def test_a_silent_or_absent_service_raises(service: RunningService) -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with Client(f"http://127.0.0.1:{port}", key_id="k", secret="s", timeout=0.5) as c:
            with pytest.raises(RequestTimeout) as late:
                await c.exchanges()
            assert "POST /auth/authenticate" in str(late.value)
    finally:
        server.close()
    async with Client(f"http://127.0.0.1:{free_port()}", key_id="k", secret="s") as client:
        with pytest.raises(Unreachable):
            await client.exchanges()


async def test_a_refused_login_ends_the_stream(tmp_path: Path) -> None:
    running = start_service(tmp_path, simulator_rate=20.0, recheck_s=0.3)
    try:
        wrong = Client(running.base_url, key_id=running.key()[0], secret="wrong")
        with pytest.raises(StreamClosed) as refused:
            async with wrong, wrong.stream():
                pass
        assert refused.value.code == 401
        key_id, secret = running.key()
        client = Client(running.base_url, key_id=key_id, secret=secret)
        async with client, logged_stream(client) as (stream, log):
            quotes = stream.level1(SYMBOL)
            await anext(quotes)
            assert running.call(running.listening.service.store.revoke_key(key_id))
            closed = await log.wait_for(lambda e: isinstance(e, Disconnected))
            assert isinstance(closed, Disconnected) and closed.code == 3001
            # The key is gone: the login is refused, and the stream ends, saying so.
            with pytest.raises(StreamClosed) as ended:
                while True:
                    await asyncio.wait_for(anext(quotes), 15)
            assert ended.value.code == 401 and "refused" in str(ended.value)
    finally:
        running.stop()
