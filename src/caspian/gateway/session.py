"""The Caspian session protocol as a pure state machine.

A :class:`Session` is one stream connection's life, from the token check at
connect to its close. It takes inbound messages, token-check outcomes and
the heartbeat's ticks, and returns the actions the connection must carry
out: frames to send, subscriptions to start or stop, a token to verify, a
ping, a wake-up for held messages, or a close with its code. It does no I/O
and reads its clocks through the functions it is given, so every rule of
the protocol, lifecycle included, is tested directly; the socket code
around it keeps to transport, frames and timers.

States: ``AUTHENTICATING`` until the connect-time token check succeeds (3000
without a token, 3001 or 3002 when it fails), ``OPEN``, then ``CLOSING``
from the first close on. Messages are held, in order and never dropped,
while authenticating, while ``MAX_PENDING_CHECKS`` token checks are in
flight and past the connection's rate; the connection stops reading from
the socket while ``backlogged``.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from time import monotonic
from typing import Any

import orjson

from caspian.catalog.product import ProductSpec
from caspian.codes import (
    CONFLATIONS,
    DEFAULT_CONFLATION,
    DEFAULT_LEVELS,
    MAX_LEVELS,
    NA_REQUEST_ID,
    PROTOCOL_ERROR_MESSAGES,
    SUBSCRIBE_MESSAGES,
    TOKEN_REFRESH_MESSAGES,
    UNSUBSCRIBE_MESSAGES,
    CloseCode,
    MessageType,
    ProtocolErrorCode,
    SubscribeCode,
    SubscriptionType,
    SymbolType,
    TokenRefreshCode,
    UnsubscribeCode,
)
from caspian.pacing import LogThrottle, TokenBucket
from caspian.timefmt import now_us

log = logging.getLogger(__name__)
_throttled = LogThrottle(log)

#: Longest requestId accepted; a subscription keeps its id for its lifetime.
MAX_REQUEST_ID_LENGTH = 128
#: The request id of the connect-time token check: a client cannot use it.
CONNECT_CHECK = NA_REQUEST_ID
#: The shortest wait for the rate limit: waking per message would cost more
#: than the messages.
MIN_WAKE_S = 0.01
#: TokenRefresh checks in flight per connection; the messages after one more
#: wait, in order, so that a flood costs the store a few queries at a time.
MAX_PENDING_CHECKS = 4
#: TokenRefreshes a connection may send at once, before their rate applies.
TOKEN_REFRESH_BURST = 5


class _Later(Exception):
    """A message that must wait ``delay`` seconds for its rate, then be handled again."""

    def __init__(self, delay: float) -> None:
        super().__init__(delay)
        self.delay = delay


#: The product a symbol names; a string when the catalog has it but no source
#: here will ever serve it (why), None when there is no such product.
Resolver = Callable[[str, SymbolType], ProductSpec | str | None]


@dataclass(eq=False, slots=True)
class Subscription:
    """An active Subscribe; compared by identity, as the gateway's groups hold it."""

    request_id: str
    product: ProductSpec
    type: SubscriptionType
    levels: int
    conflation: str
    #: ``{"requestId":"…",`` — the only part of an update that differs per client.
    prefix: bytes = field(init=False)

    def __post_init__(self) -> None:
        self.prefix = b'{"requestId":' + orjson.dumps(self.request_id) + b","

    @property
    def interval(self) -> float | None:
        return CONFLATIONS[self.conflation]


@dataclass(frozen=True, slots=True)
class Send:
    data: bytes


@dataclass(frozen=True, slots=True)
class Start:
    subscription: Subscription


@dataclass(frozen=True, slots=True)
class Stop:
    subscription: Subscription


@dataclass(frozen=True, slots=True)
class VerifyToken:
    """Check ``token`` (signature, expiry, key not revoked), then call
    :meth:`Session.token_checked` with the outcome."""

    request_id: str
    token: str


@dataclass(frozen=True, slots=True)
class Close:
    """Close the connection with ``code``."""

    code: CloseCode


@dataclass(frozen=True, slots=True)
class Ping:
    """Send a WebSocket ping; the pong goes to :meth:`Session.pong`."""


@dataclass(frozen=True, slots=True)
class Wake:
    """Call :meth:`Session.drain` in ``delay`` seconds: held messages wait for the rate."""

    delay: float


Action = Send | Start | Stop | VerifyToken | Close | Ping | Wake


class State(Enum):
    AUTHENTICATING = "authenticating"
    OPEN = "open"
    CLOSING = "closing"


@dataclass(frozen=True, slots=True)
class TokenCheck:
    """The outcome of a :class:`VerifyToken`."""

    code: TokenRefreshCode
    user: str | None = None
    expires_us: int | None = None
    exchanges: frozenset[str] | None = None
    #: What logged in: ``(kind, subject)``, a key or a user, for re-checks.
    principal: tuple[str, str] | None = None


@dataclass(frozen=True, slots=True)
class SessionLimits:
    max_subscriptions: int
    symbol_types: frozenset[SymbolType]
    #: Inbound messages per second, and at once; past them messages wait.
    max_messages_per_s: float
    max_message_burst: int
    #: TokenRefreshes per second (each is a store query), in bursts of
    #: ``TOKEN_REFRESH_BURST``; past them, they and what follows wait.
    max_token_refreshes_per_s: float


def encode(request_id: str, type_: MessageType, payload: dict[str, Any]) -> bytes:
    return orjson.dumps({"requestId": request_id, "type": type_.value, "payload": payload})


def protocol_error(code: ProtocolErrorCode, message: str | None = None) -> bytes:
    return encode(
        NA_REQUEST_ID,
        MessageType.PROTOCOL_ERROR,
        {"code": int(code), "message": message or PROTOCOL_ERROR_MESSAGES[code]},
    )


def _response(
    request_id: str, type_: MessageType, code: int, messages: dict[Any, str], detail: str | None
) -> Send:
    message = messages[code]
    if detail:
        # The original's texts end with a full stop or none: keep the sentence whole.
        message = (
            f"{message} {detail[0].upper()}{detail[1:]}."
            if message.endswith(".")
            else f"{message}: {detail}"
        )
    return Send(encode(request_id, type_, {"code": int(code), "message": message}))


def _subscribe_response(request_id: str, code: SubscribeCode, detail: str | None = None) -> Send:
    return _response(request_id, MessageType.SUBSCRIBE_RESPONSE, code, SUBSCRIBE_MESSAGES, detail)


def _unsubscribe_response(request_id: str, code: UnsubscribeCode) -> Send:
    return _response(request_id, MessageType.UNSUBSCRIBE_RESPONSE, code, UNSUBSCRIBE_MESSAGES, None)


def _token_response(request_id: str, code: TokenRefreshCode, detail: str | None = None) -> Send:
    return _response(
        request_id, MessageType.TOKEN_REFRESH_RESPONSE, code, TOKEN_REFRESH_MESSAGES, detail
    )


_BINARY_REFUSED = protocol_error(
    ProtocolErrorCode.NOT_JSON, "Binary messages are not accepted: send each request as JSON text"
)
_SYMBOL_TYPES = {member.value: member for member in SymbolType}
_SUBSCRIPTION_TYPES = {member.value: member for member in SubscriptionType}
_CONFLATION_LIST = ", ".join(CONFLATIONS)


class Session:
    """One client's protocol state: who it is, until when, and what it watches."""

    def __init__(
        self,
        limits: SessionLimits,
        resolve: Resolver,
        clock: Callable[[], float] = monotonic,
        wall_us: Callable[[], int] = now_us,
    ) -> None:
        self.state = State.AUTHENTICATING
        #: Who the connect-time token speaks for; set when it is checked.
        self.user = ""
        #: The key or user behind the token, re-checked while the session lives.
        self.principal: tuple[str, str] | None = None
        #: Exchanges the user may stream; None means all.
        self.exchanges: frozenset[str] | None = None
        self.expires_us = 0
        self._limits = limits
        self._resolve = resolve
        self._clock = clock
        self._wall_us = wall_us
        self.subscriptions: dict[str, Subscription] = {}
        self._by_stream: dict[tuple[str, SubscriptionType], Subscription] = {}
        self._pending_tokens: set[str] = set()
        #: Messages not yet handled, with whether each came as text.
        self._held: deque[tuple[bytes, bool]] = deque()
        self._bucket = TokenBucket(limits.max_messages_per_s, limits.max_message_burst, clock())
        self._refreshes = TokenBucket(
            limits.max_token_refreshes_per_s, TOKEN_REFRESH_BURST, clock()
        )
        #: The budget shared by every stream of the same key or user, once known.
        self._shared: TokenBucket | None = None
        self._awaiting_pong = False

    # -- lifecycle -------------------------------------------------------

    def connect(self, token: str | None) -> list[Action]:
        """The connection's handshake is done; ``token`` is the one it carried."""
        if token is None:
            return self._close(CloseCode.TOKEN_NOT_FOUND)
        return [VerifyToken(CONNECT_CHECK, token)]

    @property
    def backlogged(self) -> bool:
        """Whether so many messages are held that the connection should stop reading."""
        return len(self._held) >= self._limits.max_message_burst

    def receive(self, data: bytes, text: bool = True) -> list[Action]:
        """One inbound message: handled now, or held until it may be."""
        if self.state is State.CLOSING:
            return []
        if text:
            try:
                data.decode()
            except UnicodeDecodeError:
                # RFC 6455: a text message must be UTF-8, and 1007 says it was not.
                return self._close(CloseCode.INVALID_PAYLOAD)
        self._held.append((data, text))
        return self.drain()

    def drain(self) -> list[Action]:
        """Handles held messages as far as authentication, token checks and the rate allow."""
        actions: list[Action] = []
        held = self._held
        pending = self._pending_tokens
        own = self._bucket
        shared = self._shared
        while held and self.state is State.OPEN and len(pending) < MAX_PENDING_CHECKS:
            now = self._clock()
            if not own.ready(now) or (shared is not None and not shared.ready(now)):
                wait = max(own.wait(now), shared.wait(now) if shared is not None else 0.0)
                actions.append(Wake(max(MIN_WAKE_S, wait)))
                break
            own.take(now)
            if shared is not None:
                shared.take(now)
            data, text = held.popleft()
            try:
                actions += self._handle(data, text)
            except _Later as later:
                held.appendleft((data, text))
                actions.append(Wake(max(MIN_WAKE_S, later.delay)))
                break
        return actions

    def share_budget(self, budget: TokenBucket) -> None:
        """From now on messages also spend ``budget``, shared with the other streams of
        the same key or user, so that many connections cannot multiply the rate."""
        self._shared = budget

    def heartbeat(self) -> list[Action]:
        """The heartbeat's tick: a ping, or 3006 when the last one went unanswered.

        While messages are held past the limit the socket is not read, so the
        pong may be there unread: that silence is the server's, not the client's.
        """
        if self.state is State.CLOSING:
            return []
        if self._awaiting_pong and not self.backlogged:
            return self._close(CloseCode.PONG_NOT_RECEIVED)
        self._awaiting_pong = True
        return [Ping()]

    def pong(self) -> None:
        self._awaiting_pong = False

    def expiry(self) -> list[Action]:
        """Called once the token's expiry time has come: 3002 unless it was refreshed."""
        if self.state is State.OPEN and self.expires_us <= self._wall_us():
            return self._close(CloseCode.TOKEN_EXPIRED)
        return []

    def token_check_failed(self, request_id: str) -> list[Action]:
        """The check of a token could not be made (the store failed): 3004."""
        self._pending_tokens.discard(request_id)
        return self._close(CloseCode.INTERNAL)

    def _close(self, code: CloseCode) -> list[Action]:
        if self.state is State.CLOSING:
            return []
        self.state = State.CLOSING
        self._held.clear()
        return [Close(code)]

    # -- messages --------------------------------------------------------

    def _handle(self, data: bytes, text: bool) -> list[Action]:
        if not text:
            return [Send(_BINARY_REFUSED)]
        try:
            return self._dispatch(data)
        except _Later:
            raise
        except Exception:
            _throttled.exception("message", "processing a stream message failed")
            return [Send(protocol_error(ProtocolErrorCode.CANNOT_PROCESS))]

    def _dispatch(self, data: bytes) -> list[Action]:
        try:
            message = orjson.loads(data)
        except orjson.JSONDecodeError:
            return [Send(protocol_error(ProtocolErrorCode.NOT_JSON))]
        if not isinstance(message, dict):
            return [
                Send(protocol_error(ProtocolErrorCode.NOT_JSON, "A message must be a JSON object"))
            ]
        request_id = message.get("requestId")
        if not isinstance(request_id, str) or not request_id:
            return [Send(protocol_error(ProtocolErrorCode.NO_REQUEST_ID))]
        if request_id == NA_REQUEST_ID or len(request_id) > MAX_REQUEST_ID_LENGTH:
            return [
                Send(
                    protocol_error(
                        ProtocolErrorCode.NO_REQUEST_ID,
                        f"requestId must be 1 to {MAX_REQUEST_ID_LENGTH} characters "
                        f"and not the reserved {NA_REQUEST_ID}",
                    )
                )
            ]
        type_ = message.get("type")
        if type_ is None:
            return [Send(protocol_error(ProtocolErrorCode.NO_TYPE))]
        payload = message.get("payload")
        if not isinstance(payload, dict):
            payload = {}
        handler = _HANDLERS.get(type_) if isinstance(type_, str) else None
        if handler is None:
            return [
                Send(
                    protocol_error(
                        ProtocolErrorCode.UNKNOWN_TYPE,
                        "Unknown type: expected Subscribe, Unsubscribe or TokenRefresh",
                    )
                )
            ]
        return handler(self, request_id, payload)

    def _in_use(self, request_id: str) -> bool:
        return request_id in self.subscriptions or request_id in self._pending_tokens

    def _subscribe(self, request_id: str, payload: dict[str, Any]) -> list[Action]:
        if self._in_use(request_id):
            return [_subscribe_response(request_id, SubscribeCode.DUPLICATED_REQUEST_ID)]
        raw_type = payload.get("type")
        # Any JSON value may come: an object or array is unhashable, so only a
        # string is looked up.
        sub_type = _SUBSCRIPTION_TYPES.get(raw_type) if isinstance(raw_type, str) else None
        if sub_type is None:
            return [
                _subscribe_response(
                    request_id, SubscribeCode.INVALID_TYPE, "type must be Level1 or Level2"
                )
            ]
        raw_symbol_type = payload.get("symbolType", SymbolType.CASPIAN.value)
        symbol_type = (
            _SYMBOL_TYPES.get(raw_symbol_type) if isinstance(raw_symbol_type, str) else None
        )
        if symbol_type is None:
            return [
                _subscribe_response(
                    request_id,
                    SubscribeCode.INVALID_SYMBOL_TYPE,
                    "symbolType must be Caspian, Pseudo or Tora",
                )
            ]
        if symbol_type not in self._limits.symbol_types:
            return [_subscribe_response(request_id, SubscribeCode.SYMBOL_TYPE_NOT_SUPPORTED)]
        levels = DEFAULT_LEVELS
        if sub_type is SubscriptionType.LEVEL2 and "numberOfLevels" in payload:
            raw_levels = payload["numberOfLevels"]
            if (
                isinstance(raw_levels, bool)
                or not isinstance(raw_levels, int)
                or not 1 <= raw_levels <= MAX_LEVELS
            ):
                return [
                    _subscribe_response(
                        request_id,
                        SubscribeCode.INVALID_LEVELS,
                        f"numberOfLevels must be an integer from 1 to {MAX_LEVELS}",
                    )
                ]
            levels = raw_levels
        conflation = payload.get("conflation", DEFAULT_CONFLATION)
        if not isinstance(conflation, str) or conflation not in CONFLATIONS:
            # The original has no code for a bad conflation; 203 is the
            # nearest ("invalid subscription type"), and the text says which.
            return [
                _subscribe_response(
                    request_id,
                    SubscribeCode.INVALID_TYPE,
                    f"conflation must be one of {_CONFLATION_LIST}",
                )
            ]
        symbol = payload.get("symbol")
        product = self._resolve(symbol, symbol_type) if isinstance(symbol, str) and symbol else None
        if product is None:
            return [_subscribe_response(request_id, SubscribeCode.INVALID_SYMBOL)]
        if isinstance(product, str):
            return [_subscribe_response(request_id, SubscribeCode.INVALID_SYMBOL, product)]
        if self.exchanges is not None and product.exchange not in self.exchanges:
            return [_subscribe_response(request_id, SubscribeCode.NOT_AUTHORIZED)]
        stream = (product.caspian_code, sub_type)
        if stream in self._by_stream:
            return [_subscribe_response(request_id, SubscribeCode.ALREADY_EXISTS)]
        if len(self.subscriptions) >= self._limits.max_subscriptions:
            return [_subscribe_response(request_id, SubscribeCode.LIMIT_REACHED)]
        subscription = Subscription(request_id, product, sub_type, levels, conflation)
        self.subscriptions[request_id] = subscription
        self._by_stream[stream] = subscription
        # The response goes first so that no update precedes it.
        return [_subscribe_response(request_id, SubscribeCode.OK), Start(subscription)]

    def _unsubscribe(self, request_id: str, payload: dict[str, Any]) -> list[Action]:
        target = payload.get("subscribeRequestId")
        if not isinstance(target, str) or not target:
            return [Send(protocol_error(ProtocolErrorCode.NO_SUBSCRIBE_REQUEST_ID))]
        if self._in_use(request_id):
            return [_unsubscribe_response(request_id, UnsubscribeCode.DUPLICATED_REQUEST_ID)]
        subscription = self.subscriptions.pop(target, None)
        if subscription is None:
            return [_unsubscribe_response(request_id, UnsubscribeCode.NOT_FOUND)]
        del self._by_stream[(subscription.product.caspian_code, subscription.type)]
        # Stopping first means no update of it can follow the response.
        return [Stop(subscription), _unsubscribe_response(request_id, UnsubscribeCode.OK)]

    def _token_refresh(self, request_id: str, payload: dict[str, Any]) -> list[Action]:
        token = payload.get("accessToken")
        if not isinstance(token, str) or not token:
            return [Send(protocol_error(ProtocolErrorCode.NO_ACCESS_TOKEN))]
        if self._in_use(request_id):
            return [_token_response(request_id, TokenRefreshCode.DUPLICATED_REQUEST_ID)]
        now = self._clock()
        if not self._refreshes.take(now):
            raise _Later(self._refreshes.wait(now))
        self._pending_tokens.add(request_id)
        return [VerifyToken(request_id, token)]

    def token_checked(self, request_id: str, check: TokenCheck) -> list[Action]:
        """The outcome of a :class:`VerifyToken`: the connect-time one or a TokenRefresh's."""
        if self.state is State.CLOSING:
            return []
        if request_id == CONNECT_CHECK and self.state is State.AUTHENTICATING:
            if check.code is not TokenRefreshCode.OK:
                expired = check.code is TokenRefreshCode.EXPIRED
                return self._close(CloseCode.TOKEN_EXPIRED if expired else CloseCode.TOKEN_INVALID)
            assert check.user is not None and check.expires_us is not None
            self.user = check.user
            self._take(check)
            self.state = State.OPEN
            return self.drain()
        return self._token_refreshed(request_id, check) + self.drain()

    def _token_refreshed(self, request_id: str, check: TokenCheck) -> list[Action]:
        self._pending_tokens.discard(request_id)
        if check.code is not TokenRefreshCode.OK:
            return [_token_response(request_id, check.code)]
        if check.user != self.user:
            return [
                _token_response(
                    request_id, TokenRefreshCode.INVALID, "the token belongs to another user"
                )
            ]
        self._take(check)
        # A token with fewer exchanges ends the subscriptions it no longer allows.
        return [_token_response(request_id, TokenRefreshCode.OK), *self.entitle(check.exchanges)]

    def _take(self, check: TokenCheck) -> None:
        assert check.expires_us is not None
        self.expires_us = check.expires_us
        self.exchanges = check.exchanges
        self.principal = check.principal

    def close(self) -> list[Stop]:
        """Everything to stop when the connection ends."""
        self.state = State.CLOSING
        self._held.clear()
        stops = [Stop(subscription) for subscription in self.subscriptions.values()]
        self.subscriptions.clear()
        self._by_stream.clear()
        return stops

    def entitle(self, exchanges: frozenset[str] | None) -> list[Action]:
        """New entitlements (None: every exchange), from the gateway's re-check.

        Subscriptions to an exchange no longer allowed end here: each is stopped, then
        answered with a SubscribeResponse 205 under its own requestId, so that no update
        of it follows that answer and the client knows which subscription ended.
        """
        self.exchanges = exchanges
        if exchanges is None:
            return []
        actions: list[Action] = []
        for request_id, subscription in list(self.subscriptions.items()):
            exchange = subscription.product.exchange
            if exchange in exchanges:
                continue
            del self.subscriptions[request_id]
            del self._by_stream[(subscription.product.caspian_code, subscription.type)]
            actions.append(Stop(subscription))
            actions.append(
                _subscribe_response(
                    request_id,
                    SubscribeCode.NOT_AUTHORIZED,
                    f"the entitlement to {exchange} was revoked",
                )
            )
        return actions


_HANDLERS: dict[str, Callable[[Session, str, dict[str, Any]], list[Action]]] = {
    MessageType.SUBSCRIBE.value: Session._subscribe,
    MessageType.UNSUBSCRIBE.value: Session._unsubscribe,
    MessageType.TOKEN_REFRESH.value: Session._token_refresh,
}
