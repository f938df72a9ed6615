"""A small test client for the stream, built on the websockets library as any user's would be."""

from __future__ import annotations

import asyncio
import contextlib
import os
import struct
import uuid
from collections.abc import Callable
from typing import Any

import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConcurrencyError, ConnectionClosed

Message = dict[str, Any]


class StreamClient:
    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        #: The reason of the server's close frame, once closed_with has seen it.
        self.close_reason: str | None = None

    @classmethod
    async def open(
        cls, url: str, token: str | None = None, header: str | None = None, **kwargs: Any
    ) -> StreamClient:
        if token is not None:
            url = f"{url}?accessToken={token}"
        headers = {"Authorization": header} if header is not None else None
        ws = await connect(
            url, additional_headers=headers, ping_interval=None, max_size=2**24, **kwargs
        )
        return cls(ws)

    async def send(self, type_: str, payload: Any = None, request_id: str | None = None) -> str:
        request_id = request_id or str(uuid.uuid4())
        message: Message = {"requestId": request_id, "type": type_}
        if payload is not None:
            message["payload"] = payload
        await self.ws.send(orjson.dumps(message).decode())
        return request_id

    async def recv(self, within: float = 10) -> Message:
        raw = await asyncio.wait_for(self.ws.recv(), within)
        message: Message = orjson.loads(raw)
        return message

    async def wait_for(self, predicate: Callable[[Message], bool], within: float = 10) -> Message:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError("no matching message arrived")
            message = await self.recv(remaining)
            if predicate(message):
                return message

    async def response(self, request_id: str, within: float = 10) -> Message:
        return await self.wait_for(
            lambda m: m.get("requestId") == request_id and m["type"].endswith("Response"),
            within,
        )

    async def subscribe(self, symbol: str, type_: str = "Level1", **options: Any) -> str:
        request_id = await self.send("Subscribe", {"symbol": symbol, "type": type_, **options})
        response = await self.response(request_id)
        assert response["payload"]["code"] == 200, response
        return request_id

    async def whole_book(self, symbol: str, levels: int = 5) -> Message:
        """Subscribes to ``symbol``'s Level2; its first whole top-N, checked connected and
        two-sided, once the next update has come too."""
        await self.subscribe(symbol, "Level2", numberOfLevels=levels)
        whole = await self.wait_for(
            lambda m: m["type"] == "Level2" and bool(m["payload"]), within=30
        )
        assert whole["depthStream"] == "connected"
        assert {level["side"] for level in whole["payload"]} == {"bid", "ask"}
        later = await self.wait_for(lambda m: m["type"] == "Level2", within=10)
        assert later["depthStream"] == "connected"
        return whole

    async def closed_with(self, within: float = 10) -> int | None:
        """Read until the server closes; the close code it sent."""
        try:
            while True:
                await asyncio.wait_for(self.ws.recv(), within)
        except ConnectionClosed as exc:
            if exc.rcvd is None:
                return None
            self.close_reason = exc.rcvd.reason
            return exc.rcvd.code

    async def close(self) -> None:
        """Closes, reading meanwhile what is still in flight: websockets stops reading the
        socket while 16 messages wait unread, so it would not see the server's answer to
        the close and would wait out its 10 s close timeout."""
        reader = asyncio.create_task(self._discard_until_closed())
        try:
            await self.ws.close()
        finally:
            await reader

    async def _discard_until_closed(self) -> None:
        with contextlib.suppress(ConnectionClosed, ConcurrencyError):
            while True:
                await self.ws.recv()


def apply_level2(book: dict[tuple[str, float], float], message: Message) -> None:
    for level in message["payload"]:
        key = (level["side"], float(level["price"]))
        if level["size"] == 0:
            book.pop(key, None)
        else:
            book[key] = float(level["size"])


def client_frame(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    """One masked client frame, built by hand: for frames a client library would not
    send (any opcode, fragments out of order, invalid UTF-8) or many at once."""
    mask = os.urandom(4)
    length = len(payload)
    first = (0x80 if fin else 0) | opcode
    if length < 126:
        header = struct.pack("!BB", first, 0x80 | length)
    elif length < 65_536:
        header = struct.pack("!BBH", first, 0x80 | 126, length)
    else:
        header = struct.pack("!BBQ", first, 0x80 | 127, length)
    masked = bytes(byte ^ mask[index % 4] for index, byte in enumerate(payload))
    return header + mask + masked
