"""Errors of the serving graph, shaped like OpenAI's so clients handle them unchanged."""

from __future__ import annotations

from typing import Any


class ServingError(Exception):
    """An error a client should see: HTTP status plus an OpenAI-shaped body.

    Args:
        message: What went wrong and what to change.
        status: HTTP status code.
        type: OpenAI error type (``invalid_request_error``, ``not_found_error``, ...).
        param: The request field at fault, when there is one.
        code: A stable machine-readable code.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int = 400,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.type = type
        self.param = param
        self.code = code

    def body(self, request_id: str | None = None) -> dict[str, Any]:
        """The JSON body: ``{"error": {...}}`` plus the request id when known."""
        out: dict[str, Any] = {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }
        if request_id:
            out["request_id"] = request_id
        return out


def model_not_found(model: str, available: list[str]) -> ServingError:
    """The error for a request that names a model the graph does not serve."""
    return ServingError(
        f"The model {model!r} does not exist. Available models: {', '.join(available)}.",
        status=404,
        type="not_found_error",
        param="model",
        code="model_not_found",
    )
