"""Schemathesis against the gateway's served OpenAPI spec: no 5xx, no schema violations."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from llmops_gateway.keys import FileKeyStore, Tenant
from tests.integration.gateway_fixtures import Gateway, gateway, stub_upstream
from tests.reliability import outcome

CASES_PER_OPERATION = 350
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Gateway, str]]:
    folder = tmp_path_factory.mktemp("schema")
    store = FileKeyStore(folder / "keys.json")
    # Limits high enough that fuzzing measures validation, not the rate limiter.
    _, key = store.create(
        Tenant(
            name="fuzz",
            requests_per_minute=100_000,
            tokens_per_minute=10_000_000,
            tokens_per_day=1_000_000_000,
        )
    )
    with (
        stub_upstream() as upstream,
        gateway(folder, default_backend=upstream, keys_file=store.path) as running,
    ):
        yield running, key


def test_no_server_errors_and_no_schema_violations(served: tuple[Gateway, str]) -> None:
    running, key = served
    schema = schemathesis.openapi.from_url(f"{running.url}/openapi.json")
    counts = outcome("schemathesis against the served OpenAPI spec (no 5xx, no schema violation)")
    ran: dict[str, int] = {}
    for result in schema.get_all_operations():
        operation = result.ok()

        @given(case=operation.as_strategy())
        @settings(
            max_examples=CASES_PER_OPERATION,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            database=None,
        )
        def fuzz(case: schemathesis.Case) -> None:
            ran[case.operation.label] = ran.get(case.operation.label, 0) + 1
            # Random model names all stop at routing (404); two cases in three name a model
            # the stub serves, so the rest of the body reaches validation, admission, relay.
            if isinstance(case.body, dict) and ran[case.operation.label] % 3:
                embeddings = case.operation.label.endswith("/v1/embeddings")
                case.body["model"] = "stub-embed" if embeddings else "stub-chat"
            response = case.call_and_validate(
                base_url=running.url, headers={"authorization": f"Bearer {key}"}, checks=CHECKS
            )
            if response.status_code < 400:
                counts.ok()
            else:
                counts.error(str(response.status_code))

        fuzz()
    total = sum(ran.values())
    print(f"schemathesis: {total} cases over {len(ran)} operations: {ran}")
    assert total >= 1000, ran
    assert {"POST /v1/chat/completions", "POST /v1/embeddings", "GET /v1/models"} <= set(ran)
