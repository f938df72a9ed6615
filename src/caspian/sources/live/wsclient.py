"""A WebSocket client for a busy market-data feed: messages handled as their bytes arrive.

A feed connection does one thing at volume: it receives small text messages
and hands each to a parser. aiohttp's client reads frames in compiled code
but hands each message through ``receive()``, a queue and a task wake-up;
on a Binance-format feed at 10 messages a millisecond that chain cost about
2 µs a message and 25 µs a wake-up more than parsing the frames here, in
the protocol's ``data_received`` (``bench/README.md``, "Live ingest"). So
this client parses the frames a server sends (unmasked, RFC 6455) itself and
calls ``on_message`` with each message's payload; the rest of the protocol
is small, and uses the ``websockets`` library's pieces: the handshake key and
its expected answer, and masked frames for what the client sends.

Bounded turns: at most ``batch`` messages are handled per event-loop turn.
When more are waiting, reading from the socket pauses and the next batch
follows in the next turn, so a burst can hold the loop for one batch only,
and what waits is bounded by the socket's buffers, not by memory here.

What it does not do, and refuses: extensions (it asks for none, so a
server's compressed frames are a protocol error), proxies, and messages over
``max_size``. A ping is answered with a pong; a close frame is answered and
ends the connection. Every end, clean or not, sets :attr:`WebSocket.closed`
to a :class:`ConnectionError` saying why (or to the exception ``on_message``
raised).
"""

from __future__ import annotations

import asyncio
import functools
import ssl
from collections.abc import Callable
from typing import cast
from urllib.parse import urlsplit

from websockets.frames import Close, CloseCode, Frame, Opcode
from websockets.utils import accept_key, generate_key

#: Messages handled in one event-loop turn, unless ``connect`` is told otherwise.
BATCH = 32
#: How long the closing handshake may take before the socket is cut.
CLOSE_TIMEOUT_S = 1.0
#: Longest response head accepted in the handshake.
_MAX_HEAD = 16_384

_TEXT = 0x1
_BINARY = 0x2
_CONTINUATION = 0x0
_CLOSE = 0x8
_PING = 0x9
_PONG = 0xA


class ProtocolError(ConnectionError):
    """The server broke the WebSocket protocol; the connection is closed with ``code``."""

    def __init__(self, message: str, code: int = CloseCode.PROTOCOL_ERROR) -> None:
        super().__init__(message)
        self.code = code


class WebSocket(asyncio.Protocol):
    """One client connection; made by :func:`connect`."""

    def __init__(
        self,
        request: bytes,
        key: str,
        on_message: Callable[[bytes], None],
        max_size: int,
        batch: int,
    ) -> None:
        self._request = request
        self._key = key
        self._on_message = on_message
        self._max_size = max_size
        self._batch = batch
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        #: Done once the handshake succeeded, or with its failure.
        self.opened: asyncio.Future[None] = self._loop.create_future()
        #: Done with the reason the connection ended, always an exception.
        self.closed: asyncio.Future[None] = self._loop.create_future()
        self._lost: asyncio.Future[None] = self._loop.create_future()
        self._head = b""
        #: Received bytes not handled yet, from ``_pos`` on.
        self._data = b""
        self._pos = 0
        self._paused = False
        self._fragments: list[bytes] = []
        self._fragments_size = 0
        self._close_sent = False
        self._cut: asyncio.TimerHandle | None = None

    # -- asyncio.Protocol --------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not registered as asyncio.Transport.
        self._transport = cast(asyncio.Transport, transport)
        self._transport.write(self._request)

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        if self._cut is not None:
            self._cut.cancel()
        self._end(ConnectionError(str(exc) if exc else "the server closed the connection"))
        self._lost.set_result(None)

    def data_received(self, data: bytes) -> None:
        if self.closed.done():
            return
        if not self.opened.done():
            data = self._handshake(data)
            if not data:
                return
        if self._pos < len(self._data):
            data = self._data[self._pos :] + data
        self._data = data
        self._pos = 0
        self._handle()

    # -- the client's side ---------------------------------------------------------

    def send_text(self, text: str) -> None:
        """One text message; dropped if the connection is no longer open."""
        self._send(Frame(Opcode.TEXT, text.encode()))

    async def close(self) -> None:
        """The closing handshake, cut after :data:`CLOSE_TIMEOUT_S`."""
        if self._transport is None:
            return
        self._end(ConnectionError("closed by this side"))
        self._send_close(CloseCode.NORMAL_CLOSURE, "")
        await asyncio.wait([self._lost], timeout=CLOSE_TIMEOUT_S)
        self._abort()

    # -- internals -------------------------------------------------------------------

    def _send(self, frame: Frame) -> None:
        if self._transport is not None and not self._close_sent:
            self._transport.write(frame.serialize(mask=True))

    def _send_close(self, code: int, reason: str) -> None:
        if self._transport is None or self._close_sent:
            return
        self._transport.write(
            Frame(Opcode.CLOSE, Close(code, reason).serialize()).serialize(mask=True)
        )
        self._close_sent = True
        # The server closes TCP after answering; one that does not is cut.
        self._cut = self._loop.call_later(CLOSE_TIMEOUT_S, self._abort)

    def _abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    def _end(self, exc: BaseException) -> None:
        """The connection is over, for ``exc``: the first reason given is kept."""
        if not self.opened.done():
            self.opened.set_exception(exc)
            # Read here, so that a failed open that nobody awaits is not reported.
            self.opened.exception()
        if not self.closed.done():
            self.closed.set_exception(exc)
            self.closed.exception()
        self._data = b""
        self._pos = 0
        self._fragments = []

    def _fail(self, exc: BaseException) -> None:
        """Ends the connection for ``exc``; what the server sends from then on is ignored."""
        self._end(exc)
        self._send_close(
            exc.code if isinstance(exc, ProtocolError) else CloseCode.INTERNAL_ERROR, ""
        )

    def _handshake(self, data: bytes) -> bytes:
        """Reads the server's answer; the bytes that follow it, once it is complete."""
        head = self._head + data
        end = head.find(b"\r\n\r\n")
        if end < 0:
            if len(head) > _MAX_HEAD:
                self._refuse("a handshake answer longer than 16 KiB")
            else:
                self._head = head
            return b""
        self._head = b""
        lines = head[:end].decode("latin-1").split("\r\n")
        status = lines[0].split(" ", 2)
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if len(status) < 2 or status[1] != "101":
            answer = lines[0]
            body = head[end + 4 : end + 204].decode("utf-8", "replace")
            self._refuse(f"the server refused the WebSocket: {answer!r} {body!r}".rstrip())
            return b""
        if headers.get("upgrade", "").lower() != "websocket":
            self._refuse("the server's answer does not upgrade to websocket")
        elif "upgrade" not in headers.get("connection", "").lower():
            self._refuse("the server's answer does not upgrade the connection")
        elif headers.get("sec-websocket-accept") != accept_key(self._key):
            self._refuse("the server's Sec-WebSocket-Accept does not answer the key")
        elif headers.get("sec-websocket-extensions"):
            self._refuse("the server chose an extension that was not offered")
        else:
            self.opened.set_result(None)
            return head[end + 4 :]
        return b""

    def _refuse(self, why: str) -> None:
        self._end(ConnectionError(why))
        if self._transport is not None:
            self._transport.abort()

    def _handle(self) -> None:
        """Handles up to a batch of messages; pauses reading while more are waiting."""
        try:
            waiting = self._frames()
        except Exception as exc:
            self._fail(exc)
            return
        if self._transport is None or self.closed.done():
            return
        if waiting:
            if not self._paused:
                self._paused = True
                self._transport.pause_reading()
            self._loop.call_soon(self._handle)
        elif self._paused:
            self._paused = False
            self._transport.resume_reading()

    def _frames(self) -> bool:
        """Handles whole frames from ``_pos``; whether a batch was handled and more may wait."""
        data = self._data
        pos = self._pos
        size = len(data)
        on_message = self._on_message
        handled = 0
        try:
            while size - pos >= 2:
                if handled == self._batch:
                    return True
                first = data[pos]
                length = data[pos + 1]
                if length & 0x80:
                    raise ProtocolError("a masked frame from the server")
                length &= 0x7F
                start = pos + 2
                if length == 126:
                    if size - pos < 4:
                        break
                    length = int.from_bytes(data[start : start + 2], "big")
                    start += 2
                elif length == 127:
                    if size - pos < 10:
                        break
                    length = int.from_bytes(data[start : start + 8], "big")
                    start += 8
                if length > self._max_size:
                    raise ProtocolError(
                        f"a frame of {length} bytes, over the limit of {self._max_size}",
                        CloseCode.MESSAGE_TOO_BIG,
                    )
                end = start + length
                if end > size:
                    break
                pos = end
                handled += 1
                if (first == 0x81 or first == 0x82) and not self._fragments:
                    on_message(data[start:end])
                else:
                    self._frame(first, data[start:end])
                    if self.closed.done():
                        return False
        finally:
            self._pos = pos
        if pos == size:
            self._data = b""
            self._pos = 0
        return False

    def _frame(self, first: int, payload: bytes) -> None:
        """Any frame but a whole text or binary message."""
        if first & 0x70:
            raise ProtocolError("a frame with reserved bits set (no extension was agreed)")
        fin = first & 0x80
        opcode = first & 0x0F
        if opcode >= _CLOSE:
            if not fin or len(payload) > 125:
                raise ProtocolError("a fragmented or oversized control frame")
            if opcode == _PING:
                self._send(Frame(Opcode.PONG, payload))
            elif opcode == _CLOSE:
                self._closed_by_server(payload)
            elif opcode != _PONG:
                raise ProtocolError(f"a frame of unknown opcode {opcode}")
            return
        if opcode in (_TEXT, _BINARY):
            if self._fragments:
                raise ProtocolError("a new message inside a fragmented one")
        elif opcode != _CONTINUATION:
            raise ProtocolError(f"a frame of unknown opcode {opcode}")
        elif not self._fragments:
            raise ProtocolError("a continuation frame with no message to continue")
        self._fragments_size += len(payload)
        if self._fragments_size > self._max_size:
            raise ProtocolError(
                f"a message over the limit of {self._max_size} bytes", CloseCode.MESSAGE_TOO_BIG
            )
        self._fragments.append(payload)
        if fin:
            message = b"".join(self._fragments)
            self._fragments = []
            self._fragments_size = 0
            self._on_message(message)

    def _closed_by_server(self, payload: bytes) -> None:
        try:
            close = Close.parse(payload) if payload else None
        except Exception as exc:
            raise ProtocolError(f"an invalid close frame ({exc})") from None
        said = f"code {close.code} {close.reason!r}" if close is not None else "no code"
        self._end(ConnectionError(f"the server closed the WebSocket ({said})"))
        self._send_close(close.code if close is not None else CloseCode.NORMAL_CLOSURE, "")


@functools.cache
def _tls_context() -> ssl.SSLContext:
    """One context for every connection: loading the system's CA certificates is slow."""
    return ssl.create_default_context()


async def connect(
    url: str,
    on_message: Callable[[bytes], None],
    *,
    max_size: int,
    batch: int = BATCH,
    open_timeout: float = 10.0,
) -> WebSocket:
    """Opens ``url`` (``ws://`` or ``wss://``); each message's payload then goes to
    ``on_message``, at most ``batch`` in one event-loop turn.

    Raises ConnectionError (or OSError) if it cannot be opened, TimeoutError
    after ``open_timeout``.
    """
    parts = urlsplit(url)
    hostname = parts.hostname
    if parts.scheme not in ("ws", "wss") or not hostname:
        raise ValueError(f"not a WebSocket address: {url!r}")
    secure = parts.scheme == "wss"
    port = parts.port or (443 if secure else 80)
    target = parts.path or "/"
    if parts.query:
        target += f"?{parts.query}"
    host = parts.netloc.rpartition("@")[2]
    key = generate_key()
    request = (
        f"GET {target} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()
    loop = asyncio.get_running_loop()

    def protocol() -> WebSocket:
        return WebSocket(request, key, on_message, max_size, batch)

    async def opening() -> WebSocket:
        context = _tls_context() if secure else None
        _, made = await loop.create_connection(
            protocol,
            hostname,
            port,
            ssl=context,
            server_hostname=hostname if secure else None,
        )
        try:
            await made.opened
        except BaseException:
            made._abort()
            raise
        return made

    return await asyncio.wait_for(opening(), open_timeout)
