"""Replay ingest: events per second from a recording into the gateway's books, on one core.

Run as ``python bench/bench_ingest.py`` (about a minute; ``--events 50000`` for
a quick look). It writes a recording once, with the real Recorder, from the
simulator's per-symbol core stepping through ``--symbols`` products (or takes
``--file`` instead), then measures in the same process:

- reading alone: the lines of the file (gunzip and split),
- parsing: the lines and ``events.from_json`` on each,
- the replay source alone: ``ReplaySource`` at speed 0, every symbol
  watched, its sink dropping each event: parsing plus the books the replay
  keeps for catch-up,
- full ingest: ``ReplaySource`` at speed 0 delivering every event to
  ``Hub.on_event``, every symbol watched by one Level2 group (20 levels,
  conflation None) and one Level1 group (conflation None), each with one
  subscriber that drops what it is sent. That is the service's path from a
  replay file to the wire, minus the socket writes: the replay's own books (for
  catch-up), the hub's books, top-20 views and their diffs, and serializing
  every update once.

Figures are events per CPU second of this process (``time.process_time``), so
other load on a shared machine slows the run but barely moves them; each is the
best of ``--repeats``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import tempfile
import time
from collections.abc import Callable
from contextlib import suppress
from datetime import date
from pathlib import Path

from bench_book import machine
from caspian.catalog.builtin import builtin_products
from caspian.codes import SubscriptionType
from caspian.events import Event, from_json
from caspian.gateway.hub import Hub
from caspian.gateway.session import Subscription
from caspian.service import sim_product
from caspian.sources.recorder import Recorder
from caspian.sources.replay import ReplaySource, read_lines
from caspian.sources.simulator import SymbolSimulator

SEED = 20240601
#: Simulated time between two ticks of one symbol (the simulator's default 20 a second).
TICK_US = 50_000
START_US = 1_700_000_000_000_000


class Dropped:
    """A subscriber that takes every update and does nothing with it."""

    def __init__(self) -> None:
        self.count = 0

    def deliver(self, prefix: bytes, tail: bytes) -> None:
        self.count += 1


def write_recording(path: Path, events: int, symbols: int) -> list[str]:
    """At least ``events`` events of ``symbols`` products, ticked in turn; their codes."""
    products = builtin_products()
    # Spread over the catalog: several exchanges, product types and price scales.
    chosen = [products[index * len(products) // symbols] for index in range(symbols)]
    sims = [SymbolSimulator(sim_product(spec), SEED, outage_probability=1e-4) for spec in chosen]
    recorder = Recorder(path)
    for sim in sims:
        for event in sim.start(START_US):
            recorder.write(event)
    tick = 0
    while recorder.events < events:
        tick += 1
        for sim in sims:
            for event in sim.step(START_US + tick * TICK_US):
                recorder.write(event)
    recorder.close()
    return [spec.caspian_code for spec in chosen]


def best_of(repeats: int, run: Callable[[], int]) -> tuple[float, int]:
    """The least CPU time of ``repeats`` runs, and what the run counted."""
    best = float("inf")
    count = 0
    for _ in range(repeats):
        gc.collect()
        started = time.process_time()
        count = run()
        best = min(best, time.process_time() - started)
    return best, count


def read_only(path: Path) -> int:
    return sum(1 for _ in read_lines(path))


def parse(path: Path) -> int:
    count = 0
    for _, line, _ in read_lines(path):
        from_json(line)
        count += 1
    return count


def ingest(path: Path, symbols: list[str], subscriber: Dropped | None) -> int:
    """Replay the whole file at speed 0, into a hub unless ``subscriber`` is None.

    Returns the events the replay delivered.
    """
    specs = {spec.caspian_code: spec for spec in builtin_products()}

    async def run() -> int:
        source = ReplaySource(path, speed=0)
        hub = Hub(source.watch, source.unwatch, unwatch_grace_s=0)
        for index, symbol in enumerate(symbols):
            if subscriber is None:
                source.watch(symbol)
                continue
            spec = specs[symbol]
            hub.add(
                Subscription(f"l2-{index}", spec, SubscriptionType.LEVEL2, 20, "None"), subscriber
            )
            hub.add(
                Subscription(f"l1-{index}", spec, SubscriptionType.LEVEL1, 20, "None"), subscriber
            )
        delivered = 0

        def sink(event: Event) -> None:
            nonlocal delivered
            delivered += 1
            if subscriber is not None:
                hub.on_event(event)

        task = asyncio.create_task(source.run(sink))
        await source.finished.wait()
        task.cancel()
        with suppress(asyncio.CancelledError):
            await task
        if source.bad_lines:
            raise SystemExit(f"{source.bad_lines} bad lines in {path}")
        return delivered

    return asyncio.run(run())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=200_000, help="events to record")
    parser.add_argument("--symbols", type=int, default=8, help="products to record")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each measure")
    parser.add_argument("--file", type=Path, help="an existing recording to use instead")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        path = args.file
        if path is None:
            path = Path(scratch) / "bench.jsonl.gz"
            symbols = write_recording(path, args.events, args.symbols)
        else:
            symbols = sorted({from_json(line).symbol for _, line, _ in read_lines(path)})
        lines = read_only(path)
        print(f"{date.today().isoformat()}, {machine()}")
        print(
            f"{path.name}: {lines:,} events of {len(symbols)} symbols, "
            f"{path.stat().st_size / 1e6:.1f} MB; best of {args.repeats}, CPU time"
        )
        read_s, _ = best_of(args.repeats, lambda: read_only(path))
        parse_s, parsed = best_of(args.repeats, lambda: parse(path))
        source_s, replayed = best_of(args.repeats, lambda: ingest(path, symbols, None))
        subscriber = Dropped()
        ingest_s, delivered = best_of(args.repeats, lambda: ingest(path, symbols, subscriber))
    if not parsed == replayed == delivered == lines:
        raise SystemExit(
            f"counts disagree: {lines} lines, {parsed} parsed, {replayed} replayed, "
            f"{delivered} ingested"
        )
    updates = subscriber.count / args.repeats
    print(f"reading lines alone:     {lines / read_s:>10,.0f} events/s")
    print(f"parsing (read + decode): {lines / parse_s:>10,.0f} events/s")
    print(f"replay source alone:     {lines / source_s:>10,.0f} events/s")
    print(
        f"full ingest at speed 0:  {lines / ingest_s:>10,.0f} events/s "
        f"({updates / lines:.2f} updates sent per event)"
    )
    print(
        f"ingest/parsing: {parse_s / ingest_s:.2f} of the parsing rate; "
        f"parsing is {parse_s / ingest_s * 100:.0f}% of the ingest time"
    )


if __name__ == "__main__":
    main()
