"""Prometheus metrics of the service, in the default registry that ``/metrics`` serves.

They are defined once here, at import, because the registry refuses a second
metric of the same name; every part of the service imports them from here.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

from prometheus_client import REGISTRY, Counter, Gauge
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector


class Tally(Collector):
    """A counter without labels for a path taken per message.

    prometheus_client's Counter takes a lock on every increment, which costs
    more than the rest of a delivery's bookkeeping; this is a plain integer,
    read when ``/metrics`` is scraped. Only the event loop's thread adds to it.
    """

    def __init__(self, name: str, documentation: str) -> None:
        self.name = name
        self.documentation = documentation
        self.value = 0
        REGISTRY.register(self)

    def inc(self, amount: int = 1) -> None:
        self.value += amount

    def collect(self) -> Iterator[CounterMetricFamily]:
        yield CounterMetricFamily(self.name, self.documentation, value=self.value)


#: Books thrown away and rebuilt from a fresh snapshot, by what forced it:
#: ``disconnect``, ``stall`` (the watchdog), ``checksum``, ``sequence``,
#: ``crossed``, ``lag`` (the feed fell behind the exchange) or ``error`` (anything
#: else the upstream library raised).
RESYNCS = Counter(
    "caspian_resyncs_total",
    "Upstream books dropped and rebuilt from a fresh snapshot.",
    ["exchange", "symbol", "reason"],
)

#: Every new upstream connection after a symbol's first, successful or not.
UPSTREAM_RECONNECTS = Counter(
    "caspian_upstream_reconnects_total",
    "Upstream connection attempts after a failure.",
    ["exchange", "symbol"],
)

#: 1 while a stream of a watched symbol is connected, 0 while it is not; the
#: series goes away when the symbol is no longer watched.
STREAM_STATE = Gauge(
    "caspian_stream_state",
    "Upstream stream state of a watched symbol: 1 connected, 0 disconnected.",
    ["exchange", "symbol", "stream"],
)

#: Open stream connections (from the accepted handshake to the socket's end).
STREAM_CONNECTIONS = Gauge("caspian_stream_connections", "Open stream connections.")

#: Connections the server closed, by close code (3007: a slow client cut off).
STREAM_CLOSES = Counter(
    "caspian_stream_closes_total", "Stream connections closed by the server.", ["code"]
)

#: Client connections refused or cut before their request was served, by HTTP
#: status: 503 server full, 429 address over its limit, 408 request head too
#: slow, 431 request head too large.
CONNECTIONS_REFUSED = Counter(
    "caspian_connections_refused_total",
    "Client connections refused at the connection limits.",
    ["status"],
)

#: Client connections (REST and stream) open now, and the limit on them.
CLIENT_CONNECTIONS = Gauge("caspian_client_connections", "Open client connections.")
CLIENT_CONNECTIONS_LIMIT = Gauge(
    "caspian_client_connections_limit", "Client connections the server accepts at most."
)

#: REST requests refused because the server was serving its limit of them.
REST_BUSY = Counter(
    "caspian_rest_busy_total", "REST requests refused with 503 at the limit of requests in flight."
)

#: Inbound stream messages held back by the per-connection rate limit.
MESSAGES_PACED = Counter(
    "caspian_stream_messages_paced_total",
    "Inbound stream messages that waited for their connection's rate limit.",
)

#: Active subscriptions, by type (Level1, Level2).
SUBSCRIPTIONS = Gauge("caspian_stream_subscriptions", "Active subscriptions.", ["type"])

#: Updates handed to clients: one per client per update, counted once per group message.
MESSAGES = Tally("caspian_stream_messages", "Level1 and Level2 updates sent to clients.")

#: Source instances a gateway heard within CASPIAN_SOURCE_TIMEOUT_S.
BUS_SOURCES_HEARD = Gauge(
    "caspian_bus_sources_heard", "Source instances heard on the bus within the source timeout."
)
#: Seconds since each source instance (by epoch) was last heard.
BUS_SOURCE_SILENCE = Gauge(
    "caspian_bus_source_silence_seconds",
    "Seconds since the last heartbeat of each source instance heard, by epoch.",
    ["epoch"],
)
#: Symbol feeds that joined a source instance other than the one they followed.
BUS_SOURCE_CHANGES = Counter(
    "caspian_bus_source_changes_total",
    "Symbol feeds that moved to another source instance (a failover or a restart).",
)
#: Feeds marked down because their source's heartbeat stopped.
BUS_SOURCE_TIMEOUTS = Counter(
    "caspian_bus_source_timeouts_total",
    "Symbol feeds marked disconnected because their source stopped its heartbeat.",
)

#: 1 while the NATS bus is connected (and the in-process bus, always); 0 while it
#: connects for the first time or reconnects.
BUS_CONNECTED = Gauge("caspian_bus_connected", "1 while the bus is connected, 0 otherwise.")

#: Connections to NATS made again after one was lost (to the same or another server).
BUS_RECONNECTS = Counter("caspian_bus_reconnects_total", "NATS connections re-established.")

#: Whole-state requests a gateway sent to the source side (each retry counts).
BUS_SNAPSHOT_REQUESTS = Counter(
    "caspian_bus_snapshot_requests_total", "Snapshot requests sent over the NATS bus."
)

#: Long-lived background tasks that ended with an exception (caspian/tasks.py).
TASK_FAILURES = Counter(
    "caspian_task_failures_total",
    "Background tasks that failed, by name: the process needs a restart.",
    ["task"],
)

#: Events the source side could not hand to NATS (its buffer for a reconnect
#: full, a payload over the server's limit): gateways see the gap and resync.
BUS_PUBLISH_FAILURES = Counter(
    "caspian_bus_publish_failures_total",
    "Events the source side could not publish to NATS, by error.",
    ["error"],
)

#: NATS bus feeds rebuilt from a snapshot after a gap, a new source epoch or a reconnect.
BUS_RESYNCS = Counter("caspian_bus_resyncs_total", "Bus feeds rebuilt from a snapshot.")

#: How far a watched live symbol runs behind its exchange, from the exchange's
#: time stamps (less the smallest delay seen since its book was synced).
LIVE_LAG = Gauge(
    "caspian_live_lag_seconds",
    "Delay of a live symbol's book behind the exchange's time stamps.",
    ["exchange", "symbol"],
)

#: Tasks alive on the service's event loop, counted when ``/metrics`` is read:
#: a count that keeps growing under churn is a leak (``bench/bench_soak.py``).
ASYNCIO_TASKS = Gauge("caspian_asyncio_tasks", "Tasks alive on the service's event loop.")


def count_tasks(loop: asyncio.AbstractEventLoop) -> None:
    """Makes ``ASYNCIO_TASKS`` count the tasks of ``loop``, the service's."""
    ASYNCIO_TASKS.set_function(lambda: len(asyncio.all_tasks(loop)))
