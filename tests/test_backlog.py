"""A paused stream connection's backlog: whole and in order, bounded, and no object per message.

The soak showed why the last matters: a slow client's tens of thousands of
small frames, one object each, were spread over the allocator's small-object
arenas among longer-lived objects, and once freed those arenas stayed with the
process: each slow client raised the RSS floor for good.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any, cast

from caspian.codes import SymbolType
from caspian.gateway.connection import StreamConnection
from caspian.gateway.gateway import Gateway, StreamSettings
from caspian.gateway.session import SessionLimits
from caspian.guard import ConnectionLimits


class Transport:
    """What the connection writes, as a transport that takes everything."""

    def __init__(self) -> None:
        self.written = bytearray()
        self.writes = 0

    def write(self, data: bytes | bytearray) -> None:
        self.written += data
        self.writes += 1

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 50000) if name == "peername" else default

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass


def connection(max_queue: int = 1_000_000, max_queue_bytes: int = 1 << 30) -> StreamConnection:
    settings = StreamSettings(
        heartbeat_s=30.0,
        recheck_s=30.0,
        max_queue=max_queue,
        max_queue_bytes=max_queue_bytes,
        max_message_bytes=1 << 20,
        limits=SessionLimits(100, frozenset(SymbolType), 200.0, 500, 1.0),
    )
    gateway = Gateway(
        hub=cast(Any, None),
        access=cast(Any, None),
        resolve=cast(Any, None),
        settings=settings,
        in_maintenance=lambda: 0.0,
        sync_sessions=cast(Any, None),
    )
    limits = ConnectionLimits(total=100, per_address=100, streams_per_principal=100)
    made = StreamConnection.bound(gateway, limits)()
    made.connection_made(cast(Any, Transport()))
    return made


def transport(made: StreamConnection) -> Transport:
    return cast(Transport, made._transport)


def frames(count: int) -> list[tuple[bytes, bytes]]:
    prefix = b'{"requestId":"r1","type":"Level1","payload":'
    return [(prefix, b'{"n":%d,"bid":[64000.5,1.25]}}' % n) for n in range(count)]


def unframed(data: bytes) -> list[bytes]:
    """The payloads of ``data``'s unmasked text frames of under 64 KiB."""
    payloads = []
    at = 0
    while at < len(data):
        assert data[at] == 0x81
        length = data[at + 1]
        at += 2
        if length == 126:
            length = int.from_bytes(data[at : at + 2], "big")
            at += 2
        payloads.append(data[at : at + length])
        at += length
    return payloads


async def test_a_backlog_holds_no_object_per_message() -> None:
    made = connection()
    sent = frames(20_000)
    made.pause_writing()
    before = sys.getallocatedblocks()
    for prefix, tail in sent:
        made.deliver(prefix, tail)
    grown = sys.getallocatedblocks() - before
    # A frame object each would be 20,000 blocks and more.
    assert grown < 200, grown
    assert transport(made).written == b""
    made.connection_lost(None)


async def test_a_backlog_reaches_the_client_whole_and_in_order_in_large_writes() -> None:
    made = connection()
    sent = frames(20_000)
    made.deliver(*sent[0])
    await asyncio.sleep(0)
    made.pause_writing()
    for prefix, tail in sent[1:]:
        made.deliver(prefix, tail)
    made.resume_writing()
    written = transport(made)
    assert unframed(bytes(written.written)) == [prefix + tail for prefix, tail in sent]
    # Batched, not a write per message.
    assert written.writes < 20
    assert made.gateway.trimmer.freed_total == len(written.written) - (
        2 + len(sent[0][0]) + len(sent[0][1])
    )
    made.connection_lost(None)


async def test_a_resumed_client_paused_again_keeps_the_rest_for_later() -> None:
    made = connection()
    sent = frames(5_000)
    made.pause_writing()
    for prefix, tail in sent:
        made.deliver(prefix, tail)
    written = transport(made)

    def pause_after_one_write(data: bytes | bytearray) -> None:
        Transport.write(written, data)
        made.pause_writing()

    written.write = pause_after_one_write  # type: ignore[method-assign]
    made.resume_writing()
    assert written.writes == 1
    first = unframed(bytes(written.written))
    assert 0 < len(first) < len(sent)
    written.write = lambda data: Transport.write(written, data)  # type: ignore[method-assign]
    made.resume_writing()
    assert unframed(bytes(written.written)) == [prefix + tail for prefix, tail in sent]
    made.connection_lost(None)


async def test_the_message_bound_counts_messages_still_held() -> None:
    made = connection(max_queue=1_000)
    sent = frames(999)
    made.pause_writing()
    for prefix, tail in sent:
        made.deliver(prefix, tail)
    made.resume_writing()
    made.pause_writing()
    # What was written no longer counts: 999 more fit.
    for prefix, tail in sent:
        made.deliver(prefix, tail)
    assert not made._closing
    made.deliver(*sent[0])
    assert made._closing
    await asyncio.sleep(0)


async def test_the_byte_bound_closes_with_3007_and_drops_the_backlog() -> None:
    made = connection(max_queue_bytes=10_000)
    made.pause_writing()
    for prefix, tail in frames(200):
        made.deliver(prefix, tail)
        if made._closing:
            break
    assert made._closing
    assert not made._backlog
    assert made.gateway.trimmer.freed_total > 10_000
    await asyncio.sleep(0)
