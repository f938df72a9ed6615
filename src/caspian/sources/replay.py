"""Replays a recording (CONTRACT.md section 6 JSONL, optionally gzip) as a source.

The replay keeps every symbol's book and latest Level1 state as it reads, so a
symbol first watched in the middle of a file starts from a whole snapshot of
that moment, never from a diff with no base. Bad lines are reported once each,
with their line number, and skipped; a partial last line (a recording cut off
by a crash) ends the file quietly.

Time: by default each event is stamped (``ts``, which clients see as
``caspianTimestamp`` and Level1's Caspian timestamps) with the time the replay
delivers it, never earlier than the one before, across loops too, while the
exchange's timestamps stay as recorded: a replay then looks to a client like
the live feed it stands in for, and its staleness and ordering checks hold.
``recorded_times`` keeps the recording's own ``ts`` instead, for those who
compare a replay with its original.
"""

from __future__ import annotations

import asyncio
import gzip
import logging
import time
import zlib
from collections.abc import Iterator
from io import BufferedIOBase
from pathlib import Path

import orjson

from caspian.events import (
    EventFormatError,
    from_json,
)
from caspian.sources.base import EventSink, Source
from caspian.sources.tracker import SymbolTracker
from caspian.timefmt import now_us

log = logging.getLogger(__name__)

#: Events handled between two yields to the event loop.
_BATCH = 256


def open_recording(path: Path) -> BufferedIOBase:
    with path.open("rb") as probe:
        magic = probe.read(2)
    if magic == b"\x1f\x8b":
        return gzip.open(path, "rb")
    return path.open("rb")


def read_lines(path: Path) -> Iterator[tuple[int, bytes, bool]]:
    """``(line number, line, is_last_and_unterminated)`` of a recording.

    A gzip stream cut short ends the iteration after its last whole line,
    which is how a recording that crashed mid-write reads.
    """
    with open_recording(path) as handle:
        number = 0
        pending: bytes | None = None
        try:
            for line in handle:
                if pending is not None:
                    yield number, pending, False
                number += 1
                pending = line
        except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
            log.warning("%s: the file ends early (%s); replaying what is complete", path, exc)
        if pending is not None:
            yield number, pending, not pending.endswith(b"\n")


def _symbols_in(path: Path) -> set[str]:
    symbols: set[str] = set()
    for _, line, _ in read_lines(path):
        try:
            symbol = orjson.loads(line).get("symbol")
        except (orjson.JSONDecodeError, AttributeError):
            continue  # reported when it is replayed
        if isinstance(symbol, str):
            symbols.add(symbol)
    return symbols


class ReplaySource(Source):
    def __init__(
        self,
        path: Path,
        speed: float = 1.0,
        loop_forever: bool = False,
        recorded_times: bool = False,
    ) -> None:
        if speed < 0:
            raise ValueError("the replay speed must be 0 (as fast as possible) or more")
        if not path.is_file():
            raise ValueError(f"no recording at {path}")
        self.path = path
        self.speed = speed
        self.loop_forever = loop_forever
        self.recorded_times = recorded_times
        #: The last delivery stamp: the next is never earlier.
        self._last_stamp = 0
        self._watched: set[str] = set()
        #: The symbols the recording has events of, read once through at start.
        self.symbols = frozenset(_symbols_in(path))
        self._tracker = SymbolTracker()
        self._sink: EventSink | None = None
        self.bad_lines = 0
        # Line numbers already reported, so that a looping replay warns once per line.
        self._reported: set[int] = set()
        #: Set when a pass over the file has finished (each pass, when looping).
        self.finished = asyncio.Event()

    def watch(self, symbol: str) -> None:
        self._watched.add(symbol)
        if self._sink is not None:
            for event in self._tracker.catch_up(symbol):
                self._sink(event)

    def unwatch(self, symbol: str) -> None:
        self._watched.discard(symbol)

    def unserved(self, symbol: str) -> str | None:
        if symbol in self.symbols:
            return None
        return f"the recording {self.path.name} has no events of {symbol}"

    async def run(self, sink: EventSink) -> None:
        self._sink = sink
        while True:
            self._tracker.clear()
            await self._pass(sink)
            self.finished.set()
            if not self.loop_forever:
                break
            self.finished = asyncio.Event()
            # A file shorter than a batch would otherwise loop without ever
            # letting the service run.
            await asyncio.sleep(0)
        # Stay alive like any source: the service stops us by cancelling.
        await asyncio.Event().wait()

    async def _pass(self, sink: EventSink) -> None:
        first_ts: int | None = None
        started = time.monotonic()
        handled = 0
        for number, line, partial in read_lines(self.path):
            if not line.strip():
                continue
            try:
                event = from_json(line)
            except EventFormatError as exc:
                if number not in self._reported:
                    self._reported.add(number)
                    if partial:
                        log.warning("%s:%d: partial last line ignored", self.path, number)
                    else:
                        self.bad_lines += 1
                        log.warning("%s:%d: bad line skipped: %s", self.path, number, exc)
                continue
            if self.speed > 0:
                if first_ts is None:
                    first_ts = event.ts
                due = started + (event.ts - first_ts) / 1_000_000 / self.speed
                delay = due - time.monotonic()
                if delay > 0.001:
                    await asyncio.sleep(delay)
            if not self.recorded_times:
                # After the pacing, which follows the recorded times.
                self._last_stamp = event.ts = max(now_us(), self._last_stamp)
            handled += 1
            # Also when paced: a burst of events recorded within the same
            # millisecond must not hold the event loop either.
            if handled % _BATCH == 0:
                await asyncio.sleep(0)
            self._tracker.track(event)
            if event.symbol in self._watched:
                sink(event)
