"""The in-process bus: a direct call from the source to the gateway."""

from __future__ import annotations

from caspian.book import OrderBook
from caspian.bus.base import Bus
from caspian.events import Event
from caspian.sources.base import Source


class MemoryBus(Bus):
    def __init__(self, source: Source) -> None:
        super().__init__()
        self._source = source

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    def publish(self, event: Event) -> None:
        handler = self.handler
        if handler is not None:
            handler(event)

    def watch(self, symbol: str) -> None:
        self._source.watch(symbol)

    def unwatch(self, symbol: str) -> None:
        self._source.unwatch(symbol)

    def publish_depth(self, symbol: str, depth: int) -> OrderBook | None:
        return self._source.publish_depth(symbol, depth)
