"""The session protocol state machine, tested directly (no socket)."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from caspian.catalog.product import ProductSpec
from caspian.codes import CloseCode, SubscriptionType, SymbolType, TokenRefreshCode
from caspian.gateway.session import (
    CONNECT_CHECK,
    MAX_PENDING_CHECKS,
    Close,
    Ping,
    Send,
    Session,
    SessionLimits,
    Start,
    State,
    Stop,
    TokenCheck,
    VerifyToken,
    Wake,
)
from caspian.pacing import TokenBucket

GEMINI = ProductSpec(
    exchange="GEMINI",
    type="FX",
    caspian_code="FX-ETH/USD=GEMINI",
    pseudo_code="ETHUSD=GEMINI",
    tora_code="ETH/USD",
    tora_market="GEMINI",
    native_code="ethusd",
    native_code_v2="ETH/USD",
    ccy_from="ETH",
    ccy_to="USD",
    description="Ethereum - US Dollar - FX pair",
    lot_size="0.000001",
    tick_size="0.01",
    tick_rule=",,0.01",
)
BITMEX = ProductSpec(
    exchange="BITMEX",
    type="PERP",
    caspian_code="PERP-BTC/USD=BITMEX",
    pseudo_code="BTCUSDPERP=BITMEX",
    tora_code="BTC/USD-PERP",
    tora_market="BITMEX",
    native_code="XBTUSD",
    native_code_v2="BTC/USD:BTC",
    ccy_from="BTC",
    ccy_to="USD",
    description="Bitcoin - US Dollar - Perpetual swap",
    lot_size="1",
    tick_size="0.5",
    tick_rule=",,0.5",
)
PRODUCTS = {
    SymbolType.CASPIAN: {p.caspian_code: p for p in (GEMINI, BITMEX)},
    SymbolType.PSEUDO: {p.pseudo_code: p for p in (GEMINI, BITMEX)},
    SymbolType.TORA: {f"{p.tora_code}.{p.tora_market}": p for p in (GEMINI, BITMEX)},
}


def resolve(symbol: str, symbol_type: SymbolType) -> ProductSpec | None:
    return PRODUCTS[symbol_type].get(symbol)


def limits(
    max_subscriptions: int = 100,
    symbol_types: frozenset[SymbolType] = frozenset(SymbolType),
    rate: float = 1e9,
    burst: int = 1_000_000,
    refreshes: float = 1e9,
) -> SessionLimits:
    return SessionLimits(max_subscriptions, symbol_types, rate, burst, refreshes)


def opened(session: Session, check: TokenCheck) -> Session:
    """``session`` past its connect-time token check, answered with ``check``."""
    assert session.connect("token") == [VerifyToken(CONNECT_CHECK, "token")]
    assert session.token_checked(CONNECT_CHECK, check) == []
    assert session.state is State.OPEN
    return session


def make(
    exchanges: frozenset[str] | None = None,
    max_subscriptions: int = 100,
    symbol_types: frozenset[SymbolType] = frozenset(SymbolType),
) -> Session:
    session = Session(limits(max_subscriptions, symbol_types), resolve, lambda: 0.0)
    return opened(session, TokenCheck(TokenRefreshCode.OK, "alice", 10**18, exchanges))


def sent(actions: list[Any]) -> list[dict[str, Any]]:
    return [orjson.loads(action.data) for action in actions if isinstance(action, Send)]


def subscribe(request_id: str = "r1", **payload: Any) -> bytes:
    body = {"symbol": GEMINI.caspian_code, "type": "Level1"} | payload
    return orjson.dumps({"requestId": request_id, "type": "Subscribe", "payload": body})


def code_of(actions: list[Any]) -> int:
    (message,) = sent(actions)
    return int(message["payload"]["code"])


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        (b"{not json", 100),
        (b"[1, 2]", 100),
        (b'"text"', 100),
        (b'{"type": "Subscribe", "payload": {}}', 101),
        (b'{"requestId": "", "type": "Subscribe"}', 101),
        (b'{"requestId": 7, "type": "Subscribe"}', 101),
        (b'{"requestId": "N/A", "type": "Subscribe"}', 101),
        (b'{"requestId": "r", "payload": {}}', 102),
        (b'{"requestId": "r", "type": "Bogus"}', 103),
        (b'{"requestId": "r", "type": "Level1"}', 103),
        (b'{"requestId": "r", "type": 5}', 103),
        (b'{"requestId": "r", "type": "TokenRefresh", "payload": {}}', 104),
        (b'{"requestId": "r", "type": "TokenRefresh"}', 104),
        (b'{"requestId": "r", "type": "Unsubscribe", "payload": {"x": 1}}', 105),
    ],
)
def test_protocol_errors(raw: bytes, code: int) -> None:
    session = make()
    (message,) = sent(session.receive(raw))
    assert message["requestId"] == "N/A"
    assert message["type"] == "ProtocolError"
    assert message["payload"]["code"] == code
    assert message["payload"]["message"]


def test_overlong_request_id_is_refused() -> None:
    (message,) = sent(make().receive(subscribe("x" * 129)))
    assert message["payload"]["code"] == 101


def test_subscribe_ok_response_precedes_start() -> None:
    session = make()
    actions = session.receive(subscribe("r1", extra="ignored"))
    assert isinstance(actions[0], Send) and isinstance(actions[1], Start)
    message = orjson.loads(actions[0].data)
    assert message == {
        "requestId": "r1",
        "type": "SubscribeResponse",
        "payload": {"code": 200, "message": "All OK"},
    }
    subscription = actions[1].subscription
    assert subscription.product is GEMINI
    assert subscription.type is SubscriptionType.LEVEL1
    assert subscription.conflation == "330ms"
    assert subscription.interval == 0.33
    assert subscription.prefix == b'{"requestId":"r1",'


def test_subscription_prefix_escapes_the_request_id() -> None:
    session = make()
    actions = session.receive(subscribe('a"b\\c'))
    start = actions[1]
    assert isinstance(start, Start)
    message = orjson.loads(start.subscription.prefix + b'"type":"Level1"}')
    assert message["requestId"] == 'a"b\\c'


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        ({"type": "Level3"}, 203),
        ({"type": None}, 203),
        ({"symbol": "FX-NOPE/USD=GEMINI"}, 202),
        ({"symbol": 17}, 202),
        ({"symbol": ""}, 202),
        ({"symbolType": "Bloomberg"}, 207),
        ({"symbolType": 3}, 207),
        ({"type": "Level2", "numberOfLevels": 0}, 208),
        ({"type": "Level2", "numberOfLevels": 101}, 208),
        ({"type": "Level2", "numberOfLevels": "20"}, 208),
        ({"type": "Level2", "numberOfLevels": True}, 208),
        ({"type": "Level2", "numberOfLevels": 2.5}, 208),
        ({"conflation": "2s"}, 203),
        ({"conflation": None}, 203),
    ],
)
def test_subscribe_refusals(payload: dict[str, Any], code: int) -> None:
    session = make()
    actions = session.receive(subscribe("r1", **payload))
    assert code_of(actions) == code
    assert not session.subscriptions


def test_bad_conflation_message_names_the_choices() -> None:
    (message,) = sent(make().receive(subscribe("r1", conflation="2s")))
    assert "250ms" in message["payload"]["message"]


@pytest.mark.parametrize("levels", [1, 20, 100])
def test_levels_accepted(levels: int) -> None:
    actions = make().receive(subscribe("r1", type="Level2", numberOfLevels=levels))
    assert isinstance(actions[1], Start)
    assert actions[1].subscription.levels == levels


def test_all_conflations_accepted() -> None:
    session = make()
    for index, name in enumerate(["None", "250ms", "330ms", "500ms", "1s", "3s", "5s"]):
        symbol = GEMINI.caspian_code if index % 2 else BITMEX.caspian_code
        kind = "Level1" if index < 3 else "Level2"
        session.subscriptions.clear()
        session._by_stream.clear()
        actions = session.receive(subscribe(f"r{index}", symbol=symbol, type=kind, conflation=name))
        assert code_of(actions[:1]) == 200, name


def test_symbol_types() -> None:
    session = make()
    assert (
        code_of(session.receive(subscribe("a", symbol="ETHUSD=GEMINI", symbolType="Pseudo"))[:1])
        == 200
    )
    assert (
        code_of(
            session.receive(subscribe("b", symbol="BTC/USD-PERP.BITMEX", symbolType="Tora"))[:1]
        )
        == 200
    )
    # A Caspian code given as a Pseudo code is not a Pseudo code.
    assert (
        code_of(session.receive(subscribe("c", symbol=GEMINI.caspian_code, symbolType="Pseudo")))
        == 202
    )


def test_symbol_type_switched_off_is_209() -> None:
    session = make(symbol_types=frozenset({SymbolType.CASPIAN}))
    assert (
        code_of(session.receive(subscribe("a", symbol="ETHUSD=GEMINI", symbolType="Pseudo"))) == 209
    )
    assert code_of(session.receive(subscribe("b"))[:1]) == 200


def test_entitlement_205() -> None:
    session = make(exchanges=frozenset({"BITMEX"}))
    assert code_of(session.receive(subscribe("a"))) == 205
    assert code_of(session.receive(subscribe("b", symbol=BITMEX.caspian_code))[:1]) == 200


def test_duplicate_request_id_201_and_same_stream_204() -> None:
    session = make()
    assert code_of(session.receive(subscribe("r1"))[:1]) == 200
    assert code_of(session.receive(subscribe("r1", symbol=BITMEX.caspian_code))) == 201
    # Same symbol and type is 204 whatever the levels or conflation.
    assert code_of(session.receive(subscribe("r2", conflation="None"))) == 204
    assert code_of(session.receive(subscribe("r3", type="Level2"))[:1]) == 200
    assert code_of(session.receive(subscribe("r4", type="Level2", numberOfLevels=5))) == 204


def test_subscription_limit_206() -> None:
    session = make(max_subscriptions=2)
    assert code_of(session.receive(subscribe("a"))[:1]) == 200
    assert code_of(session.receive(subscribe("b", type="Level2"))[:1]) == 200
    assert code_of(session.receive(subscribe("c", symbol=BITMEX.caspian_code))) == 206


def test_unsubscribe_codes_and_stop_before_response() -> None:
    session = make()
    start = session.receive(subscribe("r1"))[1]
    assert isinstance(start, Start)
    unsubscribe = orjson.dumps(
        {"requestId": "u1", "type": "Unsubscribe", "payload": {"subscribeRequestId": "r1"}}
    )
    actions = session.receive(unsubscribe)
    assert isinstance(actions[0], Stop) and actions[0].subscription is start.subscription
    assert code_of(actions[1:]) == 300
    assert code_of(session.receive(unsubscribe)) == 301
    # The requestId may be used again once its subscription ended.
    assert code_of(session.receive(subscribe("r1"))[:1]) == 200
    duplicate = orjson.dumps(
        {"requestId": "r1", "type": "Unsubscribe", "payload": {"subscribeRequestId": "r1"}}
    )
    assert code_of(session.receive(duplicate)) == 302


def test_token_refresh_flow() -> None:
    session = make()
    refresh = orjson.dumps(
        {"requestId": "t1", "type": "TokenRefresh", "payload": {"accessToken": "tok"}}
    )
    (verify,) = session.receive(refresh)
    assert verify == VerifyToken("t1", "tok")
    # While it is being checked, its requestId is in use.
    assert code_of(session.receive(refresh)) == 204
    (response,) = sent(
        session.token_checked("t1", TokenCheck(TokenRefreshCode.OK, "alice", 42, frozenset({"X"})))
    )
    assert response == {
        "requestId": "t1",
        "type": "TokenRefreshResponse",
        "payload": {"code": 200, "message": "All OK"},
    }
    assert session.expires_us == 42
    assert session.exchanges == frozenset({"X"})


@pytest.mark.parametrize(
    ("check", "code"),
    [
        (TokenCheck(TokenRefreshCode.INVALID), 202),
        (TokenCheck(TokenRefreshCode.EXPIRED), 203),
        (TokenCheck(TokenRefreshCode.OK, "mallory", 99, None), 202),
    ],
)
def test_token_refresh_failures_keep_the_old_expiry(check: TokenCheck, code: int) -> None:
    session = make()
    session.receive(
        orjson.dumps({"requestId": "t", "type": "TokenRefresh", "payload": {"accessToken": "x"}})
    )
    assert code_of(session.token_checked("t", check)) == code
    assert session.expires_us == 10**18


def test_token_refresh_with_subscription_id_is_204() -> None:
    session = make()
    session.receive(subscribe("r1"))
    actions = session.receive(
        orjson.dumps({"requestId": "r1", "type": "TokenRefresh", "payload": {"accessToken": "x"}})
    )
    assert code_of(actions) == 204


def test_close_stops_everything() -> None:
    session = make()
    session.receive(subscribe("a"))
    session.receive(subscribe("b", type="Level2"))
    stops = session.close()
    assert {stop.subscription.request_id for stop in stops} == {"a", "b"}
    assert not session.subscriptions
    # A closing session handles nothing more.
    assert session.state is State.CLOSING
    assert session.receive(subscribe("c")) == []


def test_token_refresh_moves_the_session_to_the_new_tokens_principal() -> None:
    session = opened(
        Session(limits(), resolve, lambda: 0.0),
        TokenCheck(TokenRefreshCode.OK, "alice", 10, None, ("key", "OLD")),
    )
    session.receive(
        orjson.dumps({"requestId": "t", "type": "TokenRefresh", "payload": {"accessToken": "x"}})
    )
    session.token_checked("t", TokenCheck(TokenRefreshCode.OK, "alice", 20, None, ("key", "NEW")))
    assert session.principal == ("key", "NEW")


def test_a_revoked_entitlement_ends_its_subscriptions_with_205() -> None:
    session = make()
    session.receive(subscribe("g"))
    session.receive(subscribe("b1", symbol=BITMEX.caspian_code))
    session.receive(subscribe("b2", symbol=BITMEX.caspian_code, type="Level2"))

    actions = session.entitle(frozenset({"GEMINI"}))
    # Each subscription is stopped before its answer, so no update of it follows the 205.
    assert [type(action) for action in actions] == [Stop, Send, Stop, Send]
    stopped = [action.subscription.request_id for action in actions if isinstance(action, Stop)]
    assert stopped == ["b1", "b2"]
    assert sent(actions) == [
        {
            "requestId": request_id,
            "type": "SubscribeResponse",
            "payload": {
                "code": 205,
                "message": "Not authorized: the entitlement to BITMEX was revoked",
            },
        }
        for request_id in ("b1", "b2")
    ]
    assert set(session.subscriptions) == {"g"}
    assert session.exchanges == frozenset({"GEMINI"})
    assert code_of(session.receive(subscribe("b3", symbol=BITMEX.caspian_code))) == 205

    # Granted back: nothing to stop, and the same stream may be subscribed again (not 204).
    assert session.entitle(None) == []
    assert code_of(session.receive(subscribe("b1", symbol=BITMEX.caspian_code))[:1]) == 200
    assert session.entitle(frozenset({"GEMINI", "BITMEX"})) == []

    # Every exchange revoked ends every subscription.
    actions = session.entitle(frozenset())
    ended = {action.subscription.request_id for action in actions if isinstance(action, Stop)}
    assert ended == {"g", "b1"} and not session.subscriptions
    assert {message["payload"]["code"] for message in sent(actions)} == {205}


# -- lifecycle -------------------------------------------------------------


class Clock:
    """Monotonic seconds and wall-clock microseconds, moved by hand."""

    def __init__(self) -> None:
        self.now = 100.0
        self.wall = 1_000_000

    def monotonic(self) -> float:
        return self.now

    def wall_us(self) -> int:
        return self.wall


def fresh(clock: Clock | None = None, rate: float = 1e9, burst: int = 1_000_000) -> Session:
    clock = clock or Clock()
    return Session(limits(rate=rate, burst=burst), resolve, clock.monotonic, clock.wall_us)


ALICE = TokenCheck(TokenRefreshCode.OK, "alice", 5_000_000, None, ("key", "K"))


def test_no_token_at_connect_closes_3000() -> None:
    session = fresh()
    assert session.connect(None) == [Close(CloseCode.TOKEN_NOT_FOUND)]
    assert session.state is State.CLOSING


@pytest.mark.parametrize(
    ("code", "close"),
    [
        (TokenRefreshCode.INVALID, CloseCode.TOKEN_INVALID),
        (TokenRefreshCode.EXPIRED, CloseCode.TOKEN_EXPIRED),
    ],
)
def test_a_refused_connect_token_closes(code: TokenRefreshCode, close: CloseCode) -> None:
    session = fresh()
    session.connect("token")
    session.receive(subscribe("early"))
    assert session.token_checked(CONNECT_CHECK, TokenCheck(code)) == [Close(close)]
    assert session.state is State.CLOSING
    assert session.receive(subscribe("late")) == []


def test_messages_before_the_token_check_are_held_then_all_answered_in_order() -> None:
    session = fresh()
    session.connect("token")
    for index in range(300):
        assert session.receive(subscribe(f"s{index}")) == []
    actions = session.token_checked(CONNECT_CHECK, ALICE)
    answers = [message["requestId"] for message in sent(actions)]
    assert answers == [f"s{index}" for index in range(300)]
    assert session.user == "alice" and session.principal == ("key", "K")


def test_a_store_failure_during_a_check_closes_3004() -> None:
    session = fresh()
    session.connect("token")
    assert session.token_check_failed(CONNECT_CHECK) == [Close(CloseCode.INTERNAL)]
    session = opened(fresh(), ALICE)
    session.receive(
        orjson.dumps({"requestId": "t", "type": "TokenRefresh", "payload": {"accessToken": "x"}})
    )
    assert session.token_check_failed("t") == [Close(CloseCode.INTERNAL)]


def test_messages_past_the_rate_wait_and_the_reading_stops_past_the_burst() -> None:
    clock = Clock()
    session = opened(fresh(clock, rate=10.0, burst=5), ALICE)
    answered = []
    for index in range(8):
        actions = session.receive(subscribe(f"s{index}", symbol="nope"))
        answered += [message["requestId"] for message in sent(actions)]
        if index < 5:
            assert not any(isinstance(action, Wake) for action in actions)
    assert answered == [f"s{index}" for index in range(5)]
    assert not session.backlogged
    (wake,) = [action for action in actions if isinstance(action, Wake)]
    assert wake.delay == pytest.approx(0.1)
    for index in range(8, 10):
        session.receive(subscribe(f"s{index}", symbol="nope"))
    assert session.backlogged
    clock.now += 0.25
    answered = [message["requestId"] for message in sent(session.drain())]
    assert answered == ["s5", "s6"]
    assert not session.backlogged
    clock.now += 10
    assert [message["requestId"] for message in sent(session.drain())] == ["s7", "s8", "s9"]


def test_streams_of_one_key_share_a_budget_besides_their_own() -> None:
    """Two connections of one key, each well within its own rate, are held to their
    shared budget together: one more connection cannot double what the key may send."""
    clock = Clock()
    budget = TokenBucket(10.0, 4, clock.monotonic())
    first = opened(fresh(clock, rate=1000.0, burst=100), ALICE)
    second = opened(fresh(clock, rate=1000.0, burst=100), ALICE)
    first.share_budget(budget)
    second.share_budget(budget)
    answered = []
    for index in range(3):
        answered += sent(first.receive(subscribe(f"a{index}", symbol="nope")))
    actions = []
    for index in range(3):
        actions = second.receive(subscribe(f"b{index}", symbol="nope"))
        answered += sent(actions)
    assert [m["requestId"] for m in answered] == ["a0", "a1", "a2", "b0"]
    (wake,) = [action for action in actions if isinstance(action, Wake)]
    assert wake.delay == pytest.approx(0.1)
    clock.now += 0.11
    assert [m["requestId"] for m in sent(second.drain())] == ["b1"]
    # Another key's connection has a budget of its own.
    other = opened(fresh(clock, rate=1000.0, burst=100), ALICE)
    other.share_budget(TokenBucket(10.0, 4, clock.monotonic()))
    assert [m["requestId"] for m in sent(other.receive(subscribe("c0", symbol="nope")))] == ["c0"]


def test_token_checks_in_flight_are_bounded_and_later_messages_keep_their_order() -> None:
    session = opened(fresh(), ALICE)

    def refresh(request_id: str) -> bytes:
        return orjson.dumps(
            {"requestId": request_id, "type": "TokenRefresh", "payload": {"accessToken": "x"}}
        )

    verifies = []
    for index in range(MAX_PENDING_CHECKS + 2):
        verifies += [a for a in session.receive(refresh(f"t{index}")) if isinstance(a, VerifyToken)]
    assert [v.request_id for v in verifies] == [f"t{i}" for i in range(MAX_PENDING_CHECKS)]
    # A duplicate of a check in flight is still 204 while fewer are in flight.
    session = opened(fresh(), ALICE)
    session.receive(refresh("t"))
    assert code_of(session.receive(refresh("t"))) == 204


def test_heartbeat_pings_and_closes_3006_when_unanswered() -> None:
    session = opened(fresh(), ALICE)
    assert session.heartbeat() == [Ping()]
    session.pong()
    assert session.heartbeat() == [Ping()]
    assert session.heartbeat() == [Close(CloseCode.PONG_NOT_RECEIVED)]


def test_no_3006_while_the_server_is_not_reading() -> None:
    clock = Clock()
    session = opened(fresh(clock, rate=1.0, burst=2), ALICE)
    for index in range(4):
        session.receive(subscribe(f"s{index}"))
    assert session.backlogged
    assert session.heartbeat() == [Ping()]
    assert session.heartbeat() == [Ping()]


def test_the_token_expiry_closes_3002_unless_refreshed() -> None:
    clock = Clock()
    session = opened(fresh(clock), ALICE)
    assert session.expiry() == []
    clock.wall = ALICE.expires_us or 0
    session.receive(
        orjson.dumps({"requestId": "t", "type": "TokenRefresh", "payload": {"accessToken": "x"}})
    )
    session.token_checked("t", TokenCheck(TokenRefreshCode.OK, "alice", clock.wall + 10, None))
    assert session.expiry() == []
    clock.wall += 10
    assert session.expiry() == [Close(CloseCode.TOKEN_EXPIRED)]


def test_invalid_utf8_closes_1007_and_binary_answers_100() -> None:
    session = opened(fresh(), ALICE)
    (message,) = sent(session.receive(subscribe("b"), text=False))
    assert message["payload"]["code"] == 100
    assert "Binary" in message["payload"]["message"]
    assert session.receive(b'{"requestId":"\xff"}') == [Close(CloseCode.INVALID_PAYLOAD)]


def test_a_refreshed_token_with_fewer_exchanges_ends_the_subscriptions_it_no_longer_allows() -> (
    None
):
    session = make()
    session.receive(subscribe("g"))
    session.receive(subscribe("b", symbol=BITMEX.caspian_code))
    session.receive(
        orjson.dumps({"requestId": "t", "type": "TokenRefresh", "payload": {"accessToken": "x"}})
    )
    actions = session.token_checked(
        "t", TokenCheck(TokenRefreshCode.OK, "alice", 10**18, frozenset({"GEMINI"}))
    )
    answers = [(m["requestId"], m["payload"]["code"]) for m in sent(actions)]
    assert answers == [("t", 200), ("b", 205)]
    assert [a.subscription.request_id for a in actions if isinstance(a, Stop)] == ["b"]
    assert set(session.subscriptions) == {"g"}


def test_token_refreshes_past_their_rate_wait_in_order() -> None:
    clock = Clock()
    session = opened(Session(limits(refreshes=2.0), resolve, clock.monotonic, clock.wall_us), ALICE)

    def refresh(request_id: str) -> bytes:
        return orjson.dumps(
            {"requestId": request_id, "type": "TokenRefresh", "payload": {"accessToken": "x"}}
        )

    checked = []
    for index in range(8):
        for action in session.receive(refresh(f"t{index}")):
            if isinstance(action, VerifyToken):
                checked.append(action.request_id)
                session.token_checked(action.request_id, ALICE)
    session.receive(subscribe("after"))
    # A burst of five, then the rest wait, and the Subscribe behind them too.
    assert checked == [f"t{index}" for index in range(5)]
    clock.now += 0.5
    actions = session.drain()
    assert [a.request_id for a in actions if isinstance(a, VerifyToken)] == ["t5"]
    assert isinstance(actions[-1], Wake) and actions[-1].delay == pytest.approx(0.5)
    session.token_checked("t5", ALICE)
    clock.now += 10
    actions = session.drain()
    assert [a.request_id for a in actions if isinstance(a, VerifyToken)] == ["t6", "t7"]
    assert [m["requestId"] for m in sent(actions)] == ["after"]


def test_a_detail_after_a_full_stop_reads_as_a_sentence() -> None:
    session = make()
    session.receive(
        orjson.dumps({"requestId": "t", "type": "TokenRefresh", "payload": {"accessToken": "x"}})
    )
    (message,) = sent(
        session.token_checked("t", TokenCheck(TokenRefreshCode.OK, "mallory", 99, None))
    )
    assert message["payload"]["message"] == (
        "Access Token is invalid. The token belongs to another user."
    )
    (message,) = sent(session.receive(subscribe("c", conflation="2s")))
    assert message["payload"]["message"].startswith("Invalid subscription type: conflation")


def test_a_symbol_no_source_here_serves_is_202_saying_why() -> None:
    def unserved(symbol: str, symbol_type: SymbolType) -> ProductSpec | str | None:
        found = resolve(symbol, symbol_type)
        return "GEMINI is not streamed live here" if found is GEMINI else found

    session = opened(Session(limits(), unserved, lambda: 0.0), ALICE)
    (message,) = sent(session.receive(subscribe("g")))
    assert message["payload"]["code"] == 202
    assert message["payload"]["message"].endswith(": GEMINI is not streamed live here")
    assert not session.subscriptions
    assert code_of(session.receive(subscribe("b", symbol=BITMEX.caspian_code))) == 200
