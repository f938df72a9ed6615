"""The operator's ``caspian`` command, run as a real process on a data directory of its own."""

from __future__ import annotations

import asyncio
import json
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
import typer

from caspian import cli
from caspian.catalog.ccxt_markets import products_from_ccxt
from caspian.catalog.importer import fetch_ccxt_markets
from caspian.settings import Settings
from caspian.store import GatewayInfo, SessionInfo, Store
from tests.support.cli import caspian, cli_env, fails, ok
from tests.support.kraken import RecordedExchange, recorded_kraken
from tests.support.running import Started
from tests.support.service import start_service

SRC = Path(__file__).resolve().parents[1] / "src" / "caspian"
KRAKEN_MARKETS = SRC / "catalog" / "data" / "ccxt" / "kraken.json"
KEY_ID = re.compile(r"[A-Z0-9]{20}")
PRODUCT_COUNTS = re.compile(r"^KRAKEN: (\d+) products created, (\d+) updated$")
REFRESH_COUNTS = re.compile(r"^KRAKEN: (\d+) products created, (\d+) updated, (\d+) retired$")


def products(data_dir: Path) -> dict[str, dict[str, Any]]:
    listed = json.loads(ok(data_dir, "products", "list", "--exchange", "KRAKEN", "--json"))
    return {product["caspianCode"]: product for product in listed}


def authenticate(base_url: str, key_id: str, secret: str) -> httpx.Response:
    return httpx.post(
        f"{base_url}/v1/auth/authenticate",
        json={"type": "Key", "payload": {"accessKeyID": key_id, "secretAccessKey": secret}},
        timeout=30,
    )


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


def test_console_script_is_installed(tmp_path: Path) -> None:
    script = shutil.which("caspian")
    assert script is not None
    result = subprocess.run(
        [script, "--help"], capture_output=True, text=True, env=cli_env(tmp_path), timeout=60
    )
    assert result.returncode == 0
    for command in ("serve", "users", "keys", "sessions", "products", "db"):
        assert command in result.stdout


def test_db_upgrade_creates_and_seeds_the_store(data_dir: Path) -> None:
    assert ok(data_dir, "db", "upgrade").strip() == "the store is up to date"
    assert (data_dir / "caspian.db").is_file()
    # Running it again changes nothing and still succeeds.
    ok(data_dir, "db", "upgrade")
    kraken = products(data_dir)
    assert "FX-BTC/USD=KRAKEN" in kraken


def test_users(data_dir: Path) -> None:
    assert ok(data_dir, "users", "list").strip() == "no users"
    created = ok(data_dir, "users", "create", "carol", "--password-stdin", stdin="pa ss\n")
    assert created.strip() == "created user carol"
    duplicate = fails(data_dir, "users", "create", "carol", "--password-stdin", stdin="x\n")
    assert "already exists" in duplicate
    assert "empty" in fails(data_dir, "users", "create", "dan", "--password-stdin", stdin="")
    assert "--password-stdin" in fails(data_dir, "users", "create", "dan")
    assert "invalid user name" in fails(
        data_dir, "users", "create", "no spaces", "--password-stdin", stdin="pw\n"
    )

    listed = json.loads(ok(data_dir, "users", "list", "--json"))
    assert [(user["name"], user["credential"], user["exchanges"]) for user in listed] == [
        ("carol", True, "ALL")
    ]
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", listed[0]["created"])
    table = ok(data_dir, "users", "list")
    assert "carol" in table and "ALL" in table

    # On a store no server has seeded yet, revoking one exchange keeps all the others.
    revoked = ok(data_dir, "users", "revoke", "carol", "kraken").strip()
    assert revoked.startswith("carol: ")
    left = revoked.removeprefix("carol: ").split(",")
    assert len(left) == 21 and "KRAKEN" not in left and "GEMINI" in left
    assert ok(data_dir, "users", "revoke", "carol", "--all").strip() == "carol: none"
    assert ok(data_dir, "users", "grant", "carol", "GEMINI").strip() == "carol: GEMINI"
    assert ok(data_dir, "users", "grant", "carol", "DERIBIT").strip() == "carol: DERIBIT,GEMINI"
    assert json.loads(ok(data_dir, "users", "list", "--json"))[0]["exchanges"] == "DERIBIT,GEMINI"
    assert ok(data_dir, "users", "grant", "carol", "--all").strip() == "carol: ALL"

    assert "unknown exchange NOPE" in fails(data_dir, "users", "grant", "carol", "NOPE")
    assert "unknown exchange NOPE" in fails(data_dir, "users", "revoke", "carol", "NOPE")
    assert "no user" in fails(data_dir, "users", "grant", "nobody", "--all")
    assert "--all" in fails(data_dir, "users", "grant", "carol")
    assert "--all" in fails(data_dir, "users", "grant", "carol", "GEMINI", "--all")


def test_users_disable_enable_and_passwd(data_dir: Path) -> None:
    ok(data_dir, "users", "create", "erin", "--password-stdin", stdin="first\n")

    def credential_works(password: str) -> bool:
        async def check() -> bool:
            store = Store(f"sqlite+aiosqlite:///{data_dir / 'caspian.db'}")
            try:
                return await store.verify_credential("erin", password) is not None
            finally:
                await store.close()

        return asyncio.run(check())

    def disabled() -> bool:
        [erin] = json.loads(ok(data_dir, "users", "list", "--json"))
        return bool(erin["disabled"])

    assert not disabled()
    assert ok(data_dir, "users", "disable", "erin").strip() == "disabled erin"
    assert disabled() and not credential_works("first")
    assert "disabled" in ok(data_dir, "users", "list")
    assert ok(data_dir, "users", "enable", "erin").strip() == "enabled erin"
    assert not disabled() and credential_works("first")

    changed = ok(data_dir, "users", "passwd", "erin", "--password-stdin", stdin="second\n")
    assert changed.strip() == "changed the password of erin"
    assert credential_works("second") and not credential_works("first")
    assert "--password-stdin" in fails(data_dir, "users", "passwd", "erin")
    assert "empty" in fails(data_dir, "users", "passwd", "erin", "--password-stdin", stdin="\n")
    for command in (("disable",), ("enable",), ("passwd", "--password-stdin")):
        error = fails(data_dir, "users", command[0], "nobody", *command[1:], stdin="pw\n")
        assert error == "error: no user 'nobody'"


def test_keys(data_dir: Path) -> None:
    out = ok(data_dir, "keys", "create", "--user", "erin", "--json")
    assert out.count("\n") == 1
    created = json.loads(out)
    assert list(created) == ["accessKeyID", "secretAccessKey"]
    assert KEY_ID.fullmatch(created["accessKeyID"])
    assert len(created["secretAccessKey"]) >= 40

    plain = caspian(data_dir, "keys", "create", "--user", "erin")
    assert plain.returncode == 0
    shown = dict(line.split(":", 1) for line in plain.stdout.strip().splitlines())
    assert KEY_ID.fullmatch(shown["accessKeyID"].strip())
    assert len(shown["secretAccessKey"].strip()) >= 40
    assert "only now" in plain.stderr

    # The key's owner was made on the way, without a password.
    users = json.loads(ok(data_dir, "users", "list", "--json"))
    assert [(user["name"], user["credential"]) for user in users] == [("erin", False)]

    listed = json.loads(ok(data_dir, "keys", "list", "--json"))
    assert [key["accessKeyID"] for key in listed] == [
        created["accessKeyID"],
        shown["accessKeyID"].strip(),
    ]
    assert all(key["user"] == "erin" and key["revoked"] is False for key in listed)
    table = ok(data_dir, "keys", "list")
    assert created["accessKeyID"] in table
    assert created["secretAccessKey"] not in table

    revoked = ok(data_dir, "keys", "revoke", created["accessKeyID"])
    assert revoked.strip() == f"revoked {created['accessKeyID']}"
    after = {
        key["accessKeyID"]: key["revoked"]
        for key in json.loads(ok(data_dir, "keys", "list", "--json"))
    }
    assert after == {created["accessKeyID"]: True, shown["accessKeyID"].strip(): False}
    assert "no key" in fails(data_dir, "keys", "revoke", "NOSUCHKEY00000000000")
    assert "invalid user name" in fails(data_dir, "keys", "create", "--user", "a b")


def test_import_from_a_file_keeps_created_time(data_dir: Path, tmp_path: Path) -> None:
    ok(data_dir, "db", "upgrade")
    before = products(data_dir)
    assert "FX-DOT/USD=KRAKEN" not in before

    markets = json.loads(KRAKEN_MARKETS.read_text())
    markets["BTC/USD"]["precision"]["price"] = 0.5
    markets["DOT/USD"] = markets["XRP/USD"] | {
        "id": "DOTUSD",
        "symbol": "DOT/USD",
        "base": "DOT",
        "baseId": "DOT",
        "quote": "USD",
        "quoteId": "ZUSD",
        "precision": {"amount": 1e-08, "price": 0.0001},
    }
    changed = tmp_path / "kraken-changed.json"
    changed.write_text(json.dumps(markets))

    counts = PRODUCT_COUNTS.match(
        ok(data_dir, "products", "import", "--file", str(changed), "--exchange", "KRAKEN").strip()
    )
    assert counts is not None
    assert (int(counts[1]), int(counts[2])) == (1, len(before))
    first = products(data_dir)
    btc, old_btc = first["FX-BTC/USD=KRAKEN"], before["FX-BTC/USD=KRAKEN"]
    assert btc["tickRule"] == ",,0.5" and old_btc["tickRule"] == ",,0.1"
    assert btc["createdTime"] == old_btc["createdTime"]
    assert btc["updatedTime"] > old_btc["updatedTime"]
    dot = first["FX-DOT/USD=KRAKEN"]
    assert dot["nativeCode"] == "DOTUSD" and dot["tickRule"] == ",,0.0001"
    assert dot["description"].endswith(" - US Dollar - FX pair")
    assert dot["createdTime"] == dot["updatedTime"]

    # Named after the exchange, the file needs no --exchange.
    named = tmp_path / "kraken.json"
    shutil.copy(changed, named)
    again = PRODUCT_COUNTS.match(ok(data_dir, "products", "import", "--file", str(named)).strip())
    assert again is not None and int(again[1]) == 0
    second = products(data_dir)
    assert second["FX-DOT/USD=KRAKEN"]["createdTime"] == dot["createdTime"]
    assert second["FX-DOT/USD=KRAKEN"]["updatedTime"] > dot["updatedTime"]
    assert set(second) == set(first)


@pytest.fixture
def kraken() -> Iterator[RecordedExchange]:
    with recorded_kraken() as exchange:
        yield exchange


async def test_ccxt_loads_kraken_markets_from_the_recording(kraken: RecordedExchange) -> None:
    markets = await fetch_ccxt_markets("KRAKEN", api_url=kraken.url)
    assert set(kraken.requested) == {"/0/public/Assets", "/0/public/AssetPairs"}
    assert markets["ETH/EUR"]["id"] == "XETHZEUR"
    assert markets["BTC/EUR"]["active"] is False
    specs = {spec.caspian_code: spec for spec in products_from_ccxt("KRAKEN", markets)}
    assert sorted(specs) == [
        "FX-ADA/USDT=KRAKEN",
        "FX-BTC/USD=KRAKEN",
        "FX-ETH/BTC=KRAKEN",
        "FX-ETH/EUR=KRAKEN",
    ]
    eth = specs["FX-ETH/BTC=KRAKEN"]
    assert (eth.native_code, eth.tick_rule, eth.lot_size) == ("XETHXXBT", ",,0.00001", "0.00000001")
    assert eth.pseudo_code == "ETHBTC=KRAKEN"


def test_import_through_ccxt(data_dir: Path, kraken: RecordedExchange) -> None:
    assert "--ccxt-url" in ok(data_dir, "products", "import", "--help")
    ok(data_dir, "db", "upgrade")
    before = products(data_dir)
    counts = REFRESH_COUNTS.match(
        ok(data_dir, "products", "import", "--ccxt", "KRAKEN", "--ccxt-url", kraken.url).strip()
    )
    assert counts is not None
    assert {"/0/public/Assets", "/0/public/AssetPairs"} <= set(kraken.requested)
    after = products(data_dir)
    new = {"FX-ETH/EUR=KRAKEN", "FX-ETH/BTC=KRAKEN"}
    # The built-in Kraken products the recorded exchange no longer lists are retired.
    delisted = {
        code
        for code, product in before.items()
        if product["exchange"] == "KRAKEN"
        and code not in {"FX-BTC/USD=KRAKEN", "FX-ADA/USDT=KRAKEN"}
    }
    assert (int(counts[1]), int(counts[2]), int(counts[3])) == (len(new), 2, len(delisted))
    assert set(after) == (set(before) - delisted) | new
    assert after["FX-ETH/EUR=KRAKEN"]["nativeCode"] == "XETHZEUR"
    assert after["FX-ETH/EUR=KRAKEN"]["tickRule"] == ",,0.01"
    # The pair Kraken lists as cancel_only is not tradable, so not a product.
    assert "FX-BTC/EUR=KRAKEN" not in after
    assert after["FX-BTC/USD=KRAKEN"]["createdTime"] == before["FX-BTC/USD=KRAKEN"]["createdTime"]
    assert after["FX-BTC/USD=KRAKEN"]["updatedTime"] > before["FX-BTC/USD=KRAKEN"]["updatedTime"]

    # An exchange answering with an error is reported, not crashed on.
    kraken.answers["/0/public/AssetPairs"] = (
        200,
        b'{"error":["EService:Unavailable"],"result":{}}',
    )
    failure = fails(data_dir, "products", "import", "--ccxt", "KRAKEN", "--ccxt-url", kraken.url)
    assert "could not load KRAKEN markets" in failure


def test_import_refuses_bad_input(data_dir: Path, tmp_path: Path) -> None:
    not_json = tmp_path / "markets.json"
    not_json.write_text("this is { not json")
    a_list = tmp_path / "list.json"
    a_list.write_text("[1, 2]")
    nothing = tmp_path / "nothing.json"
    nothing.write_text("{}")
    binary = tmp_path / "binary.json"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    existing = str(KRAKEN_MARKETS)
    cases: list[tuple[list[str], str]] = [
        (["--file", str(tmp_path / "missing.json"), "--exchange", "KRAKEN"], "No such file"),
        (["--file", str(not_json), "--exchange", "KRAKEN"], "is not JSON"),
        (["--file", str(binary), "--exchange", "KRAKEN"], "is not JSON"),
        (["--file", str(a_list), "--exchange", "KRAKEN"], "not a ccxt markets object"),
        (["--file", str(nothing), "--exchange", "KRAKEN"], "no product could be read"),
        (["--file", existing, "--exchange", "NOWHERE"], "unknown exchange 'NOWHERE'"),
        (["--file", str(not_json)], "name the exchange"),
        (["--ccxt", "NOWHERE"], "unknown exchange 'NOWHERE'"),
        (["--ccxt", "BTCC"], "ccxt does not support BTCC"),
        (["--file", existing, "--ccxt", "KRAKEN"], "either --file"),
        ([], "either --file"),
        (["--file", existing, "--ccxt-url", "http://127.0.0.1:9"], "--ccxt-url"),
    ]
    for args, expected in cases:
        assert expected in fails(data_dir, "products", "import", *args), args
    # Each was refused before the store was touched.
    assert not (data_dir / "caspian.db").exists()


def test_invalid_database_urls_are_one_line(data_dir: Path) -> None:
    for url in ("not a url", "nosuchdialect://x/y", "sqlite:///sync-driver.db"):
        line = fails(data_dir, "users", "list", CASPIAN_DATABASE_URL=url)
        assert "invalid database URL" in line
    assert "invalid database URL" in fails(
        data_dir, "serve", "--port", "0", timeout=30, CASPIAN_DATABASE_URL="not a url"
    )


def test_cli_acts_on_the_store_of_a_running_server(data_dir: Path) -> None:
    running = start_service(data_dir)
    try:
        created = json.loads(ok(data_dir, "keys", "create", "--user", "frank", "--json"))
        login = authenticate(running.base_url, created["accessKeyID"], created["secretAccessKey"])
        assert login.status_code == 200
        headers = {"Authorization": login.json()["accessToken"]}
        exchanges = httpx.get(
            f"{running.base_url}/v1/reference/exchanges", headers=headers, timeout=30
        )
        assert exchanges.status_code == 200 and len(exchanges.json()) == 22

        ok(data_dir, "users", "create", "gina", "--password-stdin", stdin="gina-pass\n")
        credential = httpx.post(
            f"{running.base_url}/v1/auth/authenticate",
            json={"type": "Credential", "payload": {"user": "gina", "pass": "gina-pass"}},
            timeout=30,
        )
        assert credential.status_code == 200

        markets = json.loads(KRAKEN_MARKETS.read_text())
        markets["BTC/USD"]["precision"]["price"] = 0.25
        changed = data_dir.parent / "kraken.json"
        changed.write_text(json.dumps(markets))
        ok(data_dir, "products", "import", "--file", str(changed))
        product = httpx.get(
            f"{running.base_url}/v1/reference/products/FX-BTC/USD=KRAKEN",
            headers=headers,
            timeout=30,
        )
        assert product.status_code == 200 and product.json()["tickRule"] == ",,0.25"

        ok(data_dir, "keys", "revoke", created["accessKeyID"])
        refused = httpx.get(
            f"{running.base_url}/v1/reference/exchanges", headers=headers, timeout=30
        )
        assert refused.status_code == 401
        again = authenticate(running.base_url, created["accessKeyID"], created["secretAccessKey"])
        assert again.status_code == 401
    finally:
        running.stop()


class Served:
    """``caspian serve`` as a child process, with the addresses it printed."""

    def __init__(self, data_dir: Path, *args: str, **env: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "caspian", "serve", "--port", "0", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=cli_env(data_dir, CASPIAN_LOG_LEVEL="warning", **env),
            cwd=data_dir.parent,
        )
        lines: queue.Queue[str] = queue.Queue()
        stdout = self.process.stdout
        assert stdout is not None

        def pump() -> None:
            for line in stdout:
                lines.put(line)

        threading.Thread(target=pump, daemon=True).start()
        printed: dict[str, str] = {}
        deadline = time.monotonic() + 60
        while len(printed) < 2:
            try:
                line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                self.process.kill()
                _, stderr = self.process.communicate()
                raise AssertionError(f"serve printed no addresses: {stderr}") from None
            label, _, url = line.partition(": ")
            printed[label] = url.strip()
        self.rest_url = printed["Caspian REST API"]
        self.stream_url = printed["Caspian stream"]

    @property
    def base_url(self) -> str:
        return self.rest_url.removesuffix("/v1")

    def stop(self, how: signal.Signals) -> tuple[int, str, float]:
        """Send the signal; the exit code, stderr and how long stopping took."""
        started = time.monotonic()
        self.process.send_signal(how)
        try:
            _, stderr = self.process.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise
        return self.process.returncode, stderr, time.monotonic() - started


@pytest.mark.parametrize("how", [signal.SIGINT, signal.SIGTERM])
def test_serve_answers_and_stops_cleanly(data_dir: Path, how: signal.Signals) -> None:
    created = json.loads(ok(data_dir, "keys", "create", "--user", "hank", "--json"))
    served = Served(data_dir)
    try:
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+/v1", served.rest_url)
        port = served.rest_url.rsplit(":", 1)[1].removesuffix("/v1")
        assert served.stream_url == f"ws://127.0.0.1:{port}/v1/stream"
        login = authenticate(served.base_url, created["accessKeyID"], created["secretAccessKey"])
        assert login.status_code == 200
        token = login.json()["accessToken"]
        exchanges = httpx.get(
            f"{served.rest_url}/reference/exchanges", headers={"Authorization": token}, timeout=30
        )
        assert exchanges.status_code == 200
        assert {"name": "Kraken", "code": "KRAKEN"} in exchanges.json()

        # No CASPIAN_JWT_SECRET: the key is generated once, kept private, and signs tokens.
        secret_file = data_dir / "jwt-secret"
        assert secret_file.stat().st_mode & 0o777 == 0o600
        secret = secret_file.read_text().strip()
        claims = jwt.decode(token, secret, algorithms=["HS256"], issuer="Caspian Tech")
        assert claims["sub"] == created["accessKeyID"]
    finally:
        code, stderr, took = served.stop(how)
    assert code == 0, stderr
    assert "Traceback" not in stderr, stderr
    assert took < 10
    # SQLite folds its write-ahead log back and deletes it when the last connection
    # closes: a server killed before closing its store leaves the file behind.
    assert not (data_dir / "caspian.db-wal").exists()


def test_serve_with_a_configured_signing_key(data_dir: Path) -> None:
    configured = "a-signing-key-given-by-the-operator-0123456789"
    created = json.loads(ok(data_dir, "keys", "create", "--user", "ivy", "--json"))
    served = Served(data_dir, CASPIAN_JWT_SECRET=configured)
    try:
        login = authenticate(served.base_url, created["accessKeyID"], created["secretAccessKey"])
        assert login.status_code == 200
        token = login.json()["accessToken"]
        claims = jwt.decode(token, configured, algorithms=["HS256"], issuer="Caspian Tech")
        assert claims["sub"] == created["accessKeyID"]
        with pytest.raises(jwt.InvalidSignatureError):
            jwt.decode(token, "some-other-key-of-enough-length-0123456789", algorithms=["HS256"])
        assert not (data_dir / "jwt-secret").exists()
    finally:
        code, stderr, _ = served.stop(signal.SIGTERM)
    assert code == 0, stderr


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"CASPIAN_PORT": "notaport"}, "port"),
        ({"CASPIAN_PORT": "70000"}, "port"),
        ({"CASPIAN_MAINTENANCE": "garbage"}, "maintenance"),
        ({"CASPIAN_TOKEN_TTL_S": "-5"}, "token_ttl_s"),
        ({"CASPIAN_JWT_SECRET": "too-short"}, "at least 32 characters"),
        ({"CASPIAN_SOURCE": "carrier-pigeon"}, "unsupported source"),
        ({"CASPIAN_REUSE_PORT": "maybe"}, "reuse_port"),
        ({"CASPIAN_LIVE_MAX_LAG_S": "0"}, "live_max_lag_s"),
        ({"CASPIAN_SOURCE": "live:CEX"}, "cannot stream CEX live"),
        ({"CASPIAN_BUS": "redis://127.0.0.1:6379"}, "neither memory nor a nats://"),
        ({"CASPIAN_BUS": "nats://127.0.0.1:4222,,nats://b:4222"}, "an empty entry"),
        ({"CASPIAN_BUS": "nats://:4222"}, "names no host"),
        ({"CASPIAN_BUS": "nats://127.0.0.1:4222/db"}, "no path, query or fragment"),
        ({"CASPIAN_BUS_PREFIX": "caspian.*"}, "bus_prefix"),
        ({"CASPIAN_BUS_PREFIX": "a..b"}, "bus_prefix"),
        ({"CASPIAN_NATS_CREDS": "/nonexistent/user.creds"}, "nats_creds: Value error, cannot read"),
        ({"CASPIAN_NATS_CREDS": __file__}, "not a NATS credentials file"),
        ({"CASPIAN_NATS_TLS_CA": "/nonexistent/ca.pem"}, "CASPIAN_NATS_TLS_CA: cannot load"),
        ({"CASPIAN_NATS_TLS_CERT": __file__}, "CASPIAN_NATS_TLS_CERT/KEY: cannot load"),
        ({"CASPIAN_NATS_TLS_KEY": __file__}, "needs CASPIAN_NATS_TLS_CERT"),
    ],
)
def test_serve_refuses_invalid_settings(data_dir: Path, env: dict[str, str], expected: str) -> None:
    # A free port unless the case is about the port, and a timeout: a setting wrongly
    # accepted would otherwise leave a server running.
    line = fails(data_dir, "serve", timeout=30, **({"CASPIAN_PORT": "0"} | env))
    assert expected in line


@pytest.mark.parametrize(
    "bus",
    [
        "nats://caspian:s3cret-pass@127.0.0.1:notaport",
        "nats://127.0.0.1:4222, nats://s3cret-pass@b:70000",
        "redis://caspian:s3cret-pass@127.0.0.1:6379",
    ],
)
def test_a_bad_bus_is_shown_without_its_password(data_dir: Path, bus: str) -> None:
    line = fails(data_dir, "serve", timeout=30, CASPIAN_PORT="0", CASPIAN_BUS=bus)
    assert "s3cret-pass" not in line
    assert "***@" in line


def test_serve_on_a_taken_port_says_which(data_dir: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        line = fails(data_dir, "serve", "--port", str(port), timeout=30)
    assert f"cannot listen on 127.0.0.1:{port}" in line


# -- what a new user sees: version, help, banner, the store in use ---------------------


def test_version(tmp_path: Path) -> None:
    assert ok(tmp_path / "data", "--version").strip() == f"caspian {version('caspian')}"


def _model_default(name: str) -> str | None:
    default = Settings.model_fields[name].get_default(call_default_factory=True)
    if default is None:
        return None
    # As the variable takes it: true, ["Caspian", "Pseudo", "Native"].
    return json.dumps(default) if isinstance(default, bool | list) else str(default)


def _unspaced(text: str) -> str:
    # Help is wrapped to the terminal, at spaces and after hyphens ("00:15-" / "00:16").
    return re.sub(r"\s+", "", text)


@pytest.mark.parametrize("command", [(), ("serve",), ("ingest",), ("gateway",), ("record",)])
def test_help_shows_each_flag_s_default_from_the_settings_model(
    tmp_path: Path, command: tuple[str, ...]
) -> None:
    click_command = typer.main.get_command(cli.app)
    for name in command:
        assert isinstance(click_command, typer.core.TyperGroup)
        click_command = click_command.commands[name]
    flags = [param.name for param in click_command.params if param.name in Settings.model_fields]
    assert flags, "no flag of this command is a setting"
    shown = _unspaced(ok(tmp_path / "data", *command, "--help", COLUMNS="60"))
    for name in flags:
        assert name is not None
        flag = f"--{name.replace('_', '-')}<"
        assert flag in shown, name
        after = shown[shown.index(flag) :]
        described = after[after.index("[envvar:") : after.index("]") + 1]
        default = _model_default(name)
        assert described == _unspaced(
            f"[env var: CASPIAN_{name.upper()}"
            + ("" if default is None else f"; default: {default}")
            + "]"
        ), name


@pytest.mark.parametrize("command", ["serve", "ingest", "gateway"])
def test_help_lists_every_setting_with_its_default(tmp_path: Path, command: str) -> None:
    text = ok(tmp_path / "data", command, "--help", COLUMNS="60")
    entries = {
        _unspaced(paragraph).split(":", 1)[0]: _unspaced(paragraph)
        for paragraph in text.split("\n\n")
        if paragraph.strip().startswith("CASPIAN_")
    }
    for name, field in Settings.model_fields.items():
        entry = entries[f"CASPIAN_{name.upper()}"]
        assert _unspaced(str(field.description)) in entry
        default = _model_default(name)
        if default is not None:
            assert entry.endswith(_unspaced(f"[default: {default}]")), entry
    # Read by the live source, not the model, and documented all the same.
    assert "CASPIAN_LIVE_URLS" in entries
    assert "none" in entries["CASPIAN_SOURCE"]


BANNER = (
    "Caspian REST API",
    "Caspian stream",
    "Caspian version",
    "Caspian store",
    "Caspian data dir",
    "Caspian source",
    "Caspian bus",
)


def test_serve_banner_says_what_it_runs_with_and_that_the_store_is_new(data_dir: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as closed:
        nats_port = closed.getsockname()[1]
    # The bus connects in the background: the banner is printed while NATS is down.
    env = {
        "CASPIAN_LOG_LEVEL": "warning",
        "CASPIAN_BUS": f"nats://caspian:s3cret-pass@127.0.0.1:{nats_port}",
    }
    first = Started(data_dir, "serve", "--port", "0", labels=BANNER, env=env)
    try:
        # Scripts read the addresses first, by label: they stay the first two lines.
        assert list(first.printed)[:2] == ["Caspian REST API", "Caspian stream"]
        assert first.printed["Caspian version"] == version("caspian")
        assert first.printed["Caspian store"] == (
            f"sqlite+aiosqlite:///{data_dir.resolve() / 'caspian.db'}"
        )
        assert first.printed["Caspian data dir"] == str(data_dir.resolve())
        assert first.printed["Caspian source"] == "simulator"
        assert first.printed["Caspian bus"] == f"nats://caspian:***@127.0.0.1:{nats_port}"
    finally:
        code, _ = first.stop()
    assert code == 0, first.stderr
    assert "s3cret-pass" not in first.stderr
    notes = [line for line in first.stderr.splitlines() if line.startswith("note: ")]
    assert notes == [
        "note: a new, empty store (no users, no keys) was created in the data directory "
        f"{data_dir.resolve()}; if you meant another, give CASPIAN_DATA_DIR or --data-dir"
    ], first.stderr

    again = Started(data_dir, "serve", "--port", "0", labels=BANNER, env=env)
    again.stop()
    assert "note: " not in again.stderr


def test_banner_hides_the_store_s_and_the_bus_s_passwords(
    capsys: pytest.CaptureFixture[str],
) -> None:
    settings = Settings(
        database_url="postgresql+asyncpg://caspian:db-pass@db.example:5432/caspian",
        bus="nats://caspian:bus-pass@a.example:4222,tls://bus-token@b.example:4222",
    )
    cli._print_setup(settings)
    printed = capsys.readouterr().out
    assert "db-pass" not in printed and "bus-pass" not in printed and "bus-token" not in printed
    lines = dict(line.split(": ", 1) for line in printed.splitlines())
    assert (
        lines["Caspian store"].strip() == "postgresql+asyncpg://caspian:***@db.example:5432/caspian"
    )
    assert (
        lines["Caspian bus"].strip() == "nats://caspian:***@a.example:4222,tls://***@b.example:4222"
    )


def test_a_command_on_a_new_store_says_so(data_dir: Path) -> None:
    notice = (
        "note: a new, empty store (no users, no keys) was created in the data directory "
        f"{data_dir.resolve()}; if you meant another, give CASPIAN_DATA_DIR or --data-dir"
    )
    created = caspian(data_dir, "keys", "create", "--user", "bob", "--json")
    assert created.returncode == 0, created.stderr
    assert created.stderr.strip() == notice
    # The store is there now: no notice any more.
    listed = caspian(data_dir, "keys", "list")
    assert listed.returncode == 0 and listed.stderr == ""

    # A command failing on a new store (most likely the wrong one) says both in one line.
    elsewhere = data_dir.parent / "elsewhere"
    line = fails(elsewhere, "users", "disable", "bob")
    assert line.startswith("error: no user 'bob' (a new, empty store")
    assert str(elsewhere.resolve()) in line

    # Given by URL: named with its password hidden, with the data directory.
    other = data_dir.parent / "other.db"
    by_url = caspian(data_dir, "users", "list", CASPIAN_DATABASE_URL=f"sqlite+aiosqlite:///{other}")
    assert by_url.returncode == 0
    assert by_url.stderr.startswith(
        f"note: a new, empty store (no users, no keys) was created at sqlite+aiosqlite:///{other} "
        f"(data directory {data_dir.resolve()})"
    )


# -- exchange codes -----------------------------------------------------------------


def test_exchange_codes_are_case_insensitive(data_dir: Path, tmp_path: Path) -> None:
    # On a store no server has started on, as a new user meets it.
    lower = json.loads(ok(data_dir, "products", "list", "--exchange", "gemini", "--json"))
    assert lower and {product["exchange"] for product in lower} == {"GEMINI"}
    assert lower == json.loads(ok(data_dir, "products", "list", "--exchange", "GEMINI", "--json"))
    mixed = ok(data_dir, "products", "list", "--exchange", "Gemini", COLUMNS="200")
    assert "FX-BTC/USD=GEMINI" in mixed

    ok(data_dir, "users", "create", "dora", "--password-stdin", stdin="dora-pass\n")
    assert ok(data_dir, "users", "revoke", "dora", "--all").strip() == "dora: none"
    assert ok(data_dir, "users", "grant", "dora", "gemini").strip() == "dora: GEMINI"
    assert ok(data_dir, "users", "grant", "dora", "Kraken").strip() == "dora: GEMINI,KRAKEN"
    assert ok(data_dir, "users", "revoke", "dora", "kraken").strip() == "dora: GEMINI"

    copy = tmp_path / "markets.json"
    shutil.copy(KRAKEN_MARKETS, copy)
    imported = ok(data_dir, "products", "import", "--file", str(copy), "--exchange", "kraken")
    assert PRODUCT_COUNTS.fullmatch(imported.strip())


@pytest.mark.parametrize(
    "args",
    [
        ("products", "list", "--exchange", "nasdaq"),
        ("products", "list", "--exchange", "nasdaq", "--json"),
        ("users", "grant", "dora", "nasdaq"),
        ("users", "revoke", "dora", "nasdaq"),
    ],
)
def test_an_unknown_exchange_is_an_error(data_dir: Path, args: tuple[str, ...]) -> None:
    ok(data_dir, "users", "create", "dora", "--password-stdin", stdin="dora-pass\n")
    line = fails(data_dir, *args)
    assert line.startswith("error: unknown exchange nasdaq (the codes are BINANCE, ")
    assert "GEMINI" in line


# -- tables ---------------------------------------------------------------------------


def _table_cells(text: str) -> list[list[str]]:
    """The rows of a Rich table, each cell's wrapped lines joined (spaces dropped)."""
    rows: list[list[str]] = []
    for line in text.splitlines():
        if not line.startswith("│"):
            continue
        parts = [part.strip() for part in line.strip().strip("│").split("│")]
        if parts[0]:
            rows.append(parts)
        else:
            rows[-1] = [cell + part for cell, part in zip(rows[-1], parts, strict=True)]
    return [[cell.replace(" ", "") for cell in row] for row in rows]


def _records(text: str) -> list[dict[str, str]]:
    """The rows of the layout for terminals too narrow for a table."""
    return [
        {name: value.strip() for name, value in (line.split(":", 1) for line in block.splitlines())}
        for block in text.strip().split("\n\n")
    ]


async def _open_session(data_dir: Path) -> None:
    store = Store(f"sqlite+aiosqlite:///{data_dir / 'caspian.db'}")
    try:
        gateway = GatewayInfo(
            id="gw-1", host="gateway-host-1", pid=4242, started_time=datetime(2026, 11, 23)
        )
        session = SessionInfo(
            id="3f9c2a7d41e0b865",
            user="hank-the-operator",
            key_id="V1QHTQPJ01921C3MDFHY",
            peer="192.168.100.200:54321",
            opened_time=datetime(2026, 11, 23, 23, 6, 56),
        )
        await store.sync_gateway(gateway, [session], [], 60.0)
    finally:
        await store.close()


@pytest.mark.parametrize(
    ("columns", "sessions_as"),
    # 80: the width at which sessions' times were cut ("2026-1…"); 120: a table whose
    # columns must wrap.
    [(40, "records"), (80, "records"), (120, "table")],
)
def test_tables_fit_the_terminal_and_cut_nothing(
    data_dir: Path, columns: int, sessions_as: str
) -> None:
    ok(data_dir, "keys", "create", "--user", "hank-the-operator")
    asyncio.run(_open_session(data_dir))
    sessions = ok(data_dir, "sessions", "list", COLUMNS=str(columns))
    assert sessions.startswith("┏") == (sessions_as == "table"), sessions
    for command in ("users", "keys", "sessions"):
        listed = json.loads(ok(data_dir, command, "list", "--json"))
        shown = ok(data_dir, command, "list", COLUMNS=str(columns))
        assert "…" not in shown
        assert max(len(line) for line in shown.splitlines()) <= columns, shown
        expected = [
            {name: "-" if value is None else str(value) for name, value in row.items()}
            for row in listed
        ]
        if shown.startswith("┏"):
            header = _table_cells(shown.replace("┃", "│").split("┡")[0])
            assert header == [[name.replace(" ", "") for name in expected[0]]]
            assert _table_cells(shown.split("┡")[1]) == [
                [value.replace(" ", "") for value in row.values()] for row in expected
            ]
        else:
            assert _records(shown) == expected, shown
    if sessions_as == "records":
        assert "opened:      2026-11-23 23:06:56" in sessions
