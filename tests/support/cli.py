"""The ``caspian`` command run as a real process, as an operator runs it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def cli_env(data_dir: Path, **extra: str) -> dict[str, str]:
    # Settings the developer's shell may hold must not leak into the command under test.
    env = {name: value for name, value in os.environ.items() if not name.startswith("CASPIAN_")}
    env["CASPIAN_DATA_DIR"] = str(data_dir)
    env.update(extra)
    return env


def caspian(
    data_dir: Path, *args: str, stdin: str | None = None, timeout: float = 60, **env: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "caspian", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=cli_env(data_dir, **env),
        cwd=data_dir.parent,
        timeout=timeout,
    )


def ok(data_dir: Path, *args: str, stdin: str | None = None, **env: str) -> str:
    result = caspian(data_dir, *args, stdin=stdin, timeout=60, **env)
    assert result.returncode == 0, (args, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    return result.stdout


def fails(
    data_dir: Path, *args: str, stdin: str | None = None, timeout: float = 60, **env: str
) -> str:
    """Runs a command that must fail with one line on stderr; returns that line."""
    result = caspian(data_dir, *args, stdin=stdin, timeout=timeout, **env)
    assert result.returncode != 0, (args, result.stdout)
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), lines
    return lines[0]
