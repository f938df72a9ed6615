"""The cost of the send system calls alone: the floor under any fan-out server.

One update to 1,000 clients is 1,000 ``send`` calls, one per socket, whatever
the server does in Python. This measures a burst of exactly that: a sender
process pinned where the server runs writes one message of ``size`` bytes to
each of ``connections`` loopback TCP sockets in a plain loop, while a reader
process pinned where the clients run drains them. On loopback the kernel also
runs the receiving side's TCP work inside the sender's ``send`` call, as it
does for the servers measured beside it.

Run alone as ``python bench/send_floor.py`` (a few seconds), or through
``bench_fanout.py``, which prints it beside the server's own burst times.
"""

from __future__ import annotations

import argparse
import multiprocessing
import selectors
import socket
import statistics
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection

from loadgen import Placement, placements, raise_nofile


@dataclass(frozen=True)
class Floor:
    connections: int
    size: int
    #: Wall time of one burst (one send to every socket), median and 99th percentile.
    burst_ms: float
    burst_p99_ms: float

    @property
    def us_per_send(self) -> float:
        return self.burst_ms * 1000 / self.connections


def _reader(port: int, connections: int, placement: Placement, ready: Connection) -> None:
    raise_nofile()
    placement.apply()
    selector = selectors.DefaultSelector()
    for _ in range(connections):
        sock = socket.create_connection(("127.0.0.1", port))
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ, sock)
    ready.send("connected")
    while True:
        for key, _ in selector.select():
            sock = key.data
            try:
                data = sock.recv(1 << 16)
            except BlockingIOError:
                continue
            if not data:
                return


def _sender(
    connections: int,
    size: int,
    bursts: int,
    gap_s: float,
    server: Placement,
    client: Placement,
    out: Connection,
) -> None:
    raise_nofile()
    server.apply()
    listener = socket.create_server(("127.0.0.1", 0), backlog=connections)
    port = listener.getsockname()[1]
    parent, child = multiprocessing.get_context("fork").Pipe()
    reader = multiprocessing.get_context("fork").Process(
        target=_reader, args=(port, connections, client, child), daemon=True
    )
    reader.start()
    socks = []
    for _ in range(connections):
        sock, _ = listener.accept()
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
        socks.append(sock)
    parent.recv()
    payload = b"x" * size
    times = []
    for burst in range(bursts + 10):
        began = time.perf_counter()
        for sock in socks:
            sock.send(payload)
        if burst >= 10:  # the first bursts warm the caches up
            times.append(time.perf_counter() - began)
        time.sleep(gap_s)
    for sock in socks:
        sock.close()
    reader.join(10)
    times.sort()
    out.send(
        Floor(
            connections,
            size,
            statistics.median(times) * 1000,
            times[min(len(times) - 1, int(0.99 * len(times)))] * 1000,
        )
    )


def measure(
    connections: int,
    size: int,
    server: Placement,
    client: Placement,
    bursts: int = 300,
    gap_s: float = 0.01,
) -> Floor:
    """Burst times of ``connections`` sends of ``size`` bytes, sender and reader so placed.

    The reader must run where the benchmark's clients do: on loopback, a
    reader on the sender's own core makes each send about half as costly
    (no cache lines shared between cores, no cross-core wake-ups).
    """
    parent, child = multiprocessing.get_context("fork").Pipe()
    process = multiprocessing.get_context("fork").Process(
        target=_sender, args=(connections, size, bursts, gap_s, server, client, child)
    )
    process.start()
    floor: Floor = parent.recv()
    process.join(10)
    return floor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--size", type=int, default=700, help="bytes per send")
    parser.add_argument("--no-pin", action="store_true", help="let the OS place the processes")
    args = parser.parse_args()
    floor = measure(args.connections, args.size, *placements(not args.no_pin, 0))
    print(
        f"{floor.connections} sends of {floor.size} bytes: burst median {floor.burst_ms:.2f} ms, "
        f"p99 {floor.burst_p99_ms:.2f} ms ({floor.us_per_send:.2f} µs per send)"
    )


if __name__ == "__main__":
    main()
