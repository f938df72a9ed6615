"""The reference-data catalog: ccxt mapping, the built-in products and the in-memory index."""

from __future__ import annotations

import json
import re
from collections import Counter
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from caspian.catalog.builtin import builtin_markets, builtin_products, load_ccxt_file
from caspian.catalog.ccxt_markets import (
    PrecisionMode,
    detect_precision_mode,
    products_from_ccxt,
)
from caspian.catalog.currencies import currency_name, normalize_currency
from caspian.catalog.exchanges import CCXT_FILES, CCXT_IDS, EXCHANGES
from caspian.catalog.index import Catalog
from caspian.catalog.product import PRODUCT_TYPES, ProductSpec
from caspian.catalog.symbols import parse_caspian_code
from caspian.codes import SymbolType

CODES = [code for _, code in EXCHANGES]
_TIMESTAMP = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}")
_PLAIN = re.compile(r"\d+(\.\d*[1-9])?")


@pytest.fixture(scope="module")
def products() -> list[ProductSpec]:
    return builtin_products()


@pytest.fixture(scope="module")
def by_code(products: list[ProductSpec]) -> dict[str, ProductSpec]:
    return {product.caspian_code: product for product in products}


def market(**fields: Any) -> dict[str, Any]:
    """A minimal ccxt spot market, with ``fields`` replacing its defaults."""
    base: dict[str, Any] = {
        "id": "BTCUSD",
        "symbol": "BTC/USD",
        "base": "BTC",
        "quote": "USD",
        "type": "spot",
        "active": True,
        "precision": {"amount": 0.001, "price": 0.5},
    }
    return base | fields


def parse_tick_rule(rule: str) -> list[tuple[Decimal | None, Decimal | None, Decimal]]:
    ranges = []
    for part in rule.split(";"):
        low, high, tick = part.split(",")
        ranges.append(
            (Decimal(low) if low else None, Decimal(high) if high else None, Decimal(tick))
        )
    return ranges


# --- exchanges and currencies -----------------------------------------------


def test_the_22_exchanges_in_the_contracts_order() -> None:
    assert len(EXCHANGES) == 22
    assert CODES[:3] == ["BINANCE", "BITFINEX", "BITFLYER"]
    assert CODES[-1] == "POLONIEX"
    assert ("Coinbase Pro (GDAX)", "GDAX") in EXCHANGES
    assert ("OKEx", "OKEX") in EXCHANGES
    assert len(set(CODES)) == 22


def test_ccxt_ids_are_the_exchanges_with_a_fixture() -> None:
    assert set(CCXT_FILES) == set(CODES) - {"BTCC", "ITBIT", "KORBIT", "LIQUID"}
    assert set(CCXT_IDS) == set(CCXT_FILES) - {"BITMEX", "BITTREX"}
    assert CCXT_IDS["HUOBI"] == "htx" and CCXT_FILES["HUOBI"] == "huobi"
    assert CCXT_IDS["GDAX"] == "coinbaseexchange"
    assert CCXT_IDS["OKEX"] == "okx"


def test_currencies() -> None:
    assert currency_name("ETH") == "Ethereum"
    assert currency_name("USD") == "US Dollar"
    assert currency_name("JPY") == "Japanese Yen"
    assert currency_name("USDT") == "Tether"
    assert currency_name("XBT") == "Bitcoin"
    assert normalize_currency("xbt") == "BTC"
    assert currency_name("NOSUCHCOIN") == "NOSUCHCOIN"


def test_every_builtin_currency_has_a_name(products: list[ProductSpec]) -> None:
    currencies = {product.ccy_from for product in products}
    currencies |= {product.ccy_to for product in products}
    for markets in builtin_markets().values():
        currencies |= {m["settle"] for m in markets.values() if m.get("settle")}
    # Some currencies are called by their code; any other name equal to the code is the fallback.
    named_as_code = {"EOS", "NEO", "QASH"}
    unnamed = [c for c in sorted(currencies - named_as_code) if currency_name(c) == c]
    assert unnamed == []


# --- the built-in products ---------------------------------------------------


def test_every_exchange_has_products(products: list[ProductSpec]) -> None:
    counts = Counter(product.exchange for product in products)
    assert sorted(counts) == sorted(CODES)
    assert all(counts[code] >= 1 for code in CODES)


def test_every_product_type_is_present(products: list[ProductSpec]) -> None:
    assert {product.type for product in products} == set(PRODUCT_TYPES)


def test_codes_are_unique(products: list[ProductSpec]) -> None:
    for codes in (
        [p.caspian_code for p in products],
        [p.pseudo_code for p in products],
        [f"{p.tora_code}.{p.tora_market}" for p in products],
    ):
        assert [code for code, n in Counter(codes).items() if n > 1] == []
    assert len(Catalog(products)) == len(products)


def test_every_product_is_consistent(products: list[ProductSpec]) -> None:
    for p in products:
        parts = parse_caspian_code(p.caspian_code)
        assert (parts.type, parts.base, parts.quote, parts.exchange) == (
            p.type,
            p.ccy_from,
            p.ccy_to,
            p.exchange,
        ), p
        assert (parts.pseudo_code, parts.tora_code, parts.tora_market) == (
            p.pseudo_code,
            p.tora_code,
            p.tora_market,
        ), p
        assert p.native_code and p.native_code_v2, p
        for step in (p.lot_size, p.tick_size):
            assert _PLAIN.fullmatch(step) and Decimal(step) > 0, p
        ranges = parse_tick_rule(p.tick_rule)
        assert ranges[0][0] is None and ranges[-1][1] is None, p
        assert all(ranges[i][1] == ranges[i + 1][0] for i in range(len(ranges) - 1)), p
        assert Decimal(p.tick_size) == min(tick for _, _, tick in ranges), p
        assert p.description.startswith(f"{currency_name(p.ccy_from)} - "), p
        if p.type == "FX":
            assert p.underlying_caspian_code is None and p.multiplier is None, p
        dated = p.type in ("FUT", "OPT")
        assert (p.expire_date is not None) == dated, p
        if p.expire_date is not None:
            assert _TIMESTAMP.fullmatch(p.expire_date), p
            assert p.last_trading_date == p.expire_date, p
        assert (p.strike is not None) == (p.type == "OPT"), p


def test_gemini_eth_usd_is_the_originals_example(by_code: dict[str, ProductSpec]) -> None:
    product = by_code["FX-ETH/USD=GEMINI"]
    assert product.api_fields() == {
        "caspianCode": "FX-ETH/USD=GEMINI",
        "pseudoCode": "ETHUSD=GEMINI",
        "toraCode": "ETH/USD",
        "toraMarket": "GEMINI",
        "nativeCode": "ethusd",
        "nativeCode_v2": "ETH/USD",
        "ccyFrom": "ETH",
        "ccyTo": "USD",
        "description": "Ethereum - US Dollar - FX pair",
        "lotSize": "0.000001",
        "tickRule": ",,0.01",
        "exchange": "GEMINI",
        "type": "FX",
    }
    assert product.tick_size == "0.01"


def test_binance_decimal_places(by_code: dict[str, ProductSpec]) -> None:
    btc = by_code["FX-BTC/USDT=BINANCE"]
    assert (btc.lot_size, btc.tick_size, btc.tick_rule) == ("0.00001", "0.01", ",,0.01")
    # amount 0 decimal places is a step of 1, not a step of 0
    xrp = by_code["FX-XRP/USDT=BINANCE"]
    assert (xrp.lot_size, xrp.tick_size) == ("1", "0.0001")
    inverse = by_code["PERP-BTC/USD=BINANCE"]
    assert (inverse.native_code, inverse.lot_size, inverse.tick_size) == ("BTCUSD_PERP", "1", "0.1")
    assert inverse.multiplier == "100"
    assert inverse.native_code_v2 == "BTC/USD:BTC"


def test_binance_future(by_code: dict[str, ProductSpec]) -> None:
    future = by_code["FUT-BTC/USDT-2023DEC29=BINANCE"]
    assert future.pseudo_code == "BTCUSDT231229=BINANCE"
    assert future.tora_code == "BTC/USDT-20231229"
    assert future.native_code == "BTCUSDT_231229"
    assert future.expire_date == "2023-12-29T08:00:00.000000"
    assert (future.lot_size, future.tick_rule) == ("0.001", ",,0.1")
    assert future.description == "Bitcoin - Tether - Future 2023DEC29"


def test_deribit_option(by_code: dict[str, ProductSpec]) -> None:
    option = by_code["OPT-BTC/USD-2024JAN26-39000-C=DERIBIT"]
    assert option.type == "OPT"
    assert option.pseudo_code == "BTCUSD240126C39000=DERIBIT"
    assert (option.tora_code, option.tora_market) == ("BTC/USD-20240126-39000-C", "DERIBIT")
    assert option.native_code == "BTC-26JAN24-39000-C"
    assert option.native_code_v2 == "BTC/USD:BTC-240126-39000-C"
    assert option.strike == "39000"
    assert option.expire_date == "2024-01-26T08:00:00.000000"
    assert option.last_trading_date == "2024-01-26T08:00:00.000000"
    assert option.multiplier == "1"
    assert option.lot_size == "0.1"
    # Deribit's tick_size_steps: 0.0001 below 0.005, 0.0005 from there on.
    assert option.tick_rule == ",0.005,0.0001;0.005,,0.0005"
    assert option.tick_size == "0.0001"
    # Deribit lists neither a BTC/USD pair nor a BTC/USD perpetual.
    assert option.underlying_caspian_code is None
    assert option.description == "Bitcoin - US Dollar - Option 2024JAN26 39000 Call"


def test_okx_put(by_code: dict[str, ProductSpec]) -> None:
    put = by_code["OPT-BTC/USD-2024DEC27-60000-P=OKEX"]
    assert put.description == "Bitcoin - US Dollar - Option 2024DEC27 60000 Put"
    assert put.strike == "60000"


def test_bitmex_xbt_is_btc(by_code: dict[str, ProductSpec]) -> None:
    perp = by_code["PERP-BTC/USD=BITMEX"]
    assert (perp.native_code, perp.ccy_from, perp.pseudo_code) == (
        "XBTUSD",
        "BTC",
        "BTCUSDPERP=BITMEX",
    )
    assert (perp.lot_size, perp.tick_size, perp.multiplier) == ("100", "0.1", "1")
    assert perp.description == "Bitcoin - US Dollar - Perpetual swap"
    assert by_code["FX-BTC/USDT=BITMEX"].lot_size == "0.00001"


def test_bitfinex_prices_have_five_significant_digits(by_code: dict[str, ProductSpec]) -> None:
    product = by_code["FX-BTC/USD=BITFINEX"]
    ranges = parse_tick_rule(product.tick_rule)
    ticks = {low: tick for low, _, tick in ranges}
    assert ticks[Decimal(10000)] == Decimal(1)  # 12345
    assert ticks[Decimal(1000)] == Decimal("0.1")  # 1234.5
    assert ticks[Decimal("0.001")] == Decimal("0.0000001")  # 0.0012345
    assert ticks[None] == Decimal("0.00000001")  # at most 8 decimals
    assert product.lot_size == "0.00000001"
    assert product.tick_size == "0.00000001"


def test_hand_written_exchanges_use_native_symbols(by_code: dict[str, ProductSpec]) -> None:
    assert by_code["FX-BTC/USD=ITBIT"].native_code == "BTCUSD"
    assert by_code["FX-BTC/KRW=KORBIT"].native_code == "btc_krw"
    assert by_code["FX-BTC/JPY=LIQUID"].native_code == "BTCJPY"
    assert by_code["FX-BTC/CNY=BTCC"].native_code == "btccny"
    assert by_code["FX-BTC/JPY=LIQUID"].description == "Bitcoin - Japanese Yen - FX pair"


def test_coinone_native_code_is_its_currency(by_code: dict[str, ProductSpec]) -> None:
    assert by_code["FX-BTC/KRW=COINONE"].native_code == "btc"


def test_precision_modes_of_the_bundled_files() -> None:
    modes = {code: detect_precision_mode(code, m) for code, m in builtin_markets().items()}
    assert modes.pop("BINANCE") is PrecisionMode.DECIMAL_PLACES
    assert modes.pop("BITFINEX") is PrecisionMode.SIGNIFICANT_DIGITS
    assert set(modes.values()) == {PrecisionMode.TICK_SIZE}


# --- products_from_ccxt on hand-made markets ---------------------------------


def test_a_fraction_proves_steps_even_for_a_counting_exchange() -> None:
    markets = {
        "BTC/USDT": market(precision={"amount": 1, "price": 1}),
        "ETH/USDT": market(symbol="ETH/USDT", base="ETH", precision={"amount": 0.001, "price": 1}),
    }
    assert detect_precision_mode("BINANCE", markets) is PrecisionMode.TICK_SIZE
    products = products_from_ccxt("BINANCE", markets)
    assert [p.lot_size for p in products] == ["1", "0.001"]


def test_whole_steps_of_a_step_exchange_stay_steps() -> None:
    markets = {"BTC/USD": market(precision={"amount": 1, "price": 5})}
    assert detect_precision_mode("KRAKEN", markets) is PrecisionMode.TICK_SIZE
    [product] = products_from_ccxt("KRAKEN", markets)
    assert (product.lot_size, product.tick_rule) == ("1", ",,5")


def test_explicit_precision_mode_wins() -> None:
    markets = {"BTC/USD": market(precision={"amount": 2, "price": 1})}
    [counted] = products_from_ccxt("KRAKEN", markets, PrecisionMode.DECIMAL_PLACES)
    assert (counted.lot_size, counted.tick_rule) == ("0.01", ",,0.1")
    [steps] = products_from_ccxt("KRAKEN", markets, PrecisionMode.TICK_SIZE)
    assert (steps.lot_size, steps.tick_rule) == ("2", ",,1")


def test_skips_what_cannot_be_mapped() -> None:
    markets = {
        "A": market(id="inactive", active=False),
        "B": market(id="index", type="index"),
        "C": market(id="noprecision", precision=None),
        "D": market(id="zerostep", precision={"amount": 0, "price": 0.5}),
        "E": market(id="badbase", base="BTC-X"),
        "F": market(id="future", type="future", symbol="BTC/USD:BTC-231229"),
        "G": market(id="option", type="option", expiry=1703836800000, optionType="call"),
        "H": "not a market",
        "I": market(id=None),
        "J": market(id="active-unknown", active=None),
    }
    products = products_from_ccxt("KRAKEN", markets)
    assert [p.native_code for p in products] == ["active-unknown"]


def test_unknown_exchange_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown exchange"):
        products_from_ccxt("NOPE", {"BTC/USD": market()})


def test_inverse_wins_a_shared_code_whatever_the_order() -> None:
    linear = market(
        id="BTCUSD-LIN", symbol="BTC/USD:USD", type="swap", settle="USD", contractSize=0.001
    )
    inverse = market(id="XBTUSD", symbol="BTC/USD:BTC", type="swap", settle="XBT", contractSize=1)
    for markets in (
        {"BTC/USD:USD": linear, "BTC/USD:BTC": inverse},
        {"BTC/USD:BTC": inverse, "BTC/USD:USD": linear},
    ):
        [product] = products_from_ccxt("BITMEX", markets)
        assert product.native_code == "XBTUSD"
        assert product.caspian_code == "PERP-BTC/USD=BITMEX"


def test_linear_wins_over_another_settlement() -> None:
    quanto = market(id="Q", symbol="ETH/USD:BTC", base="ETH", type="swap", settle="BTC")
    linear = market(id="L", symbol="ETH/USD:USD", base="ETH", type="swap", settle="USD")
    [product] = products_from_ccxt("BITMEX", {"ETH/USD:BTC": quanto, "ETH/USD:USD": linear})
    assert product.native_code == "L"


def test_a_shared_pseudo_code_goes_to_the_smaller_caspian_code() -> None:
    markets = {
        "AB/CD": market(id="1", symbol="AB/CD", base="AB", quote="CD"),
        "ABC/D": market(id="2", symbol="ABC/D", base="ABC", quote="D"),
    }
    [product] = products_from_ccxt("KRAKEN", markets)
    assert (product.caspian_code, product.pseudo_code) == ("FX-AB/CD=KRAKEN", "ABCD=KRAKEN")


def test_xbt_is_normalized_in_codes_but_not_in_native_code() -> None:
    markets = {"XBT/USD": market(id="XXBTZUSD", symbol="XBT/USD", base="XBT")}
    [product] = products_from_ccxt("KRAKEN", markets)
    assert (product.caspian_code, product.native_code, product.ccy_from) == (
        "FX-BTC/USD=KRAKEN",
        "XXBTZUSD",
        "BTC",
    )
    assert product.native_code_v2 == "XBT/USD"


def test_option_from_string_fields() -> None:
    option = market(
        id="BTC-29MAR19-4000-C",
        symbol="BTC/USD:BTC-190329-4000-C",
        type="option",
        expiry="1553846400000",
        strike="4000.0",
        optionType="call",
        contractSize="1",
        precision={"amount": "0.1", "price": "0.0005"},
    )
    [product] = products_from_ccxt("DERIBIT", {"BTC/USD:BTC-190329-4000-C": option})
    assert product.caspian_code == "OPT-BTC/USD-2019MAR29-4000-C=DERIBIT"
    assert product.pseudo_code == "BTCUSD190329C4000=DERIBIT"
    assert product.strike == "4000"
    assert product.expire_date == "2019-03-29T08:00:00.000000"
    assert (product.lot_size, product.tick_rule, product.multiplier) == ("0.1", ",,0.0005", "1")


def test_malformed_tick_steps_skip_the_market() -> None:
    bad = market(info={"tick_size_steps": [{"above_price": "x", "tick_size": 1}]})
    assert products_from_ccxt("DERIBIT", {"BTC/USD": bad}) == []


# --- loading files -------------------------------------------------------------


def test_load_ccxt_file(tmp_path: Path) -> None:
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"BTC/USD": market()}))
    assert load_ccxt_file(good) == {"BTC/USD": market()}
    assert load_ccxt_file(str(good)) == {"BTC/USD": market()}
    not_json = tmp_path / "bad.json"
    not_json.write_text("{")
    with pytest.raises(ValueError, match="not JSON"):
        load_ccxt_file(not_json)
    a_list = tmp_path / "list.json"
    a_list.write_text("[]")
    with pytest.raises(ValueError, match="not a ccxt markets object"):
        load_ccxt_file(a_list)


# --- Catalog -----------------------------------------------------------------


def test_catalog_resolves_every_symbol_type(
    products: list[ProductSpec], by_code: dict[str, ProductSpec]
) -> None:
    catalog = Catalog(products)
    gemini = by_code["FX-ETH/USD=GEMINI"]
    assert catalog.resolve("FX-ETH/USD=GEMINI", "Caspian") is gemini
    assert catalog.resolve("ETHUSD=GEMINI", "Pseudo") is gemini
    assert catalog.resolve("ETH/USD.GEMINI", "Tora") is gemini
    assert catalog.resolve("ETH/USD.GEMINI", SymbolType.TORA) is gemini
    assert catalog.get("FX-ETH/USD=GEMINI") is gemini
    option = by_code["OPT-BTC/USD-2024JAN26-39000-C=DERIBIT"]
    assert catalog.resolve("BTCUSD240126C39000=DERIBIT", SymbolType.PSEUDO) is option
    assert catalog.resolve("BTC/USD-20240126-39000-C.DERIBIT", SymbolType.TORA) is option
    for product in products:
        assert catalog.resolve(product.caspian_code, "Caspian") is product
        assert catalog.resolve(product.pseudo_code, "Pseudo") is product
        assert catalog.resolve(f"{product.tora_code}.{product.tora_market}", "Tora") is product


def test_catalog_unknown_symbols(products: list[ProductSpec]) -> None:
    catalog = Catalog(products)
    assert catalog.get("FX-ETH/USD=NOWHERE") is None
    assert catalog.resolve("FX-ETH/USD=NOWHERE", "Caspian") is None
    assert catalog.resolve("ETHUSD=GEMINI", "Caspian") is None  # a Pseudo code as Caspian
    assert catalog.resolve("FX-ETH/USD=GEMINI", "Pseudo") is None
    assert catalog.resolve("ETH/USD", "Tora") is None  # toraCode without its market
    with pytest.raises(ValueError, match="unknown symbol type"):
        catalog.resolve("FX-ETH/USD=GEMINI", "Native")


def test_catalog_len_iteration_and_first_wins(by_code: dict[str, ProductSpec]) -> None:
    gemini = by_code["FX-ETH/USD=GEMINI"]
    bitmex = by_code["PERP-BTC/USD=BITMEX"]
    twin = ProductSpec(**{**_fields(gemini), "native_code": "other"})
    catalog = Catalog([gemini, bitmex, twin])
    assert len(catalog) == 2
    assert list(catalog) == [gemini, bitmex]
    assert catalog.get(gemini.caspian_code) is gemini
    assert len(Catalog(())) == 0


def _fields(product: ProductSpec) -> dict[str, Any]:
    return {name: getattr(product, name) for name in ProductSpec.__slots__}
