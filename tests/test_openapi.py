"""Schemathesis against the OpenAPI document the running service serves.

Requests generated from the document (valid ones, and invalid ones) go over real
HTTP to a live service; every answer must be no server error and must match what
the document promises (status codes, content types, headers and bodies).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode
from schemathesis import checks as st_checks
from schemathesis.core.failures import FailureGroup

from tests.support.service import RunningService, start_service

CHECKS = [
    st_checks.not_a_server_error,
    st_checks.status_code_conformance,
    st_checks.content_type_conformance,
    st_checks.response_headers_conformance,
    st_checks.response_schema_conformance,
    st_checks.negative_data_rejection,
    st_checks.ignored_auth,
    st_checks.unsupported_method,
    st_checks.positive_data_acceptance,
]
OPERATIONS = {
    "POST /v1/auth/authenticate",
    "GET /v1/reference/exchanges",
    "POST /v1/reference/products",
    "GET /v1/reference/products/{caspianCode}",
}
EXAMPLES_PER_OPERATION = 60


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningService]:
    # Generated logins all fail; a limiter that never locks keeps them reaching the
    # handler instead of being answered 429 from the second request on.
    running = start_service(tmp_path_factory.mktemp("openapi"), auth_max_failures=10**9)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def token(live: RunningService) -> str:
    return live.token("schemathesis")


@pytest.fixture(scope="module")
def schema(live: RunningService) -> Any:
    return schemathesis.openapi.from_url(f"{live.base_url}/openapi.json", timeout=30)


def test_document_lists_every_operation(schema: Any) -> None:
    labels = {result.ok().label for result in schema.get_all_operations()}
    assert labels == OPERATIONS


def exercise(operation: Any, mode: GenerationMode, base_url: str, token: str) -> set[int]:
    """Send generated requests for one operation and check each answer; the statuses seen."""
    statuses: set[int] = set()

    @settings(
        max_examples=EXAMPLES_PER_OPERATION,
        deadline=None,
        database=None,
        phases=[Phase.explicit, Phase.generate, Phase.shrink],
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def send(case: Any) -> None:
        response = case.call_and_validate(
            base_url=base_url, headers={"Authorization": token}, checks=CHECKS, timeout=30
        )
        statuses.add(response.status_code)

    send()
    return statuses


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_generated_requests(
    live: RunningService, token: str, schema: Any, mode: GenerationMode
) -> None:
    failures: dict[str, str] = {}
    answered: dict[str, set[int]] = {}
    for result in schema.get_all_operations():
        operation = result.ok()
        try:
            answered[operation.label] = exercise(operation, mode, live.base_url, token)
        except (Exception, FailureGroup) as exc:
            # Schemathesis's failures name the check and give a curl command that repeats
            # the request; each operation is still tried when another failed.
            failures[operation.label] = str(exc)
    assert not failures, "\n\n".join(f"{label}:\n{text}" for label, text in failures.items())
    assert set(answered) == OPERATIONS
    if mode is GenerationMode.POSITIVE:
        # The service was really exercised, not just turned away at the door.
        assert 200 in answered["GET /v1/reference/exchanges"]
        assert 401 in answered["POST /v1/auth/authenticate"]


def test_token_still_good_after_fuzzing(live: RunningService, token: str) -> None:
    # Thousands of odd requests leave the service answering normally.
    response = httpx.get(
        f"{live.base_url}/v1/reference/exchanges", headers={"Authorization": token}, timeout=30
    )
    assert response.status_code == 200
    assert len(response.json()) == 22
    assert not live.errors
