"""Access tokens, the signing key file, login limiting, the maintenance window and the
replay-format event lines, each on its own."""

from __future__ import annotations

import asyncio
import math
import multiprocessing
import re
import threading
import time
from calendar import timegm
from pathlib import Path
from typing import Any

import jwt
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from caspian.auth.proxies import TrustedProxies
from caspian.auth.ratelimit import (
    ADDRESS_FACTOR,
    KNOWN_ADDRESS_S,
    NAME_CHARS,
    PENDING_RETRY_S,
    USER_FACTOR,
    Attempt,
    Kind,
    LoginLimiter,
)
from caspian.auth.tokens import (
    TokenClaims,
    TokenError,
    TokenExpired,
    TokenInvalid,
    TokenService,
    load_or_create_secret,
)
from caspian.codes import Stream, StreamState
from caspian.events import (
    BookEvent,
    Event,
    EventFormatError,
    QuoteEvent,
    StatusEvent,
    TradeEvent,
    from_dict,
    from_json,
    to_dict,
    to_json,
)
from caspian.maintenance import MaintenanceWindow
from caspian.timefmt import parse_us

# Long enough for PyJWT's HS512 too, which one of the wrong tokens is signed with.
SECRET = "s" * 64
OTHER_SECRET = "o" * 64


def valid_claims(**changes: Any) -> dict[str, Any]:
    now = int(time.time())
    claims: dict[str, Any] = {
        "sub": "KEYID0000000000000000",
        "iss": "Caspian Tech",
        "iat": now,
        "exp": now + 600,
        "jti": "0123456789abcdef",
        "knd": "key",
        "usr": "alice",
    }
    claims.update(changes)
    return {name: value for name, value in claims.items() if value is not None}


# -- TokenService -------------------------------------------------------------


def test_issued_token_carries_its_claims() -> None:
    tokens = TokenService(SECRET, 3600)
    before = time.time()
    issued = tokens.issue("key", "KEYID0000000000000000", "alice")
    after = time.time()
    header = jwt.get_unverified_header(issued.token)
    assert header["alg"] == "HS256"
    payload = jwt.decode(issued.token, SECRET, algorithms=["HS256"], issuer="Caspian Tech")
    assert payload["sub"] == "KEYID0000000000000000"
    assert payload["knd"] == "key" and payload["usr"] == "alice"
    assert payload["jti"] == issued.claims.token_id
    assert isinstance(payload["iat"], int) and isinstance(payload["exp"], int)
    assert math.floor(before) <= payload["iat"] <= after
    # The expiry is a whole second, no earlier than a full lifetime after issue.
    assert issued.claims.expires_us % 1_000_000 == 0
    assert issued.claims.expires_us == payload["exp"] * 1_000_000
    assert before + 3600 <= payload["exp"] < after + 3600 + 1
    # The issue time to the microsecond, which ``iat`` rounds down to the second.
    assert payload["iat"] == payload["ius"] // 1_000_000
    assert before * 1_000_000 - 1 <= payload["ius"] <= after * 1_000_000 + 1
    assert issued.claims == TokenClaims(
        "key",
        "KEYID0000000000000000",
        "alice",
        payload["exp"] * 1_000_000,
        payload["jti"],
        payload["ius"],
    )
    assert tokens.verify(issued.token) == issued.claims


def test_every_token_is_distinct() -> None:
    tokens = TokenService(SECRET, 60)
    first = tokens.issue("user", "bob", "bob")
    second = tokens.issue("user", "bob", "bob")
    assert first.token != second.token
    assert first.claims.token_id != second.claims.token_id
    assert tokens.verify(second.token).kind == "user"


def test_expired_token() -> None:
    tokens = TokenService(SECRET, 60)
    now = int(time.time())
    expired = jwt.encode(valid_claims(iat=now - 120, exp=now - 1), SECRET, algorithm="HS256")
    with pytest.raises(TokenExpired):
        tokens.verify(expired)
    assert issubclass(TokenExpired, TokenError) and issubclass(TokenInvalid, TokenError)


@pytest.mark.parametrize(
    "token",
    [
        pytest.param(jwt.encode(valid_claims(), OTHER_SECRET, algorithm="HS256"), id="secret"),
        pytest.param(jwt.encode(valid_claims(), SECRET, algorithm="HS512"), id="HS512"),
        pytest.param(jwt.encode(valid_claims(), "", algorithm="none"), id="alg-none"),
        pytest.param(jwt.encode(valid_claims(iss="Someone"), SECRET), id="issuer"),
        pytest.param(jwt.encode(valid_claims(sub=None), SECRET), id="no-sub"),
        pytest.param(jwt.encode(valid_claims(iss=None), SECRET), id="no-iss"),
        pytest.param(jwt.encode(valid_claims(iat=None), SECRET), id="no-iat"),
        pytest.param(jwt.encode(valid_claims(exp=None), SECRET), id="no-exp"),
        pytest.param(jwt.encode(valid_claims(jti=None), SECRET), id="no-jti"),
        pytest.param(jwt.encode(valid_claims(knd=None), SECRET), id="no-kind"),
        pytest.param(jwt.encode(valid_claims(knd="admin"), SECRET), id="bad-kind"),
        pytest.param(jwt.encode(valid_claims(usr=None), SECRET), id="no-user"),
        pytest.param(jwt.encode(valid_claims(usr=7), SECRET), id="user-not-text"),
        pytest.param(jwt.encode(valid_claims(ius="soon"), SECRET), id="issued-not-int"),
        pytest.param(jwt.encode(valid_claims(ius=True), SECRET), id="issued-bool"),
        pytest.param("not.a.token", id="garbage"),
        pytest.param("", id="empty"),
    ],
)
def test_unusable_tokens_are_invalid(token: str) -> None:
    with pytest.raises(TokenInvalid):
        TokenService(SECRET, 60).verify(token)


def test_tampered_token_is_invalid() -> None:
    tokens = TokenService(SECRET, 60)
    header, _, signature = tokens.issue("key", "A" * 20, "alice").token.split(".")
    forged = jwt.encode(valid_claims(usr="mallory"), SECRET).split(".")[1]
    with pytest.raises(TokenInvalid):
        tokens.verify(f"{header}.{forged}.{signature}")


def test_short_signing_keys_are_refused() -> None:
    with pytest.raises(ValueError, match="32"):
        TokenService("x" * 31, 60)
    TokenService("x" * 32, 60)


# -- the signing key file -------------------------------------------------------


def test_signing_key_file(tmp_path: Path) -> None:
    data_dir = tmp_path / "not" / "yet" / "made"
    secret = load_or_create_secret(data_dir)
    path = data_dir / "jwt-secret"
    assert path.stat().st_mode & 0o777 == 0o600
    assert len(secret) >= 32
    TokenService(secret, 60)
    assert path.read_text().strip() == secret
    assert load_or_create_secret(data_dir) == secret
    # Only the key is left in the directory, no draft of it.
    assert [entry.name for entry in data_dir.iterdir()] == ["jwt-secret"]


def test_an_existing_key_file_is_used(tmp_path: Path) -> None:
    (tmp_path / "jwt-secret").write_text("k" * 40 + "\n")
    assert load_or_create_secret(tmp_path) == "k" * 40


def _create_at_once(data_dir: Path, threads: int) -> list[str]:
    """load_or_create_secret called by ``threads`` threads released together."""
    barrier = threading.Barrier(threads)
    found: list[str] = []

    def create() -> None:
        barrier.wait()
        found.append(load_or_create_secret(data_dir))

    workers = [threading.Thread(target=create) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return found


def test_concurrent_creation_agrees_on_one_key(tmp_path: Path) -> None:
    # The race is lost only now and then: many small rounds give it many chances.
    for round_ in range(40):
        data_dir = tmp_path / str(round_)
        found = _create_at_once(data_dir, 4)
        assert len(found) == 4
        assert len(set(found)) == 1, found
        assert len(found[0]) >= 32
        assert (data_dir / "jwt-secret").read_text().strip() == found[0]


def _create_in_process(data_dir: str, start: Any, results: Any) -> None:
    start.wait()
    results.put(load_or_create_secret(Path(data_dir)))


def test_concurrent_processes_agree_on_one_key(tmp_path: Path) -> None:
    context = multiprocessing.get_context("spawn")
    start = context.Event()
    results = context.Queue()
    processes = [
        context.Process(target=_create_in_process, args=(str(tmp_path / "data"), start, results))
        for _ in range(3)
    ]
    for process in processes:
        process.start()
    start.set()
    found = {results.get(timeout=60) for _ in processes}
    for process in processes:
        process.join(30)
        assert process.exitcode == 0
    assert len(found) == 1 and len(found.pop()) >= 32


# -- LoginLimiter -----------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def attempt(limiter: LoginLimiter, kind: Kind, name: str, address: str) -> Attempt:
    started = limiter.begin(kind, name, address)
    assert isinstance(started, Attempt), f"refused, retry after {started}"
    return started


def fail(limiter: LoginLimiter, kind: Kind, name: str, address: str, times: int = 1) -> None:
    for _ in range(times):
        attempt(limiter, kind, name, address).failed()


def test_limiter_locks_at_the_limit_and_lifts_after_the_window() -> None:
    clock = FakeClock()
    limiter = LoginLimiter(3, 10.0, clock=clock)
    fail(limiter, "key", "A", "192.0.2.1")
    clock.now += 1
    fail(limiter, "key", "A", "192.0.2.1")
    clock.now += 1
    fail(limiter, "key", "A", "192.0.2.1")
    # Locked until the first of the three failures (at 1000) is 10 s old.
    assert limiter.begin("key", "A", "192.0.2.1") == 8
    clock.now += 0.5
    assert limiter.begin("key", "A", "192.0.2.1") == 8
    clock.now = 1009.99
    assert limiter.begin("key", "A", "192.0.2.1") == 1
    clock.now = 1010.0
    # One more failure while two are still in the window locks again.
    fail(limiter, "key", "A", "192.0.2.1")
    assert limiter.begin("key", "A", "192.0.2.1") == 1
    clock.now = 1011.0
    attempt(limiter, "key", "A", "192.0.2.1").succeeded()


def test_parallel_attempts_are_limited_like_serial_ones() -> None:
    clock = FakeClock()
    limiter = LoginLimiter(5, 60.0, clock=clock)
    # 100 logins arrive before any of their secrets has been checked.
    started = [limiter.begin("key", "A", "192.0.2.1") for _ in range(100)]
    held = [one for one in started if isinstance(one, Attempt)]
    assert len(held) == 5
    # The others are told to come back once those settle.
    assert [one for one in started if not isinstance(one, Attempt)] == [PENDING_RETRY_S] * 95
    clock.now += 0.2
    for one in held:
        one.failed()
    assert limiter.begin("key", "A", "192.0.2.1") == 60


def test_settled_successes_free_their_slots() -> None:
    limiter = LoginLimiter(2, 60.0, clock=FakeClock())
    first = attempt(limiter, "user", "bob", "192.0.2.1")
    second = attempt(limiter, "user", "bob", "192.0.2.1")
    assert limiter.begin("user", "bob", "192.0.2.1") == PENDING_RETRY_S
    first.succeeded()
    second.succeeded()
    for _ in range(10):
        attempt(limiter, "user", "bob", "192.0.2.1").succeeded()
    # Successes do not erase failures.
    fail(limiter, "user", "bob", "192.0.2.1", 2)
    third = limiter.begin("user", "bob", "192.0.2.1")
    assert third == 60
    with pytest.raises(RuntimeError, match="already settled"):
        first.failed()


def test_an_attempt_left_unsettled_frees_on_error_and_fails_on_cancellation() -> None:
    limiter = LoginLimiter(1, 60.0, clock=FakeClock())
    with pytest.raises(OSError), attempt(limiter, "key", "A", "192.0.2.1"):
        raise OSError("the store is unreachable")
    # An error is no guess: the slot is free again, and nothing was counted.
    with pytest.raises(asyncio.CancelledError), attempt(limiter, "key", "A", "192.0.2.1"):
        raise asyncio.CancelledError
    # A client that leaves mid-check still spent its guess.
    assert limiter.begin("key", "A", "192.0.2.1") == 60


def test_a_guesser_cannot_lock_a_key_out_of_other_addresses() -> None:
    limiter = LoginLimiter(5, 60.0, clock=FakeClock())
    fail(limiter, "key", "A", "203.0.113.9", 5)
    assert limiter.begin("key", "A", "203.0.113.9") == 60
    attempt(limiter, "key", "A", "198.51.100.7").succeeded()
    # Keys have no count over all addresses: however many addresses fail, the
    # owner's is untouched.
    for host in range(200):
        fail(limiter, "key", "A", f"10.0.0.{host}")
    attempt(limiter, "key", "A", "198.51.100.7").succeeded()


def test_an_address_is_limited_over_all_principals() -> None:
    limiter = LoginLimiter(5, 60.0, clock=FakeClock())
    for number in range(ADDRESS_FACTOR):
        fail(limiter, "key", f"K{number}", "203.0.113.9", 5)
    # Every failure was on a key of its own pair's limit, yet the address is spent.
    assert limiter.begin("key", "UNTRIED", "203.0.113.9") == 60
    assert limiter.begin("user", "bob", "203.0.113.9") == 60
    attempt(limiter, "key", "UNTRIED", "203.0.113.10").succeeded()


def test_a_user_under_distributed_guessing_keeps_its_known_addresses() -> None:
    clock = FakeClock()
    limiter = LoginLimiter(5, 60.0, clock=clock)

    def guess_from_many(network: str) -> None:
        for host in range(5 * USER_FACTOR):
            fail(limiter, "user", "bob", f"{network}.{host // 256}.{host % 256}")

    attempt(limiter, "user", "bob", "198.51.100.7").succeeded()
    guess_from_many("10.0")
    # Past the user's limit, no new address may try...
    assert limiter.begin("user", "bob", "203.0.113.1") == 60
    # ...but the one bob logged in from may.
    attempt(limiter, "user", "bob", "198.51.100.7").succeeded()
    # An address is known for KNOWN_ADDRESS_S after its last success.
    clock.now += KNOWN_ADDRESS_S - 1
    guess_from_many("10.1")
    attempt(limiter, "user", "bob", "198.51.100.7").succeeded()
    clock.now += KNOWN_ADDRESS_S
    guess_from_many("10.2")
    assert limiter.begin("user", "bob", "198.51.100.7") == 60


def test_ipv6_clients_are_counted_per_64_network() -> None:
    limiter = LoginLimiter(5, 60.0, clock=FakeClock())
    for host in range(1, 6):
        fail(limiter, "key", "A", f"2001:db8:0:1::{host}")
    assert limiter.begin("key", "A", "2001:db8:0:1:ffff::1") == 60
    attempt(limiter, "key", "A", "2001:db8:0:2::1").succeeded()
    # An IPv4 client on a dual-stack socket is the same client either way.
    fail(limiter, "key", "B", "192.0.2.1", 4)
    fail(limiter, "key", "B", "::ffff:192.0.2.1")
    assert limiter.begin("key", "B", "192.0.2.1") == 60


def test_limiter_memory_stays_bounded() -> None:
    clock = FakeClock()
    limiter = LoginLimiter(5, 60.0, clock=clock, max_subjects=100)
    held = attempt(limiter, "key", "HELD", "198.51.100.7")
    for number in range(5000):
        clock.now += 0.001
        fail(limiter, "user", f"user{number}", f"10.0.{number // 256}.{number % 256}")
        attempt(limiter, "user", f"user{number}", "198.51.100.8").succeeded()
    # Three counts per user login plus one known address each: the bound holds for
    # both, with the attempt still in flight kept beyond it.
    assert len(limiter) <= 2 * 100 + 2
    # The most recent subjects are the ones still counted.
    fail(limiter, "user", "user4999", "10.0.19.135", 4)
    assert limiter.begin("user", "user4999", "10.0.19.135") == 60
    # An attempt in flight kept its counts through the spray, and settles on them.
    held.failed()
    fail(limiter, "key", "HELD", "198.51.100.7", 4)
    assert limiter.begin("key", "HELD", "198.51.100.7") == 60


def test_long_names_take_bounded_room() -> None:
    limiter = LoginLimiter(5, 60.0, clock=FakeClock(), max_subjects=10)
    for number in range(100):
        fail(limiter, "key", "X" * 60_000 + str(number), f"192.0.2.{number}")
        fail(limiter, "key", "Y" * 60_000, f"198.51.100.{number}")
    assert len(limiter) <= 10
    # Nothing public tells how large the entries are; their names are the memory
    # in question.
    assert sum(map(len, limiter._counts)) <= 10 * (NAME_CHARS + 40)


def test_limiter_forgets_expired_subjects() -> None:
    clock = FakeClock()
    limiter = LoginLimiter(1, 5.0, clock=clock, max_subjects=100)
    for number in range(10):
        fail(limiter, "key", f"K{number}", f"192.0.2.{number}")
    assert len(limiter) == 20
    clock.now += 5
    for number in range(10):
        attempt(limiter, "key", f"K{number}", f"192.0.2.{number}").succeeded()
    assert len(limiter) == 0


# -- TrustedProxies -----------------------------------------------------------------


@pytest.mark.parametrize("entry", ["10.0.0.0/33", "proxy.example", "", "10.0.0.1,10.0.0.2"])
def test_trusted_proxies_refuse_what_is_no_address(entry: str) -> None:
    with pytest.raises(ValueError, match=re.escape(f"invalid trusted proxy {entry!r}")):
        TrustedProxies(["127.0.0.1", entry])


def test_trusted_proxies_hold_addresses_and_networks() -> None:
    proxies = TrustedProxies(["10.0.0.0/8", "192.0.2.7", "2001:db8::/32", "10.1.2.3/16"])
    assert "10.200.0.1" in proxies
    assert "192.0.2.7" in proxies
    assert "192.0.2.8" not in proxies
    assert "2001:db8:ffff::1" in proxies
    assert "2001:db9::1" not in proxies
    assert "::ffff:10.0.0.1" in proxies
    assert "not an address" not in proxies
    assert "" not in proxies
    assert "127.0.0.1" not in TrustedProxies([])


def test_forwarded_for_counts_only_from_a_trusted_peer() -> None:
    proxies = TrustedProxies(["10.0.0.0/8"])
    assert proxies.client("203.0.113.9", "198.51.100.1") == "203.0.113.9"
    assert proxies.client("10.0.0.5", None) == "10.0.0.5"
    assert proxies.client("10.0.0.5", "198.51.100.1") == "198.51.100.1"
    # The right-most entry that is not a trusted proxy; what the client wrote
    # before it is ignored.
    assert proxies.client("10.0.0.5", "1.1.1.1, 198.51.100.1, 10.0.0.6") == "198.51.100.1"
    # Only proxies in the chain: the left-most of them.
    assert proxies.client("10.0.0.5", "10.0.0.7, 10.0.0.6") == "10.0.0.7"
    # Ports and brackets, as some proxies write them.
    assert proxies.client("10.0.0.5", "198.51.100.1:4711") == "198.51.100.1"
    assert proxies.client("10.0.0.5", "[2001:db8::1]:443") == "2001:db8::1"
    assert proxies.client("10.0.0.5", "2001:db8::1") == "2001:db8::1"
    # An entry that is no address stops the walk at the nearest trusted hop.
    assert proxies.client("10.0.0.5", "198.51.100.1, unknown") == "10.0.0.5"
    assert proxies.client("10.0.0.5", "unknown, 10.0.0.6") == "10.0.0.6"
    assert proxies.client("::ffff:10.0.0.5", "198.51.100.1") == "198.51.100.1"


@given(st.text(max_size=200))
@settings(max_examples=300)
def test_a_client_cannot_forge_its_address_behind_a_trusted_proxy(forged: str) -> None:
    proxies = TrustedProxies(["10.0.0.0/8"])
    # The proxy appends the peer it saw to whatever the client sent.
    assert proxies.client("10.0.0.5", f"{forged}, 203.0.113.9") == "203.0.113.9"
    assert proxies.client("203.0.113.9", forged) == "203.0.113.9"


# -- MaintenanceWindow --------------------------------------------------------------


def gmt(text: str) -> float:
    """Seconds since the epoch of a GMT time written 'YYYY-MM-DD HH:MM:SS'."""
    return float(timegm(time.strptime(text, "%Y-%m-%d %H:%M:%S")))


# 2024-06-01 was a Saturday, 2024-06-02 a Sunday, 2024-06-03 a Monday.


def test_default_window() -> None:
    window = MaintenanceWindow.parse("SUN 00:15-00:16")
    assert window == MaintenanceWindow(6 * 86_400 + 15 * 60, 60)
    assert window.remaining_s(gmt("2024-06-02 00:14:59")) == 0
    assert window.remaining_s(gmt("2024-06-02 00:15:00")) == 60
    assert window.remaining_s(gmt("2024-06-02 00:15:30") + 0.25) == 29.75
    assert window.remaining_s(gmt("2024-06-02 00:16:00")) == 0
    # A week later, and never on another day.
    assert window.remaining_s(gmt("2024-06-09 00:15:10")) == 50
    assert window.remaining_s(gmt("2024-06-03 00:15:10")) == 0
    assert window.remaining_s(gmt("2024-06-01 00:15:10")) == 0


def test_window_across_midnight() -> None:
    window = MaintenanceWindow.parse("SAT 23:30-00:30")
    assert window.length_s == 3600
    assert window.remaining_s(gmt("2024-06-01 23:29:59")) == 0
    assert window.remaining_s(gmt("2024-06-01 23:45:00")) == 45 * 60
    assert window.remaining_s(gmt("2024-06-02 00:15:00")) == 15 * 60
    assert window.remaining_s(gmt("2024-06-02 00:30:00")) == 0


def test_window_across_the_end_of_the_week() -> None:
    window = MaintenanceWindow.parse("sun 23:00 - 1:00")
    assert window.remaining_s(gmt("2024-06-02 22:59:59")) == 0
    assert window.remaining_s(gmt("2024-06-02 23:30:00")) == 90 * 60
    assert window.remaining_s(gmt("2024-06-03 00:30:00")) == 30 * 60
    assert window.remaining_s(gmt("2024-06-03 01:00:00")) == 0
    assert window.remaining_s(gmt("2024-06-09 23:00:00")) == 2 * 3600


@pytest.mark.parametrize(
    "text",
    [
        "",
        "garbage",
        "SUN",
        "SUN 00:15",
        "SUNDAY 00:15-00:16",
        "XYZ 00:15-00:16",
        "SUN 24:00-00:16",
        "SUN 00:15-24:00",
        "SUN 00:60-01:00",
        "SUN 00:15-00:99",
        "SUN 0:5-0:16",
        "SUN 00:15-00:16 extra",
        "SUN -1:00-00:16",
    ],
)
def test_bad_windows(text: str) -> None:
    with pytest.raises(ValueError):
        MaintenanceWindow.parse(text)


# -- events ---------------------------------------------------------------------------

TS = parse_us("2018-06-08T08:13:44.683000")
EXCHANGE_TS = parse_us("2018-06-08T08:13:44.653000")

EXAMPLES: list[Event] = [
    BookEvent("FX-BTC/USD=GEMINI", TS, True, [(7631.49, 0.27)], [(7641.12, 8.79)], EXCHANGE_TS),
    BookEvent("FX-BTC/USD=GEMINI", TS + 1, False, [(7631.49, 0.0)], []),
    TradeEvent("FX-BTC/USD=GEMINI", TS, 7641.14, 0.008, "123", {"side": "BUY"}, EXCHANGE_TS),
    TradeEvent("FX-BTC/USD=GEMINI", TS, 1.0, 2.0),
    QuoteEvent("FX-BTC/USD=GEMINI", TS, 7631.49, 0.27, 7641.12, 8.79, EXCHANGE_TS),
    QuoteEvent("FX-BTC/USD=GEMINI", TS, 7631.49, 0.27, None, None),
    *(
        StatusEvent("FX-BTC/USD=GEMINI", TS, stream, state)
        for stream in Stream
        for state in StreamState
    ),
]


@pytest.mark.parametrize("event", EXAMPLES, ids=lambda event: type(event).__name__)
def test_event_round_trip(event: Event) -> None:
    line = to_json(event)
    assert b"\n" not in line
    assert from_json(line) == event
    assert from_json(line.decode()) == event


def test_contract_lines_parse() -> None:
    lines = [
        '{"ts": "2018-06-08T08:13:44.683000", "exchangeTs": "2018-06-08T08:13:44.653000", '
        '"symbol": "FX-BTC/USD=GEMINI", "kind": "book", "snapshot": true, '
        '"bids": [[7631.49, 0.27]], "asks": [[7641.12, 8.79]]}',
        '{"ts": "2018-06-08T08:13:44.683000", "symbol": "FX-BTC/USD=GEMINI", "kind": "trade", '
        '"price": 7641.14, "size": 0.008, "tradeId": "123", "info": {"side": "BUY"}}',
        '{"ts": "2018-06-08T08:13:44.683000", "symbol": "FX-BTC/USD=GEMINI", "kind": "status", '
        '"stream": "depth", "state": "disconnected"}',
    ]
    book, trade, status = (from_json(line) for line in lines)
    assert book == EXAMPLES[0]
    assert (
        isinstance(trade, TradeEvent) and trade.trade_id == "123" and trade.info == {"side": "BUY"}
    )
    assert status == StatusEvent("FX-BTC/USD=GEMINI", TS, Stream.DEPTH, StreamState.DISCONNECTED)
    assert to_dict(EXAMPLES[0]) == orjson.loads(lines[0])


def test_numeric_trade_ids_become_text() -> None:
    line = '{"ts": "2018-06-08T08:13:44.683000", "symbol": "S", "kind": "trade", '
    trade = from_json(line + '"price": 1, "size": 2, "tradeId": 77, "info": {"n": 5}}')
    assert isinstance(trade, TradeEvent)
    assert (trade.trade_id, trade.info, trade.price) == ("77", {"n": "5"}, 1.0)


prices = st.floats(min_value=1e-8, max_value=1e9, allow_nan=False, allow_infinity=False)
sizes = st.floats(min_value=0, max_value=1e9, allow_nan=False, allow_infinity=False)
times = st.integers(min_value=0, max_value=4_102_444_800_000_000)
symbols = st.text(min_size=1, max_size=30)
levels = st.lists(st.tuples(prices, sizes), max_size=5)
events = st.one_of(
    st.builds(BookEvent, symbols, times, st.booleans(), levels, levels, st.none() | times),
    st.builds(
        TradeEvent,
        symbols,
        times,
        prices,
        sizes,
        st.none() | st.text(max_size=10),
        st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=3),
        st.none() | times,
    ),
    st.builds(
        QuoteEvent,
        symbols,
        times,
        st.none() | prices,
        st.none() | sizes,
        st.none() | prices,
        st.none() | sizes,
        st.none() | times,
    ),
    st.builds(StatusEvent, symbols, times, st.sampled_from(Stream), st.sampled_from(StreamState)),
)


@settings(max_examples=300, deadline=None)
@given(events)
def test_any_event_round_trips(event: Event) -> None:
    assert from_json(to_json(event)) == event


BASE = {"ts": "2018-06-08T08:13:44.683000", "symbol": "FX-BTC/USD=GEMINI"}


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(BASE | {"kind": "book", "bids": [[1.0, -0.5]]}, id="negative-size"),
        pytest.param(BASE | {"kind": "book", "asks": [[-1.0, 0.5]]}, id="negative-price"),
        pytest.param(BASE | {"kind": "book", "asks": [[0, 0.5]]}, id="zero-price"),
        pytest.param(BASE | {"kind": "book", "bids": [[1.0]]}, id="half-level"),
        pytest.param(BASE | {"kind": "book", "bids": [["1", "2"]]}, id="text-level"),
        pytest.param(BASE | {"kind": "book", "bids": {"1": 2}}, id="bids-object"),
        pytest.param(BASE | {"kind": "book", "bids": [[float("nan"), 1.0]]}, id="nan-price"),
        pytest.param(BASE | {"kind": "book", "bids": [[1.0, float("inf")]]}, id="inf-size"),
        pytest.param(BASE | {"kind": "book", "snapshot": "yes"}, id="snapshot-text"),
        pytest.param(BASE | {"kind": "trade", "size": 1.0}, id="trade-no-price"),
        pytest.param(BASE | {"kind": "trade", "price": 1.0}, id="trade-no-size"),
        pytest.param(BASE | {"kind": "trade", "price": 1.0, "size": -1}, id="trade-negative"),
        pytest.param(BASE | {"kind": "trade", "price": True, "size": 1}, id="trade-bool"),
        pytest.param(BASE | {"kind": "trade", "price": float("nan"), "size": 1}, id="trade-nan"),
        pytest.param(
            BASE | {"kind": "trade", "price": 1, "size": 1, "tradeId": [1]}, id="trade-id-list"
        ),
        pytest.param(BASE | {"kind": "trade", "price": 1, "size": 1, "info": [1]}, id="info-list"),
        pytest.param(BASE | {"kind": "quote", "bid": -1.0}, id="quote-negative"),
        pytest.param(BASE | {"kind": "quote", "askSize": "1"}, id="quote-text"),
        pytest.param(
            BASE | {"kind": "status", "stream": "book", "state": "connected"}, id="stream"
        ),
        pytest.param(BASE | {"kind": "status", "stream": "bbo", "state": "up"}, id="state"),
        pytest.param(BASE | {"kind": "status"}, id="status-empty"),
        pytest.param(BASE | {"kind": "candle"}, id="unknown-kind"),
        pytest.param(BASE, id="no-kind"),
        pytest.param({"symbol": "S", "kind": "quote"}, id="no-ts"),
        pytest.param(BASE | {"ts": "yesterday", "kind": "quote"}, id="bad-ts"),
        pytest.param(BASE | {"ts": 1528445624, "kind": "quote"}, id="number-ts"),
        pytest.param(BASE | {"exchangeTs": "soon", "kind": "quote"}, id="bad-exchange-ts"),
        pytest.param({"ts": BASE["ts"], "kind": "quote"}, id="no-symbol"),
        pytest.param(BASE | {"symbol": "", "kind": "quote"}, id="empty-symbol"),
        pytest.param([BASE | {"kind": "quote"}], id="not-an-object"),
    ],
)
def test_bad_events_are_refused(raw: Any) -> None:
    with pytest.raises(EventFormatError):
        from_dict(raw)


@pytest.mark.parametrize(
    "line",
    [
        b"",
        b"{",
        b"not json",
        b'{"ts": "2018-06-08T08:13:44.683000", "symbol": "S", "kind": "trade", '
        b'"price": NaN, "size": 1}',
        b"[]",
        b"null",
    ],
)
def test_bad_lines_are_refused(line: bytes) -> None:
    with pytest.raises(EventFormatError):
        from_json(line)
    assert issubclass(EventFormatError, ValueError)
