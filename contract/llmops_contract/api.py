"""The OpenAI error shape and the request-body parsing the gateway and the router share."""

from __future__ import annotations

import json
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

M = TypeVar("M", bound=BaseModel)


class ApiError(Exception):
    """An error a client should see: an HTTP status and an OpenAI-shaped body.

    Args:
        message: What went wrong and what to change; never contains a key.
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
        """OpenAI's ``{"error": {message, type, param, code}}``, plus the request id when
        known."""
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


class RequestBodyError(ValueError):
    """A request body that is too large (status 413) or not the request it should be (400).

    Args:
        message: What is wrong, for the client.
        status: 413 or 400.
        param: The field at fault, when one is.
    """

    def __init__(self, message: str, *, status: int = 400, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param


def parse_request_body(raw: bytes, model_cls: type[M], limit: int) -> tuple[dict[str, Any], M]:
    """Parses and checks a JSON request body against ``model_cls``.

    Returns:
        The JSON object and the validated model.

    Raises:
        RequestBodyError: over ``limit`` bytes (413), malformed JSON, not an object, or a
            field of the wrong type (400; the first error's location is the ``param``).
    """
    if len(raw) > limit:
        raise RequestBodyError(
            f"request body is {len(raw)} bytes; the limit is {limit}", status=413
        )
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RequestBodyError(f"request body is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise RequestBodyError("request body must be a JSON object")
    try:
        return data, model_cls.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "body"
        raise RequestBodyError(f"invalid {where}: {first['msg']}", param=where) from exc
