"""The service's garbage-collection policy frees cyclic garbage instead of freezing it."""

from __future__ import annotations

import asyncio
import gc
import weakref
from collections.abc import Iterator
from contextlib import suppress
from pathlib import Path

import pytest

from caspian import service as service_module
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
