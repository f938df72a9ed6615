"""The tests' own stream client must not slow the suite down or make it flaky."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from tests.support.client import StreamClient
from tests.support.service import start_service


async def test_a_client_that_stopped_reading_closes_at_once(tmp_path: Path) -> None:
    """websockets stops reading the socket while 16 messages wait unread; a close then
    waited 10 s for an answer it could not see, and 24 such closes timed a test out."""
    running = start_service(tmp_path, simulator_rate=40.0)
    try:
        token = await asyncio.to_thread(running.token)
        client = await StreamClient.open(running.stream_url, token)
        await client.subscribe("FX-BTC/USD=GEMINI", conflation="None")
        await asyncio.sleep(3)
        await client.wait_for(lambda m: m["type"] == "Level1")
        started = time.monotonic()
        await client.close()
        assert time.monotonic() - started < 5
    finally:
        running.stop()
