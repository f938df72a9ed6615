"""Idle-connection benchmark: server memory per open, subscribed connection.

Run as ``python bench/bench_idle.py`` (about 2 minutes; ``--quick`` for 1,000
connections). For Caspian's server and the naive baseline in turn (each a
subprocess with the simulator at a low rate), it opens ``--connections``
WebSocket connections in two halves, each authenticated by the token in its
URL and subscribed to Level1 of one symbol with 5 s conflation, then left
idle. Memory is read from ``/proc`` with no connection (after a few opened
and closed, so that lazily loaded code and first-use caches are in the
baseline) and after each half:

- ``VmRSS``: resident memory, what the issue's target is about;
- ``Pss``: the same with shared pages divided among their users, which
  discounts library pages the server shares with other processes.

The figure per connection is the growth from no connection to all of them,
divided by their number; the growth over the second half, divided by its
size, shows the marginal cost once start-up allocations are behind.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from loadgen import (
    BenchSetup,
    Server,
    bench_main,
    machine,
)

WARMUP_CONNECTIONS = 20
#: A conflated update every 5 s: this long a window sees at least one per connection.
CHECK_WINDOW_S = 6.0
TARGET_KB = 30.0


@dataclass
class Result:
    server: str
    before: dict[str, int]
    half: dict[str, int]
    full: dict[str, int]
    connections: int
    open_seconds: float
    messages: int
    lost: int

    def per_connection(self, key: str) -> float:
        """KiB per connection, from no connection to all."""
        return (self.full[key] - self.before[key]) / self.connections

    def marginal(self, key: str) -> float:
        """KiB per connection over the second half."""
        return (self.full[key] - self.half[key]) / (self.connections - self.connections // 2)


def _settled_memory(server: Server, seconds: float) -> dict[str, int]:
    """Memory once it stops growing (or after ``seconds``)."""
    deadline = time.monotonic() + seconds
    last = server.memory_kb()
    while time.monotonic() < deadline:
        time.sleep(1.0)
        now = server.memory_kb()
        if abs(now["VmRSS"] - last["VmRSS"]) < 64:
            return now
        last = now
    return last


class Bench(BenchSetup):
    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__(args, "idle", [args.symbol])
        self.subscription = {"symbol": args.symbol, "type": "Level1", "conflation": "5s"}

    def _open(self, server: Server, count: int) -> float:
        return self.open(server, count, [self.subscription])

    def measure(self, start: Callable[[float], Server]) -> Result:
        count = self.args.connections
        server = start(self.args.rate)
        try:
            self._open(server, WARMUP_CONNECTIONS)
            self.pool.close_connections()
            before = _settled_memory(server, self.args.settle)
            took = self._open(server, count // 2)
            half = _settled_memory(server, self.args.settle)
            took += self._open(server, count - count // 2)
            full = _settled_memory(server, self.args.settle)
            # Still open, still served: every connection gets its conflated update.
            self.pool.start(0)
            time.sleep(CHECK_WINDOW_S)
            window = self.pool.stop()
            self.pool.close_connections()
        finally:
            server.stop()
        result = Result(server.name, before, half, full, count, took, window.frames, window.lost)
        print(
            f"{result.server:>7}: VmRSS {before['VmRSS'] / 1024:.1f} -> "
            f"{half['VmRSS'] / 1024:.1f} -> {full['VmRSS'] / 1024:.1f} MiB, "
            f"{result.per_connection('VmRSS'):.1f} KiB/connection (Pss "
            f"{result.per_connection('Pss'):.1f}); opened in {took:.1f} s; "
            f"{window.frames:,} updates in {CHECK_WINDOW_S:g} s, {window.lost} lost",
            flush=True,
        )
        return result


def report(args: argparse.Namespace, bench: Bench, ours: Result, naive: Result) -> None:
    print()
    print(f"Idle-connection benchmark, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; {machine()}")
    print(
        f"{args.connections:,} connections in {args.processes} client processes, each "
        f"subscribed to Level1 of {args.symbol} with conflation 5s; simulator rate "
        f"{args.rate:g}/s"
    )
    print()
    print("| measure | ours | naive | ours/naive |")
    print("|---|---:|---:|---:|")
    rows = [
        (
            "VmRSS with no connection (MiB)",
            ours.before["VmRSS"] / 1024,
            naive.before["VmRSS"] / 1024,
        ),
        (
            f"VmRSS with {args.connections:,} (MiB)",
            ours.full["VmRSS"] / 1024,
            naive.full["VmRSS"] / 1024,
        ),
        ("VmRSS per connection (KiB)", ours.per_connection("VmRSS"), naive.per_connection("VmRSS")),
        ("Pss per connection (KiB)", ours.per_connection("Pss"), naive.per_connection("Pss")),
        (
            "VmRSS per connection, second half (KiB)",
            ours.marginal("VmRSS"),
            naive.marginal("VmRSS"),
        ),
        ("seconds to open and subscribe all", ours.open_seconds, naive.open_seconds),
    ]
    for name, mine, theirs in rows:
        print(f"| {name} | {mine:.1f} | {theirs:.1f} | {mine / theirs:.2f} |")
    print()
    for result in (ours, naive):
        print(
            f"{result.server}: {result.messages:,} conflated updates in {CHECK_WINDOW_S:g} s "
            f"with everything open, {result.lost} connections lost"
        )
    per = ours.per_connection("VmRSS")
    print(
        f"target: under {TARGET_KB:g} KB per connection: "
        f"{'met' if per < TARGET_KB else 'MISSED'} ({per:.1f} KiB)"
    )


def run(args: argparse.Namespace) -> None:
    bench = Bench(args)
    try:
        ours = bench.measure(bench.caspian)
        naive = bench.measure(bench.naive)
        report(args, bench, ours, naive)
    finally:
        bench.close()


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=10_000)
    parser.add_argument("--processes", type=int, default=2, help="client worker processes")
    parser.add_argument("--symbol", default="FX-BTC/USD=GEMINI")
    parser.add_argument("--rate", type=float, default=1.0, help="simulator updates/s per symbol")
    parser.add_argument(
        "--settle", type=float, default=10.0, help="longest wait for memory to stop growing"
    )
    parser.add_argument("--no-pin", action="store_true", help="let the OS place the processes")
    parser.add_argument(
        "--nice", type=int, default=0, help="nice value of server and clients (<0 needs root)"
    )
    parser.add_argument("--quick", action="store_true", help="1,000 connections: a smoke run")
    args = parser.parse_args()
    if args.quick:
        args.connections = min(args.connections, 1_000)
        args.settle = min(args.settle, 3.0)
    return args


if __name__ == "__main__":
    bench_main(parse_args, run)
