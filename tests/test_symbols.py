"""Product codes: the contract's examples both ways, malformed codes, strike formatting."""

from __future__ import annotations

from datetime import date
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from caspian.catalog.symbols import (
    SymbolParts,
    parse_caspian_code,
    plain_decimal,
    to_decimal,
    tora_symbol,
)

# CONTRACT.md section 2, row by row: parts, Caspian, Pseudo, toraCode, toraMarket.
CONTRACT_EXAMPLES = [
    (
        SymbolParts("FX", "ETH", "USD", "GEMINI"),
        "FX-ETH/USD=GEMINI",
        "ETHUSD=GEMINI",
        "ETH/USD",
        "GEMINI",
    ),
    (
        SymbolParts("FUT", "BTC", "JPY", "BITFLYER", date(2018, 6, 30)),
        "FUT-BTC/JPY-2018JUN30=BITFLYER",
        "BTCJPY180630=BITFLYER",
        "BTC/JPY-20180630",
        "BITFLYER",
    ),
    (
        SymbolParts("PERP", "BTC", "USD", "BITMEX"),
        "PERP-BTC/USD=BITMEX",
        "BTCUSDPERP=BITMEX",
        "BTC/USD-PERP",
        "BITMEX",
    ),
    (
        SymbolParts("OPT", "BTC", "USD", "DERIBIT", date(2019, 3, 29), Decimal(4000), "C"),
        "OPT-BTC/USD-2019MAR29-4000-C=DERIBIT",
        "BTCUSD190329C4000=DERIBIT",
        "BTC/USD-20190329-4000-C",
        "DERIBIT",
    ),
]


@pytest.mark.parametrize(("parts", "caspian", "pseudo", "tora", "market"), CONTRACT_EXAMPLES)
def test_contract_examples_build(
    parts: SymbolParts, caspian: str, pseudo: str, tora: str, market: str
) -> None:
    assert parts.caspian_code == caspian
    assert parts.pseudo_code == pseudo
    assert parts.tora_code == tora
    assert parts.tora_market == market
    assert parts.tora_symbol == f"{tora}.{market}"


@pytest.mark.parametrize(("parts", "caspian", "pseudo", "tora", "market"), CONTRACT_EXAMPLES)
def test_contract_examples_parse(
    parts: SymbolParts, caspian: str, pseudo: str, tora: str, market: str
) -> None:
    parsed = parse_caspian_code(caspian)
    assert parsed == parts
    assert (parsed.pseudo_code, parsed.tora_code, parsed.tora_market) == (pseudo, tora, market)


def test_tora_symbols_as_the_contract_writes_them() -> None:
    assert tora_symbol("ETH/USD", "GEMINI") == "ETH/USD.GEMINI"
    expected = [
        "ETH/USD.GEMINI",
        "BTC/JPY-20180630.BITFLYER",
        "BTC/USD-PERP.BITMEX",
        "BTC/USD-20190329-4000-C.DERIBIT",
    ]
    assert [row[0].tora_symbol for row in CONTRACT_EXAMPLES] == expected


def test_put_and_fractional_strike() -> None:
    parts = SymbolParts("OPT", "ETH", "USDT", "BINANCE", date(2023, 12, 29), Decimal("0.50"), "P")
    assert parts.caspian_code == "OPT-ETH/USDT-2023DEC29-0.5-P=BINANCE"
    assert parts.pseudo_code == "ETHUSDT231229P0.5=BINANCE"
    assert parts.tora_code == "ETH/USDT-20231229-0.5-P"
    assert parse_caspian_code(parts.caspian_code) == parts


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (Decimal(4000), "4000"),
        (Decimal("4E+3"), "4000"),
        (Decimal("39000.0"), "39000"),
        (Decimal("4000.50"), "4000.5"),
        (Decimal("0.000001"), "0.000001"),
        (Decimal("1E-8"), "0.00000001"),
        (Decimal("100000000"), "100000000"),
    ],
)
def test_plain_decimal(value: Decimal, text: str) -> None:
    assert plain_decimal(value) == text


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (1e-05, Decimal("0.00001")),
        (0.1, Decimal("0.1")),
        ("0.00000100", Decimal("0.000001")),
        (5, 5),
    ],
)
def test_to_decimal(value: object, expected: Decimal) -> None:
    assert to_decimal(value) == expected


@pytest.mark.parametrize("value", [None, "", "abc", True, float("nan"), "Infinity", [1]])
def test_to_decimal_rejects(value: object) -> None:
    with pytest.raises(ValueError):
        to_decimal(value)


@pytest.mark.parametrize(
    "code",
    [
        "",
        "FX-ETH/USD",
        "FX-ETH/USD=",
        "ETH/USD=GEMINI",
        "FX-ETHUSD=GEMINI",
        "fx-eth/usd=gemini",
        "FX-eth/USD=GEMINI",
        "SPOT-ETH/USD=GEMINI",
        "FX-ETH/USD=GEMINI ",
        "FX-ETH/USD=GEMINI=GEMINI",
        "FX-ETH-X/USD=GEMINI",
        "FX-ETH/USD-2018JUN30=GEMINI",
        "PERP-BTC/USD-2018JUN30=BITMEX",
        "FUT-BTC/JPY=BITFLYER",
        "FUT-BTC/JPY-20180630=BITFLYER",
        "FUT-BTC/JPY-2018JUX30=BITFLYER",
        "FUT-BTC/JPY-2018FEB30=BITFLYER",
        "FUT-BTC/JPY-2018jun30=BITFLYER",
        "FUT-BTC/JPY-2018JUN30-4000-C=BITFLYER",
        "OPT-BTC/USD-2019MAR29=DERIBIT",
        "OPT-BTC/USD-2019MAR29-4000=DERIBIT",
        "OPT-BTC/USD-2019MAR29-4000-X=DERIBIT",
        "OPT-BTC/USD-2019MAR29-0-C=DERIBIT",
        "OPT-BTC/USD-2019MAR29-4000.0-C=DERIBIT",
        "OPT-BTC/USD-2019MAR29-04000-C=DERIBIT",
        "OPT-BTC/USD-2019MAR29--4000-C=DERIBIT",
        "OPT-BTC/USD-4000-C=DERIBIT",
    ],
)
def test_malformed_codes_raise(code: str) -> None:
    with pytest.raises(ValueError, match="malformed Caspian code"):
        parse_caspian_code(code)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"type": "SPOT"},
        {"base": "eth"},
        {"quote": "US-D"},
        {"exchange": "GEM.INI"},
        {"expiry": date(2018, 6, 30)},
        {"type": "FUT"},
        {"type": "OPT", "expiry": date(2019, 3, 29), "strike": Decimal(4000)},
        {"type": "OPT", "expiry": date(2019, 3, 29), "option_type": "C"},
        {"type": "OPT", "expiry": date(2019, 3, 29), "strike": Decimal(-1), "option_type": "C"},
        {"type": "OPT", "expiry": date(2019, 3, 29), "strike": Decimal(1), "option_type": "call"},
        {"type": "FUT", "expiry": date(2019, 3, 29), "strike": Decimal(1), "option_type": "C"},
    ],
)
def test_parts_that_do_not_fit_the_type_raise(kwargs: dict[str, object]) -> None:
    fields: dict[str, object] = {"type": "FX", "base": "ETH", "quote": "USD", "exchange": "GEMINI"}
    with pytest.raises(ValueError):
        SymbolParts(**(fields | kwargs))  # type: ignore[arg-type]


_names = st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789", min_size=1, max_size=8)
_strikes = st.decimals(min_value=Decimal("0.00000001"), max_value=Decimal(10**7), places=8)


@st.composite
def symbol_parts(draw: st.DrawFn) -> SymbolParts:
    product_type = draw(st.sampled_from(["FX", "FUT", "PERP", "OPT"]))
    dated = product_type in ("FUT", "OPT")
    option = product_type == "OPT"
    return SymbolParts(
        product_type,
        draw(_names),
        draw(_names),
        draw(_names),
        draw(st.dates(date(2000, 1, 1), date(2099, 12, 31))) if dated else None,
        draw(_strikes.filter(lambda strike: strike > 0)) if option else None,
        draw(st.sampled_from(["C", "P"])) if option else None,
    )


@given(symbol_parts())
def test_every_code_parses_back_to_its_parts(parts: SymbolParts) -> None:
    parsed = parse_caspian_code(parts.caspian_code)
    assert parsed.caspian_code == parts.caspian_code
    assert (parsed.type, parsed.base, parsed.quote, parsed.exchange) == (
        parts.type,
        parts.base,
        parts.quote,
        parts.exchange,
    )
    assert parsed.expiry == parts.expiry
    assert parsed.strike == parts.strike
    assert parsed.option_type == parts.option_type
    assert parsed.pseudo_code == parts.pseudo_code
    assert parsed.tora_symbol == parts.tora_symbol
