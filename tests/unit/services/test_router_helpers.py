"""The router's protocol helpers: errors, embeddings encoding, SSE relay."""

from __future__ import annotations

import base64
import json
import struct
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import pytest

from llmops_services.errors import ServingError, model_not_found
from llmops_services.router import _as_error, _embedding_inputs, _embedding_payload, _sse


def test_error_body_is_openai_shaped() -> None:
    error = model_not_found("gpt-x", ["a", "b"])
    assert error.status == 404
    assert error.body("req-1") == {
        "error": {
            "message": "The model 'gpt-x' does not exist. Available models: a, b.",
            "type": "not_found_error",
            "param": "model",
            "code": "model_not_found",
        },
        "request_id": "req-1",
    }


def test_upstream_error_response_keeps_its_status() -> None:
    upstream = SimpleNamespace(
        error=SimpleNamespace(message="too long", code=400, param="input_tokens")
    )
    error = _as_error(upstream)
    assert error is not None
    assert (error.status, error.type, error.param) == (400, "invalid_request_error", "input_tokens")
    assert _as_error("data: {}\n\n") is None


def test_base64_embeddings_decode_to_the_same_floats() -> None:
    vector = [0.5, -0.25, 1.0]
    payload = _embedding_payload(vector, "base64")
    assert isinstance(payload, str)
    assert list(struct.unpack("<3f", base64.b64decode(payload))) == vector
    assert _embedding_payload(vector, "float") == vector


@pytest.mark.parametrize(
    ("value", "message"),
    [([], "non-empty"), ([1, 2], "token-id"), (["ok", ""], "empty strings"), (5, "non-empty")],
)
def test_bad_embedding_inputs(value: Any, message: str) -> None:
    with pytest.raises(ServingError, match=message):
        _embedding_inputs(value)


def test_single_string_input_becomes_a_list() -> None:
    assert _embedding_inputs("hi") == ["hi"]


async def _collect(first: Any, rest: AsyncIterator[Any]) -> list[str]:
    return [chunk async for chunk in _sse(first, rest)]


async def _gen(*items: Any, fail: Exception | None = None) -> AsyncIterator[Any]:
    for item in items:
        yield item
    if fail is not None:
        raise fail


async def test_sse_relays_batches_in_order_one_body_chunk_each_and_ends_with_done() -> None:
    chunks = await _collect(["data: 1\n\n", "data: 2\n\n"], _gen(["data: 3\n\n"], []))
    assert chunks == ["data: 1\n\ndata: 2\n\n", "data: 3\n\n", "data: [DONE]\n\n"]


async def test_sse_does_not_repeat_done() -> None:
    chunks = await _collect(["data: 1\n\n"], _gen(["data: [DONE]\n\n"]))
    assert chunks.count("data: [DONE]\n\n") == 1


async def test_sse_failure_mid_stream_ends_with_an_error_event() -> None:
    chunks = await _collect(["data: 1\n\n"], _gen(fail=RuntimeError("replica died")))
    assert chunks[0] == "data: 1\n\n"
    error = json.loads(chunks[1].removeprefix("data: "))
    assert error["error"]["type"] == "server_error"
    assert "RuntimeError" in error["error"]["message"]
    assert chunks[-1] == "data: [DONE]\n\n"


def test_the_router_loads_vllms_request_models_before_its_first_request() -> None:
    # A fresh interpreter: in this one another test may have imported vLLM already.
    script = textwrap.dedent(
        """
        import asyncio, sys
        from llmops_services import default_graph_config
        from llmops_services.router import Router

        models = "ray.serve.llm.openai_api_models"
        assert models not in sys.modules, "importing the router module stays light"
        router = Router.__new__(Router)
        asyncio.run(Router.__init__(router, default_graph_config().model_dump(mode="json"), {}))
        print(models in sys.modules)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stderr[-2000:]
    # Loaded by the constructor, not by the first chat request (where it blocked the event loop).
    assert result.stdout.split()[-1] == "True"
