"""Trimmer: a large free is followed by one trim of the heap, soon, and not too often."""

from __future__ import annotations

import asyncio

from caspian.heap import Trimmer


class Trims:
    def __init__(self) -> None:
        self.at: list[float] = []

    def __call__(self) -> bool:
        self.at.append(asyncio.get_running_loop().time())
        return True


async def test_small_frees_wait_until_they_add_up() -> None:
    trims = Trims()
    trimmer = Trimmer(threshold=1000, delay_s=0.05, every_s=1.0, trim=trims)
    trimmer.freed(400)
    trimmer.freed(400)
    await asyncio.sleep(0.15)
    assert trims.at == []
    trimmer.freed(400)
    await asyncio.sleep(0.15)
    assert len(trims.at) == 1 and trimmer.trims == 1
    assert trimmer.freed_total == 1200


async def test_frees_that_come_together_share_one_trim() -> None:
    trims = Trims()
    trimmer = Trimmer(threshold=100, delay_s=0.1, every_s=1.0, trim=trims)
    start = asyncio.get_running_loop().time()
    for _ in range(5):
        trimmer.freed(1000)
    await asyncio.sleep(0.3)
    assert len(trims.at) == 1
    assert trims.at[0] - start >= 0.1


async def test_trims_are_spaced_by_every_s() -> None:
    trims = Trims()
    trimmer = Trimmer(threshold=100, delay_s=0.01, every_s=0.4, trim=trims)
    trimmer.freed(1000)
    await asyncio.sleep(0.1)
    trimmer.freed(1000)
    await asyncio.sleep(0.1)
    assert len(trims.at) == 1
    await asyncio.sleep(0.4)
    assert len(trims.at) == 2
    assert trims.at[1] - trims.at[0] >= 0.4


async def test_close_cancels_a_pending_trim() -> None:
    trims = Trims()
    trimmer = Trimmer(threshold=100, delay_s=0.05, every_s=1.0, trim=trims)
    trimmer.freed(1000)
    trimmer.close()
    await asyncio.sleep(0.15)
    assert trims.at == []
