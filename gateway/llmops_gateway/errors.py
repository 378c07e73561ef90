"""The gateway's one error type, mapped to HTTP statuses and gRPC codes alike."""

from __future__ import annotations

from typing import Any


class GatewayError(Exception):
    """An error the caller should see.

    Args:
        message: What went wrong and what to change; never contains a key.
        status: HTTP status.
        grpc_code: Name of the gRPC status code (``grpc.StatusCode`` member).
        type: OpenAI error type.
        code: Stable machine-readable code.
        param: The request field at fault.
        retry_after_s: For 429/503: when to retry.
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
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.grpc_code = grpc_code
        self.type = type
        self.code = code
        self.param = param
        self.retry_after_s = retry_after_s

    def body(self, request_id: str) -> dict[str, Any]:
        """OpenAI-shaped JSON body with the request id."""
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            },
            "request_id": request_id,
        }


def unauthenticated(message: str) -> GatewayError:
    """401: no key, or a key that does not authenticate."""
    return GatewayError(
        message,
        status=401,
        grpc_code="UNAUTHENTICATED",
        type="authentication_error",
        code="invalid_api_key",
    )


def permission_denied(message: str) -> GatewayError:
    """403: the tenant may not use this model."""
    return GatewayError(
        message,
        status=403,
        grpc_code="PERMISSION_DENIED",
        type="permission_error",
        code="model_not_allowed",
        param="model",
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


def not_found(message: str) -> GatewayError:
    """404: unknown model."""
    return GatewayError(
        message,
        status=404,
        grpc_code="NOT_FOUND",
        type="not_found_error",
        code="model_not_found",
        param="model",
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


def timed_out(message: str) -> GatewayError:
    """504: the backend did not answer in time."""
    return GatewayError(
        message, status=504, grpc_code="DEADLINE_EXCEEDED", type="timeout_error", code="timeout"
    )
