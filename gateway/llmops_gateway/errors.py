"""The gateway's one error type, mapped to HTTP statuses and gRPC codes alike."""

from __future__ import annotations

import math
from typing import Any

from llmops_contract import ApiError


class GatewayError(ApiError):
    """An error the caller should see: OpenAI's error shape (`llmops_contract.ApiError`, as
    the graph's router answers) plus what the gateway adds.

    Args:
        message: What went wrong and what to change; never contains a key.
        status: HTTP status.
        grpc_code: Name of the gRPC status code (``grpc.StatusCode`` member).
        type: OpenAI error type.
        code: Stable machine-readable code.
        param: The request field at fault.
        retry_after_s: For 429/503: when to retry.
        should_retry: False tells clients not to retry at all (the ``openai`` SDKs read it
            from the ``x-should-retry`` header, before any status-based retry).
        upstream_body: A backend's own error body, already in OpenAI's shape: REST answers
            it unchanged (gRPC has only the message).
    """

    def __init__(
        self,
        message: str,
        *,
        status: int,
        grpc_code: str,
        type: str,
        code: str | None = None,
        param: str | None = None,
        retry_after_s: float | None = None,
        should_retry: bool | None = None,
        upstream_body: bytes | None = None,
    ) -> None:
        super().__init__(message, status=status, type=type, param=param, code=code)
        self.grpc_code = grpc_code
        self.retry_after_s = retry_after_s
        self.should_retry = should_retry
        self.upstream_body = upstream_body


class ClientGoneError(Exception):
    """The client went away before its request was read: nobody to answer."""


def internal() -> GatewayError:
    """500: a bug in the gateway (logged with its traceback where it was caught)."""
    return GatewayError(
        "internal error in the gateway", status=500, grpc_code="INTERNAL", type="server_error"
    )


def unauthenticated(message: str) -> GatewayError:
    """401: no key, or a key that does not authenticate."""
    return GatewayError(
        message,
        status=401,
        grpc_code="UNAUTHENTICATED",
        type="authentication_error",
        code="invalid_api_key",
    )


def invalid(message: str, param: str | None = None) -> GatewayError:
    """400: the request itself is wrong."""
    return GatewayError(
        message,
        status=400,
        grpc_code="INVALID_ARGUMENT",
        type="invalid_request_error",
        param=param,
    )


def model_not_found(model: str) -> GatewayError:
    """404: nobody serves the model, or the caller's tenant may not use it.

    One answer for both, as OpenAI gives: a key learns nothing about models it may not use.
    """
    return GatewayError(
        f"The model {model!r} does not exist or you do not have access to it.",
        status=404,
        grpc_code="NOT_FOUND",
        type="invalid_request_error",
        code="model_not_found",
        param="model",
    )


def route_not_found(method: str, path: str) -> GatewayError:
    """404 for a URL the API does not have (OpenAI's wording)."""
    return GatewayError(
        f"Invalid URL ({method} {path})",
        status=404,
        grpc_code="NOT_FOUND",
        type="invalid_request_error",
        code="unknown_url",
    )


def method_not_allowed(method: str, path: str) -> GatewayError:
    """405: the URL exists, but not for this method."""
    return GatewayError(
        f"Method {method} is not allowed on {path}",
        status=405,
        grpc_code="UNIMPLEMENTED",
        type="invalid_request_error",
        code="method_not_allowed",
    )


def too_large(message: str) -> GatewayError:
    """413: body over the size limit."""
    return GatewayError(
        message,
        status=413,
        grpc_code="INVALID_ARGUMENT",
        type="invalid_request_error",
        code="request_too_large",
    )


def rate_limited(message: str, reason: str, retry_after_s: float) -> GatewayError:
    """429: a limit is reached; retry after the given time."""
    return GatewayError(
        message,
        status=429,
        grpc_code="RESOURCE_EXHAUSTED",
        type="rate_limit_error",
        code=reason,
        retry_after_s=retry_after_s,
    )


def insufficient_quota(message: str, retry_after_s: float) -> GatewayError:
    """429 for an exhausted budget (the daily tokens): retrying within seconds cannot help.

    OpenAI's shape for it (type and code ``insufficient_quota``), with ``x-should-retry:
    false`` so the SDKs raise at once instead of retrying; Retry-After still says when the
    budget renews.
    """
    return GatewayError(
        message,
        status=429,
        grpc_code="RESOURCE_EXHAUSTED",
        type="insufficient_quota",
        code="insufficient_quota",
        retry_after_s=retry_after_s,
        should_retry=False,
    )


def unavailable(message: str, retry_after_s: float | None = None) -> GatewayError:
    """503: the gateway or a backend cannot serve right now."""
    return GatewayError(
        message,
        status=503,
        grpc_code="UNAVAILABLE",
        type="server_error",
        code="unavailable",
        retry_after_s=retry_after_s,
    )


def stream_failed(message: str) -> GatewayError:
    """A stream that failed after it started (its error event), where the wire format ends
    it with a status instead (gRPC)."""
    return GatewayError(message, status=502, grpc_code="UNAVAILABLE", type="server_error")


def timed_out(message: str) -> GatewayError:
    """504: the backend did not answer in time."""
    return GatewayError(
        message, status=504, grpc_code="DEADLINE_EXCEEDED", type="timeout_error", code="timeout"
    )


_UPSTREAM = {
    400: ("INVALID_ARGUMENT", "invalid_request_error"),
    401: ("UNAUTHENTICATED", "authentication_error"),
    403: ("PERMISSION_DENIED", "permission_error"),
    404: ("NOT_FOUND", "not_found_error"),
    408: ("DEADLINE_EXCEEDED", "timeout_error"),
    413: ("INVALID_ARGUMENT", "invalid_request_error"),
    429: ("RESOURCE_EXHAUSTED", "rate_limit_error"),
    504: ("DEADLINE_EXCEEDED", "timeout_error"),
}


def upstream(status: int, payload: bytes, data: dict[str, Any]) -> GatewayError:
    """A backend's error answer as the gateway's error, keeping its status and message.

    Backends answer in several shapes: OpenAI's ``{"error": {...}}`` (vLLM today), vLLM's
    older flat ``{"object": "error", "message": ...}``, FastAPI's ``{"detail": ...}``, or
    plain text (Ray Serve's "Internal Server Error"); clients get OpenAI's in every case.
    """
    inner = data.get("error")
    found = inner if isinstance(inner, dict) else data
    message = found.get("message") or found.get("detail")
    if not isinstance(message, str) or not message:
        text = payload.decode("utf-8", errors="replace").strip()
        message = text[:1000] if text and not data else f"the backend answered {status}"
    server = ("UNAVAILABLE", "server_error")
    default = ("INVALID_ARGUMENT", "invalid_request_error") if status < 500 else server
    grpc_code, kind = _UPSTREAM.get(status, default)
    upstream_type = found.get("type")
    code = found.get("code")
    return GatewayError(
        message,
        status=status,
        grpc_code=grpc_code,
        type=upstream_type if isinstance(inner, dict) and isinstance(upstream_type, str) else kind,
        code=code if isinstance(code, str) else None,
        param=found.get("param") if isinstance(found.get("param"), str) else None,
        upstream_body=payload if isinstance(inner, dict) else None,
    )


MAX_UPSTREAM_RETRY_AFTER_S = 60.0
"""The longest Retry-After passed on for a backend's 503: the ``openai`` SDKs stop retrying
at all past MAX_RETRY_AFTER_DELAY (120 s, openai/_base_client.py ``_should_retry``), and a
restart is worth another try sooner."""


def upstream_unavailable(
    payload: bytes, data: dict[str, Any], retry_after: str | None
) -> GatewayError:
    """A backend's 503 (an engine restarting, Ray Serve with no replica or under
    backpressure) as the gateway's: its message, with a Retry-After however it answered.

    Args:
        payload: The backend's body.
        data: The body as a JSON object ({} if not one).
        retry_after: The backend's Retry-After header: seconds, or absent (an HTTP date is
            read as absent).
    """
    error = upstream(503, payload, data)
    error.upstream_body = None  # answered in the gateway's shape, with its Retry-After
    try:
        seconds = float(retry_after) if retry_after is not None else 1.0
    except ValueError:
        seconds = 1.0
    if not math.isfinite(seconds) or seconds <= 0:
        seconds = 1.0
    error.retry_after_s = min(seconds, MAX_UPSTREAM_RETRY_AFTER_S)
    return error
