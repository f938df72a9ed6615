"""The service's garbage-collection policy frees cyclic garbage instead of freezing it."""

from __future__ import annotations

import asyncio
import gc
import os
import weakref
from collections.abc import Iterator
from contextlib import suppress
from pathlib import Path

import pytest

from caspian import service as service_module
from caspian.heap import release_free_heap
from caspian.service import Service
from caspian.settings import Settings


class Node:
    def __init__(self) -> None:
        self.other: Node | None = None


@pytest.fixture
def collector_off() -> Iterator[None]:
    # Only the policy under test may collect: no collection triggered by allocations.
    gc.disable()
    yield
    gc.enable()
    gc.unfreeze()


async def test_cyclic_garbage_is_collected_before_it_is_frozen(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, collector_off: None
) -> None:
    monkeypatch.setattr(service_module, "GC_FREEZE_S", 0.05)
    service = Service(Settings(data_dir=tmp_path, maintenance="off"))
    task = asyncio.create_task(service._manage_gc())
    try:
        await asyncio.sleep(0.02)
        a, b = Node(), Node()
        a.other, b.other = b, a
        gone = weakref.ref(a)
        del a, b
        await asyncio.sleep(0.3)
        assert gone() is None, "a cycle that became garbage was frozen, not freed"
    finally:
        task.cancel()
        with suppress(asyncio.CancelledError):
            await task
        await service.store.close()


def _rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.skipif(not release_free_heap(), reason="the C library has no malloc_trim")
async def test_memory_a_burst_freed_goes_back_to_the_system(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A burst's memory, freed among a few survivors, is given back by the full pass."""
    monkeypatch.setattr(service_module, "GC_FREEZE_S", 0.05)
    monkeypatch.setattr(service_module, "GC_FULL_S", 0.1)
    service = Service(Settings(data_dir=tmp_path, maintenance="off"))
    # Blocks of the size of queued messages, too big for Python's own
    # allocator and too small for their own mappings: glibc's heap.
    burst = [bytes(2000) + index.to_bytes(4, "little") for index in range(50_000)]
    survivors = burst[::100]
    del burst
    before = _rss_mb()
    task = asyncio.create_task(service._manage_gc())
    try:
        # The policy's first pass is a full collection of the whole test
        # process, which may take longer than a few of its periods.
        for _ in range(100):
            await asyncio.sleep(0.05)
            if _rss_mb() < before - 50:
                break
        else:
            raise AssertionError(f"freed heap pages were kept: {_rss_mb():.0f} MB")
    finally:
        task.cancel()
        with suppress(asyncio.CancelledError):
            await task
        await service.store.close()
    assert len(survivors) == 500
