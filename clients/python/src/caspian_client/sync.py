"""A blocking wrapper for scripts and notebooks.

The asynchronous client runs on an event loop of its own, in a background
thread, so the connection keeps answering pings and refreshing its token while
the caller's code does other things between two updates (and it works where a
loop already runs in the caller's thread, as in Jupyter).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Coroutine, Iterator, Sequence
from types import TracebackType
from typing import Any, Self, TypeVar

from caspian_client.book import Level2Update
from caspian_client.client import Client
from caspian_client.models import Exchange, Level1, Product
from caspian_client.stream import Event, Stream

T = TypeVar("T")


class _Loop:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(
            target=self.loop.run_forever, name="caspian-client", daemon=True
        )
        self.thread.start()

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result()

    def iterate(self, iterator: AsyncIterator[T]) -> Iterator[T]:
        while True:
            try:
                yield self.run(_anext(iterator))
            except StopAsyncIteration:
                return

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


async def _anext(iterator: AsyncIterator[T]) -> T:
    return await iterator.__anext__()


class SyncClient:
    """``Client`` with blocking calls: ``with SyncClient(url, key_id=..., secret=...) as c``,
    ``c.exchanges()``, ``c.products(["GEMINI"])``, ``c.product(code)``, and
    ``with c.stream() as s: for book in s.level2(symbol): ...``."""

    def __init__(self, url: str | None = None, **options: Any) -> None:
        self._loop = _Loop()
        try:
            self.client = self._loop.run(_make(url, options))
        except BaseException:
            self._loop.stop()
            raise

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self._loop.run(self.client.aclose())
        self._loop.stop()

    def exchanges(self) -> list[Exchange]:
        return self._loop.run(self.client.exchanges())

    def products(self, exchanges: Sequence[str]) -> list[Product]:
        return self._loop.run(self.client.products(exchanges))

    def product(self, caspian_code: str) -> Product:
        return self._loop.run(self.client.product(caspian_code))

    def stream(self, **options: Any) -> SyncStream:
        return SyncStream(self._loop, self._loop.run(_stream(self.client, options)))


async def _make(url: str | None, options: dict[str, Any]) -> Client:
    # The client's HTTP pool belongs to the loop it is made on.
    return Client(url, **options)


async def _stream(client: Client, options: dict[str, Any]) -> Stream:
    return client.stream(**options)


class SyncStream:
    """A ``Stream`` used from blocking code: ``with client.stream() as stream``."""

    def __init__(self, loop: _Loop, stream: Stream) -> None:
        self._loop = loop
        self.stream = stream

    def __enter__(self) -> Self:
        self._loop.run(self.stream.__aenter__())
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self._loop.run(self.stream.aclose())

    def level1(self, symbol: str, **options: Any) -> Iterator[Level1]:
        subscription = self._loop.run(_call(self.stream.level1, symbol, options))
        return self._loop.iterate(subscription)

    def level2(self, symbol: str, **options: Any) -> Iterator[Level2Update]:
        subscription = self._loop.run(_call(self.stream.level2, symbol, options))
        return self._loop.iterate(subscription)

    def events(self) -> Iterator[Event]:
        return self._loop.iterate(self.stream.events())


async def _call(method: Any, symbol: str, options: dict[str, Any]) -> Any:
    # Subscriptions make their futures and queues on the stream's loop.
    return method(symbol, **options)
