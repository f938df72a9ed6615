"""Every code, message type and fixed value of the Caspian API v1, defined once.

The numbers and their meanings are the original client documentation's
(``shared/spec/caspian-api-v1-original.txt``); the message texts are ours.
"""

from __future__ import annotations

from enum import IntEnum, StrEnum

#: The requestId the protocol uses for messages that answer no request.
NA_REQUEST_ID = "N/A"

#: Issuer claim of the access tokens, as in the original's sample token.
TOKEN_ISSUER = "Caspian Tech"


class MessageType(StrEnum):
    SUBSCRIBE = "Subscribe"
    UNSUBSCRIBE = "Unsubscribe"
    TOKEN_REFRESH = "TokenRefresh"
    PROTOCOL_ERROR = "ProtocolError"
    SUBSCRIBE_RESPONSE = "SubscribeResponse"
    UNSUBSCRIBE_RESPONSE = "UnsubscribeResponse"
    TOKEN_REFRESH_RESPONSE = "TokenRefreshResponse"
    LEVEL1 = "Level1"
    LEVEL2 = "Level2"


class SubscriptionType(StrEnum):
    LEVEL1 = "Level1"
    LEVEL2 = "Level2"


class SymbolType(StrEnum):
    CASPIAN = "Caspian"
    PSEUDO = "Pseudo"
    TORA = "Tora"


class StreamState(StrEnum):
    CONNECTED = "connected"
    DISCONNECTED = "disconnected"


class Stream(StrEnum):
    """The upstream streams whose state clients see (replay format's ``stream``)."""

    BBO = "bbo"
    TRADE = "trade"
    DEPTH = "depth"


#: Conflation names of a Subscribe, and their interval in seconds (None: every change).
CONFLATIONS: dict[str, float | None] = {
    "None": None,
    "250ms": 0.25,
    "330ms": 0.33,
    "500ms": 0.5,
    "1s": 1.0,
    "3s": 3.0,
    "5s": 5.0,
}
DEFAULT_CONFLATION = "330ms"
DEFAULT_LEVELS = 20
MAX_LEVELS = 100


class ProtocolErrorCode(IntEnum):
    NOT_JSON = 100
    NO_REQUEST_ID = 101
    NO_TYPE = 102
    UNKNOWN_TYPE = 103
    NO_ACCESS_TOKEN = 104
    NO_SUBSCRIBE_REQUEST_ID = 105
    CANNOT_PROCESS = 199


PROTOCOL_ERROR_MESSAGES: dict[ProtocolErrorCode, str] = {
    ProtocolErrorCode.NOT_JSON: "Request was not properly formatted as JSON",
    ProtocolErrorCode.NO_REQUEST_ID: "No requestId found in the message",
    ProtocolErrorCode.NO_TYPE: "No type found in the message",
    ProtocolErrorCode.UNKNOWN_TYPE: "Unknown type",
    ProtocolErrorCode.NO_ACCESS_TOKEN: "No accessToken found in the message",
    ProtocolErrorCode.NO_SUBSCRIBE_REQUEST_ID: "No subscribeRequestId found in the message",
    ProtocolErrorCode.CANNOT_PROCESS: "Server could not process the request",
}


class SubscribeCode(IntEnum):
    OK = 200
    DUPLICATED_REQUEST_ID = 201
    INVALID_SYMBOL = 202
    INVALID_TYPE = 203
    ALREADY_EXISTS = 204
    NOT_AUTHORIZED = 205
    LIMIT_REACHED = 206
    INVALID_SYMBOL_TYPE = 207
    INVALID_LEVELS = 208
    SYMBOL_TYPE_NOT_SUPPORTED = 209


SUBSCRIBE_MESSAGES: dict[SubscribeCode, str] = {
    SubscribeCode.OK: "All OK",
    SubscribeCode.DUPLICATED_REQUEST_ID: "Duplicated Request ID",
    SubscribeCode.INVALID_SYMBOL: "Invalid subscription symbol",
    SubscribeCode.INVALID_TYPE: "Invalid subscription type",
    SubscribeCode.ALREADY_EXISTS: "Another subscription already exists",
    SubscribeCode.NOT_AUTHORIZED: "Not authorized",
    SubscribeCode.LIMIT_REACHED: "Subscription limit reached",
    SubscribeCode.INVALID_SYMBOL_TYPE: "Invalid symbol type",
    SubscribeCode.INVALID_LEVELS: "Invalid number of levels",
    SubscribeCode.SYMBOL_TYPE_NOT_SUPPORTED: "Symbol type not currently supported",
}


class UnsubscribeCode(IntEnum):
    OK = 300
    NOT_FOUND = 301
    DUPLICATED_REQUEST_ID = 302


UNSUBSCRIBE_MESSAGES: dict[UnsubscribeCode, str] = {
    UnsubscribeCode.OK: "All OK",
    UnsubscribeCode.NOT_FOUND: "Subscription not found",
    UnsubscribeCode.DUPLICATED_REQUEST_ID: "Duplicated requestId",
}


class TokenRefreshCode(IntEnum):
    OK = 200
    INVALID = 202
    EXPIRED = 203
    DUPLICATED_REQUEST_ID = 204


TOKEN_REFRESH_MESSAGES: dict[TokenRefreshCode, str] = {
    TokenRefreshCode.OK: "All OK",
    TokenRefreshCode.INVALID: "Access Token is invalid.",
    TokenRefreshCode.EXPIRED: "Access Token has expired.",
    TokenRefreshCode.DUPLICATED_REQUEST_ID: "Request ID is duplicated.",
}


class CloseCode(IntEnum):
    """WebSocket close codes (RFC 6455 ones and the original's 3000 range)."""

    GOING_AWAY = 1001
    INVALID_PAYLOAD = 1007
    MESSAGE_TOO_BIG = 1009
    TOKEN_NOT_FOUND = 3000
    TOKEN_INVALID = 3001
    TOKEN_EXPIRED = 3002
    SESSION_NOT_FOUND = 3003
    INTERNAL = 3004
    PONG_NOT_RECEIVED = 3006
    QUEUE_LIMIT = 3007
    CONNECTION_LIMIT = 3008


CLOSE_REASONS: dict[CloseCode, str] = {
    CloseCode.GOING_AWAY: "Server shutting down",
    CloseCode.INVALID_PAYLOAD: "Invalid UTF-8 in a text message",
    CloseCode.MESSAGE_TOO_BIG: "Message too big",
    CloseCode.TOKEN_NOT_FOUND: "Access token not found",
    CloseCode.TOKEN_INVALID: "Supplied token is not valid",
    CloseCode.TOKEN_EXPIRED: "Token has expired",
    CloseCode.SESSION_NOT_FOUND: "The handler for this session was not found",
    CloseCode.INTERNAL: "Internal issue",
    CloseCode.PONG_NOT_RECEIVED: "Pong message not received",
    CloseCode.QUEUE_LIMIT: "Message queue limit reached",
    CloseCode.CONNECTION_LIMIT: "Too many open connections for this key or user",
}
#: The reason of 1001 when a maintenance window begins, rather than a shutdown.
MAINTENANCE_REASON = "Service maintenance"


class AuthErrorCode(IntEnum):
    """The ``code`` of REST error bodies."""

    NOT_FORMATTED = 4000
    TYPE_NOT_FOUND = 4001
    DETAILS_NOT_FOUND = 4002
    UNSUPPORTED_TYPE = 4003


AUTH_ERROR_MESSAGES: dict[AuthErrorCode, str] = {
    AuthErrorCode.NOT_FORMATTED: "Request is not properly formatted",
    AuthErrorCode.TYPE_NOT_FOUND: "Authentication type not found",
    AuthErrorCode.DETAILS_NOT_FOUND: "Authentication details not found",
    AuthErrorCode.UNSUPPORTED_TYPE: "Unsupported authentication type",
}


class RestErrorCode(IntEnum):
    """The ``code`` of REST error bodies other than authentication's 4000-4003.

    The original's table gives 400, 401 and 500 as codes, 4001 as "No
    exchange specified" / "No product specified" and 5001 as "Could not
    access the database"; the other HTTP statuses reuse their number.
    """

    BAD_REQUEST = 400
    UNAUTHORIZED = 401
    NOT_FOUND = 404
    METHOD_NOT_ALLOWED = 405
    TOO_LARGE = 413
    TOO_MANY_REQUESTS = 429
    INTERNAL = 500
    #: Maintenance, or the server at its limit of requests in flight.
    UNAVAILABLE = 503
    NOTHING_SPECIFIED = 4001
    DATABASE = 5001


DATABASE_ERROR_MESSAGE = "Could not access the database"
