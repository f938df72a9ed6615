"""The real-time stream over real sockets against the started service."""

from __future__ import annotations

import asyncio
import itertools
import re
import socket
import time
from collections.abc import Iterable
from importlib.resources import files
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit

import httpx
import orjson
import pytest
from websockets.asyncio.client import connect
from websockets.client import ClientProtocol
from websockets.exceptions import InvalidStatus
from websockets.frames import Frame, Opcode
from websockets.streams import StreamReader
from websockets.uri import parse_uri

from caspian.catalog.product import ProductSpec
from caspian.codes import Stream, StreamState
from caspian.events import StatusEvent
from caspian.gateway.connection import StreamConnection
from caspian.maintenance import MaintenanceWindow
from caspian.timefmt import now_us
from tests.support.client import StreamClient, apply_level2
from tests.support.service import RunningService, start_service

SYMBOL = "FX-BTC/USD=GEMINI"
SAMPLE = files("caspian.sources").joinpath("data", "sample.jsonl.gz")
OTHER = "FX-ETH/USD=GEMINI"
TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}$")


def served(catalog: Iterable[ProductSpec]) -> list[str]:
    """The codes of the catalog's products the simulator streams (none expired)."""
    now = now_us()
    return [product.caspian_code for product in catalog if not product.expired(now)]


def connections(running: RunningService) -> list[StreamConnection]:
    """The service's open stream connections, as the class that implements them."""
    return [
        cast(StreamConnection, connection)
        for connection in running.listening.service.gateway.connections
    ]


async def client(service: RunningService, user: str = "alice") -> StreamClient:
    return await StreamClient.open(service.stream_url, await asyncio.to_thread(service.token, user))


def stream_address(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    assert parts.hostname is not None and parts.port is not None
    return parts.hostname, parts.port


def small_window_socket(url: str) -> socket.socket:
    """A connected, non-blocking socket to the stream whose small receive buffer
    fills quickly once its reader stops: the server then has to hold data back."""
    raw = socket.socket()
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    raw.connect(stream_address(url))
    raw.setblocking(False)
    return raw


async def until_held_back(running: RunningService) -> None:
    """Until the server holds messages back for one of its connections (30 s at most)."""

    def held_back() -> bool:
        return any(
            connection._paused and connection._backlog for connection in connections(running)
        )

    for _ in range(600):
        if held_back():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the server never had to hold messages back")


async def raw_level2_subscriber(
    running: RunningService, token: str, symbols: list[str]
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, ClientProtocol]:
    """A client on a small-window socket, past its handshake, that has asked for each
    symbol's whole Level2 unconflated: it reads only when the test does."""
    raw = small_window_socket(running.stream_url)
    reader, writer = await asyncio.open_connection(sock=raw)
    protocol = ClientProtocol(parse_uri(f"{running.stream_url}?accessToken={token}"))
    protocol.send_request(protocol.connect())
    for data in protocol.data_to_send():
        writer.write(data)
    handshake = await reader.readuntil(b"\r\n\r\n")
    assert b" 101 " in handshake
    protocol.receive_data(handshake)
    protocol.events_received()
    for index, symbol in enumerate(symbols):
        protocol.send_text(
            orjson.dumps(
                {
                    "requestId": f"s{index}",
                    "type": "Subscribe",
                    "payload": {
                        "symbol": symbol,
                        "type": "Level2",
                        "numberOfLevels": 100,
                        "conflation": "None",
                    },
                }
            )
        )
    for data in protocol.data_to_send():
        writer.write(data)
    await writer.drain()
    return reader, writer, protocol


# -- connection ------------------------------------------------------------


async def test_no_token_closes_3000(service: RunningService) -> None:
    c = await StreamClient.open(service.stream_url)
    assert await c.closed_with() == 3000


async def test_invalid_token_closes_3001(service: RunningService) -> None:
    c = await StreamClient.open(service.stream_url, "not-a-token")
    assert await c.closed_with() == 3001


async def test_forged_token_closes_3001(service: RunningService) -> None:
    import jwt

    forged = jwt.encode(
        {
            "sub": "X",
            "iss": "Caspian Tech",
            "iat": 1,
            "exp": 2**31,
            "jti": "j",
            "knd": "key",
            "usr": "alice",
        },
        "another-secret-that-is-long-enough-to-sign",
        algorithm="HS256",
    )
    c = await StreamClient.open(service.stream_url, forged)
    assert await c.closed_with() == 3001


async def test_revoked_key_token_closes_3001(service: RunningService) -> None:
    key_id, secret = await asyncio.to_thread(service.key, "revokee")
    response = await asyncio.to_thread(
        httpx.post,
        f"{service.base_url}/v1/auth/authenticate",
        json={"type": "Key", "payload": {"accessKeyID": key_id, "secretAccessKey": secret}},
    )
    token = response.json()["accessToken"]
    await asyncio.to_thread(service.call, service.listening.service.store.revoke_key(key_id))
    c = await StreamClient.open(service.stream_url, token)
    assert await c.closed_with() == 3001


@pytest.mark.parametrize("scheme", ["", "Bearer "])
async def test_token_in_authorization_header(service: RunningService, scheme: str) -> None:
    token = await asyncio.to_thread(service.token)
    c = await StreamClient.open(service.stream_url, header=f"{scheme}{token}")
    request_id = await c.subscribe(SYMBOL)
    first = await c.wait_for(lambda m: m["type"] == "Level1")
    assert first["requestId"] == request_id
    await c.close()


async def test_other_paths_are_not_streams(service: RunningService) -> None:
    with pytest.raises(InvalidStatus) as info:
        await connect(service.stream_url.replace("/v1/stream", "/v1/other"))
    assert info.value.response.status_code == 404


# -- protocol errors -------------------------------------------------------


async def test_stream_sockets_send_at_once(service: RunningService) -> None:
    """Nagle's algorithm is off (TCP_NODELAY), on REST and stream connections alike:
    with it on, an update waits for the client to acknowledge the one before."""

    c = await client(service)
    async with httpx.AsyncClient(base_url=service.base_url) as rest:
        # The keep-alive connection stays open on the server meanwhile.
        assert (await rest.get("/v1/reference/exchanges")).status_code == 401
        # uvicorn's registry holds its HTTP connections and our streams.
        registry: set[Any] = service.listening.server.server_state.connections
        http = [c.transport for c in registry if not isinstance(c, StreamConnection)]
        streams = [c._transport for c in connections(service)]
        assert http and streams
        transports = http + streams
        for transport in transports:
            assert transport is not None
            sock = transport.get_extra_info("socket")
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
    await c.close()


async def test_protocol_errors_keep_the_connection(service: RunningService) -> None:
    c = await client(service)
    cases: list[tuple[bytes, int]] = [
        (b"{nope", 100),
        (b'{"type": "Subscribe"}', 101),
        (b'{"requestId": "a"}', 102),
        (b'{"requestId": "a", "type": "Nope"}', 103),
        (b'{"requestId": "a", "type": "TokenRefresh", "payload": {}}', 104),
        (b'{"requestId": "a", "type": "Unsubscribe", "payload": {}}', 105),
    ]
    for raw, code in cases:
        await c.ws.send(raw.decode())
        message = await c.recv()
        assert message == {
            "requestId": "N/A",
            "type": "ProtocolError",
            "payload": {"code": code, "message": message["payload"]["message"]},
        }
        assert message["payload"]["message"]
    await c.subscribe(SYMBOL)
    await c.close()


async def test_fragmented_messages_are_read_and_binary_ones_refused(
    service: RunningService,
) -> None:
    c = await client(service)
    payload = orjson.dumps(
        {"requestId": "frag", "type": "Subscribe", "payload": {"symbol": SYMBOL, "type": "Level1"}}
    ).decode()
    await c.ws.send(iter([payload[:10], payload[10:30], payload[30:]]))
    assert (await c.response("frag"))["payload"]["code"] == 200
    # A request in a binary frame is not parsed: it gets 100 and says why.
    request = {"requestId": "bin", "type": "Subscribe", "payload": {"symbol": SYMBOL}}
    await c.ws.send(orjson.dumps(request))
    error = await c.wait_for(lambda m: m["type"] == "ProtocolError")
    assert error["payload"]["code"] == 100
    assert "Binary" in error["payload"]["message"]
    await c.ws.send(iter([b'{"requestId":', b'"bin2"}']))
    error = await c.wait_for(lambda m: m["type"] == "ProtocolError")
    assert error["payload"]["code"] == 100
    # Still open and served.
    await c.subscribe(SYMBOL, type_="Level2", request_id="after")
    await c.close()


async def test_invalid_utf8_in_a_text_message_closes_1007(service: RunningService) -> None:
    c = await client(service)
    # A str is always valid UTF-8: the frame is written through the protocol below.
    c.ws.protocol.send_text(b'{"requestId":"\xff\xfe","type":"Subscribe"}')
    c.ws.send_data()
    assert await c.closed_with() == 1007


async def test_oversized_message_closes_1009(service: RunningService) -> None:
    c = await client(service)
    await c.ws.send("x" * (service.settings.max_message_bytes + 1))
    assert await c.closed_with() == 1009


# -- subscriptions ---------------------------------------------------------


async def test_subscribe_response_codes(tmp_path: Path) -> None:
    running = start_service(tmp_path, max_subscriptions=3, symbol_types=["Caspian", "Tora"])
    try:
        store = running.listening.service.store
        limited_token = await asyncio.to_thread(running.token, "limited")
        await asyncio.to_thread(running.call, store.revoke("limited", None))
        c = await StreamClient.open(
            running.stream_url, await asyncio.to_thread(running.token, "alice")
        )

        async def code(payload: dict[str, Any], request_id: str | None = None) -> int:
            rid = await c.send("Subscribe", payload, request_id)
            return int((await c.response(rid))["payload"]["code"])

        assert await code({"symbol": SYMBOL, "type": "Level1"}, "one") == 200
        assert await code({"symbol": OTHER, "type": "Level1"}, "one") == 201
        assert await code({"symbol": "FX-NOT/THERE=GEMINI", "type": "Level1"}) == 202
        assert await code({"symbol": SYMBOL, "type": "Level9"}) == 203
        assert await code({"symbol": SYMBOL, "type": "Level1", "conflation": "7s"}) == 203
        assert await code({"symbol": SYMBOL, "type": "Level1", "conflation": "None"}) == 204
        assert await code({"symbol": SYMBOL, "type": "Level1", "symbolType": "Isin"}) == 207
        assert await code({"symbol": SYMBOL, "type": "Level2", "numberOfLevels": 101}) == 208
        assert (
            await code({"symbol": "BTCUSD=GEMINI", "type": "Level1", "symbolType": "Pseudo"}) == 209
        )
        assert (
            await code({"symbol": "BTC/USD.GEMINI", "type": "Level2", "symbolType": "Tora"}) == 200
        )
        assert await code({"symbol": OTHER, "type": "Level1"}) == 200
        assert await code({"symbol": OTHER, "type": "Level2"}) == 206
        await c.close()
        limited = await StreamClient.open(running.stream_url, limited_token)
        rid = await limited.send("Subscribe", {"symbol": SYMBOL, "type": "Level1"})
        assert (await limited.response(rid))["payload"]["code"] == 205
        await limited.close()
    finally:
        running.stop()


async def test_level1_fields(service: RunningService) -> None:
    c = await client(service)
    request_id = await c.subscribe(SYMBOL, "Level1", conflation="None")
    first = await c.wait_for(lambda m: m["type"] == "Level1")
    assert first["requestId"] == request_id
    assert first["bboStream"] in ("connected", "disconnected")
    assert first["tradeStream"] in ("connected", "disconnected")
    seen: dict[str, Any] = {}
    deadline = time.monotonic() + 20
    while not {"tradePrice", "tradeId", "exchangeSpecificInfo", "ask"} <= set(seen):
        assert time.monotonic() < deadline, f"fields seen: {sorted(seen)}"
        message = await c.wait_for(lambda m: m["type"] == "Level1")
        assert set(message) == {"requestId", "type", "bboStream", "tradeStream", "payload"}
        seen.update(message["payload"])
    assert seen["bid"] < seen["ask"]
    assert seen["bidSize"] > 0 and seen["askSize"] > 0
    for stamp in (
        "bboCaspianTimestamp",
        "bboExchangeTimestamp",
        "tradeCaspianTimestamp",
        "tradeExchangeTimestamp",
    ):
        assert TIMESTAMP.match(seen[stamp]), stamp
    assert isinstance(seen["tradeId"], str)
    assert seen["exchangeSpecificInfo"]["side"] in ("BUY", "SELL")
    assert seen["tradePrice"] > 0 and seen["tradeSize"] > 0
    await c.close()


async def test_level2_book_matches_the_server(service: RunningService) -> None:
    """A client applying every message holds exactly the server's top N levels."""
    symbol = "FX-LTC/USD=GEMINI"
    c = await client(service)
    request_id = await c.subscribe(symbol, "Level2", numberOfLevels=7, conflation="None")
    book: dict[tuple[str, float], float] = {}
    first_full: dict[str, Any] | None = None
    for _ in range(200):
        message = await c.wait_for(lambda m: m["type"] == "Level2")
        assert message["requestId"] == request_id
        assert message["depthStream"] in ("connected", "disconnected")
        assert TIMESTAMP.match(message["caspianTimestamp"])
        if first_full is None and message["payload"]:
            first_full = message
        apply_level2(book, message)
        assert sum(1 for side, _ in book if side == "bid") <= 7
        assert sum(1 for side, _ in book if side == "ask") <= 7
    assert first_full is not None
    sides = {level["side"] for level in first_full["payload"]}
    assert sides == {"bid", "ask"}
    assert len(first_full["payload"]) == 14
    # Stop the market for this symbol, drain, then compare with the server's view.
    hub = service.listening.service.hub
    source = service.listening.service.source
    assert source is not None
    service.loop.call_soon_threadsafe(source.unwatch, symbol)
    await asyncio.sleep(0.5)
    while True:
        try:
            apply_level2(book, await c.recv(0.3))
        except TimeoutError:
            break

    async def server_view() -> Any:
        return hub.symbols[symbol].book.top(7)

    view = await asyncio.to_thread(service.call, server_view())
    expected = {("bid", p): s for p, s in view.bids} | {("ask", p): s for p, s in view.asks}
    assert book == expected
    await c.close()


async def test_unsubscribe_stops_updates(service: RunningService) -> None:
    c = await client(service)
    request_id = await c.subscribe(SYMBOL, "Level2", conflation="None")
    await c.wait_for(lambda m: m["type"] == "Level2" and bool(m["payload"]))
    unsubscribe = await c.send("Unsubscribe", {"subscribeRequestId": request_id})
    response = await c.response(unsubscribe)
    assert response["payload"] == {"code": 300, "message": "All OK"}
    again = await c.send("Unsubscribe", {"subscribeRequestId": request_id})
    assert (await c.response(again))["payload"]["code"] == 301
    other = await c.subscribe(OTHER, "Level1", conflation="None")
    duplicate = await c.send("Unsubscribe", {"subscribeRequestId": "whatever"}, other)
    assert (await c.response(duplicate))["payload"]["code"] == 302
    deadline = asyncio.get_running_loop().time() + 1.5
    while asyncio.get_running_loop().time() < deadline:
        try:
            message = await c.recv(0.2)
        except TimeoutError:
            continue
        assert message.get("requestId") != request_id
    await c.close()


@pytest.mark.parametrize(("conflation", "interval"), [("250ms", 0.25), ("1s", 1.0)])
async def test_conflation_spacing(
    service: RunningService, conflation: str, interval: float
) -> None:
    c = await client(service)
    request_id = await c.subscribe(SYMBOL, "Level2", conflation=conflation)
    first = await c.wait_for(lambda m: m["type"] == "Level2" and bool(m["payload"]))
    status = first["depthStream"]
    stamps: list[float] = []
    loop = asyncio.get_running_loop()
    while len(stamps) < 4:
        message = await c.wait_for(lambda m: m["type"] == "Level2", within=interval * 4 + 5)
        assert message["requestId"] == request_id
        if message["depthStream"] != status:
            # A status change is sent at once, outside the conflation.
            status = message["depthStream"]
            continue
        assert message["payload"], "a conflated update is sent only when something changed"
        stamps.append(loop.time())
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    # Network jitter can only bunch messages by a little, never halve the interval.
    assert min(gaps) > interval * 0.7, gaps
    await c.close()


async def test_status_change_is_sent_at_once(service: RunningService) -> None:
    symbol = "FX-BTC/EUR=GEMINI"
    c = await client(service)
    l1 = await c.subscribe(symbol, "Level1", conflation="5s")
    l2 = await c.subscribe(symbol, "Level2", conflation="5s")
    await asyncio.sleep(0.5)
    hub = service.listening.service.hub

    def inject(stream: Stream) -> None:
        hub.on_event(StatusEvent(symbol, now_us(), stream, StreamState.DISCONNECTED))

    started = time.monotonic()
    service.loop.call_soon_threadsafe(inject, Stream.DEPTH)
    depth = await c.wait_for(
        lambda m: m["requestId"] == l2 and m.get("depthStream") == "disconnected", within=3
    )
    assert depth["payload"] == []
    service.loop.call_soon_threadsafe(inject, Stream.TRADE)
    trade = await c.wait_for(
        lambda m: m["requestId"] == l1 and m.get("tradeStream") == "disconnected", within=3
    )
    assert trade["type"] == "Level1"
    assert time.monotonic() - started < 2
    await c.close()


# -- token lifetime --------------------------------------------------------


async def test_token_expiry_and_refresh(tmp_path: Path) -> None:
    running = start_service(tmp_path, token_ttl_s=2)
    try:
        token = await asyncio.to_thread(running.token)
        # An expired token is refused with 3002.
        await asyncio.sleep(2.2)
        stale = await StreamClient.open(running.stream_url, token)
        assert await stale.closed_with() == 3002
        c = await StreamClient.open(running.stream_url, await asyncio.to_thread(running.token))
        refresh = await c.send("TokenRefresh", {"accessToken": "garbage"})
        assert (await c.response(refresh))["payload"]["code"] == 202
        expired = await c.send("TokenRefresh", {"accessToken": token})
        assert (await c.response(expired))["payload"]["code"] == 203
        await c.subscribe(SYMBOL, "Level1", conflation="None")
        # Refresh with new tokens for 3 s while the original would have expired at 2 s.
        for _ in range(3):
            new_token = await asyncio.to_thread(running.token)
            rid = await c.send("TokenRefresh", {"accessToken": new_token})
            response = await c.response(rid)
            assert response["payload"] == {"code": 200, "message": "All OK"}
            await asyncio.sleep(1.0)
        # Then stop refreshing: the connection is closed when the last token expires.
        assert await c.closed_with(within=5) == 3002
    finally:
        running.stop()


async def test_token_refresh_duplicate_request_id(service: RunningService) -> None:
    c = await client(service)
    request_id = await c.subscribe(SYMBOL)
    token = await asyncio.to_thread(service.token)
    rid = await c.send("TokenRefresh", {"accessToken": token}, request_id)
    assert (await c.response(rid))["payload"]["code"] == 204
    await c.close()


# -- heartbeat, slow clients, maintenance, faults ------------------------------


async def test_unanswered_ping_closes_3006(tmp_path: Path) -> None:
    running = start_service(tmp_path, heartbeat_s=0.5)
    try:
        token = await asyncio.to_thread(running.token)
        reader, writer = await asyncio.open_connection(*stream_address(running.stream_url))
        protocol = ClientProtocol(parse_uri(f"{running.stream_url}?accessToken={token}"))
        protocol.send_request(protocol.connect())
        for data in protocol.data_to_send():
            writer.write(data)
        # Read frames but never send the pongs the protocol prepares.
        started = time.monotonic()
        close_code = None
        pings = 0
        while time.monotonic() - started < 5 and close_code is None:
            data = await asyncio.wait_for(reader.read(65536), 5)
            if not data:
                break
            protocol.receive_data(data)
            protocol.data_to_send()
            for event in protocol.events_received():
                opcode = getattr(event, "opcode", None)
                if opcode is not None and opcode.name == "PING":
                    pings += 1
                if opcode is not None and opcode.name == "CLOSE":
                    close_code = protocol.close_rcvd.code if protocol.close_rcvd else None
        writer.close()
        assert pings >= 1
        assert close_code == 3006
        # A client that answers pings (the websockets default) stays connected.
        c = await StreamClient.open(running.stream_url, token)
        await c.subscribe(SYMBOL)
        await asyncio.sleep(1.6)
        await c.ws.ping()
        assert c.ws.close_code is None
        await c.close()
    finally:
        running.stop()


@pytest.mark.parametrize(
    "bound",
    [{"max_queue": 200}, {"max_queue": 1_000_000, "max_queue_bytes": 200_000}],
    ids=["messages", "bytes"],
)
async def test_slow_client_is_closed_3007_and_others_continue(
    tmp_path: Path, bound: dict[str, int]
) -> None:
    running = start_service(tmp_path, simulator_rate=100.0, **bound)
    try:
        token = await asyncio.to_thread(running.token)
        symbols = served(running.listening.service.catalog)[:30]
        reader, writer, protocol = await raw_level2_subscriber(running, token, symbols)
        # A healthy client on the same symbols keeps getting updates meanwhile.
        healthy = await StreamClient.open(running.stream_url, token)
        await healthy.subscribe(symbols[0], "Level2", conflation="None")

        def slow_one_closing() -> bool:
            return any(connection._closing for connection in connections(running))

        deadline = time.monotonic() + 60
        while not slow_one_closing() and time.monotonic() < deadline:
            await healthy.wait_for(lambda m: m["type"] == "Level2", within=5)
        assert slow_one_closing(), "the slow client was not cut off"
        # Read what the slow client was sent: its stream ends with close 3007.
        close_code = None
        while close_code is None:
            data = await asyncio.wait_for(reader.read(1 << 20), 10)
            if not data:
                break
            protocol.receive_data(data)
            protocol.events_received()
            if protocol.close_rcvd is not None:
                close_code = protocol.close_rcvd.code
        writer.close()
        assert close_code == 3007
        # Its dropped backlog is reported, so that the heap's free pages go back soon.
        assert running.listening.service.gateway.trimmer.freed_total > 0
        await healthy.wait_for(lambda m: m["type"] == "Level2", within=5)
        await healthy.close()
    finally:
        running.stop()


async def test_a_stalled_client_reads_on_with_nothing_lost(tmp_path: Path) -> None:
    """Writes the socket took only in part, then the transport's buffer and the
    backlog, reach the client whole and in order once it reads again."""
    running = start_service(tmp_path, max_queue=1_000_000, simulator_rate=100.0)
    try:
        token = await asyncio.to_thread(running.token)
        service = running.listening.service
        symbols = served(service.catalog)[:8]
        raw = small_window_socket(running.stream_url)
        # The client's small message queue makes it stop reading the socket
        # while the test does not call recv.
        c = await StreamClient.open(running.stream_url, token, sock=raw, max_queue=4)
        request_ids = {
            await c.send(
                "Subscribe",
                {"symbol": symbol, "type": "Level2", "numberOfLevels": 100, "conflation": "None"},
            ): symbol
            for symbol in symbols
        }

        await until_held_back(running)
        books: dict[str, dict[tuple[str, float], float]] = {s: {} for s in symbols}
        subscribed = 0

        def apply(message: dict[str, Any]) -> None:
            nonlocal subscribed
            if message["type"] == "SubscribeResponse":
                assert message["payload"]["code"] == 200, message
                subscribed += 1
            elif message["type"] == "Level2":
                apply_level2(books[request_ids[message["requestId"]]], message)

        for _ in range(200):
            apply(await c.recv())
        source = service.source
        assert source is not None
        for symbol in symbols:
            running.loop.call_soon_threadsafe(source.unwatch, symbol)
        while True:
            try:
                apply(await c.recv(1.0))
            except TimeoutError:
                break
        assert subscribed == len(symbols)

        async def server_views() -> dict[str, Any]:
            return {symbol: service.hub.symbols[symbol].book.top(100) for symbol in symbols}

        views = await asyncio.to_thread(running.call, server_views())
        for symbol, view in views.items():
            expected = {("bid", p): s for p, s in view.bids} | {("ask", p): s for p, s in view.asks}
            assert books[symbol] == expected, symbol
        # The backlog it read on from was reported freed, for the heap's pages to go back.
        assert service.gateway.trimmer.freed_total > 0
        await c.close()
    finally:
        running.stop()


async def test_maintenance_closes_1001_and_refuses(tmp_path: Path) -> None:
    running = start_service(tmp_path)
    try:
        c = await StreamClient.open(running.stream_url, await asyncio.to_thread(running.token))
        await c.subscribe(SYMBOL)
        service = running.listening.service
        service._window = MaintenanceWindow(0, 7 * 86_400)
        assert await c.closed_with(within=5) == 1001
        assert c.close_reason == "Service maintenance"
        with pytest.raises(InvalidStatus) as info:
            await connect(running.stream_url)
        assert info.value.response.status_code == 503
        assert int(info.value.response.headers["Retry-After"]) >= 1
    finally:
        running.stop()


async def test_store_failure_during_authentication_closes_3004(tmp_path: Path) -> None:
    running = start_service(tmp_path)
    try:
        token = await asyncio.to_thread(running.token)
        store = running.listening.service.store

        async def broken(token_id: str, kind: str, subject: str) -> Any:
            raise RuntimeError("store exploded")

        store.token_standing = broken  # type: ignore[method-assign]
        c = await StreamClient.open(running.stream_url, token)
        assert await c.closed_with() == 3004
    finally:
        running.stop()


async def test_shutdown_closes_1001_saying_so_after_what_was_sent(tmp_path: Path) -> None:
    running = start_service(tmp_path)
    c = await StreamClient.open(running.stream_url, await asyncio.to_thread(running.token))
    await c.subscribe(SYMBOL)
    started = asyncio.get_running_loop().time()
    await asyncio.to_thread(running.stop)
    assert await c.closed_with(within=10) == 1001
    assert c.close_reason == "Server shutting down"
    assert asyncio.get_running_loop().time() - started < 10


async def test_revoking_a_key_closes_its_open_streams_3001(tmp_path: Path) -> None:
    running = start_service(tmp_path, recheck_s=0.3)
    try:
        store = running.listening.service.store
        key_id, secret = await asyncio.to_thread(running.key, "dana")
        response = await asyncio.to_thread(
            httpx.post,
            f"{running.base_url}/v1/auth/authenticate",
            json={"type": "Key", "payload": {"accessKeyID": key_id, "secretAccessKey": secret}},
        )
        doomed = await StreamClient.open(running.stream_url, response.json()["accessToken"])
        await doomed.subscribe(SYMBOL)
        other = await StreamClient.open(running.stream_url, await asyncio.to_thread(running.token))
        await other.subscribe(SYMBOL, conflation="None")
        # Entitlements changed while connected apply to the next Subscribe.
        await asyncio.to_thread(running.call, store.revoke("dana", "BITMEX"))
        await asyncio.sleep(0.8)
        rid = await doomed.send("Subscribe", {"symbol": "PERP-BTC/USD=BITMEX", "type": "Level1"})
        assert (await doomed.response(rid))["payload"]["code"] == 205
        await asyncio.to_thread(running.call, store.revoke_key(key_id))
        assert await doomed.closed_with(within=5) == 3001
        # Other users' streams go on.
        await other.wait_for(lambda m: m["type"] == "Level1", within=5)
        await other.close()
    finally:
        running.stop()


def _metric(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def test_stream_metrics(service: RunningService) -> None:
    async def scrape() -> str:
        response = await asyncio.to_thread(httpx.get, f"{service.base_url}/metrics")
        return response.text

    before = await scrape()
    c = await client(service)
    await c.subscribe(SYMBOL, "Level2", conflation="None")
    for _ in range(5):
        await c.wait_for(lambda m: m["type"] == "Level2")
    during = await scrape()
    assert _metric(during, "caspian_stream_connections") >= 1
    assert _metric(during, 'caspian_stream_subscriptions{type="Level2"}') >= 1
    assert (
        _metric(during, "caspian_stream_messages_total")
        >= _metric(before, "caspian_stream_messages_total") + 5
    )
    closed_before = _metric(during, 'caspian_stream_closes_total{code="3000"}')
    anonymous = await StreamClient.open(service.stream_url)
    assert await anonymous.closed_with() == 3000
    after = await scrape()
    assert _metric(after, 'caspian_stream_closes_total{code="3000"}') == closed_before + 1
    await c.close()


async def test_the_first_message_of_a_cold_subscription_reports_no_false_outage(
    service: RunningService,
) -> None:
    c = await client(service)
    # Symbols nobody watched yet: the simulator starts them at once.
    symbols = served(service.listening.service.catalog)[40:44]

    async def first_update(symbol: str, type_: str) -> dict[str, Any]:
        request_id = await c.subscribe(symbol, type_)
        return await c.wait_for(lambda m: m.get("requestId") == request_id)

    for symbol in symbols[:2]:
        first = await first_update(symbol, "Level1")
        assert first["bboStream"] == first["tradeStream"] == "connected", first
    for symbol in symbols[2:]:
        first = await first_update(symbol, "Level2")
        assert first["depthStream"] == "connected" and first["payload"], first
    await c.close()


@pytest.mark.parametrize(
    ("source", "served", "unserved", "why"),
    [
        ("live:GDAX", None, "FX-BTC/USD=GEMINI", "GEMINI is not streamed live here"),
        (f"replay:{SAMPLE}", SYMBOL, "FX-BTC/USDT=BINANCE", "has no events of FX-BTC/USDT="),
    ],
    ids=["live", "replay"],
)
async def test_a_subscribe_no_source_will_serve_is_202_saying_why(
    tmp_path: Path, source: str, served: str | None, unserved: str, why: str
) -> None:
    running = start_service(tmp_path, source=source)
    try:
        c = await StreamClient.open(running.stream_url, await asyncio.to_thread(running.token))
        request_id = await c.send("Subscribe", {"symbol": unserved, "type": "Level1"})
        response = await c.response(request_id)
        assert response["payload"]["code"] == 202
        assert why in response["payload"]["message"]
        if served is not None:
            await c.subscribe(served, "Level1")
        await c.close()
    finally:
        running.stop()


def frame_opcodes(data: bytes) -> list[int]:
    """The opcodes of ``data``'s unmasked frames, in order, by websockets' frame parser
    (its protocol objects parse nothing past a close, which is what is looked for)."""
    reader = StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    opcodes = []
    while True:
        parsing = Frame.parse(reader.read_exact, mask=False)
        try:
            next(parsing)
        except StopIteration as parsed:
            opcodes.append(parsed.value.opcode.value)
        except EOFError:
            return opcodes
        else:
            raise AssertionError("a frame cut short")


async def test_no_data_frame_follows_the_answer_to_a_clients_close(tmp_path: Path) -> None:
    """A client that closes while the server holds a backlog for it gets the close
    answer last: the held messages are dropped, not written after it (RFC 6455)."""
    running = start_service(tmp_path, simulator_rate=100.0)
    try:
        token = await asyncio.to_thread(running.token)
        symbols = served(running.listening.service.catalog)[:8]
        reader, writer, protocol = await raw_level2_subscriber(running, token, symbols)

        await until_held_back(running)
        protocol.send_close(1000)
        for data in protocol.data_to_send():
            writer.write(data)
        await writer.drain()
        received = bytearray()
        while data := await asyncio.wait_for(reader.read(1 << 20), 10):
            received += data
        writer.close()
        opcodes = frame_opcodes(bytes(received))
        assert Opcode.CLOSE.value in opcodes
        after = opcodes[opcodes.index(Opcode.CLOSE.value) + 1 :]
        assert after == [], f"{len(after)} frames after the close answer"
    finally:
        running.stop()
