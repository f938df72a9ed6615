"""Refreshing the catalog from the exchanges' market lists: new listings added, delisted
products retired (removed: REST 404, Subscribe 202), expired ones kept, a failing exchange
left as it was. The unit part fetches through an injected function; the end-to-end part
through ccxt, from a local server speaking Kraken's markets endpoints."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path
from typing import Any

import ccxt.async_support as ccxt_async
import httpx
import pytest

from caspian.catalog.builtin import builtin_products
from caspian.catalog.exchanges import CCXT_IDS
from caspian.catalog.refresh import REFRESHABLE, Refreshed, apply_markets, refresh_exchanges
from caspian.service import seed_reference_data
from caspian.store import Store
from caspian.timefmt import now_us, parse_us
from tests.support.cli import caspian
from tests.support.client import StreamClient
from tests.support.kraken import RecordedExchange, recorded_kraken
from tests.support.service import start_service

BUILTIN = builtin_products()
KRAKEN_BUILTIN = {p.caspian_code for p in BUILTIN if p.exchange == "KRAKEN"}
BINANCE_FUTURE = "FUT-BTC/USDT-2023DEC29=BINANCE"
BINANCE_OPTION = "OPT-ETH/USDT-2023DEC29-800-C=BINANCE"


def spot(symbol: str, **fields: Any) -> dict[str, Any]:
    """A ccxt spot market."""
    base, quote = symbol.split("/")
    market: dict[str, Any] = {
        "id": f"{base}{quote}",
        "symbol": symbol,
        "base": base,
        "quote": quote,
        "type": "spot",
        "active": True,
        "precision": {"amount": 0.001, "price": 0.01},
    }
    return market | fields


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    store = Store(f"sqlite+aiosqlite:///{tmp_path / 'caspian.db'}")
    await store.upgrade()
    await seed_reference_data(store)
    yield store
    await store.close()


async def codes(store: Store, exchange: str) -> set[str]:
    return {record.spec.caspian_code for record in await store.products([exchange])}


async def test_new_listings_are_added_and_delisted_products_retired(store: Store) -> None:
    markets = {"BTC/USD": spot("BTC/USD"), "SOL/USD": spot("SOL/USD")}
    before = await store.product("FX-BTC/USD=KRAKEN")
    result = await apply_markets(store, "KRAKEN", markets, now_us())
    assert result.created == 1 and result.updated == 1
    assert set(result.retired) == KRAKEN_BUILTIN - {"FX-BTC/USD=KRAKEN"}
    assert await codes(store, "KRAKEN") == {"FX-BTC/USD=KRAKEN", "FX-SOL/USD=KRAKEN"}
    after = await store.product("FX-BTC/USD=KRAKEN")
    assert before is not None and after is not None
    assert after.created_time == before.created_time
    assert await store.product("FX-ETH/USDT=KRAKEN") is None
    # Other exchanges are untouched.
    assert await codes(store, "GEMINI") == {
        p.caspian_code for p in BUILTIN if p.exchange == "GEMINI"
    }


async def test_expired_products_stay_when_the_exchange_drops_them(store: Store) -> None:
    markets = {"BTC/USDT": spot("BTC/USDT")}
    result = await apply_markets(store, "BINANCE", markets, now_us())
    assert BINANCE_FUTURE not in result.retired and BINANCE_OPTION not in result.retired
    assert await codes(store, "BINANCE") == {"FX-BTC/USDT=BINANCE", BINANCE_FUTURE, BINANCE_OPTION}
    future = await store.product(BINANCE_FUTURE)
    assert future is not None and future.spec.expire_date == "2023-12-29T08:00:00.000000"
    assert future.spec.underlying_caspian_code == "FX-BTC/USDT=BINANCE"
    # The option's pair (and perpetual) were retired: it names no underlying any more.
    option = await store.product(BINANCE_OPTION)
    assert option is not None and option.spec.underlying_caspian_code is None


async def test_a_product_dropped_before_its_expiry_is_retired(store: Store) -> None:
    # Judged against the time given: in mid-2023 the December future was delisted early.
    result = await apply_markets(
        store, "BINANCE", {"BTC/USDT": spot("BTC/USDT")}, parse_us("2023-06-01T00:00:00")
    )
    assert {BINANCE_FUTURE, BINANCE_OPTION} <= set(result.retired)
    assert await codes(store, "BINANCE") == {"FX-BTC/USDT=BINANCE"}


async def test_a_failing_or_empty_exchange_is_left_as_it_was(store: Store) -> None:
    answers: dict[str, Mapping[str, Any] | ValueError] = {
        "KRAKEN": ValueError("could not load KRAKEN markets through ccxt: timed out"),
        "GEMINI": {"BTC/XYZ": {"type": "spot"}},
        "BITSTAMP": {"BTC/USD": spot("BTC/USD")},
    }
    asked: list[str] = []

    async def fetch(code: str) -> Mapping[str, Any]:
        asked.append(code)
        answer = answers[code]
        if isinstance(answer, ValueError):
            raise answer
        return answer

    gemini = await codes(store, "GEMINI")
    results = await refresh_exchanges(store, ["KRAKEN", "GEMINI", "BITSTAMP"], fetch, now_us())
    assert sorted(asked) == ["BITSTAMP", "GEMINI", "KRAKEN"]
    assert results["KRAKEN"] == "could not load KRAKEN markets through ccxt: timed out"
    assert results["GEMINI"] == "no product could be read for GEMINI"
    bitstamp = results["BITSTAMP"]
    assert isinstance(bitstamp, Refreshed) and bitstamp.created + bitstamp.updated == 1
    assert await codes(store, "KRAKEN") == KRAKEN_BUILTIN
    assert await codes(store, "GEMINI") == gemini
    assert await codes(store, "BITSTAMP") == {"FX-BTC/USD=BITSTAMP"}


def test_every_exchange_ccxt_reaches_is_refreshable() -> None:
    assert set(REFRESHABLE) == set(CCXT_IDS)
    assert "KRAKEN" in REFRESHABLE and "BTCC" not in REFRESHABLE


# --- end to end, through ccxt and a local server ---------------------------------


def every_exchange_at(url: str) -> dict[str, dict[str, Any]]:
    """``CASPIAN_LIVE_URLS`` sending every refreshable exchange's REST APIs to ``url``."""
    overrides: dict[str, dict[str, Any]] = {}
    for code in REFRESHABLE:
        exchange = getattr(ccxt_async, CCXT_IDS[code])()
        table = exchange.urls["api"]
        overrides[code] = {"api": {name: url for name in table} if isinstance(table, dict) else url}
        asyncio.run(exchange.close())
    return overrides


@pytest.fixture
def kraken() -> Iterator[RecordedExchange]:
    with recorded_kraken() as exchange:
        yield exchange


def eventually(check: Any, within: float = 30) -> None:
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("the catalog was not refreshed in time")
        time.sleep(0.1)


async def test_a_running_service_refreshes_its_catalog(
    tmp_path: Path, kraken: RecordedExchange, monkeypatch: pytest.MonkeyPatch
) -> None:
    overrides = await asyncio.to_thread(every_exchange_at, kraken.url)
    monkeypatch.setenv("CASPIAN_LIVE_URLS", json.dumps(overrides))
    running = start_service(tmp_path, catalog_refresh_s=0.3)
    try:
        token = await asyncio.to_thread(running.token)
        headers = {"Authorization": token}

        def status(code: str) -> int:
            url = f"{running.base_url}/v1/reference/products/{code}"
            return httpx.get(url, headers=headers).status_code

        async def wait_for(code: str, expected: int) -> None:
            await asyncio.to_thread(eventually, lambda: status(code) == expected)

        # Kraken now lists ETH/EUR, and no longer ETH/USDT.
        await wait_for("FX-ETH/EUR=KRAKEN", 200)
        await wait_for("FX-ETH/USDT=KRAKEN", 404)
        assert status("FX-BTC/USD=KRAKEN") == 200
        # Exchanges that could not be reached keep their products.
        assert status("FX-ETH/USD=GEMINI") == 200

        c = await StreamClient.open(running.stream_url, token)
        await c.whole_book("FX-ETH/EUR=KRAKEN")
        request_id = await c.send("Subscribe", {"symbol": "FX-ETH/USDT=KRAKEN", "type": "Level1"})
        assert (await c.response(request_id))["payload"]["code"] == 202

        # Kraken delists ETH/EUR while the service runs: retired without a restart.
        pairs = json.loads(kraken.answers["/0/public/AssetPairs"][1])
        del pairs["result"]["XETHZEUR"]
        kraken.answers["/0/public/AssetPairs"] = (200, json.dumps(pairs).encode())
        await wait_for("FX-ETH/EUR=KRAKEN", 404)
        # The open subscription is told its market is gone.
        await c.wait_for(lambda m: m["type"] == "Level2" and m["depthStream"] == "disconnected")
        request_id = await c.send("Subscribe", {"symbol": "FX-ETH/EUR=KRAKEN", "type": "Level1"})
        assert (await c.response(request_id))["payload"]["code"] == 202
        await c.close()
    finally:
        running.stop()


def test_import_refreshes_every_exchange_at_once(tmp_path: Path, kraken: RecordedExchange) -> None:
    result = caspian(tmp_path, "products", "import", "--ccxt", "all", "--ccxt-url", kraken.url)
    # Only Kraken answers here: it is refreshed, every other exchange reported, status 1.
    assert result.returncode == 1, result.stdout
    assert "Traceback" not in result.stderr
    assert result.stdout.startswith("KRAKEN: 4 products created, 0 updated, 0 retired"), (
        result.stdout
    )
    failed = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert sorted(line.split(":")[1].strip() for line in failed) == sorted(
        code for code in REFRESHABLE if code != "KRAKEN"
    )

    several = caspian(
        tmp_path, "products", "import", "--ccxt", "kraken, BITSTAMP", "--ccxt-url", kraken.url
    )
    assert several.returncode == 1
    assert several.stdout.startswith("KRAKEN: 0 products created, 4 updated, 0 retired")
    assert "error: BITSTAMP: could not load BITSTAMP markets" in several.stderr


def test_import_names_what_it_cannot_refresh(tmp_path: Path) -> None:
    for value, expected in (
        ("all,KRAKEN", "unknown exchange 'all'"),
        ("KRAKEN,BTCC", "ccxt does not support BTCC"),
        (" , ", "name the exchange with --ccxt CODE, or --ccxt all"),
    ):
        result = caspian(tmp_path, "products", "import", "--ccxt", value)
        assert result.returncode == 1 and result.stderr.strip() == f"error: {expected}", value
    # Each was refused before the store was touched.
    assert not (tmp_path / "caspian.db").exists()
