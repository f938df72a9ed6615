"""The session protocol under arbitrary input: a documented answer, never an exception.

Every field of every request takes any JSON value, and whole messages are
random or mutated bytes. The session must answer each with one of the
original's codes (or start a subscription, or ask for a token check) and
stay usable for the next message.
"""

from __future__ import annotations

from typing import Any

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from caspian.codes import (
    PROTOCOL_ERROR_MESSAGES,
    SUBSCRIBE_MESSAGES,
    TOKEN_REFRESH_MESSAGES,
    UNSUBSCRIBE_MESSAGES,
    CloseCode,
)
from caspian.gateway.session import (
    Action,
    Close,
    Send,
    Session,
    Start,
    State,
    Stop,
    VerifyToken,
)
from tests.test_session import GEMINI, make

DOCUMENTED = {
    # 199 is the answer to an internal fault, never to bad input.
    "ProtocolError": {int(code) for code in PROTOCOL_ERROR_MESSAGES} - {199},
    "SubscribeResponse": {int(code) for code in SUBSCRIBE_MESSAGES},
    "UnsubscribeResponse": {int(code) for code in UNSUBSCRIBE_MESSAGES},
    "TokenRefreshResponse": {int(code) for code in TOKEN_REFRESH_MESSAGES},
}

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)


REQUESTS: list[dict[str, Any]] = [
    {
        "requestId": "r1",
        "type": "Subscribe",
        "payload": {
            "symbol": GEMINI.caspian_code,
            "symbolType": "Caspian",
            "type": "Level2",
            "numberOfLevels": 20,
            "conflation": "None",
        },
    },
    {"requestId": "r2", "type": "Unsubscribe", "payload": {"subscribeRequestId": "r1"}},
    {"requestId": "r3", "type": "TokenRefresh", "payload": {"accessToken": "token"}},
]
#: Every field of every request, as (key in the message, key in its payload or None).
FIELDS = [(key, None) for request in REQUESTS for key in request] + [
    (None, key) for request in REQUESTS for key in request["payload"]
]

any_message = st.recursive(
    json_values, lambda children: st.dictionaries(st.text(max_size=8), children, max_size=4)
)


@st.composite
def one_field_replaced(draw: st.DrawFn) -> dict[str, Any]:
    """A well-formed request with one field, top-level or in the payload, any JSON value."""
    message: dict[str, Any] = orjson.loads(orjson.dumps(draw(st.sampled_from(REQUESTS))))
    top, inner = draw(st.sampled_from(FIELDS))
    value = draw(json_values)
    if top is not None:
        message[top] = value
    elif inner in message["payload"]:
        message["payload"][inner] = value
    return message


def check(actions: list[Action]) -> None:
    assert actions, "every message gets an answer"
    for action in actions:
        if isinstance(action, Close):
            # The one close a message can cause: a text message that is not UTF-8.
            assert action == Close(CloseCode.INVALID_PAYLOAD)
        elif isinstance(action, Send):
            message = orjson.loads(action.data)
            assert message["payload"]["code"] in DOCUMENTED[message["type"]], message
            assert isinstance(message["requestId"], str) and message["requestId"]
        else:
            assert isinstance(action, Start | Stop | VerifyToken)


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.lists(one_field_replaced() | any_message, min_size=1, max_size=6))
def test_any_json_in_any_field_gets_a_documented_code(batch: list[Any]) -> None:
    session: Session = make()
    for message in batch:
        check(session.receive(orjson.dumps(message)))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_get_a_documented_code(data: bytes) -> None:
    check(make().receive(data))


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(REQUESTS), st.data())
def test_mutated_messages_get_a_documented_code(
    message: dict[str, Any], data: st.DataObject
) -> None:
    raw = bytearray(orjson.dumps(message))
    for _ in range(data.draw(st.integers(min_value=1, max_value=4))):
        position = data.draw(st.integers(min_value=0, max_value=len(raw) - 1))
        raw[position] = data.draw(st.integers(min_value=0, max_value=255))
    session = make()
    check(session.receive(bytes(raw)))
    after = session.receive(b'{"requestId":"z","type":"Bogus"}')
    if session.state is State.CLOSING:
        assert after == []
    else:
        # Still usable afterwards.
        (answer,) = after
        assert isinstance(answer, Send)
