"""Keeping the catalog true to the exchanges: each one's current market list applied to the store.

A refresh of an exchange makes its products those the exchange lists now:

- a market it lists that the store lacks is created, one it has is updated
  (``createdTime`` kept, ``updatedTime`` renewed);
- a product it no longer lists is **retired**: removed from the store, so REST
  answers 404 for it and a Subscribe answers 202 as for any unknown code;
- except a dated product that has expired: exchanges drop those from their
  lists at expiry, but they stay in the reference data with their dates (and
  are not served, see ``Service``).

An exchange whose list cannot be fetched, or from which no product can be
read, is left as it was: an outage of the exchange must not empty its catalog.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from caspian.catalog.ccxt_markets import products_from_ccxt, repair_underlyings
from caspian.catalog.exchanges import CCXT_IDS, EXCHANGES
from caspian.catalog.importer import fetch_ccxt_markets
from caspian.store import Store

log = logging.getLogger(__name__)

#: Gets one exchange's markets (ccxt symbol -> market) by Caspian exchange code;
#: raises ValueError when it cannot.
Fetch = Callable[[str], Awaitable[Mapping[str, Any]]]

#: The exchanges whose market lists ccxt can fetch, in the contract's order.
REFRESHABLE: tuple[str, ...] = tuple(code for _, code in EXCHANGES if code in CCXT_IDS)

#: Market lists fetched at once: enough to refresh every exchange in a few
#: round trips, few enough not to look like a flood from one address.
_CONCURRENT_FETCHES = 4


@dataclass(frozen=True, slots=True)
class Refreshed:
    """What one exchange's refresh did."""

    exchange: str
    created: int
    updated: int
    retired: tuple[str, ...]

    def summary(self) -> str:
        return (
            f"{self.exchange}: {self.created} products created, {self.updated} updated, "
            f"{len(self.retired)} retired"
        )


def ccxt_fetcher(
    urls: Mapping[str, Mapping[str, Any]] | None = None, api_url: str | None = None
) -> Fetch:
    """Fetching through ccxt; ``urls`` per exchange code as ``CASPIAN_LIVE_URLS`` has them."""
    overrides = urls or {}

    async def fetch(code: str) -> Mapping[str, Any]:
        return await fetch_ccxt_markets(code, urls=overrides.get(code), api_url=api_url)

    return fetch


async def apply_markets(
    store: Store, code: str, markets: Mapping[str, Any], now_us: int
) -> Refreshed:
    """Make ``code``'s products in the store those of ``markets`` (see the module docstring)."""
    products = products_from_ccxt(code, markets)
    if not products:
        raise ValueError(f"no product could be read for {code}")
    created, updated = await store.upsert_products(products)
    listed = {product.caspian_code for product in products}
    retired = tuple(
        record.spec.caspian_code
        for record in await store.products([code])
        if record.spec.caspian_code not in listed and not record.spec.expired(now_us)
    )
    await store.delete_products(retired)
    kept = [record.spec for record in await store.products([code])]
    if repaired := repair_underlyings(kept):
        await store.upsert_products(repaired)
    return Refreshed(code, created, updated, retired)


async def refresh_exchanges(
    store: Store, codes: Iterable[str], fetch: Fetch, now_us: int
) -> dict[str, Refreshed | str]:
    """Refresh each exchange on its own; per code, what was done or why it was not.

    Lists are fetched concurrently, then applied one exchange at a time (one
    writer at a time suits every store). Store errors propagate.
    """
    wanted = list(dict.fromkeys(codes))
    gate = asyncio.Semaphore(_CONCURRENT_FETCHES)

    async def fetch_one(code: str) -> Mapping[str, Any] | str:
        async with gate:
            try:
                return await fetch(code)
            except ValueError as exc:
                return str(exc)

    fetched = await asyncio.gather(*(fetch_one(code) for code in wanted))
    results: dict[str, Refreshed | str] = {}
    for code, markets in zip(wanted, fetched, strict=True):
        if isinstance(markets, str):
            results[code] = markets
            continue
        try:
            results[code] = await apply_markets(store, code, markets, now_us)
        except ValueError as exc:
            results[code] = str(exc)
    return results
