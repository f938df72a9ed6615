"""The OpenAPI document of the REST API: what each route takes and answers.

The handlers parse bodies by hand (see ``caspian.rest.app``), so FastAPI cannot
derive the bodies from them: each route's description here is given whole, as
keyword arguments of its decorator.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from caspian.catalog.exchanges import EXCHANGES

_ERROR_SCHEMA = {
    "type": "object",
    "required": ["code", "message"],
    "properties": {"code": {"type": "integer"}, "message": {"type": "string"}},
}

_ERROR_DESCRIPTIONS = {
    400: "Bad Request: the body is not valid JSON or misses required attributes",
    401: "Unauthorized: no valid access token (or, for authentication, wrong credentials)",
    404: "Not found",
    413: "The request body is too large",
    429: "Too many failed logins; retry after the Retry-After header's seconds",
    500: "Internal Server Error (5001: could not access the database)",
    503: "The service is down for its maintenance window",
}


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {
        status: {
            "description": _ERROR_DESCRIPTIONS[status],
            "content": {"application/json": {"schema": _ERROR_SCHEMA}},
        }
        for status in statuses
    }


def _json(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


_PRODUCT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["caspianCode", "exchange"],
    "properties": {
        name: {"type": "string"}
        for name in (
            "toraCode",
            "toraMarket",
            "caspianCode",
            "lotSize",
            "pseudoCode",
            "createdTime",
            "updatedTime",
            "ccyFrom",
            "ccyTo",
            "nativeCode",
            "tickRule",
            "description",
            "exchange",
            "multiplier",
            "lastTradingDate",
            "expireDate",
            "type",
            "strike",
            "underlyingCaspianCode",
            "nativeCode_v2",
        )
    },
}


def _login(type_: str, fields: tuple[str, str]) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["type", "payload"],
        "properties": {
            "type": {"type": "string", "const": type_},
            "payload": {
                "type": "object",
                "required": list(fields),
                "properties": {name: {"type": "string", "minLength": 1} for name in fields},
            },
        },
    }


_AUTH_BODY = {
    "required": True,
    "content": {
        "application/json": {
            "schema": {
                "oneOf": [
                    _login("Key", ("accessKeyID", "secretAccessKey")),
                    _login("Credential", ("user", "pass")),
                ]
            }
        }
    },
}

_PRODUCTS_BODY = {
    "required": True,
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "required": ["exchanges"],
                "properties": {
                    "exchanges": {
                        "type": "array",
                        "items": {"type": "string", "enum": [code for _, code in EXCHANGES]},
                        "minItems": 1,
                    }
                },
            }
        }
    },
}

_TOKEN_SECURITY: list[dict[str, list[str]]] = [{"accessToken": []}]

_SECURITY_SCHEMES = {
    "accessToken": {
        "type": "apiKey",
        "in": "header",
        "name": "Authorization",
        "description": "The accessToken from /v1/auth/authenticate, alone or after 'Bearer '",
    }
}

AUTHENTICATE: dict[str, Any] = {
    "summary": "Obtain an access token",
    "tags": ["Authentication"],
    "openapi_extra": {"requestBody": _AUTH_BODY},
    "responses": {
        200: _json(
            "Authorization successful",
            {
                "type": "object",
                "required": ["accessToken", "expiration"],
                "properties": {
                    "accessToken": {"type": "string"},
                    "expiration": {"type": "string"},
                },
            },
        ),
        **_errors(400, 413, 429, 500, 503),
        401: {"description": "Incorrect credentials or key (no content)"},
    },
}

EXCHANGES_DOC: dict[str, Any] = {
    "summary": "All available exchanges",
    "tags": ["Reference Data"],
    "openapi_extra": {"security": _TOKEN_SECURITY},
    "responses": {
        200: _json(
            "The exchanges",
            {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["name", "code"],
                    "properties": {"name": {"type": "string"}, "code": {"type": "string"}},
                },
            },
        ),
        **_errors(401, 500, 503),
    },
}

PRODUCTS: dict[str, Any] = {
    "summary": "All products of the given exchanges",
    "tags": ["Reference Data"],
    "openapi_extra": {"requestBody": _PRODUCTS_BODY, "security": _TOKEN_SECURITY},
    "responses": {
        200: _json("The products", {"type": "array", "items": _PRODUCT_SCHEMA}),
        **_errors(400, 401, 413, 500, 503),
    },
}

PRODUCT: dict[str, Any] = {
    "summary": "The details of one product",
    "tags": ["Reference Data"],
    "openapi_extra": {"security": _TOKEN_SECURITY},
    "responses": {
        200: _json("The product", _PRODUCT_SCHEMA),
        **_errors(400, 401, 404, 500, 503),
    },
}


def install(app: FastAPI) -> None:
    """Make ``app`` serve its document with the access-token scheme its routes name.

    FastAPI writes a security scheme only for its own security dependencies;
    the token is checked by hand here, so the scheme is added to the document.
    """

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title,
                version=app.version,
                description=app.description,
                routes=app.routes,
            )
            schema.setdefault("components", {})["securitySchemes"] = _SECURITY_SCHEMES
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
