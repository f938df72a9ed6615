"""Every product of the built-in catalog can be simulated, on its own tick rule and lot grid,
in its own price currency."""

from __future__ import annotations

import math
from dataclasses import replace
from decimal import Decimal

import pytest

from caspian.book import OrderBook
from caspian.catalog.builtin import builtin_products
from caspian.catalog.ccxt_markets import TickRange, parse_tick_rule
from caspian.events import BookEvent, Event
from caspian.service import sim_product
from caspian.sources.simulator import SimProduct, SymbolSimulator, choose_layout

PRODUCTS = builtin_products()


def on_grid(value: float, step: float) -> bool:
    ratio = value / step
    return math.isclose(ratio, round(ratio), rel_tol=1e-6, abs_tol=1e-6)


def rule_tick(rule: list[TickRange], price: float) -> float:
    """The tick the rule sets for ``price``."""
    exact = Decimal(repr(price))
    for low, high, tick in rule:
        if (low is None or exact >= low) and (high is None or exact < high):
            return float(tick)
    raise AssertionError(f"{price} is in no range of {rule}")


def run(product: SimProduct, steps: int, seed: int = 7) -> list[Event]:
    simulator = SymbolSimulator(product, seed=seed)
    ts = 1_700_000_000_000_000
    events = simulator.start(ts)
    for _ in range(steps):
        ts += 50_000
        events += simulator.step(ts)
    return events


def book_prices(events: list[Event]) -> list[float]:
    return [
        price
        for event in events
        if isinstance(event, BookEvent)
        for price, _ in event.bids + event.asks
    ]


@pytest.mark.parametrize("spec", PRODUCTS, ids=[p.caspian_code for p in PRODUCTS])
def test_every_product_simulates(spec: object) -> None:
    from caspian.catalog.product import ProductSpec

    assert isinstance(spec, ProductSpec)
    product = sim_product(spec)
    rule = parse_tick_rule(spec.tick_rule)
    book = OrderBook()
    for event in run(product, 50):
        if isinstance(event, BookEvent):
            if event.snapshot:
                book.apply_snapshot(event.bids, event.asks)
            else:
                book.apply_diff(event.bids, event.asks)
            for price, size in event.bids + event.asks:
                assert price > 0
                assert on_grid(price, rule_tick(rule, price)), (price, spec.tick_rule)
                if size:
                    assert on_grid(size, product.lot), (size, product.lot)
        assert not book.crossed()
    assert book.bid_count >= 100 and book.ask_count >= 100


@pytest.mark.parametrize(
    ("code", "currency", "low", "high"),
    [
        # Deribit's and OKX's BTC options: premiums in BTC, a fraction of one.
        ("OPT-BTC/USD-2024JAN26-39000-C=DERIBIT", "BTC", 0.0005, 1.0),
        ("OPT-BTC/USD-2024DEC27-60000-P=OKEX", "BTC", 0.0001, 1.0),
        # Binance's are paid in the quote currency: an ETH call struck at 800 costs
        # at least its intrinsic value in USDT.
        ("OPT-ETH/USDT-2023DEC29-800-C=BINANCE", "USDT", 1_000.0, 10_000.0),
    ],
)
def test_options_are_priced_in_their_premium_currency(
    code: str, currency: str, low: float, high: float
) -> None:
    spec = next(p for p in PRODUCTS if p.caspian_code == code)
    assert spec.price_currency == currency
    prices = book_prices(run(sim_product(spec), 20))
    assert prices and all(low <= price <= high for price in prices), (min(prices), max(prices))


SIGNIFICANT_5 = tuple(
    parse_tick_rule(next(p for p in PRODUCTS if p.exchange == "BITFINEX").tick_rule)
)


def test_a_price_near_the_top_of_its_range_moves_to_the_next_tick() -> None:
    # Bitfinex keeps 5 significant digits: 0.0001 in [1, 10), 0.001 in [10, 100).
    assert rule_tick(list(SIGNIFICANT_5), 8.9) == 0.0001
    product = SimProduct("FX-ATOM/XTZ=BITFINEX", "ATOM", "XTZ", "FX", 1e-8, 0.01)
    near_top = replace(product, tick_rule=SIGNIFICANT_5)
    # 8.9 has too little room under 10 on the finer grid.
    assert choose_layout(near_top, 8.9).tick == 0.001
    assert choose_layout(near_top, 3.0).tick == 0.0001


def test_prices_keep_to_the_rule_over_a_long_run() -> None:
    product = SimProduct(
        "OPT-BTC/USD-2030JAN25-60000-C=DERIBIT",
        "BTC",
        "USD",
        "OPT",
        0.0001,
        0.1,
        strike=60_000.0,
        call=True,
        price_ccy="BTC",
        tick_rule=tuple(parse_tick_rule(",0.005,0.0001;0.005,,0.0005")),
    )
    bitfinex = SimProduct(
        "FX-BTC/USD=BITFINEX", "BTC", "USD", "FX", 1e-8, 1e-8, tick_rule=SIGNIFICANT_5
    )
    for one in (product, bitfinex):
        for seed in range(3):
            for price in book_prices(run(one, 2_000, seed)):
                assert price > 0
                assert on_grid(price, rule_tick(list(one.tick_rule), price)), (one.symbol, price)


def test_a_coarser_range_below_bounds_the_book_from_below() -> None:
    # Below 1 only multiples of 0.5: the 0.01 grid of the range above must stay out of it.
    rule = tuple(parse_tick_rule(",1,0.5;1,,0.01"))
    product = SimProduct("FX-EUR/USD=KRAKEN", "EUR", "USD", "FX", 0.01, 1.0, tick_rule=rule)
    assert choose_layout(product, 1.08).tick == 0.01
    prices = book_prices(run(product, 500))
    assert min(prices) >= 1.0
    assert all(on_grid(price, rule_tick(list(rule), price)) for price in prices)
