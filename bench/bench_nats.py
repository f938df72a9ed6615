"""Fan-out through NATS: the ingest and gateway roles beside the in-process bus, in one run.

Run as ``python bench/bench_nats.py`` (about 3 minutes; ``--quick`` for a
smoke run). Three deployments serve the same simulated market (seed 1, the
symbols of ``bench_fanout.py``) in turn, step by step, so that drifting
machine noise affects them alike:

- ``in-process``: ``caspian serve`` with the in-process bus, the baseline;
- ``nats-1``: a ``nats-server`` (JetStream on, as deployments run it), one
  ``caspian ingest`` publishing the simulator's events to it, and one
  ``caspian gateway`` serving every client;
- ``nats-2``: the same with two gateways, each serving half the clients on
  an address of its own.

Every server-side process is pinned to the server's core (the clients to
the other), so each deployment has one core, as ``bench_fanout.py`` gives
its server. Two phases:

- fan-out: ``--connections`` clients, each subscribed to Level1 and Level2
  (20 levels, no conflation) of every symbol, at each of ``--rates``
  (simulator book updates a second per symbol): messages received, CPU of
  each process (utime + stime from ``/proc/PID/stat``) per delivered
  message, and the ingest-to-client latency of sampled messages (their
  ``caspianTimestamp`` is stamped where the event entered the service: in
  the ingest process under NATS), to the client's read and, on probe
  connections, to the kernel's receive time;
- events: ``--event-connections`` clients at ``--event-rate``, so that the
  cost per event, not per message, dominates: the ingest's CPU per event
  it published, the NATS server's, and a gateway's.

Events published and received are counted by the NATS server itself
(``/connz`` of its monitoring port: messages in from the ingest's
connection, out to each gateway's), so nothing is added to the path
measured. From the per-process figures the report fits a gateway's cost as
a part per event received plus a part per message sent, and estimates what
a host with more cores would serve with ``caspian serve --workers N``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench_fanout import (
    LATENCY_SAMPLING,
    PROBE_EVERY,
    add_load_arguments,
    print_profile,
    start_profile,
    subscriptions,
)
from caspian.bus.nats import DEFAULT_PREFIX
from caspian.supervisor import free_loopback_port, nats_server_binary
from loadgen import (
    BenchSetup,
    Server,
    Window,
    authenticate,
    bench_main,
    busy_cpu_seconds,
    caspian_command,
    caspian_env,
    launch,
    machine,
    percentile,
    process_cpu_seconds,
    start_caspian,
    wait_for_line,
)

IN_PROCESS = "in-process"
#: The share of a core each gateway may use in the estimate: half a core is
#: where bench_fanout.py measured p99 under 5 ms with 1,000 clients; 0.9 is
#: about where a gateway saturates.
BUDGETS = (0.5, 0.9)


class NatsServer:
    """A ``nats-server`` with JetStream and its monitoring port, placed like the servers."""

    def __init__(self, work: Path, bench: BenchSetup) -> None:
        self.port, monitor_port = free_loopback_port(), free_loopback_port()
        self.monitor_url = f"http://127.0.0.1:{monitor_port}"
        run = Path(tempfile.mkdtemp(prefix="nats-", dir=work))
        command = [nats_server_binary(), "-a", "127.0.0.1", "-p", str(self.port)]
        command += ["-m", str(monitor_port), "-js", "-sd", str(run / "jetstream")]
        process = launch(command, run, bench.server_place)
        # Server's CPU reading and stop serve any subprocess.
        self.server = Server("nats-server", process, self.url, self.monitor_url)
        deadline = time.monotonic() + 10
        while True:
            try:
                self.connections()
                return
            except OSError:
                if time.monotonic() > deadline or process.poll() is not None:
                    self.server.stop()
                    raise RuntimeError("nats-server did not start") from None
                time.sleep(0.05)

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def connections(self) -> list[dict[str, Any]]:
        with urllib.request.urlopen(f"{self.monitor_url}/connz?subs=1", timeout=5) as response:
            connections: list[dict[str, Any]] = json.load(response).get("connections") or []
        return connections

    def counts(self) -> tuple[int, int]:
        """Messages the ingest published, and messages sent to all other clients (gateways)."""
        published = received = 0
        for connection in self.connections():
            # Only a source side listens for the gateways' interest.
            if f"{DEFAULT_PREFIX}.interest" in connection.get("subscriptions_list", []):
                published += connection["in_msgs"]
            else:
                received += connection["out_msgs"]
        return published, received


@dataclass
class Deployment:
    """The processes of one configuration: those clients connect to, and behind them."""

    name: str
    gateways: list[Server]
    ingest: Server | None = None
    nats: NatsServer | None = None

    def processes(self) -> list[Server]:
        behind = [self.ingest] if self.ingest else []
        return [*self.gateways, *behind, *([self.nats.server] if self.nats else [])]

    def stop(self) -> None:
        # Gateways first, so that none reports the source or NATS as lost.
        for server in self.processes():
            server.stop()


class Bench(BenchSetup):
    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__(args, "nats", args.symbols.split(","))
        self.subscriptions = subscriptions(args.symbols)

    def serving(self, role: str, rate: float, bus: dict[str, str]) -> Server:
        """``caspian serve`` or ``caspian gateway``, with a token for its clients."""
        server = start_caspian(self.data_dir, rate, self.server_place, role, bus)
        if not self.token:
            assert server.rest_url is not None
            self.token = authenticate(server.rest_url, self.key)
        return server

    def in_process(self, rate: float) -> Deployment:
        return Deployment(IN_PROCESS, [self.serving("serve", rate, {})])

    def through_nats(self, rate: float, gateways: int) -> Deployment:
        nats = NatsServer(self.work, self)
        deployment = Deployment(f"nats-{gateways}", [], nats=nats)
        try:
            bus = {"CASPIAN_BUS": nats.url}
            run = Path(tempfile.mkdtemp(prefix="ingest-", dir=self.data_dir))
            env = caspian_env(self.data_dir, rate) | bus
            process = launch([*caspian_command(), "ingest"], run, self.server_place, env)
            health = wait_for_line(process, run / "stdout", "Caspian ingest:", "caspian ingest")
            deployment.ingest = Server("ingest", process, "", health.split()[0])
            with ThreadPoolExecutor(gateways) as starting:
                started = starting.map(
                    lambda _: self.serving("gateway", rate, bus), range(gateways)
                )
                deployment.gateways = list(started)
        except BaseException:
            deployment.stop()
            raise
        return deployment


@dataclass
class Result:
    """One deployment over one window."""

    deployment: str
    rate: float
    connections: int
    delivered_per_s: float
    #: Cores (shares of one) each process used: serve or gateways, ingest, nats-server.
    gateway_cpu: list[float]
    ingest_cpu: float | None
    nats_cpu: float | None
    #: Counted by the NATS server: published by the ingest, received per gateway.
    published_per_s: float | None
    received_per_gateway_s: float | None
    server_core: float | None
    client_cpu: float
    others: float
    window: Window
    p50_ms: float = field(init=False)
    p99_ms: float = field(init=False)
    arrival_p50_ms: float = field(init=False)
    arrival_p99_ms: float = field(init=False)

    def __post_init__(self) -> None:
        latencies, arrivals = self.window.latencies_us, self.window.arrivals_us
        self.p50_ms = percentile(latencies, 0.50) / 1000
        self.p99_ms = percentile(latencies, 0.99) / 1000
        self.arrival_p50_ms = percentile(arrivals, 0.50) / 1000
        self.arrival_p99_ms = percentile(arrivals, 0.99) / 1000

    @property
    def gateways_cpu(self) -> float:
        return sum(self.gateway_cpu)

    @property
    def gateway_us_per_message(self) -> float:
        """CPU of the processes serving clients (serve, or every gateway) per message."""
        return self.gateways_cpu * 1e6 / max(1.0, self.delivered_per_s)

    @property
    def server_side_cpu(self) -> float:
        return self.gateways_cpu + (self.ingest_cpu or 0.0) + (self.nats_cpu or 0.0)

    def line(self) -> str:
        gateways = " + ".join(f"{cpu:.0%}" for cpu in self.gateway_cpu)
        behind = (
            f", ingest {self.ingest_cpu:.1%}, nats {self.nats_cpu:.1%}, "
            f"{self.published_per_s:,.0f} events/s published"
            if self.ingest_cpu is not None and self.nats_cpu is not None and self.published_per_s
            else ""
        )
        return (
            f"{self.deployment:>10} rate {self.rate:5.0f}/s, {self.connections} conns: "
            f"{self.delivered_per_s:9,.0f} msg/s, gateways {gateways} "
            f"({self.gateway_us_per_message:.2f} µs/msg){behind}, core "
            + (f"{self.server_core:.0%}" if self.server_core is not None else "n/a")
            + f"; read p50/p99 {self.p50_ms:.2f}/{self.p99_ms:.2f} ms, arrival "
            f"{self.arrival_p50_ms:.2f}/{self.arrival_p99_ms:.2f} ms; clients CPU "
            f"{self.client_cpu:.0%}, others {self.others:.2f} cores"
            + (f", closed {self.window.closes}" if self.window.closes else "")
            + (f", lost {self.window.lost}" if self.window.lost else "")
        )


def measure(
    bench: Bench,
    start: Callable[[float], Deployment],
    rate: float,
    connections: int,
    profile: Path | None = None,
) -> Result:
    """One window of ``start``'s deployment; ``profile``: py-spy its ingest meanwhile."""
    args = bench.args
    deployment = start(rate)
    try:
        gateways = deployment.gateways
        for index, gateway in enumerate(gateways):
            share = connections // len(gateways) + (index < connections % len(gateways))
            bench.open(gateway, share, bench.subscriptions, PROBE_EVERY)
        time.sleep(args.warmup)
        processes = deployment.processes()
        nats = deployment.nats
        server_cpus = bench.server_place.cpus
        cpu_before = [process_cpu_seconds(server.pid) for server in processes]
        counts_before = nats.counts() if nats else (0, 0)
        busy_before = busy_cpu_seconds()
        core_before = busy_cpu_seconds(server_cpus or ())
        began = time.monotonic()
        spy = (
            start_profile(deployment.ingest, args.window, profile)
            if profile and deployment.ingest
            else None
        )
        bench.pool.start(LATENCY_SAMPLING)
        time.sleep(args.window)
        window = bench.pool.stop()
        cpu = [
            process_cpu_seconds(server.pid) - before
            for server, before in zip(processes, cpu_before, strict=True)
        ]
        counts = nats.counts() if nats else (0, 0)
        busy = busy_cpu_seconds() - busy_before
        core = busy_cpu_seconds(server_cpus or ()) - core_before
        elapsed = time.monotonic() - began
        if spy is not None:
            spy.wait()
        bench.pool.close_connections()
    finally:
        deployment.stop()
    cpus = bench.client_place.cpus
    client_cores = len(cpus) if cpus else 1
    shares = [seconds / elapsed for seconds in cpu]
    published, received = (
        (after - before) / elapsed for after, before in zip(counts, counts_before, strict=True)
    )
    result = Result(
        deployment=deployment.name,
        rate=rate,
        connections=connections,
        delivered_per_s=window.frames / window.seconds,
        gateway_cpu=shares[: len(gateways)],
        ingest_cpu=shares[len(gateways)] if deployment.ingest else None,
        nats_cpu=shares[-1] if nats else None,
        published_per_s=published if nats else None,
        received_per_gateway_s=received / len(gateways) if nats else None,
        server_core=core / elapsed / len(server_cpus) if server_cpus else None,
        client_cpu=window.client_cpu_s / window.seconds / client_cores,
        others=max(0.0, busy - sum(cpu) - window.client_cpu_s) / elapsed,
        window=window,
    )
    print(result.line(), flush=True)
    return result


@dataclass(frozen=True)
class GatewayCost:
    """A gateway's CPU, in µs a second: ``per_event`` × events received + ``per_message`` ×
    messages sent. Fitted on two windows of one gateway: many clients, and few."""

    per_event_us: float
    per_message_us: float

    @classmethod
    def fit(cls, fanout: Result, events: Result) -> GatewayCost:
        rows = [
            (result.received_per_gateway_s or 0.0, result.delivered_per_s, result.gateways_cpu)
            for result in (fanout, events)
        ]
        (e1, m1, g1), (e2, m2, g2) = rows
        determinant = e1 * m2 - e2 * m1
        # Noise can make the solution's share per event negative: none, then.
        per_event = max(0.0, (g1 * m2 - g2 * m1) * 1e6 / determinant) if determinant else 0.0
        return cls(per_event, (g1 * 1e6 - per_event * e1) / m1)


@dataclass(frozen=True)
class BusCost:
    """The ingest's and the NATS server's CPU per event (µs); the NATS server's split
    into a part per event in and a part per copy out to a gateway (1 against 2 gateways)."""

    ingest_us: float
    nats_in_us: float
    nats_copy_us: float

    @classmethod
    def fit(cls, one: Result, two: Result) -> BusCost:
        def per_event(result: Result, cpu: float | None) -> float:
            return (cpu or 0.0) * 1e6 / max(1.0, result.published_per_s or 0.0)

        copy = max(0.0, per_event(two, two.nats_cpu) - per_event(one, one.nats_cpu))
        ingest = (per_event(one, one.ingest_cpu) + per_event(two, two.ingest_cpu)) / 2
        return cls(ingest, max(0.0, per_event(one, one.nats_cpu) - copy), copy)


def _ms(result: Result, what: str) -> str:
    if what == "arrival":
        return f"{result.arrival_p50_ms:.2f} / {result.arrival_p99_ms:.2f}"
    return f"{result.p50_ms:.2f} / {result.p99_ms:.2f}"


def _table(results: Sequence[Result]) -> None:
    print(
        "| rate | deployment | conns | msg/s | events/s | gateway CPU | gateway µs/msg "
        "| ingest CPU | NATS CPU | all µs/msg | arrival p50 / p99 (ms) | read p50 / p99 (ms) "
        "| core | clients | others |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for result in results:
        gateways = " + ".join(f"{cpu:.0%}" for cpu in result.gateway_cpu)
        print(
            f"| {result.rate:g} | {result.deployment} | {result.connections:,} | "
            f"{result.delivered_per_s:,.0f} | "
            + (f"{result.published_per_s:,.0f}" if result.published_per_s is not None else "")
            + f" | {gateways} | {result.gateway_us_per_message:.2f} | "
            + (f"{result.ingest_cpu:.1%}" if result.ingest_cpu is not None else "")
            + " | "
            + (f"{result.nats_cpu:.1%}" if result.nats_cpu is not None else "")
            + f" | {result.server_side_cpu * 1e6 / max(1.0, result.delivered_per_s):.2f} | "
            f"{_ms(result, 'arrival')} | {_ms(result, 'read')} | "
            + (f"{result.server_core:.0%}" if result.server_core is not None else "")
            + f" | {result.client_cpu:.0%} | {result.others:.2f} |"
        )


def report(
    bench: Bench,
    fanout: dict[float, dict[str, Result]],
    events: dict[str, Result],
    commit: str,
) -> None:
    args = bench.args
    print()
    print(f"Fan-out through NATS, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; {machine()}; {commit}")
    server_cpus, client_cpus = bench.server_place.cpus, bench.client_place.cpus
    print(
        f"clients subscribed to Level1 + Level2 (20 levels, conflation None) of {args.symbols}; "
        f"windows {args.window:g} s after {args.warmup:g} s; "
        + (
            f"every server-side process pinned to CPU {sorted(server_cpus)}, "
            f"clients to {sorted(client_cpus)}"
            if server_cpus and client_cpus
            else "no CPU pinning"
        )
    )
    print()
    _table([result for by_name in fanout.values() for result in by_name.values()])
    print()
    print("Events phase (few clients: the cost per event):")
    _table(list(events.values()))

    top = max(fanout)
    base, one, two = (fanout[top][name] for name in (IN_PROCESS, "nats-1", "nats-2"))
    print()
    print(f"At {top:g}/s with {base.connections:,} connections (ratios against in-process):")
    print("| measure | in-process | nats-1 | nats-2 | nats-1 / in-process |")
    print("|---|---:|---:|---:|---:|")

    def row(name: str, value: Callable[[Result], float], shape: str) -> None:
        mine = [value(result) for result in (base, one, two)]
        ratio = f"{mine[1] / mine[0]:.2f}" if mine[0] else "n/a"
        print(f"| {name} | " + " | ".join(f"{v:{shape}}" for v in mine) + f" | {ratio} |")

    row("delivered msg/s", lambda r: r.delivered_per_s, ",.0f")
    row("CPU µs/msg, processes serving clients", lambda r: r.gateway_us_per_message, ".2f")
    row(
        "CPU µs/msg, every server-side process",
        lambda r: r.server_side_cpu * 1e6 / max(1.0, r.delivered_per_s),
        ".2f",
    )
    row("latency to arrival p50 (ms)", lambda r: r.arrival_p50_ms, ".2f")
    row("latency to arrival p99 (ms)", lambda r: r.arrival_p99_ms, ".2f")
    row("latency to read p50 (ms)", lambda r: r.p50_ms, ".2f")
    row("latency to read p99 (ms)", lambda r: r.p99_ms, ".2f")
    for rate, by_name in sorted(fanout.items()):
        memory = by_name[IN_PROCESS]
        for name in ("nats-1", "nats-2"):
            nats = by_name[name]
            print(
                f"bus adds at {rate:g}/s ({name}): arrival p50 "
                f"{nats.arrival_p50_ms - memory.arrival_p50_ms:+.2f} ms, p99 "
                f"{nats.arrival_p99_ms - memory.arrival_p99_ms:+.2f} ms; read p50 "
                f"{nats.p50_ms - memory.p50_ms:+.2f} ms, p99 {nats.p99_ms - memory.p99_ms:+.2f} ms"
            )

    gateway = GatewayCost.fit(one, events["nats-1"])
    bus = BusCost.fit(events["nats-1"], events["nats-2"])
    memory_events = events[IN_PROCESS]
    # The in-process run publishes nothing to count. Its clients are nats-1's, so its events
    # are its messages at nats-1's messages per event (a loaded simulator drops ticks: the
    # two markets' rates differ).
    nats_events = events["nats-1"]
    market_events = (
        memory_events.delivered_per_s
        * (nats_events.published_per_s or 0.0)
        / max(1.0, nats_events.delivered_per_s)
    ) or 1.0
    print()
    print(
        f"per event ({nats_events.published_per_s or 0.0:,.0f} events/s at "
        f"{args.event_rate:g}/s; in-process about {market_events:,.0f}): ingest "
        f"{bus.ingest_us:.1f} µs; NATS server {bus.nats_in_us:.1f} µs in + "
        f"{bus.nats_copy_us:.1f} µs per gateway it goes to; in-process serve with "
        f"{memory_events.connections} clients "
        f"{memory_events.gateways_cpu * 1e6 / market_events:.1f} µs (its whole process)"
    )
    print(
        f"gateway cost fitted on nats-1 ({one.connections} and {events['nats-1'].connections} "
        f"clients): {gateway.per_event_us:.1f} µs per event received + "
        f"{gateway.per_message_us:.2f} µs per message sent"
    )
    predicted = (
        gateway.per_event_us * (two.received_per_gateway_s or 0.0)
        + gateway.per_message_us * two.delivered_per_s / 2
    ) / 1e6
    print(
        f"check on nats-2: predicted {predicted:.0%} per gateway, measured "
        + " and ".join(f"{cpu:.0%}" for cpu in two.gateway_cpu)
    )
    estimate(args.workers, gateway, bus, fanout, args.cores)
    others = max(r.others for by_name in fanout.values() for r in by_name.values())
    print(f"other processes of the machine used up to {others:.2f} cores during a window")


def estimate(
    workers: int,
    gateway: GatewayCost,
    bus: BusCost,
    fanout: dict[float, dict[str, Result]],
    cores: int,
) -> None:
    """What ``workers`` gateways, an ingest and a NATS server would serve on ``cores`` cores."""
    print()
    print(
        f"Estimate for {cores} cores, serve --workers {workers} (one gateway per core, each "
        "with the same events; the ingest and NATS on what is left):"
    )
    print(
        "| market rate | events/s | msg/s per client | gateway budget | msg/s per gateway "
        "| clients per gateway | msg/s in all | clients in all | ingest + NATS cores |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for rate, by_name in sorted(fanout.items()):
        one = by_name["nats-1"]
        events = one.received_per_gateway_s or 0.0
        per_client = one.delivered_per_s / one.connections
        side = (bus.ingest_us + bus.nats_in_us + bus.nats_copy_us * workers) * events / 1e6
        for budget in BUDGETS:
            per_gateway = max(0.0, budget * 1e6 - gateway.per_event_us * events) / (
                gateway.per_message_us
            )
            total = per_gateway * workers
            print(
                f"| {rate:g}/s | {events:,.0f} | {per_client:,.0f} | {budget:.0%} | "
                f"{per_gateway:,.0f} | {per_gateway / per_client:,.0f} | {total:,.0f} | "
                f"{total / per_client:,.0f} | {side:.2f} |"
            )
    print(
        f"one core of ingest publishes up to {1e6 / bus.ingest_us:,.0f} events/s of this market "
        f"(simulator included); the NATS server's part grows with the gateways: "
        f"{bus.nats_in_us + bus.nats_copy_us * workers:.0f} µs per event for {workers}"
    )


def run(args: argparse.Namespace) -> None:
    bench = Bench(args)
    commit = _commit()
    starts: dict[str, Callable[[float], Deployment]] = {
        IN_PROCESS: bench.in_process,
        "nats-1": lambda rate: bench.through_nats(rate, 1),
        "nats-2": lambda rate: bench.through_nats(rate, 2),
    }
    try:
        fanout: dict[float, dict[str, Result]] = {}
        for rate in args.rates:
            fanout[rate] = {
                name: measure(bench, start, rate, args.connections)
                for name, start in starts.items()
            }
        profile = bench.work / "profile.txt" if args.profile else None
        events = {
            name: measure(
                bench,
                start,
                args.event_rate,
                args.event_connections,
                profile if name == "nats-1" else None,
            )
            for name, start in starts.items()
        }
        report(bench, fanout, events, commit)
        if profile is not None:
            print_profile(profile, what=f"the ingest at {args.event_rate:g}/s (nats-1)")
    finally:
        bench.close()


def _commit() -> str:
    done = subprocess.run(
        ["git", "describe", "--always", "--dirty"],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parent,
        check=False,
    )
    return f"commit {done.stdout.strip() or 'unknown'}"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_load_arguments(parser)
    parser.add_argument(
        "--rates",
        type=lambda text: [float(rate) for rate in text.split(",")],
        default=[8.0, 32.0],
        help="simulator rates of the fan-out phase, comma-separated",
    )
    parser.add_argument(
        "--event-rate", type=float, default=512.0, help="simulator rate of the events phase"
    )
    parser.add_argument(
        "--event-connections", type=int, default=10, help="clients in the events phase"
    )
    parser.add_argument("--workers", type=int, default=15, help="gateways in the estimate")
    parser.add_argument("--cores", type=int, default=16, help="cores in the estimate")
    parser.add_argument(
        "--profile", action="store_true", help="py-spy the ingest in the events phase"
    )
    parser.add_argument(
        "--quick", action="store_true", help="200 connections, one rate, 3 s windows"
    )
    args = parser.parse_args()
    if args.quick:
        args.connections = min(args.connections, 200)
        args.rates = args.rates[-1:]
        args.window = min(args.window, 3.0)
        args.warmup = min(args.warmup, 1.0)
    return args


if __name__ == "__main__":
    bench_main(parse_args, run)
