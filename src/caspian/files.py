"""Files only their owner may read: the data directory, the store, the signing key, recordings.

Each is created private, and one found with wider permissions (made by an
older version, or by hand) is tightened, with a warning that says so.
"""

from __future__ import annotations

import logging
import os
import stat
from contextlib import suppress
from pathlib import Path

log = logging.getLogger(__name__)

PRIVATE_DIR = 0o700
PRIVATE_FILE = 0o600


def _tighten(path: Path, mode: int) -> None:
    current = stat.S_IMODE(path.stat().st_mode)
    if current & ~mode:
        path.chmod(current & mode)
        log.warning(
            "%s was open to other users (mode %03o); made it %03o", path, current, current & mode
        )


def private_dir(path: Path) -> Path:
    """``path`` as a directory only its owner can enter, made if missing (with its parents)."""
    path.mkdir(mode=PRIVATE_DIR, parents=True, exist_ok=True)
    _tighten(path, PRIVATE_DIR)
    return path


def private_file(path: Path) -> None:
    """Make ``path`` empty if it is missing, and readable by its owner only."""
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT, PRIVATE_FILE))
    _tighten(path, PRIVATE_FILE)


def tighten_if_present(path: Path) -> None:
    """Make ``path``, if it exists, readable by its owner only."""
    with suppress(FileNotFoundError):
        _tighten(path, PRIVATE_FILE)


def open_private(path: Path) -> int:
    """A file descriptor writing ``path`` from its start, the file readable by its owner only."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, PRIVATE_FILE)
    try:
        _tighten(path, PRIVATE_FILE)
    except OSError:
        os.close(fd)
        raise
    return fd
