"""A stream cut before its usage chunk is charged its reasoning and tool-call deltas too.

Chunks are shaped as the pinned vLLM writes them: ``DeltaMessage`` with ``reasoning`` (older
vLLM and other servers: ``reasoning_content``) and ``tool_calls`` of ``DeltaToolCall``, dumped
with ``model_dump_json(exclude_unset=True)`` (vllm/entrypoints/generate/base/protocol.py,
vllm/entrypoints/openai/chat_completion/serving.py); the Responses API's
``response.reasoning_text.delta`` and ``response.function_call_arguments.delta`` events
(vllm/entrypoints/openai/responses/streaming_events.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, cast

import aiohttp
import pytest

from llmops_gateway.admission import MemoryAdmission
from llmops_gateway.core import Admitted, Caller, content_chunks, relay_sse
from llmops_gateway.keys import FileKeyStore, Tenant
from llmops_gateway.metrics import GatewayMetrics
from llmops_gateway.settings import GatewaySettings
from tests.unit.gateway.test_relay import Reads, RecordingCore


def _chunk(delta: dict[str, Any], spaced: bool = False) -> bytes:
    separators = (", ", ": ") if spaced else (",", ":")
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}
    body = {"id": "c", "object": "chat.completion.chunk", "choices": [choice]}
    return f"data: {json.dumps(body, separators=separators)}\n\n".encode()


def _tool_stream(spaced: bool = False) -> bytes:
    """A role chunk, two reasoning deltas, then a tool call: name, then arguments in pieces."""
    call = {"id": "call-1", "type": "function", "index": 0, "function": {"name": "weather"}}
    pieces = ['{"city": ', '"Par', 'is"}']
    deltas: list[dict[str, Any]] = [
        {"role": "assistant", "content": ""},
        {"reasoning": "The user"},
        {"reasoning": " wants weather."},
        {"tool_calls": [call]},
        *({"tool_calls": [{"index": 0, "function": {"arguments": p}}]} for p in pieces),
    ]
    return b"".join(_chunk(delta, spaced) for delta in deltas)


@pytest.mark.parametrize("spaced", [False, True], ids=["compact", "spaced"])
def test_reasoning_and_tool_call_deltas_count(spaced: bool) -> None:
    assert content_chunks(_tool_stream(spaced), spaced) == 2 + 1 + 3


@pytest.mark.parametrize("field", ["reasoning", "reasoning_content"])
def test_reasoning_chunks_count_and_empty_ones_do_not(field: str) -> None:
    events = _chunk({field: "Hmm"}) + _chunk({field: ""}) + _chunk({"content": "Yes"})
    assert content_chunks(events) == 2


def test_responses_reasoning_and_arguments_deltas_count() -> None:
    kinds = [
        "response.reasoning_text.delta",
        "response.reasoning_text.delta",
        "response.function_call_arguments.delta",
        "response.output_text.delta",
    ]
    events = b"".join(
        f"event: {kind}\ndata: {json.dumps({'type': kind, 'delta': 'x'}, separators=(',', ':'))}"
        "\n\n".encode()
        for kind in kinds
    )
    assert content_chunks(events) == 4


async def test_a_cut_stream_is_charged_its_reasoning_and_tool_calls(tmp_path: Path) -> None:
    """No usage chunk arrives (the client left, the engine died): the relay charges the chunks
    it relayed, which were 0 for a stream of reasoning and tool calls."""
    stream = _tool_stream()
    core = RecordingCore(
        GatewaySettings(),
        FileKeyStore(tmp_path / "k.json"),
        MemoryAdmission(),
        GatewayMetrics.create(),
    )
    core.settled = []
    admitted = Admitted(Caller("k", Tenant(name="t")), "m", "http://backend", None, 11)
    response = cast(aiohttp.ClientResponse, Reads([stream]))
    out = b"".join([part async for part in relay_sse(core, admitted, response, True)])
    await core.close()
    assert out == stream
    assert core.settled == [(11, 6)]
    assert admitted.first_token is not None
