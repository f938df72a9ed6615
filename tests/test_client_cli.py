"""The client distribution's terminal commands, run for real against the started service:
the live view in a pseudo-terminal, read back through a terminal emulator."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pexpect  # type: ignore[import-untyped]
import pyte
import pytest

from caspian.codes import CloseCode
from tests.support.service import RunningService

SYMBOL = "FX-BTC/USD=GEMINI"
ROWS, COLUMNS = 40, 120


def command(name: str) -> str:
    """The console script as installed with the client distribution."""
    path = Path(sys.executable).with_name(name)
    assert path.exists(), f"{name} is not installed: pip install -e ./clients/python"
    return str(path)


@pytest.fixture
def login(service: RunningService) -> dict[str, str]:
    """The environment the commands take the service and a key from."""
    key_id, secret = service.key()
    env = {name: value for name, value in os.environ.items() if not name.startswith("CASPIAN_")}
    return env | {
        "CASPIAN_URL": service.base_url,
        "CASPIAN_KEY_ID": key_id,
        "CASPIAN_KEY_SECRET": secret,
        "PYTHONUNBUFFERED": "1",
    }


def run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [command(args[0]), *args[1:]], capture_output=True, text=True, env=env, timeout=60
    )


def api(service: RunningService, env: dict[str, str], method: str, path: str, **kw: Any) -> Any:
    token = httpx.post(
        f"{service.base_url}/v1/auth/authenticate",
        json={
            "type": "Key",
            "payload": {
                "accessKeyID": env["CASPIAN_KEY_ID"],
                "secretAccessKey": env["CASPIAN_KEY_SECRET"],
            },
        },
    ).json()["accessToken"]
    response = httpx.request(
        method, f"{service.base_url}/v1{path}", headers={"Authorization": token}, **kw
    )
    return response.json()


def test_exchanges_and_products_as_tables_and_json(
    service: RunningService, login: dict[str, str]
) -> None:
    listed = run(login, "caspian-exchanges", "--json")
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout) == api(service, login, "GET", "/reference/exchanges")
    table = run(login, "caspian-exchanges")
    assert re.search(r"GEMINI\s+Gemini", table.stdout)
    products = run(login, "caspian-products", "GEMINI", "--json")
    assert products.returncode == 0, products.stderr
    expected = api(service, login, "POST", "/reference/products", json={"exchanges": ["GEMINI"]})
    assert json.loads(products.stdout) == expected
    table = run(login, "caspian-products", "GEMINI")
    for product in expected:
        assert re.search(
            rf"{re.escape(product['caspianCode'])}\s+{re.escape(product['pseudoCode'])}",
            table.stdout,
        )


def test_errors_are_one_line(service: RunningService, login: dict[str, str]) -> None:
    unknown = run(login, "caspian-products", "NOPE")
    assert unknown.returncode == 1
    assert unknown.stderr.startswith("error: 4000 ") and "NOPE" in unknown.stderr
    refused = run(login | {"CASPIAN_KEY_SECRET": "wrong"}, "caspian-exchanges")
    assert (refused.returncode, refused.stderr) == (1, "error: 401 Unauthorized\n")
    symbol = run(login, "caspian-tail", "FX-NOPE/USD=GEMINI")
    assert (symbol.returncode, symbol.stderr) == (1, "error: 202 Invalid subscription symbol\n")
    alone = {name: value for name, value in login.items() if name != "CASPIAN_URL"}
    assert run(alone, "caspian-exchanges").stderr.startswith("error: no service URL")


def lines_of(process: subprocess.Popen[str], count: int) -> list[dict[str, Any]]:
    assert process.stdout is not None
    lines = []
    for _ in range(count):
        line = process.stdout.readline()
        assert line, process.stderr.read() if process.stderr else ""
        lines.append(json.loads(line))
    return lines


def test_tail_prints_json_lines_and_stops_on_ctrl_c(
    service: RunningService, login: dict[str, str]
) -> None:
    process = subprocess.Popen(
        [command("caspian-tail"), SYMBOL, "--level2", "--levels", "5", "--conflation", "None"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=login,
    )
    try:
        updates = lines_of(process, 30)
    finally:
        process.send_signal(signal.SIGINT)
        _, errors = process.communicate(timeout=30)
    assert process.returncode == 0 and "Traceback" not in errors
    assert updates[0]["whole"] and updates[0]["depthStream"] == "connected"
    book: dict[tuple[str, float], float] = {}
    for update in updates:
        assert update["symbol"] == SYMBOL and update["type"] == "Level2"
        if update["whole"]:
            book.clear()
        for side, price, size in update["changes"]:
            if size == 0:
                book.pop((side, price), None)
            else:
                book[(side, price)] = size
        shown = {("bid", p): s for p, s in update["bids"]} | {
            ("ask", p): s for p, s in update["asks"]
        }
        # The book printed is the changes applied in order.
        assert shown == book
        assert len(update["bids"]) == len(update["asks"]) == 5
    # Level1 by pseudo code: the merged state.
    pseudo = subprocess.Popen(
        [command("caspian-tail"), "BTCUSD=GEMINI", "--symbol-type", "Pseudo"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=login,
    )
    try:
        (quote,) = lines_of(pseudo, 1)
    finally:
        pseudo.send_signal(signal.SIGINT)
        pseudo.communicate(timeout=30)
    assert quote["type"] == "Level1" and quote["symbol"] == "BTCUSD=GEMINI"
    assert quote["bid"] < quote["ask"] and quote["bboStream"] == "connected"


class Terminal:
    """A command in a pseudo-terminal, its output fed to a terminal emulator."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.screen = pyte.Screen(COLUMNS, ROWS)
        self.stream = pyte.ByteStream(self.screen)
        self.output = b""
        self.child = pexpect.spawn(
            args[0], args[1:], env=env | {"TERM": "xterm-256color"}, dimensions=(ROWS, COLUMNS)
        )

    def pump(self, within: float = 0.2) -> None:
        try:
            data = self.child.read_nonblocking(1 << 16, timeout=within)
        except pexpect.TIMEOUT:
            return
        except pexpect.EOF:
            return
        self.output += data
        self.stream.feed(data)

    def text(self) -> str:
        return "\n".join(self.screen.display)

    def wait_for(self, done: Callable[[str], bool], within: float = 30) -> str:
        deadline = time.monotonic() + within
        while not done(self.text()):
            assert time.monotonic() < deadline, f"the screen never showed it:\n{self.text()}"
            self.pump()
        return self.text()

    def quit(self) -> int:
        self.child.sendcontrol("c")
        deadline = time.monotonic() + 30
        while self.child.isalive() and time.monotonic() < deadline:
            self.pump()
        self.pump()
        self.child.close()
        status: int = self.child.exitstatus
        return status


def ladder(screen: str) -> list[tuple[float, float]]:
    """The (bid, ask) price pairs of the ladder's rows."""
    rows = re.findall(r"([\d.]+)\s+█+\s+([\d.]+)\s+([\d.]+)\s+█+\s+([\d.]+)", screen)
    return [(float(bid), float(ask)) for _, bid, ask, _ in rows]


@pytest.fixture
def closing(service: RunningService) -> Iterator[Callable[[], None]]:
    def close_all() -> None:
        def run() -> None:
            for connection in list(service.listening.service.gateway.connections):
                connection.close(CloseCode.PONG_NOT_RECEIVED)

        service.loop.call_soon_threadsafe(run)

    yield close_all


def test_watch_shows_a_live_ladder_survives_a_reconnect_and_quits_cleanly(
    service: RunningService, login: dict[str, str], closing: Callable[[], None]
) -> None:
    terminal = Terminal(
        [command("caspian-watch"), SYMBOL, "--level2", "--levels", "5", "--conflation", "250ms"],
        login,
    )
    first = terminal.wait_for(lambda screen: len(ladder(screen)) == 5)
    assert SYMBOL in first and "connection: connected" in first
    assert "depthStream: connected" in first
    rows = ladder(first)
    bids, asks = [bid for bid, _ in rows], [ask for _, ask in rows]
    assert bids == sorted(bids, reverse=True) and asks == sorted(asks) and bids[0] < asks[0]
    # The prices move as the market does.
    terminal.wait_for(lambda screen: len(ladder(screen)) == 5 and ladder(screen) != rows)
    closing()
    later = terminal.wait_for(lambda screen: "reconnects: 1 (last" in screen)
    assert "never" not in later.split("reconnects:")[1]
    terminal.wait_for(lambda screen: len(ladder(screen)) == 5 and "connection: connected" in screen)
    assert terminal.wait_for(lambda screen: "updates/s:" in screen)
    rate = re.search(r"updates/s: ([\d.]+)", terminal.text())
    assert rate is not None and float(rate.group(1)) > 0
    assert terminal.quit() == 0
    # The alternate screen was left and the cursor shown again: the terminal is as it was.
    tail = terminal.output[terminal.output.rfind(b"\x1b[?1049h") :]
    assert b"\x1b[?1049l" in tail and b"\x1b[?25h" in tail
    assert b"Traceback" not in terminal.output


def test_watch_level1_ticker_by_pseudo_code(service: RunningService, login: dict[str, str]) -> None:
    terminal = Terminal(
        [
            command("caspian-watch"),
            "BTCUSD=GEMINI",
            "--symbol-type",
            "Pseudo",
            "--conflation",
            "1s",
        ],
        login,
    )
    screen = terminal.wait_for(lambda text: re.search(r"\bbid\s+[\d.]+", text) is not None)
    bid = re.search(r"\bbid\s+([\d.]+)", screen)
    ask = re.search(
        r"\bask\s+([\d.]+)",
        terminal.wait_for(lambda t: re.search(r"\bask\s+[\d.]+", t) is not None),
    )
    assert bid is not None and ask is not None and float(bid.group(1)) < float(ask.group(1))
    assert "bboStream: connected" in terminal.text()
    assert terminal.quit() == 0
