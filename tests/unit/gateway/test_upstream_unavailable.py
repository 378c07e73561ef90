"""A backend's 503 becomes the gateway's 503 with a Retry-After, UNAVAILABLE on gRPC."""

from __future__ import annotations

import pytest

from llmops_gateway import errors


@pytest.mark.parametrize(
    ("header", "expected"),
    [("7", 7.0), (None, 1.0), ("Wed, 21 Oct 2015 07:28:00 GMT", 1.0), ("0", 1.0), ("900", 60.0)],
)
def test_retry_after_is_kept_within_what_clients_honour(
    header: str | None, expected: float
) -> None:
    """Ray Serve's backpressure 503 may carry Retry-After (ray/serve/_private/http_util.py,
    retry_after_headers) or none; a missing, zero or date header becomes 1 s, a long one 60 s
    (the ``openai`` SDKs stop retrying past 120 s)."""
    error = errors.upstream_unavailable(b"Request dropped due to backpressure", {}, header)
    assert error.status == 503
    assert error.grpc_code == "UNAVAILABLE"
    assert error.retry_after_s == expected
    assert error.message == "Request dropped due to backpressure"


def test_an_openai_shaped_503_keeps_its_message_and_type() -> None:
    body = {"error": {"message": "model 'm' is restarting", "type": "server_error", "code": "x"}}
    error = errors.upstream_unavailable(b"{}", body, "5")
    assert error.body("r")["error"] == {
        "message": "model 'm' is restarting",
        "type": "server_error",
        "param": None,
        "code": "x",
    }
    assert error.retry_after_s == 5.0
