"""A failing source is shown to clients at once, restarted, and its books come back whole."""

from __future__ import annotations

import asyncio
from pathlib import Path

from caspian.codes import Stream, StreamState, SubscriptionType
from caspian.events import BookEvent, StatusEvent
from caspian.gateway.session import Subscription
from caspian.service import Service
from caspian.settings import Settings
from caspian.sources.base import EventSink, Source
from caspian.timefmt import now_us
from tests.test_hub import Recorder

SYMBOL = "FX-BTC/USD=GEMINI"


class FlakySource(Source):
    """Sends a book for each watched symbol, then fails once."""

    def __init__(self) -> None:
        self.runs = 0
        self.watched: set[str] = set()
        self.sink: EventSink | None = None

    def watch(self, symbol: str) -> None:
        self.watched.add(symbol)
        if self.sink is not None:
            self._start(symbol)

    def unwatch(self, symbol: str) -> None:
        self.watched.discard(symbol)

    def _start(self, symbol: str) -> None:
        assert self.sink is not None
        ts = now_us()
        for stream in Stream:
            self.sink(StatusEvent(symbol, ts, stream, StreamState.CONNECTED))
        price = 100.0 + self.runs
        self.sink(BookEvent(symbol, ts, True, [(price, 1.0)], [(price + 1, 1.0)]))

    async def run(self, sink: EventSink) -> None:
        self.sink = sink
        self.runs += 1
        for symbol in self.watched:
            self._start(symbol)
        await asyncio.sleep(0.2)
        if self.runs == 1:
            raise RuntimeError("upstream exploded")
        await asyncio.Event().wait()


async def test_source_failure_is_visible_and_recovers(tmp_path: Path) -> None:
    service = Service(Settings(data_dir=tmp_path, maintenance="off", unwatch_grace_s=0))
    flaky = FlakySource()
    service.source = flaky
    service.bus._source = flaky  # type: ignore[attr-defined]
    await service.start()
    try:
        product = service.catalog.get(SYMBOL)
        assert product is not None
        recorder = Recorder()
        service.hub.add(Subscription("r", product, SubscriptionType.LEVEL2, 5, "None"), recorder)
        # The restart follows a backoff: wait for it, boundedly, rather than a
        # fixed time that a loaded machine overruns.
        for _ in range(100):
            await asyncio.sleep(0.1)
            states = [m["depthStream"] for m in recorder.messages]
            recovered = "connected" in states and states[-1] == "connected"
            if (
                flaky.runs == 2
                and recovered
                and "disconnected" in states[states.index("connected") :]
            ):
                break
        # connected, then the failure shown at once, then connected again.
        assert "disconnected" in states[states.index("connected") :]
        assert states[-1] == "connected"
        assert flaky.runs == 2
        # Whatever the client held, applying every message leaves it the latest book.
        book: dict[tuple[str, float], float] = {}
        for message in recorder.messages:
            for level in message["payload"]:
                key = (level["side"], level["price"])
                if level["size"]:
                    book[key] = level["size"]
                else:
                    book.pop(key, None)
        assert book == {("bid", 102.0): 1.0, ("ask", 103.0): 1.0}
    finally:
        await service.stop()
