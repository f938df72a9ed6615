"""Replaying recordings (``CASPIAN_SOURCE=replay:FILE``), end to end over real sockets.

Every expected answer here is computed from the file itself with plain dicts and
the standard ``json`` module, following CONTRACT.md section 6 and nothing else:
never with the service's order book or event codec, so that a bug in either
cannot hide in the test.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
import os
import re
import sys
from collections import Counter
from collections.abc import Callable, Iterable
from contextlib import suppress
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Any, TypeVar

import httpx
import orjson
import pytest
from pydantic import ValidationError
from websockets.exceptions import ConnectionClosed

from caspian.catalog.builtin import builtin_products
from caspian.codes import SubscriptionType
from caspian.events import Event, StatusEvent, from_json, to_dict
from caspian.gateway.hub import Hub
from caspian.gateway.session import Subscription
from caspian.service import make_source
from caspian.settings import Settings
from caspian.sources.base import EventSink
from caspian.sources.recorder import Recorder
from caspian.sources.replay import ReplaySource
from caspian.sources.simulator import Simulator
from caspian.timefmt import now_us, parse_us
from tests.support.client import StreamClient, apply_level2
from tests.support.service import RunningService, start_service

T = TypeVar("T")

SAMPLE = Path(str(files("caspian.sources").joinpath("data", "sample.jsonl.gz")))
SYMBOLS = ("FX-BTC/USD=GEMINI", "FX-ETH/USD=GEMINI", "PERP-BTC/USD=BITMEX")
DEPTHS = (1, 5, 20, 100)
CONFLATIONS = ("None", "250ms", "1s")
BookKey = tuple[str, float]


# -- the file, read plainly --------------------------------------------------


async def replay_to_end(source: ReplaySource, sink: EventSink) -> None:
    """Run ``source`` into ``sink`` until its file is through, then stop it."""
    task = asyncio.create_task(source.run(sink))
    try:
        await asyncio.wait_for(source.finished.wait(), 10)
    finally:
        task.cancel()
        with suppress(asyncio.CancelledError):
            await task


def file_lines(path: Path) -> list[dict[str, Any]]:
    with path.open("rb") as probe:
        zipped = probe.read(2) == b"\x1f\x8b"
    with gzip.open(path, "rt") if zipped else path.open() as handle:
        return [json.loads(line) for line in handle if line.strip()]


@dataclass
class PlainSymbol:
    """One symbol's market as the file states it: snapshots replace, diffs set, 0 removes."""

    bids: dict[float, float] = field(default_factory=dict)
    asks: dict[float, float] = field(default_factory=dict)
    last_trade: dict[str, Any] | None = None
    streams: dict[str, str] = field(default_factory=dict)
    book_stamps: list[str] = field(default_factory=list)
    #: ``ts`` of the last book line that changed the best bid or offer.
    top_changed: str | None = None

    def apply(self, line: dict[str, Any]) -> None:
        if line["kind"] == "book":
            before = self.best()
            if line["snapshot"]:
                self.bids, self.asks = {}, {}
            for side, levels in ((self.bids, line["bids"]), (self.asks, line["asks"])):
                for price, size in levels:
                    if size:
                        side[price] = size
                    else:
                        side.pop(price, None)
            self.book_stamps.append(line["ts"])
            if self.best() != before:
                self.top_changed = line["ts"]
        elif line["kind"] == "trade":
            self.last_trade = line
        elif line["kind"] == "status":
            self.streams[line["stream"]] = line["state"]

    def best(self) -> tuple[float | None, float | None, float | None, float | None]:
        bid = max(self.bids, default=None)
        ask = min(self.asks, default=None)
        return bid, self.bids.get(bid or 0.0), ask, self.asks.get(ask or 0.0)

    def top(self, levels: int) -> dict[BookKey, float]:
        bids = sorted(self.bids, reverse=True)[:levels]
        asks = sorted(self.asks)[:levels]
        return {("bid", p): self.bids[p] for p in bids} | {("ask", p): self.asks[p] for p in asks}


def plain_replay(lines: Iterable[dict[str, Any]]) -> dict[str, PlainSymbol]:
    market: dict[str, PlainSymbol] = {}
    for line in lines:
        market.setdefault(line["symbol"], PlainSymbol()).apply(line)
    return market


def duration_s(lines: list[dict[str, Any]]) -> float:
    return (parse_us(lines[-1]["ts"]) - parse_us(lines[0]["ts"])) / 1e6


# -- clients -------------------------------------------------------------------


class Listener:
    """A stream connection whose every message is read in the background."""

    def __init__(self, client: StreamClient) -> None:
        self.client = client
        self.messages: list[dict[str, Any]] = []
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def open(cls, running: RunningService, token: str) -> Listener:
        return cls(await StreamClient.open(running.stream_url, token))

    async def _read(self) -> None:
        with suppress(ConnectionClosed):
            async for raw in self.client.ws:
                self.messages.append(orjson.loads(raw))

    async def subscribe(self, symbol: str, type_: str, **options: Any) -> str:
        request_id = await self.client.send(
            "Subscribe", {"symbol": symbol, "type": type_, **options}
        )
        for _ in range(1000):
            for message in self.messages:
                if (
                    message.get("requestId") == request_id
                    and message["type"] == "SubscribeResponse"
                ):
                    assert message["payload"]["code"] == 200, message
                    return request_id
            await asyncio.sleep(0.01)
        raise TimeoutError(f"no SubscribeResponse to {request_id}")

    def updates(self, request_id: str, type_: str) -> list[dict[str, Any]]:
        return [m for m in self.messages if m.get("requestId") == request_id and m["type"] == type_]

    async def close(self) -> None:
        await self.client.close()
        await self._reader


async def settle(listeners: Iterable[Listener], quiet: float = 0.5, within: float = 20) -> None:
    """Wait until no listener has received anything for ``quiet`` seconds."""
    group = list(listeners)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while loop.time() < deadline:
        seen = sum(len(listener.messages) for listener in group)
        await asyncio.sleep(quiet)
        if sum(len(listener.messages) for listener in group) == seen:
            return
    raise TimeoutError("the updates did not stop")


def replay_of(running: RunningService) -> ReplaySource:
    source = running.listening.service.source
    assert isinstance(source, ReplaySource)
    return source


async def replay_finished(running: RunningService, within: float = 30) -> None:
    source = replay_of(running)
    for _ in range(int(within / 0.05)):
        if source.finished.is_set():
            return
        await asyncio.sleep(0.05)
    raise TimeoutError("the replay did not finish")


def on_loop(running: RunningService, action: Callable[[], T]) -> T:
    """Run ``action`` on the service's event loop, between two of its events."""

    async def call() -> T:
        return action()

    return running.call(call())


@dataclass(frozen=True)
class Watch:
    listener: Listener
    request_id: str
    symbol: str
    type: str
    levels: int
    conflation: str


async def subscribe_everything(running: RunningService, token: str) -> list[Watch]:
    """Level2 at every depth and conflation and Level1 at every conflation, for every symbol.

    One connection per depth and conflation, since a connection may hold one
    Level2 subscription per symbol.
    """

    async def one_connection(levels: int, conflation: str) -> list[Watch]:
        listener = await Listener.open(running, token)
        watches = []
        for symbol in SYMBOLS:
            request_id = await listener.subscribe(
                symbol, "Level2", numberOfLevels=levels, conflation=conflation
            )
            watches.append(Watch(listener, request_id, symbol, "Level2", levels, conflation))
            if levels == DEPTHS[0]:
                request_id = await listener.subscribe(symbol, "Level1", conflation=conflation)
                watches.append(Watch(listener, request_id, symbol, "Level1", 0, conflation))
        return watches

    batches = await asyncio.gather(
        *(one_connection(levels, conflation) for levels in DEPTHS for conflation in CONFLATIONS)
    )
    return [watch for batch in batches for watch in batch]


def check_level2(messages: list[dict[str, Any]], levels: int, plain: PlainSymbol) -> None:
    """The client's book, built from every update in order, is the file's top N."""
    assert messages, "no Level2 update"
    book: dict[BookKey, float] = {}
    for message in messages:
        apply_level2(book, message)
        for side in ("bid", "ask"):
            assert sum(1 for key in book if key[0] == side) <= levels
    assert messages[-1]["depthStream"] == plain.streams["depth"] == "connected"
    assert book == plain.top(levels)


def check_level1(messages: list[dict[str, Any]], plain: PlainSymbol) -> None:
    """The last Level1 payload holds the top of the file's book and its last trade."""
    assert messages, "no Level1 update"
    last = messages[-1]
    assert last["bboStream"] == plain.streams["bbo"] == "connected"
    assert last["tradeStream"] == plain.streams["trade"] == "connected"
    bid, bid_size, ask, ask_size = plain.best()
    trade = plain.last_trade
    assert trade is not None
    expected = {
        "bid": bid,
        "bidSize": bid_size,
        "ask": ask,
        "askSize": ask_size,
        "tradePrice": trade["price"],
        "tradeSize": trade["size"],
        "tradeId": trade["tradeId"],
        "tradeCaspianTimestamp": trade["ts"],
        "tradeExchangeTimestamp": trade["exchangeTs"],
        "exchangeSpecificInfo": trade["info"],
    }
    payload = last["payload"]
    assert {key: payload.get(key) for key in expected} == expected
    # The time of the last bid/ask update: a book line of the file, no older
    # than the last change of the top of the book.
    stamp = payload["bboCaspianTimestamp"]
    assert stamp in plain.book_stamps
    assert plain.top_changed is not None
    assert plain.top_changed <= stamp <= plain.book_stamps[-1]


def check_everything(watches: list[Watch], market: dict[str, PlainSymbol]) -> None:
    for watch in watches:
        updates = watch.listener.updates(watch.request_id, watch.type)
        if watch.type == "Level2":
            check_level2(updates, watch.levels, market[watch.symbol])
        else:
            check_level1(updates, market[watch.symbol])


# -- known answers -------------------------------------------------------------


async def test_known_answer_after_the_whole_file_at_speed_0(tmp_path: Path) -> None:
    """Subscribed once the file is replayed, every client starts from its end state.

    That is the replay's catch-up: a symbol first watched mid-file (here at its
    end) gets a whole snapshot of its book, its stream states and last trade.
    """
    market = plain_replay(file_lines(SAMPLE))
    running = start_service(
        tmp_path, source=f"replay:{SAMPLE}", replay_speed=0, replay_recorded_times=True
    )
    watches: list[Watch] = []
    try:
        await replay_finished(running)
        token = await asyncio.to_thread(running.token)
        watches = await subscribe_everything(running, token)
        await settle({watch.listener for watch in watches})
        check_everything(watches, market)
        assert replay_of(running).bad_lines == 0
    finally:
        for listener in {watch.listener for watch in watches}:
            await listener.close()
        running.stop()


async def test_known_answer_while_the_file_plays(tmp_path: Path) -> None:
    """Clients subscribed during the replay follow every change to the file's end.

    The file is paced to last about 6 s, so the first clients subscribe early
    and then receive diffs, the depth outage of FX-BTC/USD and its whole-book
    resync; clients subscribed after the end join the same groups. At the end
    each client's book is the file's top N for its depth, at every conflation.
    """
    lines = file_lines(SAMPLE)
    market = plain_replay(lines)
    outage = next(
        line["ts"]
        for line in lines
        if line["kind"] == "status"
        and line["state"] == "disconnected"
        and line["stream"] == "depth"
    )
    running = start_service(
        tmp_path,
        source=f"replay:{SAMPLE}",
        replay_speed=duration_s(lines) / 6.0,
        replay_recorded_times=True,
    )
    early: list[Watch] = []
    late: list[Watch] = []
    try:
        token = await asyncio.to_thread(running.token)
        early = await subscribe_everything(running, token)
        assert not replay_of(running).finished.is_set(), "the machine is too slow for this test"
        await replay_finished(running)
        late = await subscribe_everything(running, token)
        # Longer than the longest conflation interval: every group has flushed.
        await asyncio.sleep(1.2)
        await settle({watch.listener for watch in early + late})
        check_everything(early + late, market)
        counts: dict[tuple[str, str, int, str], int] = {}
        for watch in early:
            updates = watch.listener.updates(watch.request_id, watch.type)
            counts[watch.symbol, watch.type, watch.levels, watch.conflation] = len(updates)
            # A client whose first view is older than the outage must have seen it.
            if (
                watch.type == "Level2"
                and watch.symbol == SYMBOLS[0]
                and updates[0]["caspianTimestamp"] < outage
            ):
                assert any(m["depthStream"] == "disconnected" for m in updates)
        for symbol in SYMBOLS:
            # Streamed, not only caught up: many updates, fewer when conflated.
            assert counts[symbol, "Level2", 20, "None"] > 20
            assert counts[symbol, "Level2", 20, "1s"] < counts[symbol, "Level2", 20, "None"]
            assert counts[symbol, "Level1", 0, "1s"] < counts[symbol, "Level1", 0, "None"]
    finally:
        for listener in {watch.listener for watch in early + late}:
            await listener.close()
        running.stop()


# -- a recording replays as the original run -------------------------------------


def comparable(messages: list[dict[str, Any]], type_: str) -> list[dict[str, Any]]:
    """The updates of one subscription as a client sees them, without their requestId.

    The first Level2 update comes at subscription time, before any depth event,
    so its caspianTimestamp is the wall clock of that moment: the only field no
    recording can reproduce.
    """
    updates = [
        {key: value for key, value in message.items() if key != "requestId"}
        for message in messages
        if message["type"] == type_
    ]
    if type_ == "Level2":
        assert updates[0]["payload"] == [] and updates[0]["depthStream"] == "disconnected"
        del updates[0]["caspianTimestamp"]
    return updates


class HubClient:
    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []

    def deliver(self, prefix: bytes, tail: bytes) -> None:
        self.messages.append(orjson.loads(prefix + tail))


async def test_a_recording_replays_as_the_original_run(tmp_path: Path) -> None:
    """Replaying a recording gives a subscription the same updates as the original run.

    "The same" needs a subscription that exists before the symbol's first event
    in both runs; one made later starts from whatever state it joins (the
    catch-up of the tests above). So:

    1. Original run, on the simulator: a real Recorder is put between the
       source and the hub, so it writes exactly the events the hub receives.
       Another symbol is watched 3 s before, so that the recording starts 3 s
       before the symbol under test. The simulator's ``watch`` is held back
       while the Level2 and Level1 subscriptions (conflation None) are made,
       as a slow upstream would, so both exist before the symbol's first event.
       At the end the recording and the symbol's market are stopped at once,
       on the service's loop, so that every update the client got comes from
       a recorded event.
    2. The recording is replayed by a second service at recorded pace: the
       client subscribes during the 3 s lead, and must receive the same updates.
    3. The recording is replayed at speed 0 by a ReplaySource into a fresh Hub
       whose subscriptions exist before the replay starts: the same updates.
    """
    symbol, lead = SYMBOLS[0], SYMBOLS[1]
    recording = tmp_path / "original.jsonl.gz"
    original = start_service(tmp_path / "original")
    try:
        service = original.listening.service
        simulator = service.source
        assert isinstance(simulator, Simulator)
        recorder = Recorder(recording)

        def tee(event: Event) -> None:
            recorder.write(event)
            service.hub.on_event(event)

        def start_recording() -> None:
            service.bus.handler = tee

        on_loop(original, start_recording)
        token = await asyncio.to_thread(original.token)
        lead_client = await Listener.open(original, token)
        await lead_client.subscribe(lead, "Level1", conflation="1s")
        await asyncio.sleep(3.0)
        held: list[str] = []
        on_loop(original, lambda: setattr(simulator, "watch", held.append))
        client = await Listener.open(original, token)
        level2 = await client.subscribe(symbol, "Level2", numberOfLevels=10, conflation="None")
        level1 = await client.subscribe(symbol, "Level1", conflation="None")

        def release() -> None:
            del simulator.watch
            for code in held:
                simulator.watch(code)

        on_loop(original, release)
        assert held == [symbol]
        await asyncio.sleep(2.0)

        def stop_recording() -> None:
            service.bus.handler = service.hub.on_event
            simulator.unwatch(symbol)
            simulator.unwatch(lead)
            recorder.close()

        on_loop(original, stop_recording)
        await settle([client])
        expected2 = comparable(client.updates(level2, "Level2"), "Level2")
        expected1 = comparable(client.updates(level1, "Level1"), "Level1")
        await client.close()
        await lead_client.close()
    finally:
        original.stop()
    assert len(expected2) > 20
    assert len(next(update for update in expected2 if update["payload"])["payload"]) == 20
    assert any("tradeId" in update["payload"] for update in expected1)

    replayed = start_service(
        tmp_path / "replay",
        source=f"replay:{recording}",
        replay_speed=1,
        replay_recorded_times=True,
    )
    try:
        token = await asyncio.to_thread(replayed.token)
        client = await Listener.open(replayed, token)
        level2 = await client.subscribe(symbol, "Level2", numberOfLevels=10, conflation="None")
        level1 = await client.subscribe(symbol, "Level1", conflation="None")
        await replay_finished(replayed)
        await settle([client])
        assert comparable(client.updates(level2, "Level2"), "Level2") == expected2
        assert comparable(client.updates(level1, "Level1"), "Level1") == expected1
        await client.close()
    finally:
        replayed.stop()

    source = ReplaySource(recording, speed=0, recorded_times=True)
    hub = Hub(source.watch, source.unwatch, unwatch_grace_s=0)
    product = next(p for p in builtin_products() if p.caspian_code == symbol)
    direct = HubClient()
    hub.add(Subscription("l2", product, SubscriptionType.LEVEL2, 10, "None"), direct)
    hub.add(Subscription("l1", product, SubscriptionType.LEVEL1, 20, "None"), direct)
    await replay_to_end(source, hub.on_event)
    assert comparable(direct.messages, "Level2") == expected2
    assert comparable(direct.messages, "Level1") == expected1


# -- bad lines -------------------------------------------------------------------


def with_bad_lines(path: Path) -> tuple[Path, list[int]]:
    """The sample as plain JSONL with bad lines slipped in; their line numbers."""
    with gzip.open(SAMPLE, "rb") as handle:
        good = handle.read().splitlines()
    first = json.loads(good[0])
    symbol, ts = first["symbol"], first["ts"]
    some_bid = next(json.loads(line) for line in good if b'"snapshot":true' in line)["bids"][0]
    bad = [
        b"this is not JSON",
        orjson.dumps({"ts": ts, "symbol": symbol, "kind": "level3"}),
        # A valid level first: the whole line must be skipped, not half applied.
        orjson.dumps(
            {
                "ts": ts,
                "symbol": symbol,
                "kind": "book",
                "snapshot": False,
                "bids": [[some_bid[0] + 0.01, 5.0], [some_bid[0], -1.0]],
                "asks": [],
            }
        ),
        orjson.dumps({"ts": ts, "kind": "trade", "price": 1.0, "size": 1.0}),
        b"[1, 2, 3]",
        orjson.dumps(
            {"ts": "yesterday", "symbol": symbol, "kind": "trade", "price": 1.0, "size": 1}
        ),
    ]
    spots = [1, 2, len(good) // 3, len(good) // 2, len(good) - 1]
    lines = list(good)
    for offset, (spot, line) in enumerate(zip(spots, bad, strict=False)):
        lines.insert(spot + offset, line)
    lines.insert(len(lines) // 4, b"")
    # The last line is bad too, but whole: it ends with a newline.
    lines.append(bad[-1])
    numbers = [index + 1 for index, line in enumerate(lines) if line in bad]
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path, numbers


def replay_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        record.getMessage()
        for record in caplog.records
        if record.name == "caspian.sources.replay" and record.levelno >= logging.WARNING
    ]


async def test_bad_lines_are_reported_once_and_skipped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="caspian.sources.replay")
    path, bad = with_bad_lines(tmp_path / "bad.jsonl")
    assert len(bad) == 6
    market = plain_replay(file_lines(SAMPLE))
    running = start_service(
        tmp_path / "data", source=f"replay:{path}", replay_speed=0, replay_recorded_times=True
    )
    listener: Listener | None = None
    try:
        await replay_finished(running)
        token = await asyncio.to_thread(running.token)
        listener = await Listener.open(running, token)
        watches = []
        for symbol in SYMBOLS:
            request_id = await listener.subscribe(
                symbol, "Level2", numberOfLevels=100, conflation="None"
            )
            watches.append(Watch(listener, request_id, symbol, "Level2", 100, "None"))
            request_id = await listener.subscribe(symbol, "Level1", conflation="None")
            watches.append(Watch(listener, request_id, symbol, "Level1", 0, "None"))
        await settle([listener])
        # The good lines all played, also those after each bad one.
        check_everything(watches, market)
        assert replay_of(running).bad_lines == len(bad)
    finally:
        if listener is not None:
            await listener.close()
        running.stop()
    warnings = replay_warnings(caplog)
    reported = Counter(
        int(match.group(1))
        for match in (re.search(r"\.jsonl:(\d+): bad line skipped: .+", text) for text in warnings)
        if match
    )
    assert reported == Counter(bad), warnings
    assert len(warnings) == len(bad), warnings


@pytest.mark.timeout(30)
async def test_looping_reports_each_bad_line_once_and_keeps_the_loop_running(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A file shorter than a batch, looped at speed 0: the event loop still runs."""
    caplog.set_level(logging.WARNING, logger="caspian.sources.replay")
    with gzip.open(SAMPLE, "rb") as handle:
        good = handle.read().splitlines()[:12]
    path = tmp_path / "short.jsonl"
    # A bad line, and an unterminated last line as a crash leaves it.
    path.write_bytes(b"\n".join([*good[:5], b"{oops", *good[5:]]) + b'\n{"ts": "20')
    source = ReplaySource(path, speed=0, loop_forever=True, recorded_times=True)
    for symbol in SYMBOLS:
        source.watch(symbol)
    seen: list[Event] = []
    task = asyncio.create_task(source.run(seen.append))
    try:
        for _ in range(200):
            # Only reached when the replay lets the loop run between passes.
            await asyncio.sleep(0.01)
            if len(seen) >= 5 * len(good):
                break
        assert len(seen) >= 5 * len(good)
    finally:
        task.cancel()
        with suppress(asyncio.CancelledError):
            await task
    passes = [seen[i : i + len(good)] for i in range(0, 4 * len(good), len(good))]
    assert all(one == passes[0] for one in passes)
    assert source.bad_lines == 1
    warnings = replay_warnings(caplog)
    assert sum(":6: bad line skipped" in text for text in warnings) == 1, warnings
    assert sum(f":{len(good) + 2}: partial last line ignored" in text for text in warnings) == 1
    assert len(warnings) == 2, warnings


async def test_a_looping_service_keeps_streaming(tmp_path: Path) -> None:
    running = start_service(
        tmp_path,
        source=f"replay:{SAMPLE}",
        replay_speed=0,
        replay_loop=True,
        replay_recorded_times=True,
    )
    try:
        token = await asyncio.to_thread(running.token)
        listener = await Listener.open(running, token)
        request_id = await listener.subscribe(SYMBOLS[1], "Level1", conflation="250ms")
        await asyncio.sleep(1.5)
        # Still answering REST while the file plays over and over.
        response = await asyncio.to_thread(
            httpx.get,
            f"{running.base_url}/v1/reference/exchanges",
            headers={"Authorization": token},
            timeout=10,
        )
        assert response.status_code == 200
        assert len(listener.updates(request_id, "Level1")) >= 3
        await listener.close()
    finally:
        running.stop()


# -- the source on its own ---------------------------------------------------------


async def test_pacing_follows_the_recorded_times() -> None:
    lines = file_lines(SAMPLE)
    speed = duration_s(lines) / 1.5
    source = ReplaySource(SAMPLE, speed=speed, recorded_times=True)
    for symbol in SYMBOLS:
        source.watch(symbol)
    loop = asyncio.get_running_loop()
    arrivals: list[tuple[float, int]] = []
    await replay_to_end(source, lambda event: arrivals.append((loop.time(), event.ts)))
    assert len(arrivals) == len(lines)
    start, first_ts = arrivals[0]
    lateness = [(at - start) - (ts - first_ts) / 1e6 / speed for at, ts in arrivals]
    # Never ahead of the recorded pace, and behind it only by scheduling noise.
    assert min(lateness) > -0.005
    assert sorted(lateness)[len(lateness) // 2] < 0.05
    assert max(lateness) < 0.5


async def test_speed_0_is_as_fast_as_possible() -> None:
    lines = file_lines(SAMPLE)
    source = ReplaySource(SAMPLE, speed=0, recorded_times=True)
    loop = asyncio.get_running_loop()
    started = loop.time()
    await replay_to_end(source, lambda event: None)
    assert loop.time() - started < duration_s(lines) / 10


async def test_a_symbol_watched_mid_file_starts_from_a_whole_book() -> None:
    market = plain_replay(file_lines(SAMPLE))
    source = ReplaySource(SAMPLE, speed=0, recorded_times=True)
    seen: list[Event] = []
    task = asyncio.create_task(source.run(seen.append))
    try:
        await asyncio.wait_for(source.finished.wait(), 10)
        assert seen == []
        source.watch(SYMBOLS[2])
    finally:
        task.cancel()
        with suppress(asyncio.CancelledError):
            await task
    caught_up = [json.loads(json.dumps(to_dict(event))) for event in seen]
    plain = market[SYMBOLS[2]]
    statuses = {line["stream"]: line["state"] for line in caught_up if line["kind"] == "status"}
    assert statuses == plain.streams
    books = [line for line in caught_up if line["kind"] == "book"]
    assert len(books) == 1 and books[0]["snapshot"]
    whole = PlainSymbol()
    whole.apply(books[0])
    assert (whole.bids, whole.asks) == (plain.bids, plain.asks)
    assert books[0]["ts"] == plain.book_stamps[-1]
    assert caught_up[-1] == plain.last_trade


# -- settings and the command line ------------------------------------------------------


def test_replay_settings_make_a_replay_source(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CASPIAN_SOURCE", f"replay:{SAMPLE}")
    monkeypatch.setenv("CASPIAN_REPLAY_SPEED", "10")
    monkeypatch.setenv("CASPIAN_REPLAY_LOOP", "true")
    source = make_source(Settings(), lambda code: None)
    assert isinstance(source, ReplaySource)
    assert (source.path, source.speed, source.loop_forever) == (SAMPLE, 10.0, True)
    monkeypatch.setenv("CASPIAN_REPLAY_SPEED", "-1")
    with pytest.raises(ValidationError):
        Settings()
    monkeypatch.delenv("CASPIAN_REPLAY_SPEED")
    for wrong in ("replay:", "replay:/no/such/recording.jsonl"):
        monkeypatch.setenv("CASPIAN_SOURCE", wrong)
        with pytest.raises(ValueError, match="recording"):
            make_source(Settings(), lambda code: None)


async def test_caspian_serve_replays_the_shipped_sample(tmp_path: Path) -> None:
    """The README example: ``CASPIAN_SOURCE=replay:... caspian serve``, as a user runs it."""
    plain = plain_replay(file_lines(SAMPLE))[SYMBOLS[1]]
    assert plain.last_trade is not None
    env = {
        **os.environ,
        "CASPIAN_DATA_DIR": str(tmp_path),
        "CASPIAN_PORT": "0",
        "CASPIAN_SOURCE": f"replay:{SAMPLE}",
        "CASPIAN_REPLAY_SPEED": "0",
        "CASPIAN_MAINTENANCE": "off",
        "CASPIAN_LOG_LEVEL": "warning",
    }
    caspian = [sys.executable, "-c", "from caspian.cli import main; main()"]
    server = await asyncio.create_subprocess_exec(
        *caspian, "serve", env=env, stdout=asyncio.subprocess.PIPE
    )
    try:
        assert server.stdout is not None
        urls: dict[str, str] = {}
        while "stream" not in urls:
            line = (await asyncio.wait_for(server.stdout.readline(), 30)).decode()
            assert line, "caspian serve ended before listening"
            if line.startswith("Caspian REST API:"):
                urls["rest"] = line.split(": ", 1)[1].strip()
            elif line.startswith("Caspian stream:"):
                urls["stream"] = line.split(":", 1)[1].strip()
        keys = await asyncio.create_subprocess_exec(
            *caspian, "keys", "create", "--user", "alice", "--json",
            env=env, stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, _ = await asyncio.wait_for(keys.communicate(), 30)
        key = json.loads(out)
        async with httpx.AsyncClient(timeout=10) as http:
            response = await http.post(
                f"{urls['rest']}/auth/authenticate", json={"type": "Key", "payload": key}
            )
        token = response.json()["accessToken"]
        client = await StreamClient.open(urls["stream"], token)
        await client.subscribe(SYMBOLS[1], "Level1", conflation="None")
        update = await client.wait_for(
            lambda m: m["type"] == "Level1" and "tradeId" in m["payload"], within=15
        )
        assert update["payload"]["tradeId"] == plain.last_trade["tradeId"]
        assert update["payload"]["tradePrice"] == plain.last_trade["price"]
        await client.close()
    finally:
        server.terminate()
        await asyncio.wait_for(server.wait(), 30)


@pytest.mark.timeout(30)
async def test_a_replay_stamps_delivery_time_never_backwards_and_keeps_exchange_times(
    tmp_path: Path,
) -> None:
    with gzip.open(SAMPLE, "rb") as handle:
        lines = handle.read().splitlines()[:40]
    path = tmp_path / "short.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    recorded = [from_json(line) for line in lines]
    source = ReplaySource(path, speed=0, loop_forever=True)
    for symbol in {event.symbol for event in recorded}:
        source.watch(symbol)
    seen: list[Event] = []
    before = now_us()
    task = asyncio.create_task(source.run(seen.append))
    try:
        for _ in range(300):
            await asyncio.sleep(0.01)
            if len(seen) >= 3 * len(recorded):
                break
    finally:
        task.cancel()
        with suppress(asyncio.CancelledError):
            await task
    after = now_us()
    assert len(seen) >= 3 * len(recorded)
    stamps = [event.ts for event in seen]
    # Delivery times, in order across the loops, where the recording's run days back.
    assert stamps == sorted(stamps)
    assert before <= stamps[0] and stamps[-1] <= after
    assert all(event.ts > original.ts for event, original in zip(seen, recorded, strict=False))
    # The exchange's own times are the recording's, pass after pass.
    originals = [e.exchange_ts for e in recorded if not isinstance(e, StatusEvent)]
    for start in range(0, 3 * len(recorded), len(recorded)):
        one_pass = seen[start : start + len(recorded)]
        assert [e.exchange_ts for e in one_pass if not isinstance(e, StatusEvent)] == originals
