"""The stream under random and mutated frames, against the started service.

Each example opens a connection, writes a sequence of hand-built frames
(text, binary, continuation, ping, any payload: random bytes, mutated
requests, invalid UTF-8, fragments out of order), then a marker request,
and reads until the marker's answer or the close. Every message that comes
back must be one the documentation describes, with a documented code, and
a close must carry a documented code. Meanwhile another client's Level2
updates must keep coming.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.sync.client import connect as sync_connect

from caspian.codes import (
    PROTOCOL_ERROR_MESSAGES,
    SUBSCRIBE_MESSAGES,
    TOKEN_REFRESH_MESSAGES,
    UNSUBSCRIBE_MESSAGES,
    CloseCode,
)
from tests.support.client import client_frame
from tests.support.service import RunningService, start_service

SYMBOL = "FX-BTC/USD=GEMINI"
TEXT, BINARY, CONTINUATION, PING = 0x1, 0x2, 0x0, 0x9
DOCUMENTED = {
    # 199 is the answer to an internal fault, never to bad input.
    "ProtocolError": {int(code) for code in PROTOCOL_ERROR_MESSAGES} - {199},
    "SubscribeResponse": {int(code) for code in SUBSCRIBE_MESSAGES},
    "UnsubscribeResponse": {int(code) for code in UNSUBSCRIBE_MESSAGES},
    "TokenRefreshResponse": {int(code) for code in TOKEN_REFRESH_MESSAGES},
}
#: The service's own close codes, and RFC 6455's for frames that break the protocol.
CLOSE_CODES = {int(code) for code in CloseCode} | {1002}
REQUESTS = [
    {"requestId": "s", "type": "Subscribe", "payload": {"symbol": SYMBOL, "type": "Level2"}},
    {"requestId": "u", "type": "Unsubscribe", "payload": {"subscribeRequestId": "s"}},
    {"requestId": "t", "type": "TokenRefresh", "payload": {"accessToken": "not a token"}},
]


@st.composite
def payloads(draw: st.DrawFn) -> bytes:
    """Random bytes, or a request with a few bytes changed."""
    if draw(st.booleans()):
        return draw(st.binary(max_size=300))
    raw = bytearray(orjson.dumps(draw(st.sampled_from(REQUESTS))))
    for _ in range(draw(st.integers(min_value=0, max_value=3))):
        position = draw(st.integers(min_value=0, max_value=len(raw) - 1))
        raw[position] = draw(st.integers(min_value=0, max_value=255))
    return bytes(raw)


frames = st.tuples(
    st.sampled_from([TEXT, TEXT, TEXT, BINARY, CONTINUATION, PING]),
    payloads(),
    st.booleans() | st.just(True),
)


class Watcher:
    """Another client, in a thread of its own, noting when each Level2 update arrives."""

    def __init__(self, url: str) -> None:
        self.arrivals: list[float] = []
        self._url = url
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        with sync_connect(self._url) as ws:
            subscribe = {
                "requestId": "w",
                "type": "Subscribe",
                "payload": {"symbol": SYMBOL, "type": "Level2", "conflation": "None"},
            }
            ws.send(orjson.dumps(subscribe).decode())
            while not self._stop.is_set():
                try:
                    message = orjson.loads(ws.recv(timeout=1))
                except TimeoutError:
                    continue
                if message["type"] == "Level2":
                    self.arrivals.append(time.monotonic())

    def longest_gap(self, since: float) -> float:
        times = [since] + [t for t in self.arrivals if t >= since] + [time.monotonic()]
        return max(b - a for a, b in itertools.pairwise(times))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunningService, str]]:
    running = start_service(tmp_path_factory.mktemp("fuzz"), simulator_rate=50.0)
    token = running.token()
    yield running, token
    running.stop()


async def exchange(running: RunningService, token: str, sent: list[bytes]) -> list[Any]:
    """Writes the frames and a marker; everything read back, the close code last if closed."""
    host, port = running.base_url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        (
            f"GET /v1/stream?accessToken={token} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    assert b" 101 " in await reader.readuntil(b"\r\n\r\n")
    # Answered under its own requestId once everything before it has been.
    marker = orjson.dumps(
        {"requestId": "marker", "type": "Unsubscribe", "payload": {"subscribeRequestId": "none"}}
    )
    writer.write(b"".join(sent) + client_frame(TEXT, marker))
    received: list[Any] = []
    try:
        async with asyncio.timeout(10):
            while True:
                head = await reader.readexactly(2)
                length = head[1] & 0x7F
                if length == 126:
                    length = int.from_bytes(await reader.readexactly(2))
                elif length == 127:
                    length = int.from_bytes(await reader.readexactly(8))
                data = await reader.readexactly(length)
                opcode = head[0] & 0x0F
                if opcode == 0x8:
                    received.append(int.from_bytes(data[:2]) if len(data) >= 2 else 1005)
                    break
                if opcode == TEXT:
                    message = orjson.loads(data)
                    received.append(message)
                    if message.get("requestId") == "marker":
                        break
    except asyncio.IncompleteReadError:
        # Cut without a close frame: only the service's own abort does that.
        received.append(None)
    finally:
        writer.close()
    return received


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(st.lists(frames, min_size=1, max_size=6))
def test_random_frames_get_documented_answers_and_disturb_nobody(
    fuzzed: tuple[RunningService, str], batch: list[tuple[int, bytes, bool]]
) -> None:
    running, token = fuzzed
    sent = [client_frame(opcode, payload, fin) for opcode, payload, fin in batch]
    for item in asyncio.run(exchange(running, token, sent)):
        if isinstance(item, int):
            assert item in CLOSE_CODES, item
        elif item is not None:
            assert isinstance(item, dict)
            if item["type"] in DOCUMENTED:
                assert item["payload"]["code"] in DOCUMENTED[item["type"]], item
                assert isinstance(item["requestId"], str) and item["requestId"]
            else:
                assert item["type"] in ("Level1", "Level2"), item


def test_fuzzing_does_not_disturb_another_client(fuzzed: tuple[RunningService, str]) -> None:
    running, token = fuzzed
    watcher = Watcher(f"{running.stream_url}?accessToken={token}")
    try:
        time.sleep(1.0)
        started = time.monotonic()
        test_random_frames_get_documented_answers_and_disturb_nobody(fuzzed)
        assert watcher.arrivals, "the watcher got no update at all"
        assert watcher.longest_gap(started) < 2.0
    finally:
        watcher.close()
