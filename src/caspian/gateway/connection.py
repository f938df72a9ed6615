"""The socket shell around a :class:`~caspian.gateway.session.Session`: transport, frames, timers.

uvicorn hands every WebSocket upgrade to this asyncio protocol (its ``ws``
protocol class), so REST and the stream share one address while stream
frames bypass the ASGI layer. The websockets library's sans-I/O protocol does
the handshake, inbound frame parsing, pongs and the closing handshake.
Outbound data frames are written here directly: a server frame is a 2 to 10
byte header and the payload, and building it by hand is what makes a
delivery cheap (see ``bench/``).

Writes are gathered during one event-loop turn and flushed together. When the
client reads too slowly the transport pauses us; messages then wait in a
bounded backlog, and a backlog of ``max_queue`` messages closes the
connection with 3007, so a slow client costs bounded memory and never delays
anyone else. The backlog is one contiguous buffer, not a frame object per
message: tens of thousands of small frames were spread over the allocator's
small-object arenas among longer-lived objects, and once freed those arenas
could not go back to the system, so every slow client raised the RSS floor.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from array import array
from typing import Any, cast
from urllib.parse import parse_qs, urlsplit

from websockets.frames import Frame, Opcode
from websockets.http11 import Request
from websockets.protocol import SEND_EOF, State
from websockets.server import ServerProtocol

from caspian.codes import CLOSE_REASONS, CloseCode
from caspian.gateway.gateway import Gateway
from caspian.gateway.registry import new_session
from caspian.gateway.session import (
    CONNECT_CHECK,
    Action,
    Close,
    Ping,
    Send,
    Session,
    Start,
    Stop,
    TokenCheck,
    VerifyToken,
    Wake,
)
from caspian.gateway.session import State as SessionState
from caspian.guard import ConnectionLimits
from caspian.metrics import MESSAGES_PACED, STREAM_CLOSES, STREAM_CONNECTIONS
from caspian.pacing import LogThrottle
from caspian.store import SessionInfo
from caspian.timefmt import now_us

log = logging.getLogger(__name__)
_throttled = LogThrottle(log)

STREAM_PATH = "/v1/stream"
#: How long a closing connection may take to answer before it is cut.
CLOSE_TIMEOUT_S = 5.0
#: Backlogged bytes written per transport.write when a paused client resumes.
_RESUME_BYTES = 1 << 18

_TEXT_FIN = 0x81
_pack16 = struct.Struct("!BBH").pack
_pack64 = struct.Struct("!BBQ").pack


def _text_header(length: int) -> bytes:
    if length < 126:
        return bytes((_TEXT_FIN, length))
    if length < 65_536:
        return _pack16(_TEXT_FIN, 126, length)
    return _pack64(_TEXT_FIN, 127, length)


#: The headers of the usual message sizes, ready: a lookup instead of a call
#: took a sixth off the time the hub spends fanning an update out to a
#: thousand clients (``bench/bench_fanout.py``).
_TABLED = 4096
_HEADERS = tuple(_text_header(length) for length in range(_TABLED))


def token_from_request(request: Request) -> str | None:
    """The access token of a stream request: ``?accessToken=`` or ``Authorization``."""
    query = parse_qs(urlsplit(request.path).query)
    values = query.get("accessToken")
    if values and values[0]:
        return values[0]
    header = request.headers.get("Authorization", "").strip()
    if header[:7].lower() == "bearer ":
        header = header[7:].strip()
    return header or None


class StreamConnection(asyncio.Protocol):
    """One stream client. uvicorn makes one per upgrade, from :meth:`bound`'s class."""

    gateway: Gateway
    limits: ConnectionLimits

    @classmethod
    def bound(cls, gateway: Gateway, limits: ConnectionLimits) -> type[StreamConnection]:
        """A subclass serving ``gateway``: uvicorn takes a class, not a factory."""
        return type("BoundStreamConnection", (cls,), {"gateway": gateway, "limits": limits})

    def __init__(self, **uvicorn_state: Any) -> None:
        gateway = self._gateway = self.gateway
        # uvicorn's registry: its shutdown calls shutdown() on each member.
        server_state = uvicorn_state.get("server_state")
        self._uvicorn_connections: set[Any] | None = (
            server_state.connections if server_state is not None else None
        )
        self._ws = ServerProtocol(max_size=gateway.settings.max_message_bytes)
        self._transport: asyncio.Transport | None = None
        self._loop = asyncio.get_running_loop()
        self._session = Session(gateway.settings.limits, gateway.resolve, self._loop.time)
        #: Set once the connect-time token check succeeded.
        self._registration: SessionInfo | None = None
        self._reading_paused = False
        self._wake: asyncio.TimerHandle | None = None
        self._fragments: list[bytes] = []
        self._fragments_text = False
        self._out: list[bytes] = []
        #: Waiting in the gateway's flush list.
        self._flush_queued = False
        self._paused = False
        self._backlog = bytearray()
        #: The length of each frame in the backlog, in order: its count is the message bound's.
        self._backlog_frames = array("L")
        self._closing = False
        self._expiry: asyncio.TimerHandle | None = None
        self._abort: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    # -- asyncio.Protocol ------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do the job without subclassing asyncio.Transport.
        self._transport = cast(asyncio.Transport, transport)
        if self._uvicorn_connections is not None:
            self._uvicorn_connections.add(self)

    def data_received(self, data: bytes) -> None:
        self._ws.receive_data(data)
        for event in self._ws.events_received():
            if isinstance(event, Frame):
                self._on_frame(event)
            elif isinstance(event, Request):
                self._on_request(event)
        self._write_protocol_output()

    def eof_received(self) -> bool | None:
        self._ws.receive_eof()
        self._write_protocol_output()
        return None

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        transport = self._transport
        backlog = self._backlog
        frames = self._backlog_frames
        drained = 0
        while backlog and not self._paused and transport is not None:
            size = count = 0
            for length in frames:
                size += length
                count += 1
                if size >= _RESUME_BYTES:
                    break
            # A copy for the transport, which may keep what it cannot send at once.
            batch = bytes(memoryview(backlog)[:size])
            del backlog[:size]
            del frames[:count]
            drained += size
            transport.write(batch)
        # The batches are freed once the socket took them.
        self._gateway.trimmer.freed(drained)

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        self._end_session()
        for handle in (self._expiry, self._abort, self._wake):
            if handle is not None:
                handle.cancel()
        # Token checks in flight are left to finish, not cancelled: cancelling
        # one inside the store's driver leaked its database connection. They
        # find the connection closing and do nothing more.
        if self._transport is not None:
            self.limits.release(self._transport)
        self._gateway.trimmer.freed(len(self._backlog))
        self._drop_backlog()
        self._out.clear()
        if self in self._gateway.connections:
            self._gateway.connections.discard(self)
            STREAM_CONNECTIONS.dec()
        if self._uvicorn_connections is not None:
            self._uvicorn_connections.discard(self)
        self._transport = None

    def shutdown(self) -> None:
        """uvicorn is stopping: what was sent is flushed, then 1001."""
        self.close(CloseCode.GOING_AWAY)

    # -- handshake ---------------------------------------------------------

    def _on_request(self, request: Request) -> None:
        path = urlsplit(request.path).path
        if path != STREAM_PATH:
            self._ws.send_response(self._ws.reject(404, f"No WebSocket endpoint at {path}\n"))
            return
        remaining = self._gateway.in_maintenance()
        if remaining > 0:
            response = self._ws.reject(503, "The service is down for maintenance\n")
            response.headers["Retry-After"] = str(max(1, int(remaining + 0.999)))
            self._ws.send_response(response)
            return
        response = self._ws.accept(request)
        self._ws.send_response(response)
        if response.status_code != 101:
            return
        self._gateway.connections.add(self)
        STREAM_CONNECTIONS.inc()
        self._act(self._session.connect(token_from_request(request)))

    # -- inbound ---------------------------------------------------------

    def _on_frame(self, frame: Frame) -> None:
        opcode = frame.opcode
        if opcode is Opcode.TEXT or opcode is Opcode.BINARY:
            if frame.fin:
                self._receive(bytes(frame.data), opcode is Opcode.TEXT)
            else:
                self._fragments = [bytes(frame.data)]
                self._fragments_text = opcode is Opcode.TEXT
        elif opcode is Opcode.CONT:
            self._fragments.append(bytes(frame.data))
            if frame.fin:
                message = b"".join(self._fragments)
                self._fragments = []
                self._receive(message, self._fragments_text)
        elif opcode is Opcode.PONG:
            self._session.pong()
        elif opcode is Opcode.CLOSE:
            self._client_closing()

    def _client_closing(self) -> None:
        """The client is leaving. websockets answers its close frame, and no data frame
        may follow that answer (RFC 6455), so what still waits for the client is dropped."""
        if self._closing:
            return
        self._closing = True
        if self._wake is not None:
            self._wake.cancel()
            self._wake = None
        self._gateway.trimmer.freed(len(self._backlog))
        self._drop_backlog()
        self._out.clear()
        self._loop.call_soon(self._end_session)

    def _receive(self, message: bytes, text: bool) -> None:
        if not self._closing:
            self._act(self._session.receive(message, text))

    def _drain(self) -> None:
        self._wake = None
        self._act(self._session.drain())
        self.flush()

    def _act(self, actions: list[Action]) -> None:
        hub = self._gateway.hub
        for action in actions:
            if isinstance(action, Send):
                self._send(action.data)
            elif isinstance(action, Start):
                hub.add(action.subscription, self)
            elif isinstance(action, Stop):
                hub.remove(action.subscription)
            elif isinstance(action, VerifyToken):
                self._spawn(self._check(action))
            elif isinstance(action, Wake):
                MESSAGES_PACED.inc()
                if self._wake is None:
                    self._wake = self._loop.call_later(action.delay, self._drain)
            elif isinstance(action, Ping):
                self._ws.send_ping(b"")
                self._write_protocol_output()
            elif isinstance(action, Close):
                self.close(action.code)
        self._read_as_allowed()

    def _read_as_allowed(self) -> None:
        """Held messages past the limit stop the reading (TCP backpressure); never a drop."""
        transport = self._transport
        if transport is None or self._closing:
            return
        backlogged = self._session.backlogged
        if backlogged and not self._reading_paused:
            self._reading_paused = True
            transport.pause_reading()
        elif not backlogged and self._reading_paused:
            self._reading_paused = False
            transport.resume_reading()

    async def _check(self, action: VerifyToken) -> None:
        session = self._session
        try:
            check = await self._gateway.check_token(action.token)
        except Exception:
            _throttled.exception("token", "could not check a stream token")
            self._act(session.token_check_failed(action.request_id))
            return
        if self._closing:
            return
        if action.request_id == CONNECT_CHECK and not self._opened(check):
            return
        self._act(session.token_checked(action.request_id, check))
        self._schedule_expiry()
        self.flush()

    def _opened(self, check: TokenCheck) -> bool:
        """Admits an authenticated stream within its key's or user's limit, and registers it."""
        if check.user is None:
            return True
        assert self._transport is not None
        principal = check.principal or ("user", check.user)
        if not self.limits.admit_stream(self._transport, principal):
            _throttled.warning(
                f"streams {principal}",
                f"closing a stream of {principal[0]} {principal[1]}: "
                f"{self.limits.streams_per_principal} open, the limit",
            )
            self.close(CloseCode.CONNECTION_LIMIT)
            return False
        self._session.share_budget(self.limits.budget(principal, self._loop.time()))
        self._registration = new_session(
            check.user, check.principal, self._transport.get_extra_info("peername")
        )
        return True

    # -- outbound --------------------------------------------------------

    def deliver(self, prefix: bytes, tail: bytes) -> None:
        if self._closing:
            return
        length = len(prefix) + len(tail)
        header = _HEADERS[length] if length < _TABLED else _text_header(length)
        if self._paused:
            self._queue(header, prefix, tail)
            return
        # Pieces are joined once per flush, so a delivery copies its payload once.
        out = self._out
        out.append(header)
        out.append(prefix)
        out.append(tail)
        if not self._flush_queued:
            self._flush_queued = True
            self._gateway.flush_later(self)

    def _send(self, message: bytes) -> None:
        self.deliver(b"", message)

    def _queue(self, header: bytes, prefix: bytes, tail: bytes) -> None:
        backlog = self._backlog
        backlog += header
        backlog += prefix
        backlog += tail
        self._backlog_frames.append(len(header) + len(prefix) + len(tail))
        settings = self._gateway.settings
        # Bounded in messages, as the original promises, and in bytes: a few
        # clients that stop reading whole-book updates must not take the memory.
        if (
            len(self._backlog_frames) >= settings.max_queue
            or len(backlog) > settings.max_queue_bytes
        ):
            _throttled.info(
                "slow",
                f"closing a slow client: {len(self._backlog_frames)} messages, "
                f"{len(backlog)} bytes undelivered",
            )
            self.close(CloseCode.QUEUE_LIMIT)

    def _drop_backlog(self) -> None:
        # New objects rather than cleared ones: a transport may still hold a view of the old.
        self._backlog = bytearray()
        self._backlog_frames = array("L")

    def flush(self) -> None:
        """Write what this turn gathered, as one write."""
        self._flush_queued = False
        out = self._out
        if not out or self._transport is None:
            return
        data = b"".join(out)
        out.clear()
        self._transport.write(data)

    def _write_protocol_output(self) -> None:
        # Pending data frames go first, so a close frame never overtakes them.
        if not self._paused:
            self.flush()
        transport = self._transport
        for data in self._ws.data_to_send():
            if transport is None:
                break
            if data is SEND_EOF or not data:
                transport.close()
                break
            transport.write(data)
        if self._ws.close_expected() and self._abort is None and transport is not None:
            self._abort = self._loop.call_later(CLOSE_TIMEOUT_S, transport.abort)

    # -- lifecycle -------------------------------------------------------

    @property
    def principal(self) -> tuple[str, str] | None:
        """The key or user behind this connection's token; None before authentication."""
        return self._session.principal if not self._closing else None

    @property
    def registration(self) -> SessionInfo | None:
        """This session in the cluster's registry; None before authentication and once closing."""
        return self._registration if not self._closing else None

    def entitle(self, exchanges: frozenset[str] | None) -> None:
        """New entitlements: they apply to the Subscribes that follow, and subscriptions
        to an exchange no longer allowed end with a SubscribeResponse 205."""
        if not self._closing:
            self._act(self._session.entitle(exchanges))

    def heartbeat(self) -> None:
        if not self._closing and self._ws.state is State.OPEN:
            self._act(self._session.heartbeat())

    def close(self, code: CloseCode, reason: str | None = None) -> None:
        """Close with ``code``, after what was already sent (3007 drops that backlog)."""
        if self._closing:
            return
        self._closing = True
        STREAM_CLOSES.labels(str(int(code))).inc()
        if self._wake is not None:
            self._wake.cancel()
            self._wake = None
        transport = self._transport
        if code is CloseCode.QUEUE_LIMIT:
            self._gateway.trimmer.freed(len(self._backlog))
        elif transport is not None:
            # The transport buffers beyond its high-water mark; the close
            # frame follows, and CLOSE_TIMEOUT_S bounds the wait for the client.
            if self._backlog:
                transport.write(self._backlog)
            if self._out:
                transport.write(b"".join(self._out))
        self._drop_backlog()
        self._out.clear()
        # A close can come from inside the hub's fan-out (3007): leave the
        # hub alone until that delivery loop is over.
        self._loop.call_soon(self._end_session)
        if self._ws.state is State.OPEN:
            self._ws.send_close(int(code), reason or CLOSE_REASONS[code])
        self._write_protocol_output()

    def _end_session(self) -> None:
        hub = self._gateway.hub
        for stop in self._session.close():
            hub.remove(stop.subscription)

    def _schedule_expiry(self) -> None:
        if self._session.state is not SessionState.OPEN:
            return
        if self._expiry is not None:
            self._expiry.cancel()
        delay = (self._session.expires_us - now_us()) / 1_000_000
        self._expiry = self._loop.call_later(max(0.0, delay), self._expire)

    def _expire(self) -> None:
        self._expiry = None
        actions = self._session.expiry()
        if actions:
            self._act(actions)
        elif not self._closing:
            self._schedule_expiry()

    def _spawn(self, coroutine: Any) -> None:
        task = self._loop.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
