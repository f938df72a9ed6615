"""The running service: every part built from the settings and wired together."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import socket
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

from caspian.auth.access import AccessCheck
from caspian.auth.proxies import TrustedProxies
from caspian.auth.ratelimit import LoginLimiter
from caspian.auth.tokens import TokenService, load_or_create_secret
from caspian.bus.base import Bus
from caspian.bus.memory import MemoryBus
from caspian.bus.nats import NatsBus
from caspian.bus.nats_options import parse_servers, tls_context
from caspian.catalog.builtin import builtin_markets, builtin_products
from caspian.catalog.ccxt_markets import parse_tick_rule, repair_underlyings
from caspian.catalog.exchanges import EXCHANGES
from caspian.catalog.index import Catalog
from caspian.catalog.product import ProductSpec
from caspian.catalog.refresh import (
    REFRESHABLE,
    Fetch,
    Refreshed,
    apply_markets,
    ccxt_fetcher,
    refresh_exchanges,
)
from caspian.codes import MAINTENANCE_REASON, CloseCode, StreamState, SymbolType
from caspian.events import every_stream
from caspian.files import private_dir
from caspian.gateway.gateway import Gateway, StreamSettings
from caspian.gateway.hub import Hub
from caspian.gateway.registry import new_id
from caspian.gateway.session import SessionLimits
from caspian.heap import release_free_heap
from caspian.maintenance import MaintenanceWindow
from caspian.metrics import BUS_CONNECTED, count_tasks
from caspian.rest.app import create_app
from caspian.settings import Settings
from caspian.sources.base import Source
from caspian.sources.live.source import urls_from_env
from caspian.sources.replay import ReplaySource
from caspian.sources.simulator import SimProduct, Simulator
from caspian.store import GatewayInfo, GatewaySync, SessionInfo, Store, StoreError
from caspian.tasks import failed, spawn
from caspian.timefmt import now_us, us_to_dt

log = logging.getLogger(__name__)

#: First and longest wait before a failed source is started again.
SOURCE_RESTART_S = 0.5
SOURCE_RESTART_MAX_S = 30.0
#: How often objects that survived are moved out of the collector's sight, and
#: how often that is undone for one full collection (see ``_manage_gc``).
GC_FREEZE_S = 5.0
GC_FULL_S = 60.0
#: How often the catalog is re-read, so products imported while running can be streamed.
CATALOG_REFRESH_S = 15.0
#: How long a readiness check waits for the store to answer.
READY_STORE_TIMEOUT_S = 1.0


async def seed_reference_data(store: Store) -> None:
    """The 22 exchanges, the built-in products of every exchange that has none, ITBIT's
    products under Paxos's ids, and every ``underlyingCaspianCode`` naming a product the
    store has (see ``repair_underlyings``)."""
    await store.seed_exchanges(EXCHANGES)
    by_exchange: dict[str, list[ProductSpec]] = {}
    for product in builtin_products():
        by_exchange.setdefault(product.exchange, []).append(product)
    for exchange, products in by_exchange.items():
        if not await store.has_products(exchange):
            await store.upsert_products(products)
    # Stores seeded before ITBIT was served by Paxos hold itBit's markets, under
    # ids (XBTUSD) Paxos's feeds do not know: Paxos's markets replace them.
    if any(record.spec.native_code.startswith("XBT") for record in await store.products(["ITBIT"])):
        await apply_markets(store, "ITBIT", builtin_markets()["ITBIT"], now_us())
    if repaired := repair_underlyings(record.spec for record in await store.products()):
        await store.upsert_products(repaired)


def sim_product(spec: ProductSpec) -> SimProduct:
    call: bool | None = None
    if spec.type == "OPT":
        call = spec.caspian_code.split("=")[0].endswith("-C")
    return SimProduct(
        symbol=spec.caspian_code,
        ccy_from=spec.ccy_from,
        ccy_to=spec.ccy_to,
        kind=spec.type,
        tick=float(spec.tick_size),
        lot=float(spec.lot_size),
        strike=float(spec.strike) if spec.strike else None,
        call=call,
        price_ccy=spec.price_currency,
        tick_rule=tuple(parse_tick_rule(spec.tick_rule)),
        expires_us=spec.expires_us,
    )


def make_source(
    settings: Settings,
    product: Callable[[str], ProductSpec | None],
    clock: Callable[[], int] = now_us,
) -> Source | None:
    """The configured source; None for ``none``, a gateway fed by another instance over NATS.

    ``clock`` is the simulator's: its event times and what has expired.
    """
    kind = settings.source.partition(":")[0]
    if kind == "none":
        return None
    if kind == "simulator":

        def lookup(symbol: str) -> SimProduct | None:
            spec = product(symbol)
            return sim_product(spec) if spec is not None else None

        return Simulator(
            lookup,
            seed=settings.simulator_seed,
            rate=settings.simulator_rate,
            outages=settings.simulator_outages,
            clock=clock,
        )
    if kind == "replay":
        path = settings.source.partition(":")[2]
        if not path:
            raise ValueError("name the recording: replay:PATH")
        return ReplaySource(
            Path(path),
            settings.replay_speed,
            settings.replay_loop,
            settings.replay_recorded_times,
        )
    if kind == "live":
        # Imported here: ccxt.pro takes half a second to import, and only this source needs it.
        from caspian.sources.live import LiveSource, parse_exchanges, urls_from_env

        exchanges = parse_exchanges(settings.source.partition(":")[2])
        return LiveSource(
            exchanges,
            product,
            urls=urls_from_env(),
            stall_timeout_s=settings.live_stall_s,
            max_lag_s=settings.live_max_lag_s,
        )
    raise ValueError(
        f"unsupported source {settings.source!r}: "
        "use simulator, replay:PATH, live:EXCHANGE,... or none"
    )


def make_bus(settings: Settings, source: Source | None) -> Bus:
    if settings.bus == "memory":
        if source is None:
            raise ValueError("a gateway with no source of its own needs a nats:// bus")
        return MemoryBus(source)
    return NatsBus(
        parse_servers(settings.bus),
        source,
        settings.bus_prefix,
        source_timeout_s=settings.source_timeout_s,
        credentials=settings.nats_creds,
        tls=tls_context(settings.nats_tls_ca, settings.nats_tls_cert, settings.nats_tls_key),
    )


@dataclass(frozen=True, slots=True)
class Readiness:
    """Whether the service can serve, and the state of each part it needs."""

    ready: bool
    #: store: ok, unavailable or timeout; bus: in-process, connected, connecting,
    #: reconnecting or closed; source: heard or not heard; tasks: ok, or
    #: "failed: " and the background tasks that failed (caspian/tasks.py).
    parts: dict[str, str]


class Service:
    def __init__(self, settings: Settings, serves_clients: bool = True) -> None:
        """``serves_clients`` False for ``caspian ingest``: no stream connections, so no
        heartbeats, re-checks or place in the cluster's session registry."""
        self.settings = settings
        self.serves_clients = serves_clients
        self.store = Store(settings.resolved_database_url)
        if settings.database_url is None:
            # The default store lives there; a data directory left open to others by an
            # older version is tightened here.
            private_dir(settings.data_dir)
        secret = settings.jwt_secret or load_or_create_secret(settings.data_dir)
        self.tokens = TokenService(secret, settings.token_ttl_s)
        self.access = AccessCheck(self.tokens, self.store)
        self.limiter = LoginLimiter(settings.auth_max_failures, settings.auth_window_s)
        self.proxies = TrustedProxies(settings.trusted_proxies)
        self._window = (
            MaintenanceWindow.parse(settings.maintenance) if settings.maintenance else None
        )
        self.catalog = Catalog(())
        #: The time in µs since the epoch by which products expire; tests move it.
        self.clock: Callable[[], int] = now_us
        self.source = make_source(settings, self.get, lambda: self.clock())
        # A recording is history: its products are served whether they have expired
        # since or not. Every other source, and a gateway fed over NATS, streams today.
        self._serves_today = not isinstance(self.source, ReplaySource)
        self.bus = make_bus(settings, self.source)
        self.hub = Hub(
            self.bus.watch, self.bus.unwatch, settings.unwatch_grace_s, self.bus.publish_depth
        )
        self.bus.handler = self.hub.on_event
        #: This process in the cluster's session registry.
        self.gateway_info = GatewayInfo(
            id=new_id(),
            host=socket.gethostname(),
            pid=os.getpid(),
            started_time=us_to_dt(now_us()),
        )
        self.gateway = Gateway(
            self.hub,
            self.access,
            self._resolve,
            StreamSettings(
                heartbeat_s=settings.heartbeat_s,
                recheck_s=settings.recheck_s,
                max_queue=settings.max_queue,
                max_queue_bytes=settings.max_queue_bytes,
                max_message_bytes=settings.max_message_bytes,
                limits=SessionLimits(
                    max_subscriptions=settings.max_subscriptions,
                    symbol_types=frozenset(settings.symbol_types),
                    max_messages_per_s=settings.max_messages_per_s,
                    max_message_burst=settings.max_message_burst,
                    max_token_refreshes_per_s=settings.max_token_refreshes_per_s,
                ),
            ),
            self.maintenance_remaining,
            self._sync_sessions,
        )
        self.rest = create_app(
            self, settings.max_body_bytes, settings.metrics_token, settings.max_rest_in_flight
        )
        self._tasks: list[asyncio.Task[None]] = []
        self._store_check: asyncio.Task[str] | None = None

    # The simulator looks products up through the service, so that it always
    # sees the catalog as last reloaded.
    def get(self, caspian_code: str) -> ProductSpec | None:
        return self.catalog.get(caspian_code)

    def _resolve(self, symbol: str, symbol_type: SymbolType) -> ProductSpec | str | None:
        product = self.catalog.resolve(symbol, symbol_type)
        if product is None:
            return None
        if self._serves_today and product.expired(self.clock()):
            return f"{product.caspian_code} expired on {product.expire_date}: it is not streamed"
        if self.source is None:
            return product
        return self.source.unserved(product.caspian_code) or product

    async def _sync_sessions(self, opened: list[SessionInfo], closed: list[str]) -> GatewaySync:
        return await self.store.sync_gateway(
            self.gateway_info, opened, closed, self.settings.session_stale_s
        )

    def maintenance_remaining(self) -> float:
        if self._window is None:
            return 0.0
        return self._window.remaining_s(time.time())

    def bus_state(self) -> str:
        return self.bus.connection_state if isinstance(self.bus, NatsBus) else "in-process"

    async def readiness(self) -> Readiness:
        """What ``/readyz`` answers: ready when the store answers, the bus is connected,
        a source is heard (always, for a source of its own) and no background task failed."""
        broken = failed()
        parts = {
            "store": await self._store_state(),
            "bus": self.bus_state(),
            "source": "heard" if self.bus.source_heard() else "not heard",
            "tasks": f"failed: {', '.join(broken)}" if broken else "ok",
        }
        ready = (
            parts["store"] == "ok"
            and parts["bus"] in ("connected", "in-process")
            and parts["source"] == "heard"
            and not broken
        )
        return Readiness(ready, parts)

    async def _store_state(self) -> str:
        # Probes asking at once share one query: a burst of them costs the store one.
        check = self._store_check
        if check is None or check.done():
            check = self._store_check = asyncio.create_task(
                self._check_store(), name="caspian-ready-store"
            )
        return await asyncio.shield(check)

    async def _check_store(self) -> str:
        try:
            async with asyncio.timeout(READY_STORE_TIMEOUT_S):
                await self.store.list_exchanges()
        except TimeoutError:
            return "timeout"
        except StoreError:
            return "unavailable"
        return "ok"

    async def reload_catalog(self) -> None:
        records = await self.store.products()
        self.catalog = Catalog(record.spec for record in records)

    async def start(self) -> None:
        await self.store.upgrade()
        await seed_reference_data(self.store)
        await self.reload_catalog()
        await self.bus.start()
        BUS_CONNECTED.set_function(lambda: float(self.bus_state() in ("connected", "in-process")))
        count_tasks(asyncio.get_running_loop())
        self._tasks = [
            spawn(self._refresh_catalog(), "caspian-catalog"),
            spawn(self._watch_maintenance(), "caspian-maintenance"),
            spawn(self._manage_gc(), "caspian-gc"),
        ]
        if self.source is not None:
            self._tasks.append(spawn(self._run_source(self.source), "caspian-source"))
        if self.settings.catalog_refresh_s > 0:
            fetch = ccxt_fetcher(urls_from_env())
            self._tasks.append(
                spawn(
                    self._refresh_markets(self.settings.catalog_refresh_s, fetch),
                    "caspian-catalog-refresh",
                )
            )
        if self.serves_clients:
            self.gateway.start()

    async def stop(self) -> None:
        if self.serves_clients:
            await self.gateway.stop()
            try:
                await self.store.remove_gateway(self.gateway_info.id)
            except Exception as exc:
                # Also after a failed start, with no schema yet: the rest of the shutdown
                # must go on. Its sessions stay listed until another gateway purges it as
                # stale.
                log.warning("could not leave the session registry: %s", exc)
        self.hub.close()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with suppress(asyncio.CancelledError, Exception):
                await task
        gc.unfreeze()
        if self._store_check is not None:
            self._store_check.cancel()
        await self.bus.stop()
        await self.store.close()

    async def _run_source(self, source: Source) -> None:
        """Keep the source running: a failure is shown to clients, then retried.

        Every watched stream goes ``disconnected`` at once, so no client takes
        a silent feed for a live one; after a backoff the source starts again
        and is told every symbol still watched, which brings whole books back.
        """
        delay = SOURCE_RESTART_S
        while True:
            started = time.monotonic()
            try:
                await source.run(self.bus.publish)
                return
            except Exception:
                log.exception("the market data source failed; restarting in %.1f s", delay)
            now = now_us()
            for symbol in list(self.hub.symbols):
                for event in every_stream(symbol, now, StreamState.DISCONNECTED):
                    self.hub.on_event(event)
            if time.monotonic() - started > SOURCE_RESTART_MAX_S:
                delay = SOURCE_RESTART_S
            await asyncio.sleep(delay)
            delay = min(delay * 2, SOURCE_RESTART_MAX_S)
            for symbol in list(self.hub.symbols):
                # Unwatch first: a source then starts the symbol afresh, snapshot first.
                self.bus.unwatch(symbol)
                self.bus.watch(symbol)

    async def _manage_gc(self) -> None:
        """Keep full garbage collections short, so they cannot stall deliveries.

        With a thousand connections the collector's full passes walk hundreds
        of thousands of long-lived objects and stop the loop for 30 to 130 ms.
        Frozen objects are skipped, so freezing every few seconds leaves the
        full passes only what is new. What is new is collected before it is
        frozen, a pass over a few seconds' objects only: frozen cyclic garbage
        is never freed, and under a flood of refused connections and failed
        requests (exceptions and their tracebacks are cycles) it held tens of
        MB. Garbage that was alive when frozen (a closed connection's cycles)
        waits for the full collection every ``GC_FULL_S``, the freeze undone:
        one long pause a minute instead of every few seconds. The full pass
        then gives the heap's free pages back (:mod:`caspian.heap`), so that
        memory a burst took is returned once the burst is over; not every
        pass, since returning pages costs the loop milliseconds and the next
        burst faults them in again.
        """
        gc.collect()
        gc.freeze()
        since_full = 0.0
        while True:
            await asyncio.sleep(GC_FREEZE_S)
            since_full += GC_FREEZE_S
            full = since_full >= GC_FULL_S
            if full:
                since_full = 0.0
                gc.unfreeze()
            gc.collect()
            gc.freeze()
            if full:
                release_free_heap()

    async def _refresh_catalog(self) -> None:
        while True:
            await asyncio.sleep(CATALOG_REFRESH_S)
            try:
                await self.reload_catalog()
            except StoreError as exc:
                log.warning("could not reload the catalog: %s", exc)

    async def _refresh_markets(self, every_s: float, fetch: Fetch) -> None:
        """Every ``every_s``, from now on: each exchange's market list applied to the store
        (:mod:`caspian.catalog.refresh`), then the catalog reloaded. Without network every
        exchange fails and the catalog stays as it was, until the next attempt."""
        while True:
            try:
                results = await refresh_exchanges(self.store, REFRESHABLE, fetch, self.clock())
                await self.reload_catalog()
            except StoreError as exc:
                log.warning("could not refresh the catalog: %s", exc)
            else:
                done = [result for result in results.values() if isinstance(result, Refreshed)]
                failed = [result for result in results.values() if isinstance(result, str)]
                for result in done:
                    log.info("catalog refresh: %s", result.summary())
                    if isinstance(self.source, Simulator):
                        # A live exchange stops sending a delisted market by itself.
                        for code in result.retired:
                            self.source.close_market(code)
                if failed:
                    log.warning(
                        "catalog refresh: %d of %d exchanges not refreshed: %s",
                        len(failed),
                        len(results),
                        "; ".join(failed),
                    )
            await asyncio.sleep(every_s)

    async def _watch_maintenance(self) -> None:
        """Closes every stream connection (1001) when a maintenance window begins."""
        inside = False
        while True:
            now_inside = self.maintenance_remaining() > 0
            if now_inside and not inside:
                log.info("maintenance window: closing all stream connections")
                self.gateway.close_all(CloseCode.GOING_AWAY, MAINTENANCE_REASON)
            inside = now_inside
            await asyncio.sleep(1.0)
