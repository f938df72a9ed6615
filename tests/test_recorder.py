"""Recording: the replay format as the Recorder and ``caspian record`` write it, and what
a crash, a stop or a rotation leaves on disk."""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import signal
import subprocess
import sys
import time
from contextlib import suppress
from pathlib import Path

import pytest

from caspian.catalog.builtin import builtin_products
from caspian.codes import Stream, StreamState
from caspian.events import BookEvent, Event, QuoteEvent, StatusEvent, TradeEvent, from_json
from caspian.service import sim_product
from caspian.sources.recorder import MAX_BUFFERED, Recorder, rotated_name
from caspian.sources.replay import ReplaySource, read_lines
from caspian.sources.simulator import SymbolSimulator
from caspian.timefmt import now_us, parse_us

SYMBOLS = ("FX-BTC/USD=GEMINI", "FX-ETH/USD=GEMINI", "PERP-BTC/USD=BITMEX")
CASPIAN = [sys.executable, "-c", "from caspian.cli import main; main()"]
#: 2023-11-14T22:13:20 GMT, so that recorded times are plainly not the wall clock.
START_US = 1_700_000_000_000_000


def market(ticks: int, symbols: tuple[str, ...] = SYMBOLS) -> list[Event]:
    """What the simulator emits for ``symbols`` over ``ticks`` ticks of 50 ms, with outages."""
    specs = {product.caspian_code: product for product in builtin_products()}
    sims = [
        SymbolSimulator(sim_product(specs[code]), seed=3, outage_probability=0.02)
        for code in symbols
    ]
    events: list[Event] = [event for sim in sims for event in sim.start(START_US)]
    for tick in range(1, ticks + 1):
        for sim in sims:
            events += sim.step(START_US + tick * 50_000)
    end = START_US + (ticks + 1) * 50_000
    # What the simulator never emits: a venue's own BBO with one side empty, a
    # bare trade, and a book with an empty side.
    events += [
        QuoteEvent(symbols[0], end, 1.5, 2.0, None, None, end - 10),
        TradeEvent(symbols[0], end, 3.0, 0.5),
        BookEvent(symbols[1], end, True, [(2.0, 1.0)], []),
    ]
    return events


def read_back(path: Path) -> list[Event]:
    return [from_json(line) for _, line, _ in read_lines(path)]


async def replayed(path: Path, symbols: tuple[str, ...] = SYMBOLS) -> tuple[list[Event], int]:
    """Every event a ReplaySource delivers for ``symbols`` at speed 0, and its bad line count."""
    # The recorded times, to compare with what was recorded.
    source = ReplaySource(path, speed=0, recorded_times=True)
    for symbol in symbols:
        source.watch(symbol)
    seen: list[Event] = []
    task = asyncio.create_task(source.run(seen.append))
    try:
        await asyncio.wait_for(source.finished.wait(), 30)
    finally:
        task.cancel()
        with suppress(asyncio.CancelledError):
            await task
    return seen, source.bad_lines


# -- the Recorder ------------------------------------------------------------------


@pytest.mark.parametrize("name", ["market.jsonl.gz", "market.jsonl"])
async def test_what_is_recorded_replays_unchanged(tmp_path: Path, name: str) -> None:
    events = market(150)
    kinds = {type(event) for event in events}
    assert kinds == {BookEvent, TradeEvent, QuoteEvent, StatusEvent}
    assert any(isinstance(e, StatusEvent) and e.state is StreamState.DISCONNECTED for e in events)
    path = tmp_path / name
    recorder = Recorder(path, symbols=set(SYMBOLS[:2]))
    for event in events:
        recorder.write(event)
    recorder.close()
    wanted = [event for event in events if event.symbol in SYMBOLS[:2]]
    assert recorder.events == len(wanted)
    assert recorder.files == [path]
    text = gzip.decompress(path.read_bytes()) if name.endswith(".gz") else path.read_bytes()
    # One JSON object a line, as CONTRACT.md section 6 has it.
    assert [json.loads(line)["symbol"] for line in text.splitlines()] == [
        event.symbol for event in wanted
    ]
    assert read_back(path) == wanted
    assert await replayed(path) == (wanted, 0)


async def test_everything_is_on_disk_after_each_flush(tmp_path: Path) -> None:
    """The periodic flush makes the file readable up to it while it is still being written."""
    events = market(40)
    half = len(events) // 2
    path = tmp_path / "live.jsonl.gz"
    recorder = Recorder(path, flush_s=0.2)
    task = asyncio.create_task(recorder.run())
    try:
        for event in events[:half]:
            recorder.write(event)
        await asyncio.sleep(0.6)
        assert read_back(path) == events[:half]
        for event in events[half:]:
            recorder.write(event)
        await asyncio.sleep(0.6)
        assert read_back(path) == events
    finally:
        task.cancel()
        with suppress(asyncio.CancelledError):
            await task
    # Stopping closes the gzip stream whole.
    assert gzip.decompress(path.read_bytes()).count(b"\n") == len(events)


def test_the_buffer_is_bounded(tmp_path: Path) -> None:
    """Without any flush from the clock, MAX_BUFFERED lines force one."""
    path = tmp_path / "burst.jsonl.gz"
    recorder = Recorder(path)
    trades = [
        TradeEvent(SYMBOLS[0], START_US + n, 100.0 + n % 7, 1.0, str(n))
        for n in range(MAX_BUFFERED * 5 // 2)
    ]
    for trade in trades[: MAX_BUFFERED - 1]:
        recorder.write(trade)
    assert not path.exists()
    recorder.write(trades[MAX_BUFFERED - 1])
    assert read_back(path) == trades[:MAX_BUFFERED]
    for trade in trades[MAX_BUFFERED:]:
        recorder.write(trade)
    assert read_back(path) == trades[: 2 * MAX_BUFFERED]
    recorder.close()
    assert read_back(path) == trades


def test_rotated_names() -> None:
    base = Path("/data/market.jsonl.gz")
    assert rotated_name(base, 0) == base
    assert rotated_name(base, 1) == Path("/data/market.0001.jsonl.gz")
    assert rotated_name(Path("m.jsonl"), 12) == Path("m.0012.jsonl")
    assert rotated_name(Path("m.gz"), 3) == Path("m.0003.gz")
    assert rotated_name(Path("m.log"), 2) == Path("m.log.0002")


@pytest.mark.parametrize("name", ["market.jsonl.gz", "market.jsonl"])
def test_rotation_closes_each_file_whole(tmp_path: Path, name: str) -> None:
    events = market(200)
    path = tmp_path / name
    rotate = 40_000
    recorder = Recorder(path, rotate_bytes=rotate)
    # A flush every 60 events stands in for the clock.
    for index, event in enumerate(events, 1):
        recorder.write(event)
        if index % 60 == 0:
            recorder.flush()
    recorder.close()
    assert len(recorder.files) >= 3
    assert recorder.files == [rotated_name(path, index) for index in range(len(recorder.files))]
    assert sorted(tmp_path.iterdir()) == sorted(recorder.files)
    contents = [
        gzip.decompress(file.read_bytes()) if name.endswith(".gz") else file.read_bytes()
        for file in recorder.files
    ]
    # Each file but the last is closed once it passes the limit, at a flush.
    for content in contents[:-1]:
        assert len(content) >= rotate
        assert content.count(b"\n") <= 60 + rotate // 100
    assert [event for file in recorder.files for event in read_back(file)] == events


# -- cut-off recordings ------------------------------------------------------------


async def test_a_cut_gzip_recording_replays_all_it_flushed(tmp_path: Path) -> None:
    """Wherever a crash cuts the file, everything up to the last flush before it replays."""
    events = market(60)
    path = tmp_path / "whole.jsonl.gz"
    recorder = Recorder(path)
    flushed: list[tuple[int, int]] = []  # (bytes on disk, events in them) after each flush
    for index, event in enumerate(events, 1):
        recorder.write(event)
        if index % 25 == 0:
            recorder.flush()
            flushed.append((path.stat().st_size, index))
    recorder.close()
    data = path.read_bytes()
    cut = tmp_path / "cut.jsonl.gz"
    cuts = [*range(0, 30), *range(30, len(data), max(1, len(data) // 40)), len(data) - 1]
    for size in cuts:
        cut.write_bytes(data[:size])
        lines = list(read_lines(cut))
        whole = [line for _, line, partial in lines if not partial]
        recovered = [from_json(line) for line in whole]
        assert recovered == events[: len(recovered)], size
        at_least = max((count for end, count in flushed if end <= size), default=0)
        assert len(recovered) >= at_least, size
    cut.write_bytes(data[: flushed[1][0] + 100])
    seen, bad = await replayed(cut)
    assert seen[: flushed[1][1]] == events[: flushed[1][1]]
    assert seen == events[: len(seen)]
    assert bad == 0


async def test_a_partial_last_line_is_ignored(tmp_path: Path) -> None:
    events = market(20)
    path = tmp_path / "whole.jsonl"
    recorder = Recorder(path)
    for event in events:
        recorder.write(event)
    recorder.close()
    data = path.read_bytes()
    ends = [index + 1 for index, byte in enumerate(data) if byte == ord("\n")]
    cut = tmp_path / "cut.jsonl"
    # Mid-line after 10 whole lines, and one byte short of the 11th line's closing brace.
    for size in (ends[9] + 7, ends[10] - 2):
        cut.write_bytes(data[:size])
        lines = list(read_lines(cut))
        assert [partial for _, _, partial in lines] == [False] * 10 + [True]
        assert await replayed(cut) == (events[:10], 0)


# -- the record command ----------------------------------------------------------


def record_command(tmp_path: Path, out: Path, *options: str) -> subprocess.Popen[str]:
    env = {
        **os.environ,
        "CASPIAN_DATA_DIR": str(tmp_path / "data"),
        "CASPIAN_SIMULATOR_RATE": "50",
        "CASPIAN_LOG_LEVEL": "warning",
    }
    command = [*CASPIAN, "record", "--out", str(out), "--symbols", ",".join(SYMBOLS), *options]
    return subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def wait_for_file(path: Path, process: subprocess.Popen[str], within: float = 30) -> None:
    deadline = time.monotonic() + within
    while not (path.exists() and path.stat().st_size > 0):
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "nothing was recorded"
        time.sleep(0.05)


def check_starts_whole(events: list[Event]) -> None:
    """Each symbol starts with its three streams connected, then a whole book."""
    for symbol in SYMBOLS:
        *statuses, book = [event for event in events if event.symbol == symbol][:4]
        assert {
            event.stream
            for event in statuses
            if isinstance(event, StatusEvent) and event.state is StreamState.CONNECTED
        } == set(Stream)
        assert isinstance(book, BookEvent) and book.snapshot


def test_record_command_writes_whole_rotated_files(tmp_path: Path) -> None:
    out = tmp_path / "market.jsonl.gz"
    process = record_command(tmp_path, out, "--seconds", "2", "--rotate-mb", "0.02")
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, stderr
    files = [rotated_name(out, index) for index in range(len(os.listdir(tmp_path)) - 1)]
    assert len(files) >= 2
    # The data directory, and the numbered files.
    assert set(os.listdir(tmp_path)) == {"data", *(file.name for file in files)}
    count = sum(gzip.decompress(file.read_bytes()).count(b"\n") for file in files)
    assert stdout.strip() == f"recorded {count} events to {', '.join(map(str, files))}"
    events = [event for file in files for event in read_back(file)]
    assert len(events) == count > 3 * 50
    assert {event.symbol for event in events} == set(SYMBOLS)
    check_starts_whole(events)
    stamps = [event.ts for event in events]
    assert stamps == sorted(stamps)


def test_record_command_refuses_an_unknown_symbol(tmp_path: Path) -> None:
    out = tmp_path / "market.jsonl.gz"
    env = {**os.environ, "CASPIAN_DATA_DIR": str(tmp_path / "data")}
    result = subprocess.run(
        [*CASPIAN, "record", "--out", str(out), "--symbols", "FX-NOT/THERE=GEMINI"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "unknown symbol: FX-NOT/THERE=GEMINI" in result.stderr
    assert not out.exists()


async def test_killed_recording_loses_at_most_the_last_second(tmp_path: Path) -> None:
    """SIGKILL mid-recording: the file replays, up to about a second before the kill."""
    out = tmp_path / "market.jsonl.gz"
    process = record_command(tmp_path, out, "--seconds", "120")
    try:
        wait_for_file(out, process)
        await asyncio.sleep(1.6)
        killed_at = now_us()
        process.kill()
    finally:
        process.kill()
        process.communicate(timeout=30)
    # The gzip stream was never closed...
    with pytest.raises(EOFError):
        gzip.decompress(out.read_bytes())
    # ...yet everything up to the last flush reads and replays.
    events, bad = await replayed(out)
    assert bad == 0
    assert events == read_back(out)
    check_starts_whole(events)
    stamps = [event.ts for event in events]
    assert stamps == sorted(stamps)
    # Flushes come every second; the rest is scheduling on a busy machine.
    assert stamps[-1] >= killed_at - 1_500_000


async def test_stopped_recording_closes_its_file_whole(tmp_path: Path) -> None:
    """SIGTERM, as a service manager stops it, loses nothing and leaves a whole gzip file."""
    out = tmp_path / "market.jsonl.gz"
    process = record_command(tmp_path, out, "--seconds", "120")
    try:
        wait_for_file(out, process)
        await asyncio.sleep(0.8)
        stopped_at = now_us()
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=30)
    finally:
        process.kill()
    assert process.returncode == 0
    lines = gzip.decompress(out.read_bytes()).splitlines()
    assert parse_us(json.loads(lines[-1])["ts"]) >= stopped_at - 300_000
    check_starts_whole(read_back(out))
