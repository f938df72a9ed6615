"""REST authentication and reference data, over real HTTP against the started service."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest

from tests.support.service import RunningService, start_service

TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}$")


def post(service: RunningService, path: str, body: Any = None, **kwargs: Any) -> httpx.Response:
    return httpx.post(f"{service.base_url}{path}", json=body, timeout=30, **kwargs)


def get(service: RunningService, path: str, **kwargs: Any) -> httpx.Response:
    return httpx.get(f"{service.base_url}{path}", timeout=30, **kwargs)


def authenticate(service: RunningService, type_: str, payload: Any) -> httpx.Response:
    return post(service, "/v1/auth/authenticate", {"type": type_, "payload": payload})


def test_key_login_gives_a_documented_token(service: RunningService) -> None:
    key_id, secret = service.key("alice")
    assert re.fullmatch(r"[A-Z0-9]{20}", key_id)
    assert len(secret) >= 40
    response = authenticate(service, "Key", {"accessKeyID": key_id, "secretAccessKey": secret})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"accessToken", "expiration"}
    assert TIMESTAMP.match(body["expiration"])
    claims = jwt.decode(body["accessToken"], options={"verify_signature": False})
    assert jwt.get_unverified_header(body["accessToken"])["alg"] == "HS256"
    assert {"sub", "iss", "iat", "exp", "jti"} <= set(claims)
    assert claims["sub"] == key_id
    assert claims["iss"] == "Caspian Tech"
    # 24 hours by default, and the advertised expiration is the enforced one.
    assert abs(claims["exp"] - claims["iat"] - 86_400) <= 1
    expiration = time.strptime(body["expiration"][:19], "%Y-%m-%dT%H:%M:%S")
    assert abs(time.mktime(expiration) - time.timezone - claims["exp"]) < 1


def test_credential_login(service: RunningService) -> None:
    service.call(service.listening.service.store.create_user("carol", "s3cret-pass"))
    good = authenticate(service, "Credential", {"user": "carol", "pass": "s3cret-pass"})
    assert good.status_code == 200
    assert good.json()["accessToken"]
    bad = authenticate(service, "Credential", {"user": "carol", "pass": "wrong"})
    assert bad.status_code == 401
    assert bad.content == b""


def test_wrong_and_revoked_keys_are_401(service: RunningService) -> None:
    key_id, secret = service.key("dave")
    assert (
        authenticate(
            service, "Key", {"accessKeyID": key_id, "secretAccessKey": secret + "x"}
        ).status_code
        == 401
    )
    assert (
        authenticate(
            service, "Key", {"accessKeyID": "NOSUCHKEY0000000000", "secretAccessKey": secret}
        ).status_code
        == 401
    )
    service.call(service.listening.service.store.revoke_key(key_id))
    revoked = authenticate(service, "Key", {"accessKeyID": key_id, "secretAccessKey": secret})
    assert revoked.status_code == 401
    assert revoked.content == b""


@pytest.mark.parametrize(
    ("content", "code"),
    [
        (b"{not json", 4000),
        (b"[]", 4000),
        (b'"Key"', 4000),
        (b'{"payload": {}}', 4001),
        (b'{"type": "Key"}', 4002),
        (b'{"type": "Key", "payload": "x"}', 4002),
        (b'{"type": "Key", "payload": {"accessKeyID": "A"}}', 4002),
        (b'{"type": "Credential", "payload": {"user": "a", "pass": 5}}', 4002),
        (b'{"type": "Token", "payload": {}}', 4003),
        (b'{"type": null, "payload": {}}', 4003),
    ],
)
def test_bad_authentication_requests(service: RunningService, content: bytes, code: int) -> None:
    response = httpx.post(
        f"{service.base_url}/v1/auth/authenticate",
        content=content,
        headers={"content-type": "application/json"},
        timeout=30,
    )
    assert response.status_code == 400
    body = response.json()
    assert body["code"] == code
    assert isinstance(body["message"], str) and body["message"]


def test_exchanges_requires_a_token(service: RunningService) -> None:
    response = get(service, "/v1/reference/exchanges")
    assert response.status_code == 401
    assert response.json()["code"] == 401
    garbage = get(service, "/v1/reference/exchanges", headers={"Authorization": "nope"})
    assert garbage.status_code == 401


def test_exchanges(service: RunningService) -> None:
    token = service.token()
    for header in (token, f"Bearer {token}"):
        response = get(service, "/v1/reference/exchanges", headers={"Authorization": header})
        assert response.status_code == 200
        exchanges = response.json()
        assert len(exchanges) == 22
        assert {"name": "Coinbase Pro (GDAX)", "code": "GDAX"} in exchanges
        assert {"name": "Gemini", "code": "GEMINI"} in exchanges
        assert all(set(item) == {"name", "code"} for item in exchanges)


def test_products_of_exchanges(service: RunningService) -> None:
    headers = {"Authorization": service.token()}
    response = post(service, "/v1/reference/products", {"exchanges": ["GEMINI"]}, headers=headers)
    assert response.status_code == 200
    products = response.json()
    assert products and all(product["exchange"] == "GEMINI" for product in products)
    eth = next(p for p in products if p["caspianCode"] == "FX-ETH/USD=GEMINI")
    assert eth["ccyFrom"] == "ETH" and eth["ccyTo"] == "USD"
    assert eth["pseudoCode"] == "ETHUSD=GEMINI"
    assert eth["nativeCode"] == "ethusd"
    assert eth["description"] == "Ethereum - US Dollar - FX pair"
    assert eth["tickRule"] == ",,0.01"
    assert eth["toraCode"] == "ETH/USD" and eth["toraMarket"] == "GEMINI"
    assert TIMESTAMP.match(eth["createdTime"]) and TIMESTAMP.match(eth["updatedTime"])
    both = post(
        service, "/v1/reference/products", {"exchanges": ["GEMINI", "DERIBIT"]}, headers=headers
    ).json()
    assert {p["exchange"] for p in both} == {"GEMINI", "DERIBIT"}
    assert any(p["type"] == "OPT" for p in both)


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({}, 4001),
        ({"exchanges": []}, 4001),
        ({"exchanges": "GEMINI"}, 4000),
        ({"exchanges": ["NOPE"]}, 4000),
        ({"exchanges": [1]}, 4000),
    ],
)
def test_products_bad_requests(service: RunningService, body: Any, code: int) -> None:
    headers = {"Authorization": service.token()}
    response = post(service, "/v1/reference/products", body, headers=headers)
    assert response.status_code == 400
    assert response.json()["code"] == code
    if code == 4001:
        assert response.json()["message"] == "No exchange specified"


def test_one_product_raw_and_encoded(service: RunningService) -> None:
    headers = {"Authorization": service.token()}
    raw = get(service, "/v1/reference/products/FX-ETH/USD=GEMINI", headers=headers)
    assert raw.status_code == 200
    assert raw.json()["caspianCode"] == "FX-ETH/USD=GEMINI"
    encoded = get(service, "/v1/reference/products/FX-ETH%2FUSD%3DGEMINI", headers=headers)
    assert encoded.status_code == 200
    assert encoded.json() == raw.json()
    missing = get(service, "/v1/reference/products/FX-NOPE/USD=GEMINI", headers=headers)
    assert missing.status_code == 404
    assert set(missing.json()) == {"code", "message"}
    empty = get(service, "/v1/reference/products/", headers=headers)
    assert empty.status_code == 400
    assert empty.json() == {"code": 4001, "message": "No product specified"}
    assert get(service, "/v1/reference/products/FX-ETH/USD=GEMINI").status_code == 401


def test_revoked_key_token_cannot_read(service: RunningService) -> None:
    key_id, secret = service.key("erin")
    token = authenticate(service, "Key", {"accessKeyID": key_id, "secretAccessKey": secret}).json()[
        "accessToken"
    ]
    headers = {"Authorization": token}
    assert get(service, "/v1/reference/exchanges", headers=headers).status_code == 200
    service.call(service.listening.service.store.revoke_key(key_id))
    assert get(service, "/v1/reference/exchanges", headers=headers).status_code == 401


def test_large_bodies_are_refused(service: RunningService) -> None:
    response = httpx.post(
        f"{service.base_url}/v1/auth/authenticate",
        content=b"{" + b" " * 200_000 + b"}",
        headers={"content-type": "application/json"},
        timeout=30,
    )
    assert response.status_code == 413
    assert response.json()["code"] == 413

    def chunks() -> Any:
        for _ in range(100):
            yield b" " * 10_000

    streamed = httpx.post(f"{service.base_url}/v1/auth/authenticate", content=chunks(), timeout=30)
    assert streamed.status_code == 413


def test_unknown_paths_and_methods_are_json(service: RunningService) -> None:
    missing = get(service, "/v1/nothing")
    assert missing.status_code == 404
    assert missing.json()["code"] == 404
    wrong = httpx.delete(f"{service.base_url}/v1/auth/authenticate", timeout=30)
    assert wrong.status_code == 405
    assert wrong.json()["code"] == 405


def test_openapi_document(service: RunningService) -> None:
    document = get(service, "/openapi.json").json()
    paths = document["paths"]
    assert "/v1/auth/authenticate" in paths
    assert "/v1/reference/exchanges" in paths
    assert "/v1/reference/products" in paths
    assert "/v1/reference/products/{caspianCode}" in paths


def test_login_rate_limit(tmp_path: Path) -> None:
    running = start_service(tmp_path, auth_max_failures=3, auth_window_s=2.0)
    try:
        key_id, secret = running.key("frank")
        wrong = {"accessKeyID": key_id, "secretAccessKey": "wrong" * 9}
        for _ in range(3):
            assert authenticate(running, "Key", wrong).status_code == 401
        limited = authenticate(running, "Key", wrong)
        assert limited.status_code == 429
        assert int(limited.headers["Retry-After"]) >= 1
        assert limited.json()["code"] == 429
        # While locked, even the right secret waits.
        right = {"accessKeyID": key_id, "secretAccessKey": secret}
        assert authenticate(running, "Key", right).status_code == 429
        time.sleep(2.2)
        assert authenticate(running, "Key", right).status_code == 200
    finally:
        running.stop()


def test_maintenance_window_answers_503(tmp_path: Path) -> None:
    now = time.gmtime()
    day = ["MON", "TUE", "WED", "THU", "FRI", "SAT", "SUN"][now.tm_wday]
    start_minute = now.tm_hour * 60 + now.tm_min
    end_minute = (start_minute + 2) % 1440
    window = (
        f"{day} {start_minute // 60:02d}:{start_minute % 60:02d}-"
        f"{end_minute // 60:02d}:{end_minute % 60:02d}"
    )
    running = start_service(tmp_path, maintenance=window)
    try:
        response = authenticate(running, "Key", {"accessKeyID": "A", "secretAccessKey": "B"})
        assert response.status_code == 503
        assert int(response.headers["Retry-After"]) >= 1
        assert response.json()["code"] == 503
    finally:
        running.stop()
