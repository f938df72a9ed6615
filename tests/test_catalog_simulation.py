"""Every product of the built-in catalog can be simulated, on its own tick and lot grid."""

from __future__ import annotations

import math

import pytest

from caspian.book import OrderBook
from caspian.catalog.builtin import builtin_products
from caspian.events import BookEvent
from caspian.service import sim_product
from caspian.sources.simulator import SymbolSimulator

PRODUCTS = builtin_products()


def on_grid(value: float, step: float) -> bool:
    ratio = value / step
    return math.isclose(ratio, round(ratio), rel_tol=1e-6, abs_tol=1e-6)


@pytest.mark.parametrize("spec", PRODUCTS, ids=[p.caspian_code for p in PRODUCTS])
def test_every_product_simulates(spec: object) -> None:
    from caspian.catalog.product import ProductSpec

    assert isinstance(spec, ProductSpec)
    product = sim_product(spec)
    simulator = SymbolSimulator(product, seed=7)
    book = OrderBook()
    ts = 1_700_000_000_000_000
    events = simulator.start(ts)
    for _ in range(50):
        ts += 50_000
        events += simulator.step(ts)
    for event in events:
        if isinstance(event, BookEvent):
            if event.snapshot:
                book.apply_snapshot(event.bids, event.asks)
            else:
                book.apply_diff(event.bids, event.asks)
            for price, size in event.bids + event.asks:
                assert price > 0
                assert on_grid(price, product.tick), (price, product.tick)
                if size:
                    assert on_grid(size, product.lot), (size, product.lot)
        assert not book.crossed()
    assert book.bid_count >= 100 and book.ask_count >= 100
