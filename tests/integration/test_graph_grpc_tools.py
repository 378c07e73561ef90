"""Tool calling over the gateway's gRPC API (protos/llmops/v1/gateway.proto) on `llmops up`'s
graph: the gRPC twin of test_graph_tools.py, on the same model (``smollm2-coding``, vLLM's
``hermes`` tool parser set through ``engine.extra_args`` in tests/graph.yaml).

``tools`` and ``tool_choice`` travel as JSON (``ListValue``/``Value``) and reach vLLM as
OpenAI's fields; tool calls come back as ``ToolCall`` messages, in a stream as pieces that
share an index (vLLM's ``DeltaToolCall``, vllm/entrypoints/openai/protocol.py)."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from google.protobuf import struct_pb2

from llmops_gateway.grpc_api import gateway_pb2 as pb
from llmops_gateway.grpc_api import gateway_pb2_grpc as pb_grpc
from llmops_gateway.keys import FileKeyStore, Tenant
from tests.conftest import RunningGraph
from tests.integration.gateway_metrics import wait_settled
from tests.integration.test_graph_tools import MESSAGES, NAMED, TOOLS_MODEL, WEATHER

pytestmark = pytest.mark.slow

_TENANTS = itertools.count()


@pytest.fixture(scope="module")
def stub(graph: RunningGraph) -> Iterator[pb_grpc.GatewayStub]:
    with grpc.insecure_channel(graph.grpc_target) as channel:
        grpc.channel_ready_future(channel).result(timeout=30)
        yield pb_grpc.GatewayStub(channel)


def _tenant(graph: RunningGraph) -> tuple[str, list[tuple[str, str]]]:
    """A fresh tenant (its settled tokens start at 0) and the metadata that authenticates it."""
    name = f"grpc-tools-{next(_TENANTS)}"
    _, key = FileKeyStore(graph.keys_file).create(Tenant(name=name))
    return name, [("authorization", f"Bearer {key}")]


def _request(max_tokens: int) -> pb.ChatCompletionRequest:
    request = pb.ChatCompletionRequest(
        model=TOOLS_MODEL,
        messages=[pb.Message(role=m["role"], content=m["content"]) for m in MESSAGES],
        params=pb.SamplingParams(max_tokens=max_tokens, temperature=0.0),
    )
    tools = struct_pb2.ListValue()
    tools.extend([WEATHER])
    request.tools.CopyFrom(tools)
    request.tool_choice.struct_value.update(NAMED)
    return request


def _check_weather_arguments(arguments: str) -> None:
    parsed: Any = json.loads(arguments)
    assert set(parsed) == {"city", "unit"}
    assert parsed["city"] in {"Paris", "London", "Cairo"}
    assert parsed["unit"] in {"celsius", "fahrenheit"}


def test_named_tool_call_returns_parseable_arguments(
    stub: pb_grpc.GatewayStub, graph: RunningGraph
) -> None:
    """vLLM forces a named call's envelope and a strict function's argument schema
    (vllm/tool_parsers/structural_tag_registry.py); the gateway maps the reply's
    ``message.tool_calls`` to ``ToolCall`` messages and settles the usage it reported."""
    tenant, metadata = _tenant(graph)
    reply = stub.CreateChatCompletion(_request(64), metadata=metadata, timeout=120)
    choice = reply.choices[0]
    # The structural tag forces the call's envelope and its arguments' JSON schema, and JSON
    # lets whitespace follow the last value: a model may fill max_tokens with it before the
    # closing ``}`` (seen on some CPUs at temperature 0). The arguments are then whole, the
    # finish reason is ``length``, and the usage must count max_tokens.
    assert choice.finish_reason in {"tool_calls", "stop", "length"}, reply
    if choice.finish_reason == "length":
        assert reply.usage.completion_tokens == 64, reply
    assert len(choice.message.tool_calls) == 1, reply
    call = choice.message.tool_calls[0]
    assert call.type == "function"
    assert call.id
    assert call.function.name == "get_weather"
    _check_weather_arguments(call.function.arguments)
    assert reply.usage.completion_tokens > 0
    settled = wait_settled(graph.gateway_metrics_url, tenant, reply.usage.completion_tokens)
    assert settled == reply.usage.completion_tokens


def test_streamed_tool_call_relays_deltas_and_counts_them_in_usage(
    stub: pb_grpc.GatewayStub, graph: RunningGraph
) -> None:
    """The arguments arrive in pieces as they are generated (more than one chunk), all with
    the call's index 0; the last chunk's usage counts every generated token, tool-call
    tokens included, and the gateway settles that count for the tenant."""
    tenant, metadata = _tenant(graph)
    chunks = list(stub.StreamChatCompletion(_request(64), metadata=metadata, timeout=120))
    names: list[str] = []
    pieces: list[str] = []
    ids: set[str] = set()
    for chunk in chunks:
        for delta in chunk.choices:
            for call in delta.tool_calls:
                assert call.index == 0
                if call.id:
                    ids.add(call.id)
                if call.function.name:
                    names.append(call.function.name)
                if call.function.arguments:
                    pieces.append(call.function.arguments)
    assert names == ["get_weather"]
    assert len(ids) == 1
    assert len(pieces) > 1  # relayed as generated, not in one piece
    _check_weather_arguments("".join(pieces))
    usage = chunks[-1].usage
    # Each relayed piece is at least one generated token.
    assert usage.completion_tokens >= len(pieces)
    assert usage.prompt_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    settled = wait_settled(graph.gateway_metrics_url, tenant, usage.completion_tokens)
    assert settled == usage.completion_tokens
