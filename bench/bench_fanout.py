"""Fan-out benchmark: Caspian's stream server against a naive one, in one run.

Run as ``python bench/bench_fanout.py`` (about 4 minutes; ``--quick`` for a
smaller, shorter run). Each server runs as a subprocess fed by the built-in
simulator with the same seed and products; ``--connections`` WebSocket
clients (in ``--processes`` worker processes, see ``loadgen.py``) each
subscribe to Level1 and Level2 (20 levels, no conflation) of every symbol.

For a ladder of simulator rates (book updates per second per symbol, doubling
from ``--start-rate``) it measures, over a window, the messages all clients
received per second, the server's CPU time per received message (utime +
stime from ``/proc``) and the ingest-to-client latency of sampled messages,
both when the client process read them and, on a few probe connections, when
they reached the client's network stack (the kernel's receive timestamp). A
server is saturated once its CPU nears one core or its throughput stops
growing with the rate; if the clients reach their own limit first, the
climb stops there and the saturating rate is only a lower bound. The
saturating rate is the rate whose offered load equals the best throughput;
latency is measured again, over a longer window, at half that rate, and for
Caspian also at the rate where its process uses half a core. Both servers
climb the ladder together, step by step, so that drifting machine noise
affects both alike. Last, ``send_floor.py`` measures what the kernel alone
takes to send one update to every client.
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import statistics
import subprocess
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import send_floor
from loadgen import (
    BenchSetup,
    Server,
    Window,
    bench_main,
    busy_cpu_seconds,
    machine,
    percentile,
)

SYMBOLS = "FX-BTC/USD=GEMINI,FX-ETH/USD=GEMINI,FX-BTC/USDT=BINANCE"
#: One message in this many is parsed for latency: on the ladder, and at half load.
LADDER_SAMPLING = 211
LATENCY_SAMPLING = 23
#: One connection in this many (per client process) is a kernel-timestamp probe.
PROBE_EVERY = 20
#: Saturated: when the server process or its pinned core (whatever kept it
#: busy) reaches this share of one core, or when doubling the rate grew the
#: throughput by less than this share of a doubling.
SATURATED_CPU = 0.95
SATURATED_GROWTH = 0.75
#: Targets of the issue.
TARGET_CPU_RATIO = 5.0
TARGET_P99_MS = 5.0


@dataclass
class Step:
    server: str
    rate: float
    delivered_per_s: float
    server_cpu: float  # share of one core
    server_core: float | None  # how busy the server's pinned core was, all causes
    client_cpu: float  # share of the client cores
    others: float  # cores other processes of the machine used meanwhile
    cpu_us_per_message: float
    p50_ms: float
    p99_ms: float
    arrival_p50_ms: float
    arrival_p99_ms: float
    window: Window
    saturated: bool = False

    def line(self) -> str:
        return (
            f"{self.server:>7} rate {self.rate:6.1f}/s: {self.delivered_per_s:9,.0f} msg/s, "
            f"server CPU {self.server_cpu:4.0%}"
            + (f" (core {self.server_core:4.0%})" if self.server_core is not None else "")
            + f", {self.cpu_us_per_message:6.2f} µs/msg, "
            f"read p50 {self.p50_ms:6.2f} ms, p99 {self.p99_ms:7.2f} ms, "
            f"arrival p50 {self.arrival_p50_ms:6.2f} ms, p99 {self.arrival_p99_ms:7.2f} ms, "
            f"clients CPU {self.client_cpu:4.0%}, others {self.others:.2f} cores"
            + (f", closed {self.window.closes}" if self.window.closes else "")
            + (f", lost {self.window.lost}" if self.window.lost else "")
        )


def subscriptions(symbols: str) -> list[dict[str, Any]]:
    """Level1 and Level2 (20 levels, no conflation) of each of the comma-separated symbols."""
    return [
        {"symbol": symbol, "type": kind, "numberOfLevels": 20, "conflation": "None"}
        for symbol in symbols.split(",")
        for kind in ("Level1", "Level2")
    ]


class Bench(BenchSetup):
    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__(args, "fanout", args.symbols.split(","))
        self.subscriptions = subscriptions(args.symbols)

    def measure(
        self,
        start: Callable[[float], Server],
        rate: float,
        window_s: float,
        sampling: int,
        profile: Path | None = None,
    ) -> Step:
        server_cpus = self.server_place.cpus
        server = start(rate)
        try:
            self.open(server, self.args.connections, self.subscriptions, PROBE_EVERY)
            time.sleep(self.args.warmup)
            spy = start_profile(server, window_s, profile) if profile else None
            cpu_before = server.cpu_seconds()
            busy_before = busy_cpu_seconds()
            core_before = busy_cpu_seconds(server_cpus or ())
            began = time.monotonic()
            self.pool.start(sampling)
            time.sleep(window_s)
            window = self.pool.stop()
            cpu = server.cpu_seconds() - cpu_before
            busy = busy_cpu_seconds() - busy_before
            core = busy_cpu_seconds(server_cpus or ()) - core_before
            elapsed = time.monotonic() - began
            if spy is not None:
                spy.wait()
            self.pool.close_connections()
        finally:
            server.stop()
        latencies, arrivals = window.latencies_us, window.arrivals_us
        cpus = self.client_place.cpus
        client_cores = len(cpus) if cpus else os.cpu_count() or 1
        step = Step(
            server=server.name,
            rate=rate,
            delivered_per_s=window.frames / window.seconds,
            server_cpu=cpu / elapsed,
            server_core=core / elapsed / len(server_cpus) if server_cpus else None,
            client_cpu=window.client_cpu_s / window.seconds / client_cores,
            others=max(0.0, busy - cpu - window.client_cpu_s) / elapsed,
            cpu_us_per_message=cpu * 1e6 / max(1, window.frames),
            p50_ms=percentile(latencies, 0.50) / 1000,
            p99_ms=percentile(latencies, 0.99) / 1000,
            arrival_p50_ms=percentile(arrivals, 0.50) / 1000,
            arrival_p99_ms=percentile(arrivals, 0.99) / 1000,
            window=window,
        )
        print(step.line(), flush=True)
        return step


def start_profile(server: Server, seconds: float, out: Path) -> subprocess.Popen[bytes]:
    """py-spy on the server for the window: collapsed stacks, one line per stack."""
    command = ["py-spy", "record", "--pid", str(server.pid), "--duration", str(round(seconds))]
    command += ["--rate", "250", "--format", "raw", "--output", str(out), "--nonblocking"]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


_LINE_NUMBER = re.compile(r":\d+\)")


def print_profile(path: Path, top: int = 12, what: str = "the server at half load") -> None:
    own: Counter[str] = Counter()
    within: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        samples = int(count)
        # One entry per function, not per line of it.
        frames = _LINE_NUMBER.sub(")", stack).split(";")
        total += samples
        own[frames[-1]] += samples
        for frame in set(frames):
            within[frame] += samples
    print(f"\npy-spy profile of {what} ({total} samples):")
    print("self time:")
    for frame, samples in own.most_common(top):
        print(f"  {samples / total:6.1%}  {frame}")
    print("time within (caspian and asyncio frames, below the event loop):")
    # The frames every sample passes through (cli, asyncio.run, the loop) say nothing.
    shown = [
        frame
        for frame, samples in within.most_common()
        if ("caspian/" in frame or "asyncio/" in frame) and samples < 0.8 * total
    ]
    for frame in shown[:top]:
        print(f"  {within[frame] / total:6.1%}  {frame}")


class Ladder:
    """The rate steps of one server, and whether it is saturated yet."""

    def __init__(self, name: str, start: Callable[[float], Server]) -> None:
        self.name = name
        self.start = start
        self.steps: list[Step] = []
        self.saturated = False
        #: The clients, not the server, reached their limit first: the
        #: saturating rate is then only a lower bound.
        self.client_limited = False

    def add(self, step: Step) -> None:
        previous = self.steps[-1] if self.steps else None
        self.steps.append(step)
        grew = previous is None or step.delivered_per_s >= (
            SATURATED_GROWTH * previous.delivered_per_s * step.rate / previous.rate
        )
        server_busy = max(step.server_cpu, step.server_core or 0.0) >= SATURATED_CPU
        clients_busy = step.client_cpu >= SATURATED_CPU
        step.saturated = server_busy or not grew or clients_busy
        self.client_limited = clients_busy and not server_busy
        self.saturated = self.saturated or step.saturated

    def half_cpu_rate(self) -> float:
        """The rate at which the server's process used half a core, interpolated."""
        steps = (
            sorted((step for step in self.steps if not step.saturated), key=lambda step: step.rate)
            or self.steps[:1]
        )
        for low, high in itertools.pairwise(steps):
            if low.server_cpu <= 0.5 <= high.server_cpu:
                share = (0.5 - low.server_cpu) / (high.server_cpu - low.server_cpu)
                return low.rate + share * (high.rate - low.rate)
        nearest = steps[-1] if steps[-1].server_cpu < 0.5 else steps[0]
        return nearest.rate * 0.5 / nearest.server_cpu

    def per_rate(self) -> float:
        """Messages per second per unit of rate while unsaturated.

        A median, because the simulated market has calm and busy spells that
        change how many messages a tick makes.
        """
        steps = [step for step in self.steps if not step.saturated] or self.steps[:1]
        return statistics.median(step.delivered_per_s / step.rate for step in steps)

    def best(self) -> Step:
        return max(self.steps, key=lambda step: step.delivered_per_s)

    def saturating_rate(self) -> float:
        return self.best().delivered_per_s / self.per_rate()


def _cpu(step: Step) -> str:
    core = f" ({step.server_core:.0%})" if step.server_core is not None else ""
    return f"{step.server_cpu:.0%}{core}"


def _ratio(ours: float, theirs: float) -> str:
    return f"{ours / theirs:.2f}" if theirs else "n/a"


def report(
    bench: Bench,
    ours: Ladder,
    naive: Ladder,
    ours_half: Step,
    naive_half: Step,
    ours_half_cpu: Step,
    floor: send_floor.Floor,
) -> None:
    args = bench.args
    print()
    print(f"Fan-out benchmark, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; {machine()}")
    server_cpus, client_cpus = bench.server_place.cpus, bench.client_place.cpus
    pinning = (
        f"server pinned to CPU {sorted(server_cpus)}, clients to {sorted(client_cpus)}"
        if server_cpus and client_cpus
        else "no CPU pinning"
    )
    if args.nice:
        pinning += f", both at nice {args.nice}"
    print(
        f"{args.connections} connections in {args.processes} client processes, each subscribed "
        f"to Level1 + Level2 (20 levels, conflation None) of {args.symbols}; "
        f"windows {args.window:g} s (half load {args.latency_window:g} s); {pinning}"
    )
    print()
    print("Rate ladder (simulator book updates/s per symbol; * saturated):")
    print(
        "| rate | ours msg/s | ours CPU (core) | ours µs/msg | naive msg/s | naive CPU (core) "
        "| naive µs/msg | µs/msg ours/naive |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    naive_by_rate = {step.rate: step for step in naive.steps}
    for step in ours.steps:
        other = naive_by_rate.get(step.rate)
        theirs = (
            f"{other.delivered_per_s:,.0f}{'*' if other.saturated else ''} | "
            f"{_cpu(other)} | {other.cpu_us_per_message:.2f} | "
            f"{_ratio(step.cpu_us_per_message, other.cpu_us_per_message)}"
            if other
            else "— | — | — | —"
        )
        print(
            f"| {step.rate:g} | {step.delivered_per_s:,.0f}{'*' if step.saturated else ''} | "
            f"{_cpu(step)} | {step.cpu_us_per_message:.2f} | {theirs} |"
        )

    ours_best, naive_best = ours.best(), naive.best()
    # Rates where neither server was saturated: the same work for both.
    common = [
        (step, other)
        for step in ours.steps
        if (other := naive_by_rate.get(step.rate)) is not None
        and not step.saturated
        and not other.saturated
    ]
    rows: list[tuple[str, float, float, str]] = [
        (
            "saturating rate (updates/s/symbol)",
            ours.saturating_rate(),
            naive.saturating_rate(),
            ".1f",
        ),
        ("best delivered msg/s", ours_best.delivered_per_s, naive_best.delivered_per_s, ",.0f"),
        (
            "CPU µs/msg at best throughput",
            ours_best.cpu_us_per_message,
            naive_best.cpu_us_per_message,
            ".2f",
        ),
    ]
    rows.append(
        (
            "msg/s one full core would deliver (1 s / CPU per msg)",
            1e6 / ours_best.cpu_us_per_message,
            1e6 / naive_best.cpu_us_per_message,
            ",.0f",
        )
    )
    if common:
        same_ours, same_naive = common[-1]
        rows.append(
            (
                f"CPU µs/msg at the same rate ({same_ours.rate:g}/s)",
                same_ours.cpu_us_per_message,
                same_naive.cpu_us_per_message,
                ".2f",
            )
        )
    rows += [
        ("half-load rate (updates/s/symbol)", ours_half.rate, naive_half.rate, ".1f"),
        ("msg/s at half load", ours_half.delivered_per_s, naive_half.delivered_per_s, ",.0f"),
        (
            "CPU µs/msg at half load",
            ours_half.cpu_us_per_message,
            naive_half.cpu_us_per_message,
            ".2f",
        ),
        ("latency to read, p50 at half load (ms)", ours_half.p50_ms, naive_half.p50_ms, ".2f"),
        ("latency to read, p99 at half load (ms)", ours_half.p99_ms, naive_half.p99_ms, ".2f"),
        (
            "latency to arrival, p50 at half load (ms)",
            ours_half.arrival_p50_ms,
            naive_half.arrival_p50_ms,
            ".2f",
        ),
        (
            "latency to arrival, p99 at half load (ms)",
            ours_half.arrival_p99_ms,
            naive_half.arrival_p99_ms,
            ".2f",
        ),
    ]
    print()
    print("| measure | ours | naive | ours/naive |")
    print("|---|---:|---:|---:|")
    for name, mine, baseline, shape in rows:
        print(f"| {name} | {mine:{shape}} | {baseline:{shape}} | {_ratio(mine, baseline)} |")
    print()
    for half in (ours_half, naive_half):
        print(
            f"{half.server} half load: {len(half.window.latencies_us):,} read and "
            f"{len(half.window.arrivals_us):,} arrival latency samples "
            f"{half.window.sampled_types}, {half.window.bytes / max(1, half.window.frames):.0f} "
            f"bytes per message, clients CPU {half.client_cpu:.0%}"
        )
    print(
        f"send floor: {floor.connections:,} plain sends of {floor.size} bytes, one per "
        f"socket, take {floor.burst_ms:.2f} ms (p99 {floor.burst_p99_ms:.2f} ms, "
        f"{floor.us_per_send:.2f} µs each) on the server's core with the readers on the "
        "clients' core: what one update to every client costs before any server work"
    )
    print(
        f"caspian at half a core of CPU ({ours_half_cpu.rate:g}/s, server CPU "
        f"{ours_half_cpu.server_cpu:.0%}): {ours_half_cpu.delivered_per_s:,.0f} msg/s, "
        f"latency to arrival p50 {ours_half_cpu.arrival_p50_ms:.2f} ms, "
        f"p99 {ours_half_cpu.arrival_p99_ms:.2f} ms; to read p50 {ours_half_cpu.p50_ms:.2f} ms, "
        f"p99 {ours_half_cpu.p99_ms:.2f} ms"
    )
    for ladder in (ours, naive):
        if ladder.client_limited:
            print(
                f"NOTE: the clients saturated before {ladder.name} did, at "
                f"{ladder.steps[-1].rate:g}/s: its saturating rate is a lower bound"
            )
        elif not ladder.saturated:
            print(
                f"NOTE: {ladder.name} did not saturate up to {ladder.steps[-1].rate:g}/s: "
                "its saturating rate is a lower bound"
            )
    steps = [*ours.steps, *naive.steps, ours_half, naive_half, ours_half_cpu]
    others = max(step.others for step in steps)
    print(
        f"other processes of the machine used up to {others:.2f} cores during a window"
        + (
            ": throughput and latency are disturbed, CPU per message much less so"
            if others > 0.25
            else ""
        )
    )
    busy_clients = max(step.client_cpu for step in steps)
    if busy_clients >= SATURATED_CPU:
        print(
            f"WARNING: the clients used {busy_clients:.0%} of their cores at some step: "
            "the load generator may have limited the throughput"
        )
    less = naive_best.cpu_us_per_message / ours_best.cpu_us_per_message
    print(
        f"target: CPU per message at least {TARGET_CPU_RATIO:g}x less than naive: "
        f"{'met' if less >= TARGET_CPU_RATIO else 'MISSED'} ({less:.1f}x at best throughput)"
    )
    for what, p99 in (("arrival", ours_half.arrival_p99_ms), ("read", ours_half.p99_ms)):
        print(
            f"target: p99 latency under {TARGET_P99_MS:g} ms at half load, to {what}: "
            f"{'met' if p99 < TARGET_P99_MS else 'MISSED'} ({p99:.2f} ms)"
        )


def run(args: argparse.Namespace) -> None:
    bench = Bench(args)
    try:
        ours = Ladder("caspian", bench.caspian)
        naive = Ladder("naive", bench.naive)
        rate = args.start_rate
        while rate <= args.max_rate and not (ours.saturated and naive.saturated):
            for ladder in (ours, naive):
                if not ladder.saturated:
                    ladder.add(bench.measure(ladder.start, rate, args.window, LADDER_SAMPLING))
            rate *= 2
        profile = bench.work / "profile.txt" if args.profile else None
        halves = []
        for ladder in (ours, naive):
            half = round(ladder.saturating_rate() / 2, 1)
            print(f"{ladder.name}: saturating rate {ladder.saturating_rate():.1f}/s")
            halves.append(
                bench.measure(
                    ladder.start,
                    half,
                    args.latency_window,
                    LATENCY_SAMPLING,
                    profile if ladder is ours else None,
                )
            )
        # Where the server's own load is one half, whatever the clients allow.
        half_cpu = round(ours.half_cpu_rate(), 1)
        print(f"{ours.name}: half a core of CPU at {half_cpu:.1f}/s")
        ours_half_cpu = bench.measure(ours.start, half_cpu, args.latency_window, LATENCY_SAMPLING)
        # One write per client and update: a Level1 and a Level2 message.
        write_bytes = round(2 * halves[0].window.bytes / max(1, halves[0].window.frames))
        floor = send_floor.measure(
            args.connections, write_bytes, bench.server_place, bench.client_place
        )
        report(bench, ours, naive, halves[0], halves[1], ours_half_cpu, floor)
        if profile is not None:
            print_profile(profile)
    finally:
        bench.close()


def add_load_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of the clients, the windows and the placement, shared with bench_nats.py."""
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--processes", type=int, default=2, help="client worker processes")
    parser.add_argument("--symbols", default=SYMBOLS, help="comma-separated Caspian codes")
    parser.add_argument("--window", type=float, default=6.0, help="seconds measured per step")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds before each window")
    parser.add_argument("--no-pin", action="store_true", help="let the OS place the processes")
    parser.add_argument(
        "--nice", type=int, default=0, help="nice value of server and clients (<0 needs root)"
    )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_load_arguments(parser)
    parser.add_argument("--start-rate", type=float, default=2.0, help="first simulator rate")
    parser.add_argument("--max-rate", type=float, default=512.0, help="highest simulator rate")
    parser.add_argument(
        "--latency-window", type=float, default=15.0, help="seconds measured at half load"
    )
    parser.add_argument(
        "--profile", action="store_true", help="py-spy our server at half load (needs py-spy)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="200 connections and 3 s windows: a smoke run"
    )
    args = parser.parse_args()
    if args.quick:
        args.connections = min(args.connections, 200)
        args.window = min(args.window, 3.0)
        args.latency_window = min(args.latency_window, 3.0)
        args.warmup = min(args.warmup, 1.0)
    return args


if __name__ == "__main__":
    bench_main(parse_args, run)
