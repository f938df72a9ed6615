"""Korbit's own client: whole top-30 books, trade snapshots, refusals, addresses and product ids.

The tests every exchange shares run it from tests/test_live.py's VENUES.
"""

from __future__ import annotations

import dataclasses

from caspian.events import BookEvent
from caspian.sources.live.korbit import KorbitConnection
from tests.support.mock_korbit import KorbitMock
from tests.test_live import (
    PRODUCTS,
    VENUES,
    assert_lost_change_healed,
    assert_refusal_retried,
    started,
    streaming,
)

KORBIT = next(venue for venue in VENUES if venue.code == "KORBIT")


def test_products_name_korbits_symbols() -> None:
    spec = PRODUCTS["FX-BTC/KRW=KORBIT"]
    assert spec.native_code == "btc_krw"


def test_live_urls_replace_the_base_address_and_keep_the_path() -> None:
    assert KorbitConnection.from_urls({}).ws_url == "wss://ws-api.korbit.co.kr/v2/public"
    moved = KorbitConnection.from_urls({"api": {"ws": "ws://127.0.0.1:9000"}})
    assert moved.ws_url == "ws://127.0.0.1:9000/v2/public"


async def test_a_dropped_message_is_repaired_by_the_next() -> None:
    """Korbit may drop public messages under load; each one is the whole top 30."""
    await assert_lost_change_healed(KORBIT, lambda mock: mock.update(asks=[(101.0, 7.0)]))


async def test_books_carry_korbits_book_time() -> None:
    async with streaming(KORBIT) as (source, c, mock):
        await started(KORBIT, source, c, mock)
        books = [e for e in c.events if isinstance(e, BookEvent)]
        assert books and all(book.exchange_ts is not None for book in books)


async def test_an_unknown_symbol_is_an_outage_retried() -> None:
    venue = dataclasses.replace(KORBIT, mock=lambda: KorbitMock("eth_krw"))
    await assert_refusal_retried(venue, "error")
