"""Every code the Caspian API v1 documents, and the exceptions that carry them.

Each exception keeps the number, its documented meaning and the server's own
message, so nothing the server says is lost on its way to the user.
"""

from __future__ import annotations

#: ProtocolError codes (inbound message the server could not read).
PROTOCOL_ERRORS = {
    100: "Request not properly formatted as JSON",
    101: "No requestId found in the message",
    102: "No type found in the message",
    103: "Unknown type",
    104: "No accessToken found in the message",
    105: "No subscribeRequestId found in the message",
    199: "Server could not process the request",
}

#: SubscribeResponse codes.
SUBSCRIBE_CODES = {
    200: "All OK",
    201: "Duplicated Request ID",
    202: "Invalid subscription symbol",
    203: "Invalid subscription type",
    204: "Another subscription already exists",
    205: "Not authorized",
    206: "Subscription limit reached",
    207: "Invalid symbol type",
    208: "Invalid number of levels",
    209: "Symbol type not currently supported",
}

#: UnsubscribeResponse codes.
UNSUBSCRIBE_CODES = {
    300: "All OK",
    301: "Subscription not found",
    302: "Duplicated requestId",
}

#: TokenRefreshResponse codes (the same numbers mean other things than in SubscribeResponse).
TOKEN_REFRESH_CODES = {
    200: "All OK",
    202: "Access Token is invalid",
    203: "Access Token has expired",
    204: "Request ID is duplicated",
}

#: WebSocket close codes: the documented ones, and the standard ones a client meets.
CLOSE_CODES = {
    1000: "Normal closure",
    1001: "Going away (maintenance or server shutdown)",
    1006: "Connection lost without a close frame",
    1007: "Message was not valid UTF-8",
    1008: "Policy violation",
    1009: "Message too big",
    1011: "Server error",
    1012: "Service restart",
    1013: "Try again later",
    3000: "Access token not found",
    3001: "Supplied token is not valid",
    3002: "Token has expired",
    3003: "The handler for this session was not found",
    3004: "Internal issue",
    3006: "Pong message not received",
    3007: "Message queue limit reached",
    3008: "Too many streams open for this key or user",
}

#: REST error codes (HTTP statuses and the codes of error bodies).
REST_CODES = {
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    429: "Too Many Requests",
    500: "Internal Server Error",
    503: "Service Unavailable",
    4000: "Request is not properly formatted",
    4001: "Authentication type not found",
    4002: "Authentication details not found",
    4003: "Unsupported authentication type",
    5001: "Could not access the database",
}


def meaning(table: dict[int, str], code: int | None) -> str:
    if code is None:
        return "no code given"
    return table.get(code, f"undocumented code {code}")


class CaspianError(Exception):
    """Anything the service answered with an error, or did not answer at all."""

    def __init__(self, code: int | None, meaning: str, message: str = "") -> None:
        self.code = code
        self.meaning = meaning
        self.message = message
        detail = f": {message}" if message and message != meaning else ""
        super().__init__(f"{code} {meaning}{detail}" if code is not None else f"{meaning}{detail}")


class HTTPError(CaspianError):
    """A REST request answered with an error status; ``status`` is the HTTP status,
    ``code`` the body's code when it has one (else the status)."""

    def __init__(self, status: int, code: int | None, message: str = "") -> None:
        self.status = status
        shown = code if code is not None else status
        super().__init__(shown, meaning(REST_CODES, shown), message)


class AuthenticationError(HTTPError):
    """The login was refused: 401 (wrong key or credentials) or 4000-4003."""


class ServiceUnavailable(HTTPError):
    """503 (the weekly maintenance window, or the service full) or 429; try again after
    ``retry_after`` seconds when the server said."""

    def __init__(
        self, status: int, code: int | None, message: str = "", retry_after: float | None = None
    ) -> None:
        self.retry_after = retry_after
        super().__init__(status, code, message)


class SubscriptionError(CaspianError):
    """A SubscribeResponse other than 200; the subscription is over."""

    def __init__(self, code: int, message: str = "") -> None:
        super().__init__(code, meaning(SUBSCRIBE_CODES, code), message)


class UnsubscribeError(CaspianError):
    """An UnsubscribeResponse other than 300."""

    def __init__(self, code: int, message: str = "") -> None:
        super().__init__(code, meaning(UNSUBSCRIBE_CODES, code), message)


class TokenRefreshError(CaspianError):
    """A TokenRefreshResponse other than 200."""

    def __init__(self, code: int, message: str = "") -> None:
        super().__init__(code, meaning(TOKEN_REFRESH_CODES, code), message)


class ProtocolError(CaspianError):
    """The server's ProtocolError: it could not read a message this client sent."""

    def __init__(self, code: int, message: str = "") -> None:
        super().__init__(code, meaning(PROTOCOL_ERRORS, code), message)


class RequestTimeout(CaspianError, TimeoutError):
    """A request the server did not answer within the client's ``request_timeout``."""

    def __init__(self, what: str, seconds: float) -> None:
        super().__init__(None, f"no answer to {what} within {seconds:g} s")


class Unreachable(CaspianError, ConnectionError):
    """The service could not be reached (refused, reset, name not found)."""

    def __init__(self, message: str) -> None:
        super().__init__(None, "the service could not be reached", message)


class StreamClosed(CaspianError):
    """The stream ended for good: closed by the user, or it can no longer log in."""

    def __init__(self, code: int | None, message: str = "") -> None:
        super().__init__(code, meaning(CLOSE_CODES, code) if code else "stream closed", message)
