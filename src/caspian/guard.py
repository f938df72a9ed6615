"""Limits every client connection meets before its first request is served.

The HTTP protocol uvicorn runs for REST and for the stream's handshake is
wrapped here: a connection over the limits is answered at once (503 when
the server is full, 429 when its address holds too many) and closed; a
request head must arrive whole within ``handshake_timeout_s`` (408), and
stay within ``max_header_bytes`` and ``max_headers`` (431). A stream
connection keeps its place in the counts after the upgrade, until it closes.
"""

from __future__ import annotations

import asyncio
import logging
import resource
from collections import Counter
from collections.abc import Callable, Hashable
from typing import Any

import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from caspian.metrics import CONNECTIONS_REFUSED
from caspian.pacing import LogThrottle, TokenBucket

log = logging.getLogger(__name__)
_throttled = LogThrottle(log)

#: Descriptors kept free for the store, the bus, upstream exchanges and logs
#: when the connection limit is derived from the open-file limit.
FD_HEADROOM_MIN = 64
FD_HEADROOM_SHARE = 0.125

_REASONS = {
    408: "Request Timeout",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    503: "Service Unavailable",
}


def raise_open_file_limit() -> int:
    """Raises the soft ``RLIMIT_NOFILE`` to the hard one; the soft limit in force after."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open-file limit from %d to %d: %s", soft, target, exc)
    return soft


def connection_limit(configured: int, open_files: int) -> int:
    """``configured``, or for 0 the open-file limit less the headroom."""
    if configured > 0:
        return configured
    headroom = max(FD_HEADROOM_MIN, int(open_files * FD_HEADROOM_SHARE))
    return max(1, open_files - headroom)


class ConnectionLimits:
    """Open client connections, in total, per address and, for streams, per key or user.

    Connections are known by a hashable handle (their transport); releasing
    one twice is harmless, since a connection that upgrades to the stream is
    released by whichever protocol holds it when it closes.
    """

    def __init__(
        self,
        total: int,
        per_address: int,
        streams_per_principal: int,
        exempt: Callable[[str], bool] = lambda address: False,
        messages_per_principal: tuple[float, int] = (400.0, 1_000),
    ) -> None:
        self.total = total
        self.per_address = per_address
        self.streams_per_principal = streams_per_principal
        #: Inbound stream messages per second, and at once, of all of one
        #: key's or user's streams together.
        self.messages_per_principal = messages_per_principal
        self._budgets: dict[tuple[str, str], TokenBucket] = {}
        #: Addresses the per-address limit does not apply to (trusted proxies).
        self._exempt = exempt
        self._addresses: dict[Hashable, str] = {}
        self._per_address: Counter[str] = Counter()
        self._streams: dict[Hashable, tuple[str, str]] = {}
        self._per_principal: Counter[tuple[str, str]] = Counter()

    @property
    def open(self) -> int:
        return len(self._addresses)

    def admit(self, handle: Hashable, address: str) -> int | None:
        """Counts a new connection; the HTTP status refusing it, or None when admitted."""
        if len(self._addresses) >= self.total:
            return 503
        if self._per_address[address] >= self.per_address and not self._exempt(address):
            return 429
        self._addresses[handle] = address
        self._per_address[address] += 1
        return None

    def admit_stream(self, handle: Hashable, principal: tuple[str, str]) -> bool:
        """Counts an authenticated stream of ``principal``; False when it holds too many."""
        if handle in self._streams:
            return True
        if self._per_principal[principal] >= self.streams_per_principal:
            return False
        self._streams[handle] = principal
        self._per_principal[principal] += 1
        return True

    def budget(self, principal: tuple[str, str], now: float) -> TokenBucket:
        """The inbound message budget ``principal``'s admitted streams share.

        Each connection has its own rate too; this one bounds what a key or
        user can make the server do over all its connections together.
        """
        bucket = self._budgets.get(principal)
        if bucket is None:
            rate, burst = self.messages_per_principal
            bucket = self._budgets[principal] = TokenBucket(rate, burst, now)
        return bucket

    def release(self, handle: Hashable) -> None:
        address = self._addresses.pop(handle, None)
        if address is not None:
            _decrement(self._per_address, address)
        principal = self._streams.pop(handle, None)
        if principal is not None:
            _decrement(self._per_principal, principal)
            if principal not in self._per_principal:
                self._budgets.pop(principal, None)


def _decrement(counts: Counter[Any], key: Any) -> None:
    counts[key] -= 1
    if counts[key] <= 0:
        del counts[key]


def _response(status: int, message: str, retry_after: int | None = None) -> bytes:
    body = orjson.dumps({"code": status, "message": message})
    lines = [
        f"HTTP/1.1 {status} {_REASONS[status]}",
        "content-type: application/json",
        f"content-length: {len(body)}",
        "connection: close",
    ]
    if retry_after is not None:
        lines.append(f"retry-after: {retry_after}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


class _HeadTooLarge(Exception):
    """Raised from a parser callback to stop parsing a head past the limits."""


class GuardedHttp(HttpToolsProtocol):
    """uvicorn's httptools protocol, with the limits above."""

    limits: ConnectionLimits
    head_timeout_s: float
    max_head_bytes: int
    max_headers: int

    @classmethod
    def bound(
        cls,
        limits: ConnectionLimits,
        head_timeout_s: float,
        max_head_bytes: int,
        max_headers: int,
    ) -> type[GuardedHttp]:
        """A subclass with these limits: uvicorn takes a protocol class, not a factory."""
        return type(
            "BoundGuardedHttp",
            (cls,),
            {
                "limits": limits,
                "head_timeout_s": head_timeout_s,
                "max_head_bytes": max_head_bytes,
                "max_headers": max_headers,
            },
        )

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_bytes = 0
        self._head_count = 0
        self._refused = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        address = self.client[0] if self.client else ""
        status = self.limits.admit(transport, address)
        if status is not None:
            self._refused = True
            CONNECTIONS_REFUSED.labels(str(status)).inc()
            if status == 503:
                _throttled.warning(
                    "full", f"refusing connections: {self.limits.total} open, the limit"
                )
                message = "The server is at its connection limit; try again shortly"
            else:
                _throttled.warning(
                    f"address {address}",
                    f"refusing connections from {address}: "
                    f"{self.limits.per_address} open, the limit per address",
                )
                message = "Too many open connections from this address"
            self._close_with(status, message, retry_after=1)
            return
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if not self._refused:
            self.limits.release(self.transport)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        super().data_received(data)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_bytes = 0
        self._head_count = 0
        if self._head_timer is None:
            self._arm()

    def on_url(self, url: bytes) -> None:
        self._count(len(url), 0)
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value), 1)
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()

    def send_400_response(self, msg: str) -> None:
        if self._head_bytes > self.max_head_bytes or self._head_count > self.max_headers:
            CONNECTIONS_REFUSED.labels("431").inc()
            self._close_with(
                431,
                f"The request head is over the limits: {self.max_head_bytes} bytes, "
                f"{self.max_headers} headers",
            )
            return
        super().send_400_response(msg)

    def _count(self, size: int, headers: int) -> None:
        self._head_bytes += size
        self._head_count += headers
        if self._head_bytes > self.max_head_bytes or self._head_count > self.max_headers:
            # httptools turns this into a parser error, which uvicorn answers
            # with send_400_response: 431 there.
            raise _HeadTooLarge

    def _arm(self) -> None:
        self._disarm()
        self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_timeout)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timeout(self) -> None:
        self._head_timer = None
        if self.transport.is_closing() or self.transport.get_protocol() is not self:
            return
        CONNECTIONS_REFUSED.labels("408").inc()
        self._close_with(
            408, f"No whole request head within {self.head_timeout_s:g} s of starting it"
        )

    def _close_with(self, status: int, message: str, retry_after: int | None = None) -> None:
        self.transport.write(_response(status, message, retry_after))
        self.transport.close()
