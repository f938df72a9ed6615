"""The web dashboard at /dashboard/, driven in headless Chromium against ``caspian serve``.

The browser is Debian's ``chromium`` (``apt-get install -y chromium``), driven by
Playwright's Python package through ``executable_path``: Playwright's own browser
downloads are never used. Without that executable the tests are skipped, saying so.

The page runs under its Content-Security-Policy throughout (the test reads it with
``page.evaluate``, which the policy does not govern, and never bypasses it), so
these tests also show that the policy lets the dashboard work.

A screenshot of the dashboard is saved in ``$CASPIAN_TEST_ARTIFACTS`` when that is
set, else in the test's temporary directory; its path is printed.
"""

from __future__ import annotations

import asyncio
import math
import os
import shutil
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.cli import ok
from tests.support.client import StreamClient, apply_level2
from tests.support.ports import free_port
from tests.support.running import Started

try:
    from playwright.async_api import Browser, ConsoleMessage, Page, async_playwright
except ImportError:
    pytest.skip(
        "the playwright package is not installed (pip install -e '.[test]')",
        allow_module_level=True,
    )

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
if not Path(CHROMIUM).is_file():
    pytest.skip(
        "Debian's chromium is not installed (apt-get install -y chromium chromium-driver)",
        allow_module_level=True,
    )

SYMBOL = "FX-BTC/USD=GEMINI"
OTHER = "FX-ETH/USD=GEMINI"
LEVELS = 5
#: Short, so that the dashboard must refresh its token on the open stream to keep it.
TOKEN_TTL_S = 15
USER, PASSWORD = "bob", "correct horse"

#: The ladder of one panel as shown, and the Level2 timestamp it was drawn from,
#: read in one go: the page cannot change between the two.
READ_LADDER = """(symbol) => {
  const panel = [...document.querySelectorAll(".panel")].find((p) => p.dataset.symbol === symbol);
  if (panel === undefined) return null;
  return {
    whole: panel.dataset.whole === "true",
    timestamp: panel.dataset.caspianTimestamp,
    rows: [...panel.querySelectorAll(".ladder tbody tr")].map(
      (tr) => [tr.dataset.side, Number(tr.dataset.price), Number(tr.dataset.size)]),
  };
}"""

Level = tuple[str, float, float]


@dataclass
class Served:
    """``caspian serve`` on a fixed port, so that it can be restarted where it was."""

    data_dir: Path
    port: int
    key: dict[str, str]
    process: Started

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def stream_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/stream"

    @staticmethod
    def start(data_dir: Path, port: int) -> Started:
        return Started(
            data_dir,
            "serve",
            "--port",
            str(port),
            labels=("Caspian REST API", "Caspian stream"),
            env={
                "CASPIAN_TOKEN_TTL_S": str(TOKEN_TTL_S),
                "CASPIAN_LOG_LEVEL": "warning",
                "CASPIAN_MAINTENANCE": "off",
                # Sessions ended on the server close within a second.
                "CASPIAN_RECHECK_S": "1",
            },
        )

    def restart(self) -> None:
        self.process.stop()
        self.process = self.start(self.data_dir, self.port)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    data_dir = tmp_path_factory.mktemp("dashboard") / "data"
    ok(data_dir, "users", "create", USER, "--password-stdin", stdin=f"{PASSWORD}\n")
    key = orjson.loads(ok(data_dir, "keys", "create", "--user", USER, "--json"))
    port = free_port()
    running = Served(data_dir, port, key, Served.start(data_dir, port))
    yield running
    running.process.stop()


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            yield launched
        finally:
            await launched.close()


class Problems:
    """What the page must never show: an uncaught error, or a CSP refusal."""

    def __init__(self, page: Page) -> None:
        self.seen: list[str] = []
        page.on("pageerror", lambda error: self.seen.append(f"uncaught: {error}"))
        page.on("console", self._console)

    def _console(self, message: ConsoleMessage) -> None:
        if "Content Security Policy" in message.text:
            self.seen.append(f"console: {message.text}")


async def until(page: Page, script: str, within: float = 30, arg: Any = None) -> Any:
    """Polls ``script`` in the page until it is truthy; its value."""
    deadline = time.monotonic() + within
    while True:
        value = await page.evaluate(script, arg)
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {within} s: {script}")
        await asyncio.sleep(0.1)


async def status(page: Page) -> dict[str, str]:
    found: dict[str, str] = await page.evaluate(
        "() => ({...document.querySelector('#status').dataset,"
        " text: document.querySelector('#status').textContent.replace(/\\s+/g, ' ').trim()})"
    )
    return found


async def sign_in_with_key(page: Page, served: Served) -> None:
    await page.goto(f"{served.base_url}/dashboard")
    await page.fill("#key-form input[name=keyId]", served.key["accessKeyID"])
    await page.fill("#key-form input[name=secret]", served.key["secretAccessKey"])
    await page.click("#key-form button[type=submit]")
    await page.wait_for_selector("#board:not([hidden])", timeout=30_000)


async def watch(page: Page, exchange: str, symbol: str, conflation: str) -> None:
    await page.select_option("#exchange", exchange)
    await until(
        page,
        "(symbol) => [...document.querySelectorAll('#product option')]"
        ".some((option) => option.value === symbol)",
        arg=symbol,
    )
    await page.select_option("#product", symbol)
    await page.fill("#levels", str(LEVELS))
    await page.select_option("#conflation", conflation)
    await page.click("#add")


async def agrees_with_own_book(page: Page, served: Served, symbol: str) -> None:
    """The panel's ladder, sampled while it changes, is each time the book a client of
    this test kept from its own subscription at the same Level2 message."""
    async with httpx.AsyncClient() as http:
        answer = await http.post(
            f"{served.base_url}/v1/auth/authenticate",
            json={"type": "Key", "payload": served.key},
            timeout=30,
        )
    answer.raise_for_status()
    client = await StreamClient.open(served.stream_url, answer.json()["accessToken"])
    #: Every state of the test's book, by the caspianTimestamp of the message that
    #: made it (two messages may share one).
    states: dict[str, list[frozenset[Level]]] = {}

    async def follow() -> None:
        request_id = await client.send(
            "Subscribe",
            {"symbol": symbol, "type": "Level2", "numberOfLevels": LEVELS, "conflation": "None"},
        )
        book: dict[tuple[str, float], float] = {}
        whole = False
        while True:
            message = await client.recv(30)
            if message.get("requestId") != request_id:
                continue
            if message["type"] == "SubscribeResponse":
                assert message["payload"]["code"] == 200, message
            # The first non-empty Level2 is the whole top-N; the test's book starts there.
            if message["type"] != "Level2" or not (whole or message["payload"]):
                continue
            whole = True
            apply_level2(book, message)
            state = frozenset((side, price, size) for (side, price), size in book.items())
            states.setdefault(message["caspianTimestamp"], []).append(state)

    following = asyncio.create_task(follow())
    try:
        matched: dict[str, frozenset[Level]] = {}
        deadline = time.monotonic() + 60
        while len(matched) < 4 or len({prices(state) for state in matched.values()}) < 2:
            if following.done():
                following.result()
            assert time.monotonic() < deadline, f"{len(matched)} samples agreed: {matched}"
            shown = await page.evaluate(READ_LADDER, symbol)
            if shown and shown["whole"] and shown["timestamp"] in states:
                ladder = frozenset((side, price, size) for side, price, size in shown["rows"])
                assert ladder in states[shown["timestamp"]], (shown, states[shown["timestamp"]])
                assert {side for side, _, _ in ladder} == {"bid", "ask"}
                assert len(ladder) == len(shown["rows"])
                matched[shown["timestamp"]] = ladder
            await asyncio.sleep(0.15)
    finally:
        following.cancel()
        await client.close()


async def subscriptions(served: Served) -> dict[str, int]:
    """Active stream subscriptions on the service by type, from its metrics."""
    async with httpx.AsyncClient() as http:
        answer = await http.get(f"{served.base_url}/metrics", timeout=30)
    answer.raise_for_status()
    return {
        sample.labels["type"]: int(sample.value)
        for family in text_string_to_metric_families(answer.text)
        if family.name == "caspian_stream_subscriptions"
        for sample in family.samples
    }


def prices(state: frozenset[Level]) -> frozenset[tuple[str, float]]:
    return frozenset((side, price) for side, price, _ in state)


def artifact(name: str, tmp_path: Path) -> Path:
    folder = Path(os.environ.get("CASPIAN_TEST_ARTIFACTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder / name


async def test_linked_from_the_index_and_served_under_its_own_policy(served: Served) -> None:
    async with httpx.AsyncClient(base_url=served.base_url, timeout=30) as http:
        index = (await http.get("/")).json()
        page = await http.get("/dashboard/")
        # Relative: behind a TLS-terminating proxy it keeps the client's scheme and host.
        bare = await http.get("/dashboard")
        module = await http.get("/dashboard/app.js")
        api = await http.get("/v1/reference/exchanges")
        missing = await http.get("/dashboard/nothing.js")
    assert index["dashboard"] == f"{served.base_url}/dashboard/"
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert (bare.status_code, bare.headers["location"]) == (308, "dashboard/")
    assert module.headers["content-type"].startswith("text/javascript")
    policy = page.headers["content-security-policy"]
    assert module.headers["content-security-policy"] == policy
    for directive in ("default-src 'none'", "script-src 'self'", "connect-src 'self'"):
        assert directive in policy
    assert "frame-ancestors 'none'" in policy and "unsafe" not in policy
    assert page.headers["x-content-type-options"] == "nosniff"
    # The API's own answers are left as they were.
    assert "content-security-policy" not in api.headers
    assert missing.status_code == 404 and missing.json()["code"] == 404


async def test_book_logic_in_the_browser(served: Served, browser: Browser) -> None:
    """The page's pure logic (book.js), run in the browser as the page runs it."""
    page = await browser.new_page()
    problems = Problems(page)
    await page.goto(f"{served.base_url}/dashboard/")
    result = await page.evaluate(
        """async () => {
          const { Book, backoffDelay, cumulative, parseTimestamp, refreshDelay, uuid4 } =
            await import("./book.js");
          const book = new Book();
          const level = (side, price, size) => ({ side, price, size });
          const steps = [];
          const note = () => steps.push({
            whole: book.whole, bids: book.sortedBids(), asks: book.sortedAsks(),
            depth: book.depthStream, ts: book.caspianTimestamp });
          book.apply({ depthStream: "connected", payload: [] });
          note();
          book.apply({ depthStream: "connected", caspianTimestamp: "t1", payload: [
            level("bid", 10, 1), level("bid", 11, 2), level("ask", 12, 3), level("ask", 13, 4)] });
          note();
          book.apply({ depthStream: "connected", caspianTimestamp: "t2", payload: [
            level("bid", 11, 0), level("bid", 9, 5), level("ask", 12, 0.5), level("odd", 1, 1)] });
          note();
          const statusOnly = book.apply({ depthStream: "disconnected", payload: [] });
          const unchanged = book.apply({ depthStream: "disconnected", payload: [] });
          note();
          book.restart();
          book.apply({ depthStream: "connected", caspianTimestamp: "t3", payload: [
            level("bid", 20, 1), level("ask", 21, 1)] });
          note();
          return {
            steps, statusOnly, unchanged,
            cumulative: cumulative([[10, 1], [9, 2.5]]),
            parsed: parseTimestamp("2018-06-08T08:13:44.653123"),
            unparsed: parseTimestamp("2018-06-08 08:13:44"),
            backoff: [0, 1, 5, 40].map((n) => [backoffDelay(n, () => 0), backoffDelay(n, () => 1)]),
            refresh: [refreshDelay(100000, 0), refreshDelay(500, 0)],
            ids: [uuid4(), uuid4()],
          };
        }"""
    )
    steps = result["steps"]
    # Nothing before the first non-empty payload, which is taken whole.
    assert steps[0] == {"whole": False, "bids": [], "asks": [], "depth": "connected", "ts": None}
    assert steps[1]["bids"] == [[11, 2], [10, 1]] and steps[1]["asks"] == [[12, 3], [13, 4]]
    # Changes: size 0 removes, a new level enters, an unknown side is left out.
    assert steps[2]["bids"] == [[10, 1], [9, 5]] and steps[2]["asks"] == [[12, 0.5], [13, 4]]
    assert steps[2]["ts"] == "t2"
    assert result["statusOnly"] is True and result["unchanged"] is False
    assert steps[3]["depth"] == "disconnected" and steps[3]["bids"] == steps[2]["bids"]
    # After a restart the old levels are gone: the next whole top-N alone is the book.
    assert steps[4]["bids"] == [[20, 1]] and steps[4]["asks"] == [[21, 1]]
    assert result["cumulative"] == [[10, 1], [9, 3.5]]
    assert result["parsed"] == pytest.approx(1528445624653.123, abs=1e-3)
    assert math.isnan(result["unparsed"])
    assert result["backoff"] == [[250, 500], [500, 1000], [8000, 16000], [15000, 30000]]
    assert result["refresh"] == [80000, 1000]
    first, second = result["ids"]
    assert first != second
    assert all(len(uid) == 36 and uid[14] == "4" and uid[19] in "89ab" for uid in (first, second))
    assert problems.seen == []


async def test_sign_in_with_a_user_and_a_refused_password(served: Served, browser: Browser) -> None:
    page = await browser.new_page()
    problems = Problems(page)
    await page.goto(f"{served.base_url}/dashboard/")
    await page.check("input[name=kind][value=Credential]")
    await page.fill("#user-form input[name=user]", USER)
    await page.fill("#user-form input[name=password]", "wrong")
    await page.click("#user-form button[type=submit]")
    refused = await until(page, "() => document.querySelector('#sign-in-error').textContent")
    assert refused == "Sign-in failed: 401 Incorrect credentials or key"
    assert await page.is_hidden("#board")
    await page.fill("#user-form input[name=password]", PASSWORD)
    await page.click("#user-form button[type=submit]")
    await page.wait_for_selector("#board:not([hidden])", timeout=30_000)
    exchanges = await until(
        page, "() => [...document.querySelectorAll('#exchange option')].map((o) => o.value)"
    )
    assert "GEMINI" in exchanges and len(exchanges) == 22
    assert await until(page, "() => document.querySelectorAll('#product option').length")
    assert problems.seen == []


@pytest.mark.timeout(300)
async def test_ladders_follow_the_stream_through_token_expiry_and_a_restart(
    served: Served, browser: Browser, tmp_path: Path
) -> None:
    page = await browser.new_page(viewport={"width": 1300, "height": 1000})
    problems = Problems(page)

    signed_in = time.monotonic()
    await sign_in_with_key(page, served)
    await watch(page, "GEMINI", SYMBOL, "None")
    await agrees_with_own_book(page, served, SYMBOL)

    # Several products at once, each in its panel, on the one connection.
    await watch(page, "GEMINI", OTHER, "1s")
    shown = await until(
        page,
        "([a, b]) => [a, b].every((symbol) => [...document.querySelectorAll('.panel')]"
        ".some((p) => p.dataset.symbol === symbol && p.dataset.whole === 'true'))",
        arg=[SYMBOL, OTHER],
    )
    assert shown
    # Level1 of both, live.
    quotes = await until(
        page,
        "() => { const bids = [...document.querySelectorAll('.panel .level1 .bid')]"
        ".map((dd) => dd.textContent); return bids.every((t) => t.includes('×')) && bids; }",
    )
    assert len(quotes) == 2

    # The token is refreshed on the open connection, which outlives the first token.
    await until(page, "() => Number(document.querySelector('#status').dataset.refreshes) >= 1")
    await asyncio.sleep(max(0.0, signed_in + TOKEN_TTL_S + 3 - time.monotonic()))
    now = await status(page)
    assert now["state"] == "open" and now["reconnects"] == "0", now
    assert "refreshed" in now["text"]
    # Nothing of it is kept in the browser's storage.
    stored = await page.evaluate(
        "() => [localStorage.length, sessionStorage.length, document.cookie]"
    )
    assert stored == [0, 0, ""]

    # The service goes away and comes back on the same port: the page reconnects with
    # backoff, resubscribes, and each book starts again from a whole top-N.
    served.restart()
    await until(page, "() => document.querySelector('#status').dataset.reconnects === '1'", 60)
    assert (await status(page))["state"] == "open"
    await agrees_with_own_book(page, served, SYMBOL)
    await until(
        page,
        "(symbol) => [...document.querySelectorAll('.panel')]"
        ".some((p) => p.dataset.symbol === symbol && p.dataset.whole === 'true')",
        arg=OTHER,
    )

    screenshot = artifact("dashboard.png", tmp_path)
    await page.screenshot(path=str(screenshot), full_page=True)
    print(f"dashboard screenshot: {screenshot}")

    # Closing a panel unsubscribes both its streams; the other panel's stay.
    assert await subscriptions(served) == {"Level1": 2, "Level2": 2}
    await page.click(".panel:first-child .close")
    remaining = await page.evaluate(
        "() => [...document.querySelectorAll('.panel')].map((p) => p.dataset.symbol)"
    )
    assert remaining == [OTHER]
    deadline = time.monotonic() + 10
    while await subscriptions(served) != {"Level1": 1, "Level2": 1}:
        assert time.monotonic() < deadline, await subscriptions(served)
        await asyncio.sleep(0.1)
    assert problems.seen == []


async def test_a_session_ended_on_the_server_logs_in_again_and_resubscribes(
    served: Served, browser: Browser
) -> None:
    """3003 leaves the page's token refused (3001 from then on): it logs in anew with
    the key it holds, reconnects, and the book starts again whole."""
    page = await browser.new_page()
    problems = Problems(page)
    await sign_in_with_key(page, served)
    await watch(page, "GEMINI", SYMBOL, "250ms")
    await until(page, "() => document.querySelector('.panel').dataset.whole === 'true'")

    def sessions() -> list[dict[str, Any]]:
        rows = orjson.loads(ok(served.data_dir, "sessions", "list", "--json"))
        return [row for row in rows if row["accessKeyID"] == served.key["accessKeyID"]]

    deadline = time.monotonic() + 30
    while len(listed := await asyncio.to_thread(sessions)) != 1:
        assert time.monotonic() < deadline, listed
        await asyncio.sleep(0.5)
    await asyncio.to_thread(ok, served.data_dir, "sessions", "end", listed[0]["id"])

    closed = await until(
        page,
        "() => { const text = document.querySelector('#connection').textContent;"
        " return text.startsWith('closed 3003') && text; }",
    )
    assert "reconnecting in" in closed
    await until(page, "() => document.querySelector('#status').dataset.reconnects === '1'")
    assert (await status(page))["state"] == "open"
    await until(page, "() => document.querySelector('.panel').dataset.whole === 'true'")
    # A new session, not the ended one.
    while [row["id"] for row in await asyncio.to_thread(sessions)] in ([], [listed[0]["id"]]):
        assert time.monotonic() < deadline + 30
        await asyncio.sleep(0.5)
    assert len(await asyncio.to_thread(sessions)) == 1
    assert problems.seen == []
