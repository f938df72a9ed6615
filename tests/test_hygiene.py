"""Hygiene: where the data lives and who may read it, what the log may show, who may scrape."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import platformdirs
import pytest

from caspian.events import TradeEvent
from caspian.logs import install_redaction, redact, redact_record
from caspian.settings import Settings
from caspian.sources.recorder import Recorder
from tests.support.cli import cli_env, ok
from tests.support.client import StreamClient
from tests.support.service import start_service

TOKEN = (
    "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiJsZWUiLCJ1c3IiOiJsZWUifQ"
    ".thBthJe0Wq0Ck04Z0tjwfEaM2hpyJME1mircI7gYqp4"
)
SIGNATURE = TOKEN.rsplit(".", 1)[1]


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# -- the data directory ------------------------------------------------------


def test_the_default_data_directory_is_the_users() -> None:
    assert "CASPIAN_DATA_DIR" not in os.environ
    expected = Path(platformdirs.user_data_dir("caspian", appauthor=False))
    assert Settings().data_dir == expected
    # The test session points it at a temporary directory (see conftest).
    assert expected == Path(os.environ["XDG_DATA_HOME"]) / "caspian"


def test_commands_find_one_store_wherever_they_start(tmp_path: Path) -> None:
    xdg = tmp_path / "xdg"
    env = {name: value for name, value in os.environ.items() if not name.startswith("CASPIAN_")}
    env["XDG_DATA_HOME"] = str(xdg)

    def run(cwd: Path, *args: str) -> str:
        cwd.mkdir(exist_ok=True)
        result = subprocess.run(
            [sys.executable, "-m", "caspian", *args],
            capture_output=True,
            text=True,
            env=env,
            cwd=cwd,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        return result.stdout

    created = json.loads(run(tmp_path / "one", "keys", "create", "--user", "bob", "--json"))
    listed = json.loads(run(tmp_path / "two", "keys", "list", "--json"))
    assert [key["accessKeyID"] for key in listed] == [created["accessKeyID"]]
    data_dir = xdg / "caspian"
    assert mode(data_dir) == 0o700
    assert mode(data_dir / "caspian.db") == 0o600
    assert not (tmp_path / "one" / "caspian-data").exists()


def test_a_new_data_directory_is_private(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    running = start_service(data_dir)
    try:
        running.token()
        assert mode(data_dir) == 0o700
        files = {path.name: mode(path) for path in data_dir.iterdir()}
        assert {"caspian.db", "jwt-secret"} <= set(files)
        # Besides, SQLite's write-ahead log and shared memory, while it runs.
        assert set(files.values()) == {0o600}, files
    finally:
        running.stop()


def test_an_open_data_directory_is_tightened_and_said_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data_dir = tmp_path / "data"
    start_service(data_dir).stop()
    data_dir.chmod(0o755)
    for name in ("caspian.db", "jwt-secret"):
        (data_dir / name).chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="caspian.files"):
        running = start_service(data_dir)
        running.stop()
    assert mode(data_dir) == 0o700
    assert mode(data_dir / "caspian.db") == 0o600
    assert mode(data_dir / "jwt-secret") == 0o600
    warned = [record.getMessage() for record in caplog.records if record.name == "caspian.files"]
    for path in (data_dir, data_dir / "caspian.db", data_dir / "jwt-secret"):
        assert any(message.startswith(f"{path} was open to other users") for message in warned)


def test_a_store_outside_the_data_directory_is_private_too(tmp_path: Path) -> None:
    database = tmp_path / "elsewhere" / "store.db"
    ok(tmp_path / "data", "users", "list", CASPIAN_DATABASE_URL=f"sqlite+aiosqlite:///{database}")
    assert mode(database.parent) == 0o700
    assert mode(database) == 0o600
    database.chmod(0o664)
    ok(tmp_path / "data", "users", "list", CASPIAN_DATABASE_URL=f"sqlite+aiosqlite:///{database}")
    assert mode(database) == 0o600


def test_recordings_are_private(tmp_path: Path) -> None:
    out = tmp_path / "recordings" / "market.jsonl.gz"
    out.parent.mkdir()
    out.write_bytes(b"")
    out.chmod(0o644)
    recorder = Recorder(out, rotate_bytes=1)
    for trade in range(2):
        recorder.write(TradeEvent("FX-BTC/USD=GEMINI", 1_000_000, 1.0, 2.0, str(trade), {}))
        recorder.flush()
    recorder.close()
    assert len(recorder.files) == 2
    assert [mode(path) for path in recorder.files] == [0o600, 0o600]


# -- /metrics ------------------------------------------------------------------


def test_metrics_can_require_a_token(tmp_path: Path) -> None:
    token = "scrape-me-0123456789"
    running = start_service(tmp_path / "data", metrics_token=token)
    url = f"{running.base_url}/metrics"
    try:
        for headers in (
            {},
            {"Authorization": token},
            {"Authorization": "Bearer wrong-0123456789"},
            {"Authorization": f"Bearer {token}x"},
            {"Authorization": f"Basic {token}"},
            {"Authorization": "Bearer"},
        ):
            refused = httpx.get(url, headers=headers, timeout=30)
            assert refused.status_code == 401, headers
            assert refused.json() == {
                "code": 401,
                "message": "The metrics token is missing or wrong",
            }
            assert refused.headers["www-authenticate"].startswith("Bearer")
        for scheme in ("Bearer", "bearer"):
            scraped = httpx.get(url, headers={"Authorization": f"{scheme} {token}"}, timeout=30)
            assert scraped.status_code == 200
            assert "caspian_" in scraped.text
    finally:
        running.stop()


def test_metrics_are_open_without_a_token(tmp_path: Path) -> None:
    running = start_service(tmp_path / "data")
    try:
        assert httpx.get(f"{running.base_url}/metrics", timeout=30).status_code == 200
    finally:
        running.stop()


# -- the log -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "shown"),
    [
        (
            f"< GET /v1/stream?accessToken={TOKEN} HTTP/1.1",
            f"< GET /v1/stream?accessToken=jwt:{SIGNATURE[:6]}… HTTP/1.1",
        ),
        (f"< authorization: Bearer {TOKEN}", f"< authorization: Bearer jwt:{SIGNATURE[:6]}…"),
        ("< Authorization: not-even-a-token", "< Authorization: [redacted]"),
        (
            f"[(b'host', b'x'), (b'authorization', b'{TOKEN}')]",
            f"[(b'host', b'x'), (b'authorization', b'jwt:{SIGNATURE[:6]}…')]",
        ),
        (
            '{"type":"Credential","payload":{"user":"lee","pass":"my \\"quoted\\" pass"}}',
            '{"type":"Credential","payload":{"user":"lee","pass":"[redacted]"}}',
        ),
        (
            "{'accessKeyID': 'KEY1', 'secretAccessKey': 'abc/def+ghi'}",
            "{'accessKeyID': 'KEY1', 'secretAccessKey': '[redacted]'}",
        ),
        (
            "Settings(jwt_secret='a b c', token_ttl_s=86400)",
            "Settings(jwt_secret='[redacted]', token_ttl_s=86400)",
        ),
        ("GET /x?a=1&access_token=abc&b=2", "GET /x?a=1&access_token=[redacted]&b=2"),
        (f"token {TOKEN}, then", f"token jwt:{SIGNATURE[:6]}…, then"),
        (
            f'< TEXT \'{{"requestId":"1","type":"TokenRefresh"...{SIGNATURE[-20:]}"}}}}\'',
            '< TEXT \'{"requestId":"1","type":"TokenRefresh"...[redacted]"}}\'',
        ),
        ('< TEXT \'{...MINI","type":"Level1"}}\'', '< TEXT \'{...MINI","type":"Level1"}}\''),
        (
            "hash $argon2id$v=19$m=65536,t=3,p=4$c2FsdA$aGFzaA!",
            "hash $argon2…[redacted]!",
        ),
        # Words about tokens are not tokens.
        ("invalid token: Signature has expired", "invalid token: Signature has expired"),
        ("TokenRefresh answered 200; bypass=1", "TokenRefresh answered 200; bypass=1"),
    ],
)
def test_redact(line: str, shown: str) -> None:
    assert redact(line) == shown


def test_records_are_redacted_in_arguments_and_tracebacks() -> None:
    try:
        raise ValueError(f"bad token {TOKEN}")
    except ValueError:
        record = logging.LogRecord(
            "x", logging.ERROR, __file__, 1, "%s %s", (TOKEN, 7), sys.exc_info()
        )
    redact_record(record)
    assert record.getMessage() == f"jwt:{SIGNATURE[:6]}… 7"
    assert record.exc_text is not None
    assert SIGNATURE not in record.exc_text and "ValueError: bad token jwt:" in record.exc_text
    # An argument whose text holds a token, though it is not a string itself.
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "%r", ({"token": TOKEN},), None)
    redact_record(record)
    assert SIGNATURE not in record.getMessage()


@pytest.fixture
def record_factory() -> Iterator[None]:
    """The process's log record factory, as it was before the test."""
    saved = logging.getLogRecordFactory()
    yield
    logging.setLogRecordFactory(saved)


@pytest.mark.usefixtures("record_factory")
def test_redaction_covers_every_logger_and_handler_once_installed() -> None:
    install_redaction()
    install_redaction()
    written: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            written.append(self.format(record))

    # A logger with a handler of its own that does not propagate, as uvicorn sets up its
    # own: a filter on the root logger's handlers would never see its records.
    isolated = logging.getLogger("caspian.tests.isolated")
    isolated.addHandler(Collect())
    isolated.propagate = False
    isolated.setLevel(logging.DEBUG)
    isolated.debug("< GET /v1/stream?accessToken=%s", TOKEN)
    isolated.info("%s", f"Authorization: {TOKEN}")
    assert written == [
        f"< GET /v1/stream?accessToken=jwt:{SIGNATURE[:6]}…",
        f"Authorization: jwt:{SIGNATURE[:6]}…",
    ]


class LoggedServer:
    """``caspian serve`` as a child process whose whole output goes to a file."""

    def __init__(self, data_dir: Path, log_path: Path, **env: str) -> None:
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "caspian", "serve", "--port", "0"],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=cli_env(data_dir, **env),
            cwd=data_dir.parent,
        )
        deadline = time.monotonic() + 60
        printed: dict[str, str] = {}
        while len(printed) < 2:
            if time.monotonic() > deadline or self.process.poll() is not None:
                self.stop()
                raise AssertionError(f"serve printed no addresses: {self.output()}")
            time.sleep(0.05)
            for line in self.output().splitlines():
                label, _, url = line.partition(": ")
                if label in ("Caspian REST API", "Caspian stream"):
                    printed[label] = url.strip()
        self.rest_url = printed["Caspian REST API"]
        self.stream_url = printed["Caspian stream"]

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> str:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.output()


def _login(rest_url: str, body: object) -> httpx.Response:
    return httpx.post(f"{rest_url}/auth/authenticate", json=body, timeout=30)


async def _streams(stream_url: str, key_token: str, user_token: str) -> None:
    """Streams with the token as query parameter and as header, subscriptions, a good and
    a bad TokenRefresh, and a stream refused for a forged token."""
    by_query = await StreamClient.open(stream_url, token=key_token)
    by_header = await StreamClient.open(stream_url, header=f"Bearer {user_token}")
    try:
        await by_query.subscribe("FX-BTC/USD=GEMINI")
        await by_header.subscribe("FX-ETH/USD=GEMINI", "Level2")
        refresh = await by_query.send("TokenRefresh", {"accessToken": key_token})
        answer = await by_query.response(refresh)
        assert answer["payload"]["code"] == 200, answer
        bad = await by_header.send("TokenRefresh", {"accessToken": key_token[:-4] + "AAAA"})
        assert (await by_header.response(bad))["payload"]["code"] != 200
    finally:
        await by_query.close()
        await by_header.close()
    rejected = await StreamClient.open(stream_url, token=user_token[:-4] + "AAAA")
    assert await rejected.closed_with() == 3001


def test_debug_log_of_a_whole_session_holds_no_secret(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    created = json.loads(ok(data_dir, "keys", "create", "--user", "kim", "--json"))
    key_id, key_secret = created["accessKeyID"], created["secretAccessKey"]
    password = "correct horse battery staple 42"
    ok(data_dir, "users", "create", "lee", "--password-stdin", stdin=f"{password}\n")
    metrics_token = "metrics-scrape-token-0123456789abcdef"
    wrong_secret = "WrongSecretWrongSecretWrongSecret00"
    wrong_password = "not the password at all 99"
    server = LoggedServer(
        data_dir,
        tmp_path / "serve.log",
        CASPIAN_LOG_LEVEL="debug",
        CASPIAN_METRICS_TOKEN=metrics_token,
    )
    secrets: dict[str, str] = {
        "key secret": key_secret,
        "password": password,
        "metrics token": metrics_token,
        "wrong secret": wrong_secret,
        "wrong password": wrong_password,
    }
    try:
        key_login = _login(
            server.rest_url,
            {"type": "Key", "payload": {"accessKeyID": key_id, "secretAccessKey": key_secret}},
        )
        assert key_login.status_code == 200, key_login.text
        user_login = _login(
            server.rest_url, {"type": "Credential", "payload": {"user": "lee", "pass": password}}
        )
        assert user_login.status_code == 200, user_login.text
        key_token = key_login.json()["accessToken"]
        user_token = user_login.json()["accessToken"]
        secrets |= {"key token": key_token, "user token": user_token}
        failed = _login(
            server.rest_url,
            {"type": "Key", "payload": {"accessKeyID": key_id, "secretAccessKey": wrong_secret}},
        )
        assert failed.status_code == 401
        failed = _login(
            server.rest_url,
            {"type": "Credential", "payload": {"user": "lee", "pass": wrong_password}},
        )
        assert failed.status_code == 401
        for token in (key_token, f"Bearer {user_token}"):
            exchanges = httpx.get(
                f"{server.rest_url}/reference/exchanges",
                headers={"Authorization": token},
                timeout=30,
            )
            assert exchanges.status_code == 200
        product = httpx.get(
            f"{server.rest_url}/reference/products/FX-BTC/USD=GEMINI",
            params={"accessToken": key_token},
            headers={"Authorization": user_token},
            timeout=30,
        )
        assert product.status_code == 200
        metrics = httpx.get(
            server.rest_url.removesuffix("/v1") + "/metrics",
            headers={"Authorization": f"Bearer {metrics_token}"},
            timeout=30,
        )
        assert metrics.status_code == 200
        asyncio.run(_streams(server.stream_url, key_token, user_token))
    finally:
        log = server.stop()
    secrets["signing key"] = (data_dir / "jwt-secret").read_text().strip()
    lines = log.splitlines()
    # The run was logged at debug level, handshakes included: there is something to scan.
    assert any(" DEBUG " in line for line in lines), log[:2000]
    assert any("/v1/stream" in line for line in lines), log[:2000]
    # A token's signature is what makes it usable: no part of it longer than the six
    # characters that tell tokens apart may show either.
    pieces = {
        what: [value]
        if not what.endswith("token") or "." not in value
        else [
            value.rsplit(".", 1)[1][start : start + 12]
            for start in range(len(value.rsplit(".", 1)[1]) - 11)
        ]
        for what, value in secrets.items()
    }
    leaks = [
        (what, line)
        for line in lines
        for what, values in pieces.items()
        if any(value in line for value in values)
    ]
    assert not leaks, leaks[:5]
