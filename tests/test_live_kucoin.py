"""KuCoin through the live source, beyond the generic tests of tests/test_live.py."""

from __future__ import annotations

import asyncio
import dataclasses

from caspian.codes import StreamState
from tests.support.mock_kucoin import KucoinMock
from tests.test_live import VENUES, sample, started, streaming

KUCOIN = next(venue for venue in VENUES if venue.code == "KUCOIN")


async def test_pongs_keep_a_quiet_connection_up() -> None:
    """KuCoin sends no heartbeat: the client pings within the interval the token names."""
    venue = dataclasses.replace(KUCOIN, mock=lambda: KucoinMock(ping_interval_ms=200))
    async with streaming(venue, stall_timeout_s=1.0) as (source, c, mock):
        await started(venue, source, c, mock)
        assert isinstance(mock, KucoinMock)
        labels = {"exchange": "KUCOIN", "symbol": venue.symbol, "reason": "stall"}
        stalls = sample("caspian_resyncs_total", **labels)
        pings = mock.pings
        mock.hush()
        # No market data for longer than the watchdog's limit: only pongs.
        await asyncio.sleep(1.6)
        assert mock.pings >= pings + 5
        assert c.all(StreamState.CONNECTED)
        assert sample("caspian_resyncs_total", **labels) == stalls
        assert mock.subscribes["level2"] == 1
