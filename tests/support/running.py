"""A long-running ``caspian`` command (serve, ingest, gateway) as a child process."""

from __future__ import annotations

import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path

from tests.support.cli import cli_env


class Started:
    """The command, once it printed every line of ``labels`` ('Caspian stream: URL')."""

    def __init__(
        self,
        data_dir: Path,
        *args: str,
        labels: tuple[str, ...],
        env: Mapping[str, str] | None = None,
        within: float = 90,
    ) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "caspian", *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=cli_env(data_dir, **(env or {})),
            cwd=data_dir.parent,
        )
        self.stderr_lines: list[str] = []
        lines: queue.Queue[str] = queue.Queue()
        stdout, stderr = self.process.stdout, self.process.stderr
        assert stdout is not None and stderr is not None

        def pump_out() -> None:
            for line in stdout:
                lines.put(line)

        def pump_err() -> None:
            # Read all along: a child logging into a full pipe would block.
            for line in stderr:
                self.stderr_lines.append(line)

        self._pumps = [
            threading.Thread(target=pump_out, daemon=True),
            threading.Thread(target=pump_err, daemon=True),
        ]
        for pump in self._pumps:
            pump.start()
        self.printed: dict[str, str] = {}
        deadline = time.monotonic() + within
        while not set(labels) <= set(self.printed):
            try:
                line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                self.process.kill()
                self.process.wait()
                raise AssertionError(
                    f"{args[0]} printed {self.printed}, not {labels}: {self.stderr}"
                ) from None
            label, _, value = line.partition(": ")
            self.printed[label] = value.strip()

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def stderr(self) -> str:
        return "".join(self.stderr_lines)

    def url(self, label: str) -> str:
        return self.printed[label].split()[0]

    def stop(self, how: signal.Signals = signal.SIGTERM, within: float = 30) -> tuple[int, float]:
        """Send the signal, wait for the exit; its code and how long stopping took."""
        started = time.monotonic()
        if self.process.poll() is None:
            self.process.send_signal(how)
        try:
            code = self.process.wait(within)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise
        for pump in self._pumps:
            pump.join(5)
        return code, time.monotonic() - started
