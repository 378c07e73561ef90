"""Errors of the serving graph, shaped like OpenAI's so clients handle them unchanged."""

from __future__ import annotations

from llmops_contract import ApiError


class ServingError(ApiError):
    """An error a client should see: HTTP status plus an OpenAI-shaped body, the shape the
    gateway answers in too (`llmops_contract.ApiError`)."""


def model_not_found(model: str, available: list[str]) -> ServingError:
    """The error for a request that names a model the graph does not serve."""
    return ServingError(
        f"The model {model!r} does not exist. Available models: {', '.join(available)}.",
        status=404,
        type="not_found_error",
        param="model",
        code="model_not_found",
    )
