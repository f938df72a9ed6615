"""The REST API's answers in its documented forms: JSON bodies and ``{"code", "message"}``."""

from __future__ import annotations

from typing import Any

import orjson
from fastapi.responses import Response


class ApiError(Exception):
    """Raised by a handler: answered as ``{"code": code, "message": message}``."""

    def __init__(
        self, status: int, code: int, message: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers


def json_response(
    content: Any, status: int = 200, headers: dict[str, str] | None = None
) -> Response:
    return Response(
        orjson.dumps(content), status_code=status, headers=headers, media_type="application/json"
    )


def error_response(
    status: int, code: int, message: str, headers: dict[str, str] | None = None
) -> Response:
    return json_response({"code": code, "message": message}, status, headers)
