"""Stores seeded while ITBIT's products were itBit's (XBTUSD) get Paxos's markets at start.

Products are seeded only into an exchange that has none, so without the
repair such a store would keep ids that Paxos's feeds, which serve ITBIT,
do not know, and ``live:ITBIT`` would never stream.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from caspian.catalog.builtin import builtin_products
from caspian.catalog.ccxt_markets import products_from_ccxt
from caspian.catalog.exchanges import EXCHANGES
from caspian.service import seed_reference_data
from caspian.store import Store
from tests.support.mock_paxos import PaxosMock
from tests.test_live import ASKS, BIDS, live_service


def _itbit_market(base: str, quote: str, amount: float, price: float) -> dict[str, Any]:
    base_id = "XBT" if base == "BTC" else base
    return {
        "id": base_id + quote,
        "symbol": f"{base}/{quote}",
        "base": base,
        "quote": quote,
        "baseId": base_id,
        "quoteId": quote,
        "type": "spot",
        "spot": True,
        "active": True,
        "precision": {"amount": amount, "price": price},
    }


#: ITBIT's built-in markets before Paxos served it: itBit's ids and steps.
ITBIT_MARKETS = {
    "BTC/USD": _itbit_market("BTC", "USD", 0.0001, 0.25),
    "BTC/EUR": _itbit_market("BTC", "EUR", 0.0001, 0.25),
    "BTC/SGD": _itbit_market("BTC", "SGD", 0.0001, 0.25),
    "ETH/USD": _itbit_market("ETH", "USD", 0.001, 0.01),
}


async def _old_store(data_dir: Path) -> Store:
    """A store as a service seeded it before the change: itBit's products under ITBIT."""
    store = Store(f"sqlite+aiosqlite:///{(data_dir / 'caspian.db').resolve()}")
    await store.upgrade()
    await store.seed_exchanges(EXCHANGES)
    await store.upsert_products(products_from_ccxt("ITBIT", ITBIT_MARKETS))
    return store


async def test_itbits_products_are_replaced_by_paxos_markets(tmp_path: Path) -> None:
    store = await _old_store(tmp_path)
    try:
        old = {record.spec.caspian_code: record for record in await store.products(["ITBIT"])}
        assert old["FX-BTC/USD=ITBIT"].spec.native_code == "XBTUSD"
        await seed_reference_data(store)
        now = {record.spec.caspian_code: record for record in await store.products(["ITBIT"])}
        expected = {p.caspian_code: p for p in builtin_products() if p.exchange == "ITBIT"}
        assert {code: record.spec for code, record in now.items()} == expected
        assert now["FX-BTC/USD=ITBIT"].spec.native_code == "BTCUSD"
        # Paxos does not list it: retired.
        assert "FX-BTC/SGD=ITBIT" not in now
        # The same products, updated: their creation times are kept.
        assert now["FX-ETH/USD=ITBIT"].created_time == old["FX-ETH/USD=ITBIT"].created_time
        assert now["FX-ETH/USD=ITBIT"].spec.lot_size != old["FX-ETH/USD=ITBIT"].spec.lot_size
        # Once repaired, a start leaves ITBIT alone.
        await seed_reference_data(store)
        again = {record.spec.caspian_code: record for record in await store.products(["ITBIT"])}
        assert again == now
    finally:
        await store.close()


async def test_live_itbit_streams_from_a_store_seeded_with_itbits_ids(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    await (await _old_store(tmp_path)).close()
    async with (
        PaxosMock("BTCUSD") as mock,
        live_service(tmp_path, monkeypatch, "ITBIT", {"api": {"ws": mock.ws_url}}) as c,
    ):
        mock.set_book(BIDS, ASKS)
        l1 = await c.subscribe("FX-BTC/USD=ITBIT", "Level1", conflation="None")
        quote = await c.wait_for(
            lambda m: m["requestId"] == l1 and m.get("payload", {}).get("bid") is not None
        )
        assert (quote["payload"]["bid"], quote["payload"]["ask"]) == (BIDS[0][0], ASKS[0][0])
