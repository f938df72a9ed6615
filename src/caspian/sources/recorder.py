"""Writes events in the replay format, so that what is recorded replays unchanged.

Lines are buffered and written at least once a second with a gzip sync flush:
everything up to the last flush can be decompressed even if the process dies
mid-write, so a crash loses at most the last second (and the partial line it
may leave is skipped on replay). Memory is bounded by flushing early when the
buffer grows. With rotation, a file is closed whole before the next begins.
"""

from __future__ import annotations

import asyncio
import gzip
import os
import zlib
from io import BufferedIOBase
from pathlib import Path

from caspian.events import Event, to_json
from caspian.files import PRIVATE_DIR, open_private

#: Buffered lines that force a flush before the second is up.
MAX_BUFFERED = 10_000


def rotated_name(path: Path, index: int) -> Path:
    """``trades.jsonl.gz`` -> ``trades.0001.jsonl.gz``; index 0 is the path itself."""
    if index == 0:
        return path
    name = path.name
    for suffix in (".jsonl.gz", ".jsonl", ".gz"):
        if name.endswith(suffix):
            return path.with_name(f"{name[: -len(suffix)]}.{index:04d}{suffix}")
    return path.with_name(f"{name}.{index:04d}")


class Recorder:
    def __init__(
        self,
        path: Path,
        symbols: set[str] | None = None,
        rotate_bytes: int | None = None,
        flush_s: float = 1.0,
    ) -> None:
        self.path = path
        self.symbols = symbols
        self.rotate_bytes = rotate_bytes
        self.flush_s = flush_s
        self.files: list[Path] = []
        self.events = 0
        self._buffer: list[bytes] = []
        self._handle: BufferedIOBase | None = None
        self._raw: BufferedIOBase | None = None
        self._written = 0
        self._gzip = path.name.endswith(".gz")

    def _open(self) -> None:
        path = rotated_name(self.path, len(self.files))
        path.parent.mkdir(mode=PRIVATE_DIR, parents=True, exist_ok=True)
        self._raw = os.fdopen(open_private(path), "wb")
        self._handle = gzip.GzipFile(fileobj=self._raw, mode="wb") if self._gzip else self._raw
        self._written = 0
        self.files.append(path)

    def write(self, event: Event) -> None:
        """The source's sink."""
        if self.symbols is not None and event.symbol not in self.symbols:
            return
        self._buffer.append(to_json(event) + b"\n")
        self.events += 1
        if len(self._buffer) >= MAX_BUFFERED:
            self.flush()

    def flush(self) -> None:
        if not self._buffer:
            return
        if self._handle is None:
            self._open()
        assert self._handle is not None and self._raw is not None
        data = b"".join(self._buffer)
        self._buffer.clear()
        self._handle.write(data)
        self._written += len(data)
        if isinstance(self._handle, gzip.GzipFile):
            self._handle.flush(zlib.Z_SYNC_FLUSH)
        self._raw.flush()
        if self.rotate_bytes is not None and self._written >= self.rotate_bytes:
            self._close_file()

    def _close_file(self) -> None:
        if self._handle is not None:
            self._handle.close()
            if self._raw is not None and self._raw is not self._handle:
                self._raw.close()
        self._handle = self._raw = None

    async def run(self) -> None:
        """Flush once a second until cancelled; then flush and close."""
        try:
            while True:
                await asyncio.sleep(self.flush_s)
                self.flush()
        finally:
            self.close()

    def close(self) -> None:
        self.flush()
        self._close_file()
