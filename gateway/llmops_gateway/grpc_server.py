"""The gRPC adapter: protos/llmops/v1/gateway.proto over the same `GatewayCore` as REST.

Requests become the OpenAI JSON the backends speak; answers and stream chunks are converted
back. `GatewayError` becomes the matching status code, with ``retry-after`` trailing metadata
on RESOURCE_EXHAUSTED and UNAVAILABLE.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
import structlog
from google.protobuf import json_format, struct_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from llmops_contract import REQUEST_ID_HEADER
from llmops_gateway import errors
from llmops_gateway.core import (
    Admitted,
    ChatRequest,
    CompletionRequest,
    EmbeddingRequest,
    GatewayCore,
    estimate_tokens,
    json_object,
    relay_sse,
)
from llmops_gateway.errors import GatewayError, invalid
from llmops_gateway.grpc_api import gateway_pb2 as pb
from llmops_gateway.grpc_api import gateway_pb2_grpc as pb_grpc
from llmops_gateway.settings import GatewaySettings
from llmops_gateway.tracing import TRACEPARENT, TRACESTATE

T = TypeVar("T")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Gateway"].full_name


def _params(params: pb.SamplingParams) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for field in (
        "max_tokens",
        "temperature",
        "top_p",
        "n",
        "seed",
        "presence_penalty",
        "frequency_penalty",
        "logprobs",
        "top_logprobs",
    ):
        if params.HasField(field):
            out[field] = getattr(params, field)
    if params.stop:
        out["stop"] = list(params.stop)
    return out


def _extra(request: pb.ChatCompletionRequest | pb.CompletionRequest) -> dict[str, Any]:
    if not request.HasField("extra"):
        return {}
    extra: dict[str, Any] = json_format.MessageToDict(request.extra)
    return extra


def _message_json(message: pb.Message) -> dict[str, Any]:
    """A request message in OpenAI's JSON: content parts for multimodal ones, tool calls."""
    out: dict[str, Any] = {"role": message.role}
    if message.parts:
        out["content"] = [_part_json(part) for part in message.parts]
    elif message.content or not message.tool_calls:
        out["content"] = message.content
    else:
        out["content"] = None  # an assistant turn that only called tools
    if message.name:
        out["name"] = message.name
    if message.tool_calls:
        out["tool_calls"] = [
            {
                "id": call.id,
                "type": call.type or "function",
                "function": {"name": call.function.name, "arguments": call.function.arguments},
            }
            for call in message.tool_calls
        ]
    if message.tool_call_id:
        out["tool_call_id"] = message.tool_call_id
    return out


def _part_json(part: pb.ContentPart) -> dict[str, Any]:
    if part.type == "image_url":
        image: dict[str, Any] = {"url": part.image_url}
        if part.detail:
            image["detail"] = part.detail
        return {"type": "image_url", "image_url": image}
    if part.type in ("", "text"):
        return {"type": "text", "text": part.text}
    raise invalid(f"content part type {part.type!r} is not supported: use text or image_url")


def _tool_calls(calls: Any) -> list[pb.ToolCall]:
    """OpenAI tool calls (or a stream's pieces of them) as messages."""
    out = []
    for call in calls or []:
        function = call.get("function") or {}
        out.append(
            pb.ToolCall(
                id=str(call.get("id") or ""),
                type=str(call.get("type") or ""),
                function=pb.FunctionCall(
                    name=str(function.get("name") or ""),
                    arguments=str(function.get("arguments") or ""),
                ),
                index=int(call.get("index") or 0),
            )
        )
    return out


def _struct(value: Any) -> struct_pb2.Struct | None:
    if not isinstance(value, dict):
        return None
    out = struct_pb2.Struct()
    out.update(value)
    return out


def _usage(data: dict[str, Any] | None) -> pb.Usage | None:
    if not data:
        return None
    return pb.Usage(
        prompt_tokens=int(data.get("prompt_tokens", 0)),
        completion_tokens=int(data.get("completion_tokens", 0)),
        total_tokens=int(data.get("total_tokens", 0)),
    )


class GatewayService(pb_grpc.GatewayServicer):
    """The Gateway service.

    Args:
        core: The same core the REST app uses.
    """

    def __init__(self, core: GatewayCore) -> None:
        self.core = core

    # -- shared steps ----------------------------------------------------------------------

    async def _guard(
        self, context: grpc.aio.ServicerContext, work: Callable[[], Awaitable[T]]
    ) -> T:
        try:
            return await work()
        except GatewayError as error:
            await _abort(context, error)
            raise AssertionError("abort returns only by raising") from None

    def _client_address(self, context: grpc.aio.ServicerContext, metadata: dict[str, Any]) -> str:
        """The peer's IP (``ipv4:1.2.3.4:5678`` / ``ipv6:[::1]:5678``), or for a trusted proxy
        the client its x-forwarded-for names, as REST finds it."""
        peer = context.peer() or ""
        kind, _, rest = peer.partition(":")
        if kind in ("ipv4", "ipv6"):
            peer = rest.rsplit(":", 1)[0].strip("[]")
        forwarded = metadata.get("x-forwarded-for")
        return self.core.abuse.address(peer, str(forwarded) if forwarded else None)

    def _request_id(self, context: grpc.aio.ServicerContext) -> str:
        metadata = dict(context.invocation_metadata() or ())
        request_id = str(metadata.get(REQUEST_ID_HEADER) or uuid.uuid4().hex)
        structlog.contextvars.bind_contextvars(request_id=request_id)
        return request_id

    async def _admit(
        self,
        context: grpc.aio.ServicerContext,
        body: dict[str, Any],
        kind: type[ChatRequest] | type[CompletionRequest],
        stream: bool,
    ) -> Admitted:
        metadata = dict(context.invocation_metadata() or ())
        trace = None
        if self.core.tracing is not None:  # the trace continues from the call's metadata
            operation = "chat" if kind is ChatRequest else "text_completion"
            trace = self.core.tracing.start(metadata, operation)
            structlog.contextvars.bind_contextvars(trace_id=trace.trace_id)
        try:
            caller = await self.core.authenticate_client(
                metadata.get("authorization"), self._client_address(context, metadata), trace
            )
            try:
                parsed = kind.model_validate(body)
            except ValueError as exc:
                raise invalid(f"invalid request: {exc}") from None
            parsed.stream = stream
            admitted = await self.core.admit_generation(caller, body, parsed, trace)
        except BaseException as exc:
            if trace is not None:  # not admitted: no settlement ends it
                trace.end(exc.status if isinstance(exc, GatewayError) else 500)
            raise
        traceparent = metadata.get(TRACEPARENT)
        if trace is None and traceparent:  # tracing off: the caller's context, unchanged
            admitted.trace_headers = {TRACEPARENT: str(traceparent)}
            if metadata.get(TRACESTATE):
                admitted.trace_headers[TRACESTATE] = str(metadata[TRACESTATE])
        return admitted

    async def _unary_json(
        self, admitted: Admitted, path: str, body: dict[str, Any], request_id: str
    ) -> dict[str, Any]:
        status, payload, data = await self.core.call(admitted, path, body, request_id)
        if status != 200:
            raise errors.upstream(status, payload, data)
        return data

    async def _stream_json(
        self,
        context: grpc.aio.ServicerContext,
        body: dict[str, Any],
        path: str,
        kind: type[ChatRequest] | type[CompletionRequest],
    ) -> AsyncIterator[dict[str, Any]]:
        request_id = self._request_id(context)
        try:
            admitted = await self._admit(context, body, kind, stream=True)
            body = {**body, "stream": True, "stream_options": {"include_usage": True}}
            response = await self.core.post(admitted, path, body, request_id)
            if response.status != 200:
                async with response:
                    payload = await response.read()
                await self.core.settle(admitted, 0, 0)
                raise errors.upstream(response.status, payload, json_object(payload))
        except GatewayError as error:
            await _abort(context, error)
            return
        async for block in relay_sse(self.core, admitted, response, True, request_id):
            for line in block.splitlines():
                if not line.startswith(b"data: {"):
                    continue
                chunk: dict[str, Any] = json.loads(line[6:])
                if "error" in chunk:
                    failure = chunk["error"]
                    await context.abort(grpc.StatusCode.UNAVAILABLE, str(failure.get("message")))
                yield chunk

    # -- RPCs ------------------------------------------------------------------------------

    async def CreateChatCompletion(  # noqa: N802 (gRPC method names)
        self, request: pb.ChatCompletionRequest, context: grpc.aio.ServicerContext
    ) -> pb.ChatCompletion:
        """A whole chat completion."""

        async def work() -> pb.ChatCompletion:
            body = _chat_body(request)
            admitted = await self._admit(context, body, ChatRequest, stream=False)
            data = await self._unary_json(
                admitted, "/v1/chat/completions", body, self._request_id(context)
            )
            return pb.ChatCompletion(
                id=str(data.get("id", "")),
                model=str(data.get("model", "")),
                created=int(data.get("created", 0)),
                choices=[
                    pb.ChatChoice(
                        index=int(c.get("index", 0)),
                        message=pb.Message(
                            role=str(c["message"].get("role") or "assistant"),
                            content=str(c["message"].get("content") or ""),
                            tool_calls=_tool_calls(c["message"].get("tool_calls")),
                        ),
                        finish_reason=str(c.get("finish_reason") or ""),
                        logprobs=_struct(c.get("logprobs")),
                    )
                    for c in data.get("choices", [])
                ],
                usage=_usage(data.get("usage")),
            )

        return await self._guard(context, work)

    async def StreamChatCompletion(  # noqa: N802
        self, request: pb.ChatCompletionRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ChatCompletionChunk]:
        """A chat completion as it is generated."""
        try:
            body = _chat_body(request)
        except GatewayError as error:
            await _abort(context, error)
            return
        async for chunk in self._stream_json(context, body, "/v1/chat/completions", ChatRequest):
            yield pb.ChatCompletionChunk(
                id=str(chunk.get("id", "")),
                model=str(chunk.get("model", "")),
                choices=[
                    pb.ChatDelta(
                        index=int(c.get("index", 0)),
                        role=str((c.get("delta") or {}).get("role") or ""),
                        content=str((c.get("delta") or {}).get("content") or ""),
                        finish_reason=str(c.get("finish_reason") or ""),
                        tool_calls=_tool_calls((c.get("delta") or {}).get("tool_calls")),
                        logprobs=_struct(c.get("logprobs")),
                    )
                    for c in chunk.get("choices", [])
                ],
                usage=_usage(chunk.get("usage")),
            )

    async def CreateCompletion(  # noqa: N802
        self, request: pb.CompletionRequest, context: grpc.aio.ServicerContext
    ) -> pb.Completion:
        """A whole text completion."""
        body = _completion_body(request)

        async def work() -> pb.Completion:
            admitted = await self._admit(context, body, CompletionRequest, stream=False)
            data = await self._unary_json(
                admitted, "/v1/completions", body, self._request_id(context)
            )
            return pb.Completion(
                id=str(data.get("id", "")),
                model=str(data.get("model", "")),
                created=int(data.get("created", 0)),
                choices=[_completion_choice(c) for c in data.get("choices", [])],
                usage=_usage(data.get("usage")),
            )

        return await self._guard(context, work)

    async def StreamCompletion(  # noqa: N802
        self, request: pb.CompletionRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.CompletionChunk]:
        """A text completion as it is generated."""
        body = _completion_body(request)
        async for chunk in self._stream_json(context, body, "/v1/completions", CompletionRequest):
            yield pb.CompletionChunk(
                id=str(chunk.get("id", "")),
                model=str(chunk.get("model", "")),
                choices=[_completion_choice(c) for c in chunk.get("choices", [])],
                usage=_usage(chunk.get("usage")),
            )

    async def CreateEmbeddings(  # noqa: N802
        self, request: pb.EmbeddingsRequest, context: grpc.aio.ServicerContext
    ) -> pb.Embeddings:
        """Embeddings of one or more texts."""

        async def work() -> pb.Embeddings:
            metadata = dict(context.invocation_metadata() or ())
            caller = await self.core.authenticate_client(
                metadata.get("authorization"), self._client_address(context, metadata)
            )
            if not request.model or not request.input:
                raise invalid("model and at least one input are required")
            body = {
                "model": request.model,
                "input": list(request.input),
                "encoding_format": "float",
            }
            EmbeddingRequest.model_validate(body)
            admitted = await self.core.admit(
                caller, request.model, estimate_tokens(body["input"]), 0, False
            )
            data = await self._unary_json(
                admitted, "/v1/embeddings", body, self._request_id(context)
            )
            return pb.Embeddings(
                model=str(data.get("model", "")),
                data=[
                    pb.Embedding(index=int(d.get("index", i)), values=d.get("embedding", []))
                    for i, d in enumerate(data.get("data", []))
                ],
                usage=_usage(data.get("usage")),
            )

        return await self._guard(context, work)

    async def ListModels(  # noqa: N802
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        """The models the caller's key may use."""

        async def work() -> pb.ListModelsResponse:
            metadata = dict(context.invocation_metadata() or ())
            caller = await self.core.authenticate_client(
                metadata.get("authorization"), self._client_address(context, metadata)
            )
            return pb.ListModelsResponse(models=await self.core.models_for(caller))

        return await self._guard(context, work)


def _chat_body(request: pb.ChatCompletionRequest) -> dict[str, Any]:
    tools: dict[str, Any] = {}
    if request.HasField("tools"):
        tools["tools"] = json_format.MessageToDict(request.tools)
    if request.HasField("tool_choice"):
        tools["tool_choice"] = json_format.MessageToDict(request.tool_choice)
    return {
        **_extra(request),
        **tools,
        "model": request.model,
        "messages": [_message_json(m) for m in request.messages],
        **_params(request.params),
    }


def _completion_body(request: pb.CompletionRequest) -> dict[str, Any]:
    return {
        **_extra(request),
        "model": request.model,
        "prompt": request.prompt,
        **_params(request.params),
    }


def _completion_choice(choice: dict[str, Any]) -> pb.CompletionChoice:
    return pb.CompletionChoice(
        index=int(choice.get("index", 0)),
        text=str(choice.get("text") or ""),
        finish_reason=str(choice.get("finish_reason") or ""),
        logprobs=_struct(choice.get("logprobs")),
    )


_CODES = {name: getattr(grpc.StatusCode, name) for name in grpc.StatusCode.__members__}


async def _abort(context: grpc.aio.ServicerContext, error: GatewayError) -> None:
    trailing: list[tuple[str, str]] = []
    if error.retry_after_s is not None:
        trailing.append(("retry-after", str(max(1, round(error.retry_after_s)))))
    if error.should_retry is False:
        # gRFC A6: a negative pushback tells a client with a retry policy not to retry; the
        # header REST sends is there too, for clients that read it.
        trailing += [("grpc-retry-pushback-ms", "-1"), ("x-should-retry", "false")]
    if trailing:
        context.set_trailing_metadata(tuple(trailing))
    await context.abort(_CODES[error.grpc_code], error.message)


@dataclass(frozen=True)
class _Malformed:
    """What a request that does not parse as its message type becomes."""

    reason: str


class RejectMalformed(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Answers a request that does not parse with INVALID_ARGUMENT.

    grpcio itself answers UNKNOWN ("Exception deserializing request!"), which tells a client
    nothing about whose fault it was. The request is parsed by a deserializer that cannot
    fail; the method then refuses a request that did not parse, saying why.
    """

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or handler.request_deserializer is None:
            return handler
        parse = handler.request_deserializer

        def tolerant(data: bytes) -> Any:
            try:
                return parse(data)
            except Exception as exc:  # any parse failure is the client's malformed message
                return _Malformed(f"the request is not a valid {details.method} message: {exc}")

        if handler.unary_unary is not None:
            unary = handler.unary_unary

            async def checked_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                if isinstance(request, _Malformed):
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.reason)
                return await unary(request, context)

            return grpc.unary_unary_rpc_method_handler(
                checked_unary, tolerant, handler.response_serializer
            )
        if handler.unary_stream is not None:
            streaming = handler.unary_stream

            async def checked_stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
                if isinstance(request, _Malformed):
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.reason)
                async for item in streaming(request, context):
                    yield item

            return grpc.unary_stream_rpc_method_handler(
                checked_stream, tolerant, handler.response_serializer
            )
        return handler


@dataclass(frozen=True)
class RunningGrpc:
    """The started gRPC server."""

    server: grpc.aio.Server
    port: int
    """The port it bound (useful with port 0)."""
    health: health.aio.HealthServicer

    async def drain(self, grace_s: float) -> None:
        """Health turns NOT_SERVING, then calls in flight get up to ``grace_s`` to finish."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace=grace_s)


async def start_grpc(core: GatewayCore, host: str, port: int) -> RunningGrpc:
    """Starts the gRPC server with the Gateway service, health and reflection.

    Messages over the REST body limit (``max_body_bytes``) are refused with RESOURCE_EXHAUSTED
    before they are parsed, as REST refuses them with 413; messages that do not parse get
    INVALID_ARGUMENT, as malformed JSON gets 400.
    """
    limit = core.settings.max_body_bytes
    server = grpc.aio.server(
        interceptors=[RejectMalformed()],
        options=[("grpc.max_receive_message_length", limit)],
    )
    pb_grpc.add_GatewayServicer_to_server(GatewayService(core), server)  # type: ignore[no-untyped-call]
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    await health_servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    credentials = server_credentials(core.settings)
    address = f"{host}:{port}"
    if credentials is None:
        bound = server.add_insecure_port(address)
    else:
        bound = server.add_secure_port(address, credentials)
    await server.start()
    return RunningGrpc(server, bound, health_servicer)


def server_credentials(settings: GatewaySettings) -> grpc.ServerCredentials | None:
    """TLS for the gRPC port from the settings' PEM files; None serves plaintext.

    Raises:
        ValueError: a half-configured TLS (a certificate without its key, or a client CA
            without a server certificate), or a file that cannot be read.
    """
    cert, key, client_ca = (
        settings.grpc_tls_cert_file,
        settings.grpc_tls_key_file,
        settings.grpc_tls_client_ca_file,
    )
    if cert is None and key is None:
        if client_ca is not None:
            raise ValueError(
                "grpc_tls_client_ca_file needs grpc_tls_cert_file and grpc_tls_key_file: "
                "client certificates are asked for only over TLS"
            )
        return None
    if cert is None or key is None:
        raise ValueError("set both grpc_tls_cert_file and grpc_tls_key_file, or neither")
    try:
        chain, private = cert.read_bytes(), key.read_bytes()
        roots = client_ca.read_bytes() if client_ca is not None else None
    except OSError as exc:
        raise ValueError(f"cannot read a gRPC TLS file: {exc}") from exc
    return grpc.ssl_server_credentials(
        [(private, chain)], root_certificates=roots, require_client_auth=roots is not None
    )
