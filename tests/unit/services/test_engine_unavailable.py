"""A dead or restarting engine is a 503 with Retry-After from the graph, never a 500."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import pytest
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayTaskError
from ray.serve.exceptions import BackPressureError

from llmops_services.llm import engine_guarded
from llmops_services.router import (
    RESTART_RETRY_AFTER_S,
    _as_error,
    _error_response,
    _is_unavailable,
    engine_unavailable,
)

UNAVAILABLE = object()
VLLM_ERROR_EVENT = 'data: {"error": {"message": "EngineCore encountered an issue.", "code": 500}}'


class EngineDeadError(Exception):
    """Stands in for vLLM's (vllm/v1/engine/exceptions.py), which the router matches by name;
    importing vLLM costs a unit test tens of seconds."""


async def _items(*items: Any, fail: Exception | None = None) -> AsyncIterator[Any]:
    for item in items:
        yield item
    if fail is not None:
        raise fail


def _run(stream: AsyncIterator[Any], dead: bool) -> tuple[list[Any], list[int]]:
    """Drains ``engine_guarded(stream)`` with an engine that is ``dead``; returns the items
    and how often the engine's health was asked."""
    asked: list[int] = []

    async def engine_dead() -> bool:
        asked.append(1)
        return dead

    async def drain() -> list[Any]:
        return [item async for item in engine_guarded(stream, engine_dead, lambda: UNAVAILABLE)]

    return asyncio.run(drain()), asked


def test_a_dead_engine_before_the_first_item_is_unavailable() -> None:
    """vLLM raises EngineDeadError for a whole answer (chat_completion_full_generator lets it
    through) once its EngineCore process died."""
    items, asked = _run(_items(fail=EngineDeadError()), dead=True)
    assert items == [UNAVAILABLE]
    assert asked == [1]


def test_a_dead_engines_first_error_event_is_unavailable() -> None:
    """A stream's first item is vLLM's error event (serving_chat.py,
    create_streaming_error_response), alone or batched."""
    assert _run(_items(VLLM_ERROR_EVENT, "data: [DONE]\n\n"), dead=True)[0] == [UNAVAILABLE]
    assert _run(_items([VLLM_ERROR_EVENT]), dead=True)[0] == [UNAVAILABLE]


def test_failures_of_a_live_engine_pass_unchanged() -> None:
    with pytest.raises(ValueError, match="bad"):
        _run(_items(fail=ValueError("bad")), dead=False)
    items, _ = _run(_items(VLLM_ERROR_EVENT), dead=False)
    assert items == [VLLM_ERROR_EVENT]


def test_a_failure_after_the_first_item_is_not_replaced() -> None:
    """Once a chunk went out the stream must end with vLLM's own error event."""
    items, asked = _run(_items("data: {}\n\n", VLLM_ERROR_EVENT), dead=True)
    assert items == ["data: {}\n\n", VLLM_ERROR_EVENT]
    assert asked == []
    with pytest.raises(EngineDeadError):
        _run(_items("data: {}\n\n", fail=EngineDeadError()), dead=True)


def test_the_guard_closes_the_engine_stream_when_the_client_leaves() -> None:
    closed: list[bool] = []

    async def engine() -> AsyncIterator[str]:
        try:
            while True:
                yield "data: {}\n\n"
        finally:
            closed.append(True)

    async def leave() -> None:
        async def alive() -> bool:
            return False

        guarded = engine_guarded(engine(), alive, lambda: UNAVAILABLE)
        await guarded.__anext__()
        await guarded.aclose()

    asyncio.run(leave())
    assert closed == [True]


def _task_error(cause: Exception) -> Exception:
    """How a replica's exception reaches the router (ray/exceptions.py, RayTaskError)."""
    error: Exception = RayTaskError("chat", "traceback", cause).as_instanceof_cause()
    return error


@pytest.mark.parametrize(
    "exc",
    [
        ActorDiedError(),
        ActorUnavailableError("the replica's node is unreachable", None),
        BackPressureError(num_queued_requests=9, max_queued_requests=8),
        EngineDeadError(),
    ],
    ids=["actor-died", "actor-unavailable", "backpressure", "engine-dead"],
)
def test_a_model_that_cannot_serve_now_is_unavailable(exc: Exception) -> None:
    assert _is_unavailable(exc)
    assert _is_unavailable(_task_error(exc))


def test_request_failures_are_not_unavailable() -> None:
    assert not _is_unavailable(ValueError("bad input"))
    assert not _is_unavailable(_task_error(ValueError("bad input")))


def test_the_503_has_retry_after_and_openais_shape() -> None:
    response = _error_response(engine_unavailable("m"), "req-1")
    assert response.status_code == 503
    assert response.headers["retry-after"] == str(RESTART_RETRY_AFTER_S)
    body = json.loads(bytes(response.body))
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["type"] == "server_error"
    assert "restarting" in body["error"]["message"]


def test_the_replicas_503_error_response_stays_503() -> None:
    """The replica's ErrorResponse (code 503) becomes the router's 503, Retry-After added."""
    item = SimpleNamespace(error=SimpleNamespace(message="restarting", code=503, param=None))
    error = _as_error(item)
    assert error is not None
    response = _error_response(error, "req-2")
    assert response.status_code == 503
    assert "retry-after" in response.headers
