"""The Caspian session protocol as a pure state machine.

A :class:`Session` takes one inbound WebSocket message and returns the actions
the connection must carry out: frames to send, subscriptions to start or
stop, a token to verify, or a close. It does no I/O, knows no socket and no
clock, so every rule of the protocol is tested directly; the socket code
around it stays thin.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
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
    MessageType,
    ProtocolErrorCode,
    SubscribeCode,
    SubscriptionType,
    SymbolType,
    TokenRefreshCode,
    UnsubscribeCode,
)

#: Longest requestId accepted; a subscription keeps its id for its lifetime.
MAX_REQUEST_ID_LENGTH = 128

Resolver = Callable[[str, SymbolType], ProductSpec | None]


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


Action = Send | Start | Stop | VerifyToken


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
        message = f"{message}: {detail}"
    return Send(encode(request_id, type_, {"code": int(code), "message": message}))


def _subscribe_response(request_id: str, code: SubscribeCode, detail: str | None = None) -> Send:
    return _response(request_id, MessageType.SUBSCRIBE_RESPONSE, code, SUBSCRIBE_MESSAGES, detail)


def _unsubscribe_response(request_id: str, code: UnsubscribeCode) -> Send:
    return _response(request_id, MessageType.UNSUBSCRIBE_RESPONSE, code, UNSUBSCRIBE_MESSAGES, None)


def _token_response(request_id: str, code: TokenRefreshCode, detail: str | None = None) -> Send:
    return _response(
        request_id, MessageType.TOKEN_REFRESH_RESPONSE, code, TOKEN_REFRESH_MESSAGES, detail
    )


_SYMBOL_TYPES = {member.value: member for member in SymbolType}
_SUBSCRIPTION_TYPES = {member.value: member for member in SubscriptionType}
_CONFLATION_LIST = ", ".join(CONFLATIONS)


class Session:
    """One client's protocol state: who it is, until when, and what it watches."""

    def __init__(
        self,
        user: str,
        exchanges: frozenset[str] | None,
        expires_us: int,
        limits: SessionLimits,
        resolve: Resolver,
        principal: tuple[str, str] | None = None,
    ) -> None:
        self.user = user
        #: The key or user behind the token, re-checked while the session lives.
        self.principal = principal
        #: Exchanges the user may stream; None means all.
        self.exchanges = exchanges
        self.expires_us = expires_us
        self._limits = limits
        self._resolve = resolve
        self.subscriptions: dict[str, Subscription] = {}
        self._by_stream: dict[tuple[str, SubscriptionType], Subscription] = {}
        self._pending_tokens: set[str] = set()

    def receive(self, data: str | bytes) -> list[Action]:
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
        if type_ == MessageType.SUBSCRIBE:
            return self._subscribe(request_id, payload)
        if type_ == MessageType.UNSUBSCRIBE:
            return self._unsubscribe(request_id, payload)
        if type_ == MessageType.TOKEN_REFRESH:
            return self._token_refresh(request_id, payload)
        return [
            Send(
                protocol_error(
                    ProtocolErrorCode.UNKNOWN_TYPE,
                    "Unknown type: expected Subscribe, Unsubscribe or TokenRefresh",
                )
            )
        ]

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
        self._pending_tokens.add(request_id)
        return [VerifyToken(request_id, token)]

    def token_checked(self, request_id: str, check: TokenCheck) -> list[Action]:
        self._pending_tokens.discard(request_id)
        if check.code is not TokenRefreshCode.OK:
            return [_token_response(request_id, check.code)]
        if check.user != self.user:
            return [
                _token_response(
                    request_id, TokenRefreshCode.INVALID, "the token belongs to another user"
                )
            ]
        assert check.expires_us is not None
        self.expires_us = check.expires_us
        self.exchanges = check.exchanges
        self.principal = check.principal
        return [_token_response(request_id, TokenRefreshCode.OK)]

    def close(self) -> list[Stop]:
        """Everything to stop when the connection ends."""
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
