"""Caspian's feed WebSocket client against real servers: the websockets library's, and raw
ones that break the protocol on purpose. Every scenario runs on asyncio's loop and on
uvloop, the service's default."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Any

import pytest
import uvloop
from websockets.asyncio.server import ServerConnection, serve
from websockets.frames import Close, Opcode

from caspian.sources.live import wsclient

Runner = Callable[[Coroutine[Any, Any, None]], None]


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Runner:
    return asyncio.run if request.param == "asyncio" else uvloop.run


class Received:
    def __init__(self) -> None:
        self.messages: list[bytes] = []
        self.arrived = asyncio.Event()

    def __call__(self, payload: bytes) -> None:
        self.messages.append(payload)
        self.arrived.set()

    async def count(self, n: int) -> None:
        async with asyncio.timeout(5):
            while len(self.messages) < n:
                self.arrived.clear()
                await self.arrived.wait()


@asynccontextmanager
async def library_server(
    handler: Callable[[ServerConnection], Awaitable[None]],
) -> AsyncIterator[str]:
    async with serve(handler, "127.0.0.1", 0, compression=None) as server:
        port = server.sockets[0].getsockname()[1]
        yield f"ws://127.0.0.1:{port}/ws?streams=a"


@asynccontextmanager
async def raw_server(
    script: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
) -> AsyncIterator[str]:
    """A server that runs ``script`` on each connection, from the request on."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await script(reader, writer)
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    async with server:
        port = server.sockets[0].getsockname()[1]
        yield f"ws://127.0.0.1:{port}/ws"


async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Reads the client's handshake and answers it as RFC 6455 says."""
    head = await reader.readuntil(b"\r\n\r\n")
    key = next(
        line.split(b":", 1)[1].strip()
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"sec-websocket-key:")
    )
    digest = hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest()
    writer.write(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: " + base64.b64encode(digest) + b"\r\n\r\n"
    )


def frame(first: int, payload: bytes, *, masked: bool = False) -> bytes:
    """A frame as a server writes it: ``first`` is its first byte (FIN, RSV, opcode)."""
    length = len(payload)
    mask_bit = 0x80 if masked else 0
    if length < 126:
        head = bytes((first, mask_bit | length))
    elif length < 65536:
        head = bytes((first, mask_bit | 126)) + length.to_bytes(2, "big")
    else:
        head = bytes((first, mask_bit | 127)) + length.to_bytes(8, "big")
    if masked:
        return head + b"\0\0\0\0" + payload
    return head + payload


async def client_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """The next frame the client sent: its opcode and unmasked payload; it must be masked."""
    first, second = await reader.readexactly(2)
    assert second & 0x80, "a client frame must be masked"
    length = second & 0x7F
    if length == 126:
        length = int.from_bytes(await reader.readexactly(2), "big")
    elif length == 127:
        length = int.from_bytes(await reader.readexactly(8), "big")
    mask = await reader.readexactly(4)
    data = await reader.readexactly(length)
    return first & 0x0F, bytes(b ^ mask[i % 4] for i, b in enumerate(data))


async def ended(socket: wsclient.WebSocket) -> BaseException:
    async with asyncio.timeout(5):
        await asyncio.wait([socket.closed])
    exc = socket.closed.exception()
    assert exc is not None
    return exc


async def until_it_ends(url: str) -> tuple[list[bytes], BaseException]:
    """What a connection to ``url`` received, and why it ended."""
    received = Received()
    socket = await wsclient.connect(url, received, max_size=2**20)
    return received.messages, await ended(socket)


def test_messages_of_every_length_arrive_whole_and_in_order(run: Runner) -> None:
    sizes = [0, 10, 125, 126, 200, 65535, 65536, 70_000]
    payloads = [os.urandom(size // 2).hex().encode() + b"x" * (size % 2) for size in sizes]

    async def main() -> None:
        got_text: asyncio.Future[str] = asyncio.get_running_loop().create_future()

        async def handler(connection: ServerConnection) -> None:
            for payload in payloads:
                await connection.send(payload.decode())
            await connection.send(b"\x00binary")
            # Fragmented: three frames, one message.
            await connection.send(["frag", "ment", "ed"])
            got_text.set_result(str(await connection.recv()))
            await connection.wait_closed()

        received = Received()
        async with library_server(handler) as url:
            socket = await wsclient.connect(url, received, max_size=2**20)
            await received.count(len(payloads) + 2)
            socket.send_text('{"method":"SUBSCRIBE"}')
            async with asyncio.timeout(5):
                text = await got_text
            await socket.close()
        assert received.messages == [*payloads, b"\x00binary", b"fragmented"]
        # The library's server accepts only masked client frames, and decodes text ones.
        assert text == '{"method":"SUBSCRIBE"}'

    run(main())


def test_a_ping_is_answered_and_a_close_frame_ends_the_connection(run: Runner) -> None:
    async def main() -> None:
        codes: list[int | None] = []

        async def handler(connection: ServerConnection) -> None:
            pong = await connection.ping(b"are you there")
            async with asyncio.timeout(5):
                await pong
            await connection.send("after the ping")
            await connection.close(1001, "going away")
            codes.append(connection.close_code)

        async with library_server(handler) as url:
            messages, exc = await until_it_ends(url)
        assert messages == [b"after the ping"]
        assert isinstance(exc, ConnectionError)
        assert "1001" in str(exc) and "going away" in str(exc)
        # The client answered the close frame, so the server's closing handshake completed.
        assert codes == [1001]

    run(main())


def test_a_connection_cut_ends_it(run: Runner) -> None:
    async def main() -> None:
        async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await accept(reader, writer)
            writer.write(frame(0x81, b"one"))
            await writer.drain()
            writer.transport.abort()

        async with raw_server(script) as url:
            messages, exc = await until_it_ends(url)
        assert messages == [b"one"]
        assert isinstance(exc, ConnectionError)

    run(main())


@pytest.mark.parametrize(
    ("answer", "complaint"),
    [
        (b"HTTP/1.1 403 Forbidden\r\nContent-Length: 9\r\n\r\nno access", "403 Forbidden"),
        (
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: bm90IHRoZSBhbnN3ZXI=\r\n\r\n",
            "Sec-WebSocket-Accept",
        ),
        (b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n\r\n", "upgrade"),
        (b"HTTP/1.1 200 OK\r\n" + b"X-Filler: " + b"y" * 20_000, "16 KiB"),
    ],
)
def test_a_refused_or_wrong_handshake_fails_the_connect(
    run: Runner, answer: bytes, complaint: str
) -> None:
    async def main() -> None:
        async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(answer)
            await writer.drain()
            await reader.read()

        async with raw_server(script) as url:
            with pytest.raises(ConnectionError, match=complaint):
                await wsclient.connect(url, Received(), max_size=2**20)

    run(main())


def test_a_server_that_never_answers_times_out(run: Runner) -> None:
    async def main() -> None:
        async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.read()

        async with raw_server(script) as url:
            with pytest.raises(TimeoutError):
                await wsclient.connect(url, Received(), max_size=2**20, open_timeout=0.2)

    run(main())


@pytest.mark.parametrize(
    ("bad", "code", "complaint"),
    [
        (frame(0x81, b"masked", masked=True), 1002, "masked"),
        (frame(0xC1, b"compressed?"), 1002, "reserved bits"),
        (frame(0x83, b"opcode 3"), 1002, "unknown opcode"),
        (frame(0x09, b"ping"), 1002, "fragmented or oversized control"),
        (frame(0x80, b"continuation"), 1002, "continuation"),
        (frame(0x01, b"part") + frame(0x81, b"new"), 1002, "inside a fragmented"),
        (frame(0x81, b"z" * 2000), 1009, "over the limit"),
        (frame(0x01, b"z" * 800) + frame(0x80, b"z" * 800), 1009, "over the limit"),
        (frame(0x88, b"\x03"), 1002, "invalid close"),
    ],
)
def test_a_protocol_error_closes_with_its_code_and_spares_what_came_before(
    run: Runner, bad: bytes, code: int, complaint: str
) -> None:
    async def main() -> None:
        sent: asyncio.Future[tuple[int, bytes]] = asyncio.get_running_loop().create_future()

        async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await accept(reader, writer)
            writer.write(frame(0x81, b"good") + bad + frame(0x81, b"never handled"))
            await writer.drain()
            sent.set_result(await client_frame(reader))

        received = Received()
        async with raw_server(script) as url:
            socket = await wsclient.connect(url, received, max_size=1000)
            exc = await ended(socket)
            async with asyncio.timeout(5):
                opcode, payload = await sent
        assert received.messages == [b"good"]
        assert isinstance(exc, wsclient.ProtocolError)
        assert complaint in str(exc)
        assert opcode == Opcode.CLOSE.value
        assert Close.parse(payload).code == code

    run(main())


def test_a_burst_is_handled_a_batch_per_loop_turn(run: Runner) -> None:
    async def main() -> None:
        burst = b"".join(frame(0x81, f"message {i}".encode()) for i in range(1000))

        async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await accept(reader, writer)
            # Split mid-frame too, so that frames straddle reads.
            for start in range(0, len(burst), 777):
                writer.write(burst[start : start + 777])
            await writer.drain()
            await reader.read()

        turns = 0
        turn_of: list[int] = []

        async def ticker() -> None:
            nonlocal turns
            while True:
                await asyncio.sleep(0)
                turns += 1

        def on_message(payload: bytes) -> None:
            received(payload)
            turn_of.append(turns)

        received = Received()
        task = asyncio.create_task(ticker())
        async with raw_server(script) as url:
            socket = await wsclient.connect(url, on_message, max_size=2**20, batch=32)
            await received.count(1000)
            await socket.close()
        task.cancel()
        assert received.messages == [f"message {i}".encode() for i in range(1000)]
        per_turn = max(turn_of.count(turn) for turn in set(turn_of))
        # One batch per callback: a turn can run the batch that follows a pause
        # and, once reading resumed, one read's batch.
        assert per_turn <= 2 * 32

    run(main())


def test_a_failing_handler_ends_the_connection_with_its_exception(run: Runner) -> None:
    async def main() -> None:
        async def handler(connection: ServerConnection) -> None:
            await connection.send("fine")
            await connection.send("boom")
            await connection.wait_closed()

        def on_message(payload: bytes) -> None:
            if payload == b"boom":
                raise RuntimeError("a bug in the parser")

        async with library_server(handler) as url:
            socket = await wsclient.connect(url, on_message, max_size=2**20)
            exc = await ended(socket)
            await socket.close()
        assert isinstance(exc, RuntimeError)

    run(main())


def test_close_sends_a_close_frame_and_ends_the_connection(run: Runner) -> None:
    async def main() -> None:
        seen: list[tuple[int, bytes]] = []

        async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await accept(reader, writer)
            seen.append(await client_frame(reader))
            writer.write(frame(0x88, Close(1000, "").serialize()))
            await writer.drain()

        async with raw_server(script) as url:
            socket = await wsclient.connect(url, Received(), max_size=2**20)
            async with asyncio.timeout(5):
                await socket.close()
            socket.send_text("after the close: dropped")
        assert [opcode for opcode, _ in seen] == [Opcode.CLOSE.value]
        assert Close.parse(seen[0][1]).code == 1000
        assert socket.closed.done()

    run(main())


def test_only_websocket_addresses_are_opened() -> None:
    async def main() -> None:
        with pytest.raises(ValueError, match="not a WebSocket address"):
            await wsclient.connect("https://example.com/ws", Received(), max_size=10)

    asyncio.run(main())
