"""The gateway's gRPC API, with a client built from protos/, against the stub upstream."""

from __future__ import annotations

import json
from collections.abc import Iterator

import grpc
import pytest
from google.protobuf import json_format, struct_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from llmops_gateway.grpc_api import gateway_pb2 as pb
from llmops_gateway.grpc_api import gateway_pb2_grpc as pb_grpc
from llmops_gateway.keys import FileKeyStore, Tenant
from tests.integration.gateway_fixtures import Gateway, gateway, stub_upstream


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> FileKeyStore:
    return FileKeyStore(tmp_path_factory.mktemp("grpc-keys") / "keys.json")


@pytest.fixture(scope="module")
def gw(keys: FileKeyStore, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    keys.create(Tenant(name="bootstrap"))
    with (
        stub_upstream() as upstream,
        gateway(
            tmp_path_factory.mktemp("grpc-gw"),
            default_backend=upstream,
            backends={"hang": upstream},
            keys_file=keys.path,
            request_timeout_s=1.5,
        ) as running,
    ):
        yield running


@pytest.fixture(scope="module")
def channel(gw: Gateway) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(gw.grpc_target) as chan:
        grpc.channel_ready_future(chan).result(timeout=10)
        yield chan


def _auth(keys: FileKeyStore, **limits: object) -> list[tuple[str, str]]:
    name = f"grpc-{len(keys.load().keys)}"
    key = keys.create(Tenant(name=name, **limits))[1]  # type: ignore[arg-type]
    return [("authorization", f"Bearer {key}")]


def _chat(model: str = "stub-chat", max_tokens: int = 5) -> pb.ChatCompletionRequest:
    return pb.ChatCompletionRequest(
        model=model,
        messages=[pb.Message(role="user", content="hi")],
        params=pb.SamplingParams(max_tokens=max_tokens, temperature=0.0),
    )


def test_unary_and_streaming_chat(channel: grpc.Channel, keys: FileKeyStore) -> None:
    stub = pb_grpc.GatewayStub(channel)
    metadata = _auth(keys)
    reply = stub.CreateChatCompletion(_chat(), metadata=metadata)
    assert reply.choices[0].message.content == "tok tok tok tok tok"
    assert reply.usage.completion_tokens == 5
    chunks = list(stub.StreamChatCompletion(_chat(max_tokens=7), metadata=metadata))
    assert sum(1 for c in chunks if c.choices and c.choices[0].content) == 7
    assert chunks[-1].usage.completion_tokens == 7


def test_completions_embeddings_and_models(channel: grpc.Channel, keys: FileKeyStore) -> None:
    stub = pb_grpc.GatewayStub(channel)
    metadata = _auth(keys, allowed_models=["stub-chat", "stub-embed"])
    request = pb.CompletionRequest(
        model="stub-chat", prompt="x", params=pb.SamplingParams(max_tokens=3)
    )
    assert stub.CreateCompletion(request, metadata=metadata).choices[0].text == "tok tok tok"
    streamed = list(stub.StreamCompletion(request, metadata=metadata))
    assert "".join(c.choices[0].text for c in streamed if c.choices) == "tok tok tok "
    vectors = stub.CreateEmbeddings(
        pb.EmbeddingsRequest(model="stub-embed", input=["a", "b"]), metadata=metadata
    )
    assert [len(d.values) for d in vectors.data] == [8, 8]
    assert sorted(stub.ListModels(pb.ListModelsRequest(), metadata=metadata).models) == [
        "stub-chat",
        "stub-embed",
    ]


def test_extra_fields_pass_through(channel: grpc.Channel, keys: FileKeyStore) -> None:
    extra = struct_pb2.Struct()
    extra.update({"ignore_eos": True})
    request = _chat(max_tokens=20)
    request.extra.CopyFrom(extra)
    reply = pb_grpc.GatewayStub(channel).CreateChatCompletion(request, metadata=_auth(keys))
    assert reply.usage.completion_tokens == 20  # the stub stops at 12 without ignore_eos


@pytest.mark.parametrize(
    ("make_metadata", "request_", "code"),
    [
        (lambda keys: [], _chat(), grpc.StatusCode.UNAUTHENTICATED),
        (
            lambda keys: [("authorization", "Bearer llmops_000000000000_x")],
            _chat(),
            grpc.StatusCode.UNAUTHENTICATED,
        ),
        (
            # As REST: a model the tenant may not use is not revealed to exist.
            lambda keys: _auth(keys, allowed_models=["other"]),
            _chat(),
            grpc.StatusCode.NOT_FOUND,
        ),
        (lambda keys: _auth(keys), _chat(model="gpt-9"), grpc.StatusCode.NOT_FOUND),
        (lambda keys: _auth(keys), _chat(max_tokens=-3), grpc.StatusCode.INVALID_ARGUMENT),
        (lambda keys: _auth(keys), _chat(model="hang"), grpc.StatusCode.DEADLINE_EXCEEDED),
    ],
)
def test_errors_map_to_status_codes(
    channel: grpc.Channel,
    keys: FileKeyStore,
    make_metadata: object,
    request_: object,
    code: grpc.StatusCode,
) -> None:
    stub = pb_grpc.GatewayStub(channel)
    metadata = make_metadata(keys)  # type: ignore[operator]
    with pytest.raises(grpc.RpcError) as unary:
        stub.CreateChatCompletion(request_, metadata=metadata)
    assert unary.value.code() == code
    with pytest.raises(grpc.RpcError) as streamed:
        list(stub.StreamChatCompletion(request_, metadata=metadata))
    assert streamed.value.code() == code


def test_rate_limit_is_resource_exhausted_with_retry_after(
    channel: grpc.Channel, keys: FileKeyStore
) -> None:
    stub = pb_grpc.GatewayStub(channel)
    metadata = _auth(keys, requests_per_minute=2)
    stub.CreateChatCompletion(_chat(), metadata=metadata)
    stub.CreateChatCompletion(_chat(), metadata=metadata)
    with pytest.raises(grpc.RpcError) as caught:
        stub.CreateChatCompletion(_chat(), metadata=metadata)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    trailing = dict(caught.value.trailing_metadata() or ())
    assert 1 <= int(trailing["retry-after"]) <= 60


def test_health_and_reflection(channel: grpc.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    status = health.Check(health_pb2.HealthCheckRequest(service="llmops.v1.Gateway"))
    assert status.status == health_pb2.HealthCheckResponse.SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    answers = reflection.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")])
    )
    names = {s.name for s in next(answers).list_services_response.service}
    assert "llmops.v1.Gateway" in names
    assert "grpc.health.v1.Health" in names


def test_spent_daily_budget_tells_clients_not_to_retry(
    channel: grpc.Channel, keys: FileKeyStore
) -> None:
    """As REST's 429 insufficient_quota with x-should-retry: false: RESOURCE_EXHAUSTED with a
    negative grpc-retry-pushback-ms, which gRPC clients with a retry policy must not retry
    (gRFC A6, "Pushback")."""
    stub = pb_grpc.GatewayStub(channel)
    metadata = _auth(keys, tokens_per_day=20)
    stub.CreateChatCompletion(_chat(max_tokens=12), metadata=metadata)
    with pytest.raises(grpc.RpcError) as caught:
        stub.CreateChatCompletion(_chat(max_tokens=12), metadata=metadata)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    trailing = dict(caught.value.trailing_metadata() or ())
    assert trailing["x-should-retry"] == "false"
    assert int(trailing["grpc-retry-pushback-ms"]) < 0
    assert int(trailing["retry-after"]) >= 1


@pytest.mark.parametrize(
    ("status", "code"),
    [
        (429, grpc.StatusCode.RESOURCE_EXHAUSTED),
        (401, grpc.StatusCode.UNAUTHENTICATED),
        (413, grpc.StatusCode.INVALID_ARGUMENT),
        (500, grpc.StatusCode.UNAVAILABLE),
    ],
)
def test_backend_errors_map_as_rest_statuses(
    channel: grpc.Channel, keys: FileKeyStore, status: int, code: grpc.StatusCode
) -> None:
    """gRPC's HTTP-to-status mapping (grpc/doc/http-grpc-status-mapping.md: 429 is
    UNAVAILABLE there, but a rate limit is RESOURCE_EXHAUSTED, as the gateway's own 429)."""
    request = _chat()
    failure = struct_pb2.Struct()
    failure.update({"stub_error": {"status": status, "shape": "openai"}})
    request.extra.CopyFrom(failure)
    stub = pb_grpc.GatewayStub(channel)
    with pytest.raises(grpc.RpcError) as unary:
        stub.CreateChatCompletion(request, metadata=_auth(keys))
    assert unary.value.code() == code
    assert unary.value.details() == f"stub failure {status}"


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}


def _tool_request(stream_choice: object) -> pb.ChatCompletionRequest:
    request = _chat()
    request.tools.append(WEATHER_TOOL)
    request.tool_choice.CopyFrom(struct_pb2.Value())
    if isinstance(stream_choice, str):
        request.tool_choice.string_value = stream_choice
    else:
        request.tool_choice.struct_value.update(stream_choice)
    return request


def test_tool_calls_round_trip_unary_and_streamed(
    channel: grpc.Channel, keys: FileKeyStore
) -> None:
    """tools and tool_choice reach the backend; its tool calls come back as ToolCall messages,
    streamed as vLLM streams them (id and name first, then the arguments in pieces)."""
    stub = pb_grpc.GatewayStub(channel)
    metadata = _auth(keys)
    named = {"type": "function", "function": {"name": "get_weather"}}

    reply = stub.CreateChatCompletion(_tool_request(named), metadata=metadata)
    (call,) = reply.choices[0].message.tool_calls
    assert (call.id, call.type, call.function.name) == (
        "chatcmpl-tool-stub",
        "function",
        "get_weather",
    )
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    assert reply.choices[0].finish_reason == "tool_calls"

    chunks = list(stub.StreamChatCompletion(_tool_request("required"), metadata=metadata))
    pieces = [t for c in chunks for d in c.choices for t in d.tool_calls]
    assert pieces[0].function.name == "get_weather"
    assert pieces[0].id == "chatcmpl-tool-stub"
    assert json.loads("".join(p.function.arguments for p in pieces)) == {"city": "Paris"}
    assert {p.index for p in pieces} == {0}

    # The call and its answer go back in the history, as the next turn of an agent sends them.
    follow_up = _chat()
    follow_up.messages.append(pb.Message(role="assistant", tool_calls=[call]))
    follow_up.messages.append(pb.Message(role="tool", tool_call_id=call.id, content="18 C"))
    follow_up.extra.update({"stub_echo": True})
    echoed = json.loads(
        stub.CreateChatCompletion(follow_up, metadata=metadata).choices[0].message.content
    )
    assert echoed[1] == {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "chatcmpl-tool-stub",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            }
        ],
    }
    assert echoed[2] == {"role": "tool", "content": "18 C", "tool_call_id": "chatcmpl-tool-stub"}


def test_multimodal_parts_and_logprobs(channel: grpc.Channel, keys: FileKeyStore) -> None:
    stub = pb_grpc.GatewayStub(channel)
    metadata = _auth(keys)
    image = "data:image/png;base64,iVBORw0KGgo="
    request = pb.ChatCompletionRequest(
        model="stub-chat",
        messages=[
            pb.Message(
                role="user",
                parts=[
                    pb.ContentPart(type="text", text="What is in this picture?"),
                    pb.ContentPart(type="image_url", image_url=image, detail="low"),
                ],
            )
        ],
        params=pb.SamplingParams(max_tokens=3),
    )
    request.extra.update({"stub_echo": True})
    reply = stub.CreateChatCompletion(request, metadata=metadata)
    echoed = json.loads(reply.choices[0].message.content)
    assert echoed == [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is in this picture?"},
                {"type": "image_url", "image_url": {"url": image, "detail": "low"}},
            ],
        }
    ]

    asked = _chat(max_tokens=3)
    asked.params.logprobs = True
    reply = stub.CreateChatCompletion(asked, metadata=metadata)
    tokens = json_format.MessageToDict(reply.choices[0].logprobs)["content"]
    assert [t["token"] for t in tokens] == ["tok"] * 3
    assert tokens[0]["logprob"] == -0.25
    chunks = list(stub.StreamChatCompletion(asked, metadata=metadata))
    streamed = [
        json_format.MessageToDict(d.logprobs)["content"][0]["token"]
        for c in chunks
        for d in c.choices
        if d.HasField("logprobs")
    ]
    assert streamed == ["tok"] * 3

    unknown = pb.ChatCompletionRequest(
        model="stub-chat", messages=[pb.Message(role="user", parts=[pb.ContentPart(type="video")])]
    )
    with pytest.raises(grpc.RpcError) as refused:
        stub.CreateChatCompletion(unknown, metadata=metadata)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "content part type 'video'" in str(refused.value.details())
