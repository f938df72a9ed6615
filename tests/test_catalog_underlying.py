"""Every ``underlyingCaspianCode`` names a product of the catalog, or is absent."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from caspian.catalog.builtin import builtin_products
from caspian.catalog.ccxt_markets import products_from_ccxt, repair_underlyings
from caspian.service import seed_reference_data
from caspian.store import Store


def market(symbol: str, kind: str, **fields: Any) -> dict[str, Any]:
    pair, _, rest = symbol.partition(":")
    base, quote = pair.split("/")
    values: dict[str, Any] = {
        "id": symbol,
        "symbol": symbol,
        "base": base,
        "quote": quote,
        "settle": rest.partition("-")[0] or None,
        "type": kind,
        "active": True,
        "contractSize": 1,
        "precision": {"amount": 0.1, "price": 0.5},
    }
    return values | fields


PERP = market("BTC/USD:BTC", "swap")
SPOT = market("BTC/USD", "spot")
OPTION = market(
    "BTC/USD:BTC-300125-60000-C",
    "option",
    expiry=1_895_558_400_000,
    strike=60_000,
    optionType="call",
)
FUTURE = market("BTC/USD:BTC-300125", "future", expiry=1_895_558_400_000)


def test_every_underlying_of_the_builtin_catalog_is_a_product_of_it() -> None:
    products = builtin_products()
    codes = {product.caspian_code for product in products}
    dangling = [
        (product.caspian_code, product.underlying_caspian_code)
        for product in products
        if product.underlying_caspian_code is not None
        and product.underlying_caspian_code not in codes
    ]
    assert dangling == []
    for product in products:
        pair = f"FX-{product.ccy_from}/{product.ccy_to}={product.exchange}"
        if product.type != "FX" and pair in codes:
            assert product.underlying_caspian_code == pair, product
    # Most derivatives have one: the rule is not "always absent".
    derivatives = [product for product in products if product.type != "FX"]
    named = [product for product in derivatives if product.underlying_caspian_code]
    assert len(named) > len(derivatives) * 3 // 4


def test_the_spot_pair_comes_first() -> None:
    found = {
        p.caspian_code: p.underlying_caspian_code
        for p in products_from_ccxt("DERIBIT", {"a": SPOT, "b": PERP, "c": OPTION, "d": FUTURE})
    }
    assert found == {
        "FX-BTC/USD=DERIBIT": None,
        "PERP-BTC/USD=DERIBIT": "FX-BTC/USD=DERIBIT",
        "OPT-BTC/USD-2030JAN25-60000-C=DERIBIT": "FX-BTC/USD=DERIBIT",
        "FUT-BTC/USD-2030JAN25=DERIBIT": "FX-BTC/USD=DERIBIT",
    }


def test_without_a_spot_pair_dated_products_follow_the_perpetual() -> None:
    found = {
        p.caspian_code: p.underlying_caspian_code
        for p in products_from_ccxt("DERIBIT", {"b": PERP, "c": OPTION, "d": FUTURE})
    }
    assert found == {
        "PERP-BTC/USD=DERIBIT": None,
        "OPT-BTC/USD-2030JAN25-60000-C=DERIBIT": "PERP-BTC/USD=DERIBIT",
        "FUT-BTC/USD-2030JAN25=DERIBIT": "PERP-BTC/USD=DERIBIT",
    }


def test_with_neither_it_is_absent() -> None:
    [option] = products_from_ccxt("DERIBIT", {"c": OPTION})
    assert option.underlying_caspian_code is None
    assert "underlyingCaspianCode" not in option.api_fields()


def test_repair_points_dangling_underlyings_at_what_is_listed() -> None:
    perp, option, future = products_from_ccxt("DERIBIT", {"b": PERP, "c": OPTION, "d": FUTURE})
    # As catalogs made before the rule had them: the spot pair, listed or not.
    old = [replace(p, underlying_caspian_code="FX-BTC/USD=DERIBIT") for p in (perp, option)]
    assert repair_underlyings([*old, future]) == [perp, option]
    assert repair_underlyings([perp, option, future]) == []


async def test_a_store_seeded_before_the_rule_is_repaired(tmp_path: Path) -> None:
    store = Store(f"sqlite+aiosqlite:///{tmp_path / 'caspian.db'}")
    try:
        await store.upgrade()
        await seed_reference_data(store)
        code = "PERP-BTC/USD=BITMEX"
        record = await store.product(code)
        assert record is not None and record.spec.underlying_caspian_code is None
        await store.upsert_products(
            [replace(record.spec, underlying_caspian_code="FX-BTC/USD=BITMEX")]
        )
        await seed_reference_data(store)
        repaired = await store.product(code)
        assert repaired is not None and repaired.spec.underlying_caspian_code is None
        codes = {record.spec.caspian_code for record in await store.products()}
        assert all(
            record.spec.underlying_caspian_code in codes | {None}
            for record in await store.products()
        )
    finally:
        await store.close()
