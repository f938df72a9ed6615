"""The NATS bus: one source feeds any number of gateways, on any machines.

Subjects, under a prefix (``caspian``):

- ``<prefix>.md.<symbol>``: the symbol's events, as replay-format JSON with two
  more fields, ``seq`` (1, 2, 3… per symbol) and ``epoch`` (one id per start
  of the source side). A gateway only subscribes to the symbols its clients
  watch.
- ``<prefix>.interest``: each gateway's whole set of watched symbols, sent on
  every change and renewed every ``lease_s / 3`` seconds; the source side
  watches the union of all live leases, so a gateway that dies without a word
  stops costing upstream work once its lease runs out.
- ``<prefix>.snapshot.<symbol>``: request/reply; the answer is the symbol's
  whole current state (stream states, book, last quote and trade) as events,
  with the ``seq`` and ``epoch`` it is valid at.
- ``<prefix>.heartbeat``: each source instance's epoch, about three times per
  ``source_timeout_s``. A gateway whose feed of a symbol belongs to an epoch
  it has not heard for ``source_timeout_s`` (the source was killed, or cut
  off) marks the symbol's three streams ``disconnected`` at once and joins
  again, from whichever source answers: a whole top-N when one does.

How a gateway gets a whole book, and notices a gap: it subscribes to the
symbol's events first and buffers them, asks for a snapshot, applies it, then
applies the buffered events numbered after it. From then on each event must
carry the next number of the same epoch. A number skipped (a message lost,
the gateway's NATS connection dropped) or a new epoch (the source restarted)
marks the symbol's streams ``disconnected`` for its clients at once (a lost
event may be a trade or a quote as well as a book change) and starts the
same join again, which ends in a whole top-N for every Level2 client.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
import uuid
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nats
import orjson
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription as NatsSubscription

from caspian.bus.base import Bus
from caspian.bus.leases import Leases
from caspian.bus.liveness import SourceLiveness
from caspian.bus.nats_options import redact
from caspian.codes import Stream, StreamState
from caspian.events import (
    Event,
    EventFormatError,
    StatusEvent,
    every_stream,
    from_dict,
    to_dict,
)
from caspian.metrics import (
    BUS_PUBLISH_FAILURES,
    BUS_RECONNECTS,
    BUS_RESYNCS,
    BUS_SNAPSHOT_REQUESTS,
    BUS_SOURCE_CHANGES,
    BUS_SOURCE_SILENCE,
    BUS_SOURCE_TIMEOUTS,
    BUS_SOURCES_HEARD,
)
from caspian.pacing import LogThrottle
from caspian.sources.base import Source
from caspian.sources.tracker import SymbolTracker
from caspian.tasks import spawn
from caspian.timefmt import now_us

log = logging.getLogger(__name__)

DEFAULT_PREFIX = "caspian"
#: How long a gateway's interest lasts without renewal.
DEFAULT_LEASE_S = 10.0
#: How long a gateway waits for a snapshot before asking again.
SNAPSHOT_TIMEOUT_S = 2.0
#: How long a gateway waits for a heartbeat of a feed's source before marking it down.
DEFAULT_SOURCE_TIMEOUT_S = 3.0


def exchange_of(symbol: str) -> str:
    """The exchange code a Caspian symbol code ends with (``FX-BTC/USD=GEMINI``: GEMINI)."""
    return symbol.rpartition("=")[2]


def symbol_token(symbol: str) -> str:
    """A symbol as one subject token: NATS gives '.', '*' and '>' meanings."""
    return (
        symbol.replace("%", "%25")
        .replace(".", "%2E")
        .replace("*", "%2A")
        .replace(">", "%3E")
        .replace(" ", "%20")
    )


class _SourceSide:
    """Beside the source: numbers and publishes its events, answers snapshots, follows interest."""

    def __init__(
        self, nc: Client, source: Source, prefix: str, lease_s: float, heartbeat_s: float
    ) -> None:
        self._nc = nc
        self._source = source
        self._prefix = prefix
        self._lease_s = lease_s
        self._heartbeat_s = heartbeat_s
        self.epoch = uuid.uuid4().hex[:12]
        self._seq: dict[str, int] = {}
        self._tracker = SymbolTracker()
        #: gateway -> (the symbols it watches, until when that interest holds)
        self._leases_of_gateways: dict[str, tuple[frozenset[str], float]] = {}
        self._watched: set[str] = set()
        self._outbox: deque[tuple[str, bytes]] = deque()
        self._wake = asyncio.Event()
        self._errors = LogThrottle(log)
        self._tasks: list[asyncio.Task[None]] = []
        self._subscriptions: list[NatsSubscription] = []
        #: The exchanges this instance serves, when several may (see leases.py).
        self._leases: Leases | None = None
        self._lease_wake = asyncio.Event()

    async def start(self) -> None:
        self._leases = await Leases.open(
            self._nc, self._prefix, ttl_s=3 * self._heartbeat_s, owner=self.epoch
        )
        self._subscriptions = [
            await self._nc.subscribe(f"{self._prefix}.interest", cb=self._on_interest),
            await self._nc.subscribe(f"{self._prefix}.snapshot.*", cb=self._on_snapshot),
        ]
        self._tasks = [
            spawn(self._send(), "caspian-nats-publish"),
            spawn(self._expire(), "caspian-nats-leases"),
            spawn(self._beat(), "caspian-nats-heartbeat"),
        ]
        if self._leases is not None:
            self._tasks.append(spawn(self._hold(), "caspian-nats-election"))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for subscription in self._subscriptions:
            with contextlib.suppress(Exception):
                await subscription.unsubscribe()
        if self._leases is not None:
            # Handed over at once: a standby need not wait for the leases to expire.
            for exchange in self._leases.held:
                await self._leases.release(exchange)

    def publish(self, event: Event) -> None:
        symbol = event.symbol
        if symbol not in self._watched:
            return
        self._tracker.track(event)
        seq = self._seq.get(symbol, 0) + 1
        self._seq[symbol] = seq
        message = to_dict(event)
        message["seq"] = seq
        message["epoch"] = self.epoch
        self._outbox.append((f"{self._prefix}.md.{symbol_token(symbol)}", orjson.dumps(message)))
        self._wake.set()

    async def _send(self) -> None:
        # The source's sink is synchronous; a NATS publish is a coroutine. A
        # queue drained by one task keeps events in order at no task-per-event cost.
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._outbox:
                subject, payload = self._outbox.popleft()
                try:
                    await self._nc.publish(subject, payload)
                except nats.errors.Error as exc:
                    # Lost, not fatal: the events are numbered, so a gateway sees the
                    # gap at the next one and resyncs; the heartbeat goes on, so the
                    # publishing must too.
                    BUS_PUBLISH_FAILURES.labels(type(exc).__name__).inc()
                    self._errors.warning(
                        "publish",
                        f"NATS: events lost on the way to the bus ({exc!r}); "
                        "gateways resync once it takes them again",
                    )

    async def _beat(self) -> None:
        heartbeat = orjson.dumps({"epoch": self.epoch})
        while True:
            if self._nc.is_connected:
                with contextlib.suppress(nats.errors.Error):
                    await self._nc.publish(f"{self._prefix}.heartbeat", heartbeat)
            await asyncio.sleep(self._heartbeat_s)

    def _serves(self, exchange: str) -> bool:
        return self._leases is None or exchange in self._leases.held

    def _wanted(self) -> set[str]:
        wanted: set[str] = set()
        for symbols, _ in self._leases_of_gateways.values():
            wanted |= symbols
        return wanted

    async def _hold(self) -> None:
        """Renews the leases held, takes the ones wanted and free, gives up the unwanted."""
        leases = self._leases
        assert leases is not None
        while True:
            await leases.renew()
            exchanges = {exchange_of(symbol) for symbol in self._wanted()}
            for exchange in exchanges - leases.held:
                await leases.acquire(exchange)
            for exchange in leases.held - exchanges:
                await leases.release(exchange)
            self._follow_interest()
            self._lease_wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._lease_wake.wait(), self._heartbeat_s)

    async def _on_snapshot(self, msg: Msg) -> None:
        symbol = msg.data.decode(errors="replace")
        exchange = exchange_of(symbol)
        if not self._serves(exchange):
            # The first gateway to ask need not wait for the next round of the election.
            if self._leases is None or not await self._leases.acquire(exchange):
                return
            self._follow_interest()
        reply = {
            "epoch": self.epoch,
            "seq": self._seq.get(symbol, 0),
            "events": [to_dict(event) for event in self._tracker.catch_up(symbol)],
        }
        await msg.respond(orjson.dumps(reply))

    async def _on_interest(self, msg: Msg) -> None:
        try:
            body = orjson.loads(msg.data)
            gateway = str(body["gateway"])
            symbols = frozenset(str(symbol) for symbol in body["symbols"])
        except (orjson.JSONDecodeError, KeyError, TypeError):
            log.warning("ignoring a malformed interest message")
            return
        if symbols:
            self._leases_of_gateways[gateway] = (symbols, time.monotonic() + self._lease_s)
        else:
            self._leases_of_gateways.pop(gateway, None)
        self._lease_wake.set()
        self._follow_interest()

    async def _expire(self) -> None:
        while True:
            await asyncio.sleep(self._lease_s / 3)
            now = time.monotonic()
            expired = [g for g, (_, until) in self._leases_of_gateways.items() if until < now]
            for gateway in expired:
                log.info("interest of gateway %s expired", gateway)
                del self._leases_of_gateways[gateway]
            self._follow_interest()

    def _follow_interest(self) -> None:
        """Watches upstream the symbols some gateway wants, of the exchanges served here."""
        asked = self._wanted()
        wanted = {symbol for symbol in asked if self._serves(exchange_of(symbol))}
        for symbol in wanted - self._watched:
            self._watched.add(symbol)
            self._source.watch(symbol)
        for symbol in self._watched - wanted:
            if symbol in asked:
                # Handed over (its lease lost): gateways following this epoch hear it
                # at once, rather than a feed gone quiet while its source still beats.
                for event in every_stream(symbol, now_us(), StreamState.DISCONNECTED):
                    self.publish(event)
            self._watched.discard(symbol)
            self._source.unwatch(symbol)
            self._tracker.forget(symbol)
            # The numbering goes on within the epoch: served again later, the
            # symbol starts with a snapshot event, which a gateway applies as such.


class _Feed:
    """A gateway's view of one symbol's event stream."""

    def __init__(self) -> None:
        self.subscription: NatsSubscription | None = None
        self.live = False
        self.epoch: str | None = None
        self.seq = 0
        self.buffer: list[tuple[str, int, dict[str, Any]]] = []
        self.joining: asyncio.Task[None] | None = None
        #: When it last went live (monotonic): its source's heartbeat counts from then.
        self.joined_at = 0.0
        #: Streams the bus itself marked down, to set right when the feed is back.
        self.marked: set[Stream] = set()


class NatsBus(Bus):
    def __init__(
        self,
        servers: str | Sequence[str],
        source: Source | None,
        prefix: str = DEFAULT_PREFIX,
        lease_s: float = DEFAULT_LEASE_S,
        source_timeout_s: float = DEFAULT_SOURCE_TIMEOUT_S,
        *,
        credentials: Path | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        super().__init__()
        #: One cluster's servers: nats-py moves to another when one goes away.
        self._servers = [servers] if isinstance(servers, str) else list(servers)
        self._credentials = credentials
        self._tls = tls
        self._source = source
        self._prefix = prefix
        self._lease_s = lease_s
        self._liveness = SourceLiveness(source_timeout_s)
        #: Set once the first connection is up, and from then on kept while it reconnects.
        self._nc: Client | None = None
        self._up = asyncio.Event()
        self._connecting: asyncio.Task[None] | None = None
        self._client: Client | None = None
        self._last_server = "no server"
        self._source_side: _SourceSide | None = None
        self._gateway_id = uuid.uuid4().hex[:12]
        self._feeds: dict[str, _Feed] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._renewal: asyncio.Task[None] | None = None
        self._liveness_task: asyncio.Task[None] | None = None
        self._stopping = False
        self._errors = LogThrottle(log)
        #: Gaps seen and resyncs done, for tests and metrics.
        self.resyncs = 0

    async def start(self) -> None:
        """Connects in the background, so the service serves its health and readiness
        (and its clients, who see ``disconnected``) while NATS is down; what needs the
        connection waits for it (``_connection``)."""
        self._connecting = asyncio.create_task(self._connect(), name="caspian-nats-connect")
        self._renewal = spawn(self._renew(), "caspian-nats-interest")

    async def _connect(self) -> None:
        client = self._client = Client()
        log.info("NATS: connecting to %s", ", ".join(redact(url) for url in self._servers))
        # max_reconnect_attempts=-1 makes nats-py try the servers in turn, a second
        # apart per server, until one answers: for the first connection as for later ones.
        await client.connect(
            self._servers,
            name=f"caspian-{self._gateway_id}",
            allow_reconnect=True,
            max_reconnect_attempts=-1,
            reconnect_time_wait=1,
            connect_timeout=2,
            disconnected_cb=self._on_disconnected,
            reconnected_cb=self._on_reconnected,
            error_cb=self._on_error,
            user_credentials=str(self._credentials) if self._credentials else None,
            tls=self._tls,
        )
        self._nc = client
        log.info("NATS: connected to %s", self._server_shown())
        if self._source is not None:
            self._source_side = _SourceSide(
                client,
                self._source,
                self._prefix,
                self._lease_s,
                self._liveness.timeout_s / 3,
            )
            await self._source_side.start()
        await self._start_liveness()
        self._up.set()
        self._announce()

    async def _connection(self) -> Client:
        """The NATS connection, once it has been up (it may be reconnecting now)."""
        await self._up.wait()
        assert self._nc is not None
        return self._nc

    @property
    def connection_state(self) -> str:
        """``connected``, ``connecting`` (never connected yet), ``reconnecting`` or ``closed``."""
        nc = self._nc
        if nc is None:
            return "connecting" if self._client is not None else "closed"
        if nc.is_connected:
            return "connected"
        return "reconnecting" if nc.is_reconnecting else "closed"

    def _server_shown(self) -> str:
        """The server connected to, or (once the connection is lost) last connected to."""
        url = self._nc.connected_url if self._nc is not None else None
        if url is not None:
            self._last_server = redact(url.geturl())
        return self._last_server

    async def stop(self) -> None:
        self._stopping = True
        if self._connecting is not None:
            self._connecting.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._connecting
        if self._renewal is not None:
            self._renewal.cancel()
        if self._liveness_task is not None:
            self._liveness_task.cancel()
        for task in list(self._tasks):
            task.cancel()
        client, self._client = self._client, None
        if self._nc is None:
            if client is not None:
                # Stopped while still trying to connect.
                with contextlib.suppress(Exception):
                    await client.close()
            return
        with contextlib.suppress(Exception):
            await self._nc.publish(
                f"{self._prefix}.interest",
                orjson.dumps({"gateway": self._gateway_id, "symbols": []}),
            )
        if self._source_side is not None:
            await self._source_side.stop()
        with contextlib.suppress(Exception):
            await self._nc.drain()
        self._nc = None

    # -- source side -------------------------------------------------------

    def publish(self, event: Event) -> None:
        if self._source_side is not None:
            self._source_side.publish(event)

    # -- gateway side ------------------------------------------------------

    def source_heard(self) -> bool:
        """Whether events can come: a source runs here, or one was heard within the timeout."""
        return self._source is not None or bool(self._liveness.sources())

    async def _start_liveness(self) -> None:
        assert self._nc is not None

        async def on_heartbeat(msg: Msg) -> None:
            try:
                epoch = str(orjson.loads(msg.data)["epoch"])
            except (orjson.JSONDecodeError, KeyError, TypeError):
                log.warning("ignoring a malformed heartbeat")
                return
            self._liveness.heard(epoch)

        await self._nc.subscribe(f"{self._prefix}.heartbeat", cb=on_heartbeat)
        self._liveness_task = spawn(self._watch_sources(), "caspian-nats-liveness")

    async def _watch_sources(self) -> None:
        """Marks down, and joins again, every feed whose source has gone silent."""
        liveness = self._liveness
        shown: set[str] = set()
        while True:
            await asyncio.sleep(liveness.timeout_s / 4)
            heard = liveness.sources()
            BUS_SOURCES_HEARD.set(len(heard))
            for epoch, silence in heard.items():
                BUS_SOURCE_SILENCE.labels(epoch).set(silence)
            for epoch in shown - heard.keys():
                BUS_SOURCE_SILENCE.remove(epoch)
            shown = set(heard)
            for symbol, feed in list(self._feeds.items()):
                if feed.live and not liveness.alive(feed.epoch, feed.joined_at):
                    log.warning(
                        "no heartbeat from the source of %s (epoch %s) for %g s: "
                        "marked disconnected until a source answers",
                        symbol,
                        feed.epoch,
                        liveness.timeout_s,
                    )
                    BUS_SOURCE_TIMEOUTS.inc()
                    self._mark_disconnected(symbol, feed)
                    self._join(symbol, feed)

    def watch(self, symbol: str) -> None:
        if symbol in self._feeds:
            return
        feed = self._feeds[symbol] = _Feed()
        self._spawn(self._subscribe(symbol, feed))
        self._announce()

    def unwatch(self, symbol: str) -> None:
        feed = self._feeds.pop(symbol, None)
        if feed is None:
            return
        if feed.joining is not None:
            feed.joining.cancel()
        if feed.subscription is not None:
            self._spawn(feed.subscription.unsubscribe())
        self._announce()

    async def _subscribe(self, symbol: str, feed: _Feed) -> None:
        nc = await self._connection()

        async def on_event(msg: Msg) -> None:
            self._on_event(symbol, feed, msg.data)

        feed.subscription = await nc.subscribe(
            f"{self._prefix}.md.{symbol_token(symbol)}", cb=on_event
        )
        if self._feeds.get(symbol) is not feed:
            await feed.subscription.unsubscribe()
            return
        self._join(symbol, feed)

    def _join(self, symbol: str, feed: _Feed) -> None:
        feed.live = False
        feed.buffer = []
        if feed.joining is None or feed.joining.done():
            feed.joining = self._spawn(self._take_snapshot(symbol, feed))

    async def _take_snapshot(self, symbol: str, feed: _Feed) -> None:
        delay = 0.2
        while self._feeds.get(symbol) is feed:
            nc = self._nc
            if nc is None:
                return
            try:
                BUS_SNAPSHOT_REQUESTS.inc()
                msg = await nc.request(
                    f"{self._prefix}.snapshot.{symbol_token(symbol)}",
                    symbol.encode(),
                    timeout=SNAPSHOT_TIMEOUT_S,
                )
                reply = orjson.loads(msg.data)
                epoch, seq = str(reply["epoch"]), int(reply["seq"])
                events = [from_dict(raw) for raw in reply["events"]]
            except (TimeoutError, nats.errors.Error, EventFormatError, KeyError, ValueError):
                # No source answering yet, or NATS is away: keep trying.
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            self._deliver_all(events)
            self._restore(symbol, feed, events)
            if feed.epoch is not None and feed.epoch != epoch:
                BUS_SOURCE_CHANGES.inc()
            feed.epoch, feed.seq, feed.live = epoch, seq, True
            feed.joined_at = self._liveness.now()
            buffered, feed.buffer = feed.buffer, []
            for event_epoch, event_seq, raw in buffered:
                if not self._accept(symbol, feed, event_epoch, event_seq, raw):
                    break
            return

    def _on_event(self, symbol: str, feed: _Feed, data: bytes) -> None:
        try:
            raw = orjson.loads(data)
            epoch, seq = str(raw.pop("epoch")), int(raw.pop("seq"))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            log.warning("ignoring a malformed event for %s", symbol)
            return
        if not feed.live:
            feed.buffer.append((epoch, seq, raw))
            return
        self._accept(symbol, feed, epoch, seq, raw)

    def _accept(self, symbol: str, feed: _Feed, epoch: str, seq: int, raw: dict[str, Any]) -> bool:
        """Apply one numbered event; False when a gap sent the feed back to joining."""
        if epoch == feed.epoch and seq <= feed.seq:
            return True  # already part of the snapshot
        if epoch != feed.epoch or seq != feed.seq + 1:
            log.warning(
                "gap in %s (epoch %s seq %d after epoch %s seq %d): resyncing",
                symbol,
                epoch,
                seq,
                feed.epoch,
                feed.seq,
            )
            self.resyncs += 1
            BUS_RESYNCS.inc()
            self._mark_disconnected(symbol, feed)
            self._join(symbol, feed)
            return False
        feed.seq = seq
        try:
            event = from_dict(raw)
        except EventFormatError as exc:
            log.warning("ignoring a bad event for %s: %s", symbol, exc)
            return True
        self._deliver_all([event])
        return True

    def _deliver_all(self, events: list[Event]) -> None:
        handler = self.handler
        if handler is not None:
            for event in events:
                handler(event)

    def _mark_disconnected(self, symbol: str, feed: _Feed) -> None:
        """All three streams: whatever was lost may have been a book change, a quote or a trade."""
        feed.marked.update(Stream)
        self._deliver_all(every_stream(symbol, now_us(), StreamState.DISCONNECTED))

    def _restore(self, symbol: str, feed: _Feed, events: list[Event]) -> None:
        """After a join, ``connected`` for the streams the bus marked down and the snapshot
        does not speak of (a source that never declares a stream's state): the source
        answered, so those streams are up again."""
        declared = {event.stream for event in events if isinstance(event, StatusEvent)}
        ts = now_us()
        self._deliver_all(
            [
                StatusEvent(symbol, ts, stream, StreamState.CONNECTED)
                for stream in Stream
                if stream in feed.marked and stream not in declared
            ]
        )
        feed.marked.clear()

    def _announce(self) -> None:
        nc = self._nc
        if nc is None or not nc.is_connected:
            return
        message = orjson.dumps({"gateway": self._gateway_id, "symbols": sorted(self._feeds)})
        self._spawn(nc.publish(f"{self._prefix}.interest", message))

    async def _renew(self) -> None:
        while True:
            await asyncio.sleep(self._lease_s / 3)
            if self._feeds:
                self._announce()

    async def _on_disconnected(self) -> None:
        if self._stopping:
            return  # the drain of our own stop, not an outage
        log.warning("NATS: disconnected from %s", self._server_shown())
        # Every watched stream may now miss events: say so at once.
        for symbol, feed in self._feeds.items():
            self._mark_disconnected(symbol, feed)

    async def _on_reconnected(self) -> None:
        BUS_RECONNECTS.inc()
        log.info("NATS: reconnected to %s", self._server_shown())
        self._announce()
        for symbol, feed in self._feeds.items():
            self.resyncs += 1
            BUS_RESYNCS.inc()
            self._join(symbol, feed)

    async def _on_error(self, exc: Exception) -> None:
        # While NATS is down nats-py reports each failed attempt, a second apart per server.
        self._errors.warning(type(exc).__name__, f"NATS: {exc or type(exc).__name__}")

    def _spawn(self, coroutine: Any) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task
