"""The gRPC adapter: protos/llmops/v1/gateway.proto over the same `GatewayCore` as REST.

Requests become the OpenAI JSON the backends speak; answers and stream chunks are converted
back. `GatewayError` becomes the matching status code, with ``retry-after`` trailing metadata
on RESOURCE_EXHAUSTED and UNAVAILABLE.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import json_format, struct_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from llmops_gateway import errors
from llmops_gateway.core import (
    CHAT,
    COMPLETIONS,
    EMBEDDINGS,
    Body,
    Call,
    GatewayCore,
    Operation,
    request_id_of,
)
from llmops_gateway.errors import GatewayError, invalid
from llmops_gateway.grpc_api import gateway_pb2 as pb
from llmops_gateway.grpc_api import gateway_pb2_grpc as pb_grpc
from llmops_gateway.settings import GatewaySettings

logger = logging.getLogger("llmops.gateway")
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


def _body(build: Callable[[], dict[str, Any]]) -> Body:
    """A request's OpenAI JSON, built from its message when the core reads it (after
    authentication, as REST reads its body)."""

    async def read() -> dict[str, Any]:
        return build()

    return read


class GatewayService(pb_grpc.GatewayServicer):
    """The Gateway service: each RPC turns its message into one call of the core and the
    answer back into messages; `GatewayError` becomes a status in `MapErrors`.

    Args:
        core: The same core the REST app uses.
    """

    def __init__(self, core: GatewayCore) -> None:
        self.core = core

    def _call(self, context: grpc.aio.ServicerContext) -> Call:
        """The call as the core takes it. The abuse limits count the peer's IP
        (``ipv4:1.2.3.4:5678`` / ``ipv6:[::1]:5678``), or for a trusted proxy the client its
        x-forwarded-for names, as REST finds it."""
        metadata = {
            key: value
            for key, value in context.invocation_metadata() or ()
            if isinstance(value, str)
        }
        peer = context.peer() or ""
        kind, _, rest = peer.partition(":")
        if kind in ("ipv4", "ipv6"):
            peer = rest.rsplit(":", 1)[0].strip("[]")
        address = self.core.abuse.address(peer, metadata.get("x-forwarded-for"))
        return Call(metadata, address, request_id_of(metadata))

    async def _unary(
        self, context: grpc.aio.ServicerContext, operation: Operation, body: Body
    ) -> dict[str, Any]:
        reply = await self.core.generate(operation, self._call(context), body)
        return reply.data

    async def _stream(
        self, context: grpc.aio.ServicerContext, operation: Operation, body: Body
    ) -> AsyncIterator[dict[str, Any]]:
        reply = await self.core.generate(operation, self._call(context), body)
        if reply.events is None:  # a backend that answered a stream with a whole body
            return
        async with aclosing(reply.events) as events:
            async for block in events:
                for line in block.splitlines():
                    if not line.startswith(b"data: {"):
                        continue
                    chunk: dict[str, Any] = json.loads(line[6:])
                    if "error" in chunk:
                        raise errors.stream_failed(str(chunk["error"].get("message")))
                    yield chunk

    # -- RPCs ------------------------------------------------------------------------------

    async def CreateChatCompletion(  # noqa: N802 (gRPC method names)
        self, request: pb.ChatCompletionRequest, context: grpc.aio.ServicerContext
    ) -> pb.ChatCompletion:
        """A whole chat completion."""
        data = await self._unary(context, CHAT, _body(lambda: _chat_body(request, False)))
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

    async def StreamChatCompletion(  # noqa: N802
        self, request: pb.ChatCompletionRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ChatCompletionChunk]:
        """A chat completion as it is generated."""
        body = _body(lambda: _chat_body(request, True))
        async for chunk in self._stream(context, CHAT, body):
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
        body = _body(lambda: _completion_body(request, False))
        data = await self._unary(context, COMPLETIONS, body)
        return pb.Completion(
            id=str(data.get("id", "")),
            model=str(data.get("model", "")),
            created=int(data.get("created", 0)),
            choices=[_completion_choice(c) for c in data.get("choices", [])],
            usage=_usage(data.get("usage")),
        )

    async def StreamCompletion(  # noqa: N802
        self, request: pb.CompletionRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.CompletionChunk]:
        """A text completion as it is generated."""
        body = _body(lambda: _completion_body(request, True))
        async for chunk in self._stream(context, COMPLETIONS, body):
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
        data = await self._unary(context, EMBEDDINGS, _body(lambda: _embeddings_body(request)))
        return pb.Embeddings(
            model=str(data.get("model", "")),
            data=[
                pb.Embedding(index=int(d.get("index", i)), values=d.get("embedding", []))
                for i, d in enumerate(data.get("data", []))
            ],
            usage=_usage(data.get("usage")),
        )

    async def ListModels(  # noqa: N802
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        """The models the caller's key may use, each with an adapter's ``parent`` as REST's
        /v1/models gives it (``models``: the names alone, for clients of the first field)."""
        listed = await self.core.list_models(self._call(context))
        return pb.ListModelsResponse(
            models=[str(entry["id"]) for entry in listed],
            data=[
                pb.ModelInfo(id=str(entry["id"]), parent=str(entry.get("parent") or ""))
                for entry in listed
            ],
        )


def _stream_fields(stream: bool) -> dict[str, Any]:
    """Whether the RPC streams; a streamed one always ends with a usage chunk."""
    if not stream:
        return {"stream": False}
    return {"stream": True, "stream_options": {"include_usage": True}}


def _chat_body(request: pb.ChatCompletionRequest, stream: bool) -> dict[str, Any]:
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
        **_stream_fields(stream),
    }


def _completion_body(request: pb.CompletionRequest, stream: bool) -> dict[str, Any]:
    return {
        **_extra(request),
        "model": request.model,
        "prompt": request.prompt,
        **_params(request.params),
        **_stream_fields(stream),
    }


def _embeddings_body(request: pb.EmbeddingsRequest) -> dict[str, Any]:
    if not request.model or not request.input:
        raise invalid("model and at least one input are required")
    return {"model": request.model, "input": list(request.input), "encoding_format": "float"}


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


async def _abort_for(context: grpc.aio.ServicerContext, exc: Exception) -> None:
    """Ends a call that raised: `GatewayError` as its status code, a bug as INTERNAL."""
    if isinstance(exc, grpc.aio.AbortError):  # already aborted with its status
        raise exc
    if not isinstance(exc, GatewayError):
        logger.error("unhandled error", exc_info=exc)
        exc = errors.internal()
    await _abort(context, exc)


@dataclass(frozen=True)
class _Malformed:
    """What a request that does not parse as its message type becomes."""

    reason: str


class MapErrors(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """The one place gRPC calls' errors become status codes, unary and streaming alike.

    `GatewayError` becomes its ``grpc_code`` (with ``retry-after`` trailing metadata on
    RESOURCE_EXHAUSTED and UNAVAILABLE), as the REST app's one handler makes it a status.
    A request that does not parse gets INVALID_ARGUMENT: grpcio itself answers UNKNOWN
    ("Exception deserializing request!"), which tells a client nothing about whose fault it
    was, so requests are parsed by a deserializer that cannot fail and refused here.
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
                try:
                    if isinstance(request, _Malformed):
                        raise invalid(request.reason)
                    return await unary(request, context)
                except Exception as exc:
                    await _abort_for(context, exc)

            return grpc.unary_unary_rpc_method_handler(
                checked_unary, tolerant, handler.response_serializer
            )
        if handler.unary_stream is not None:
            streaming = handler.unary_stream

            async def checked_stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
                try:
                    if isinstance(request, _Malformed):
                        raise invalid(request.reason)
                    async for item in streaming(request, context):
                        yield item
                except Exception as exc:
                    await _abort_for(context, exc)

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
        interceptors=[MapErrors()],
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
