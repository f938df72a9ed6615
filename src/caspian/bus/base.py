"""The bus between sources and gateways."""

from __future__ import annotations

from abc import ABC, abstractmethod

from caspian.book import OrderBook
from caspian.events import Event
from caspian.sources.base import EventSink


class Bus(ABC):
    """Carries events from the source to the gateway, and the gateway's interest back.

    ``watch``/``unwatch`` tell the source side which symbols anyone wants;
    ``publish`` is the source's sink; the gateway's handler receives events of
    the symbols it watches.
    """

    def __init__(self) -> None:
        self.handler: EventSink | None = None

    @abstractmethod
    async def start(self) -> None: ...

    @abstractmethod
    async def stop(self) -> None: ...

    @abstractmethod
    def publish(self, event: Event) -> None: ...

    @abstractmethod
    def watch(self, symbol: str) -> None: ...

    @abstractmethod
    def unwatch(self, symbol: str) -> None: ...

    def publish_depth(self, symbol: str, depth: int) -> OrderBook | None:
        """Asks the source for the changes to the top ``depth`` of ``symbol`` only
        (:meth:`caspian.sources.base.Source.publish_depth`); None when it will not
        be asked, as across processes, where every gateway takes the source's
        top 100 and ranks it for its own clients."""
        return None

    def source_heard(self) -> bool:
        """Whether a source is there to feed this bus (readiness): always, in-process."""
        return True
