"""The REST adapter: OpenAI-compatible FastAPI app over `GatewayCore`."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import Receive, Scope, Send

from llmops_contract import REQUEST_ID_HEADER
from llmops_gateway import errors
from llmops_gateway.core import (
    Admitted,
    ChatRequest,
    CompletionRequest,
    EmbeddingRequest,
    GatewayCore,
    ResponsesRequest,
    estimate_tokens,
    json_object,
    model_object,
    parse_body,
    relay_sse,
)
from llmops_gateway.errors import GatewayError
from llmops_gateway.tracing import TRACEPARENT, TRACESTATE, RequestTrace, trace_id_of

logger = logging.getLogger("llmops.gateway")
CHAT_PATH = "/v1/chat/completions"
COMPLETIONS_PATH = "/v1/completions"
EMBEDDINGS_PATH = "/v1/embeddings"
RESPONSES_PATH = "/v1/responses"


class ErrorDetail(BaseModel):
    """OpenAI's error object."""

    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    """Every error the gateway returns."""

    error: ErrorDetail
    request_id: str


def _responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    described = {
        400: "Malformed JSON, wrong field types, or a request larger than a limit allows.",
        401: "Missing, invalid, expired or revoked API key.",
        404: "No such model, or one the key's tenant may not use (not revealed).",
        413: "Body over the size limit.",
        429: "A rate limit is reached (see Retry-After): the tenant's, or the client "
        "address's (code client_rate_limit_exceeded: too many requests or refused keys); or "
        "the daily budget is spent (type insufficient_quota, x-should-retry: false).",
        502: "The backend failed.",
        503: "Draining, rate limiter down (fail closed), backend unreachable, or the model's "
        "engine restarting (see Retry-After; retried once by the gateway before answering).",
        504: "The backend did not answer in time.",
    }
    return {code: {"model": ErrorBody, "description": described[code]} for code in statuses}


GENERATION_ERRORS = _responses(400, 401, 404, 413, 429, 502, 503, 504)
# Chat and text completions answer JSON, or with "stream": true server-sent events.
STREAMING_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": 'The completion; with "stream": true, server-sent events of chunks '
        "(each line `data: {chunk}`, then `data: [DONE]`).",
        "content": {
            "application/json": {},
            "text/event-stream": {
                "schema": {
                    "description": "One server-sent event: data is a JSON chunk, an error "
                    "object that ends a failed stream, or [DONE].",
                    "type": "object",
                    "properties": {"data": {"type": "string"}, "event": {"type": "string"}},
                    "required": ["data"],
                }
            },
        },
    },
    **GENERATION_ERRORS,
}


def _request_id(request: Request) -> str:
    """The caller's request id (or a new one), also bound into every log line of the request."""
    request_id = request.headers.get(REQUEST_ID_HEADER) or uuid.uuid4().hex
    structlog.contextvars.bind_contextvars(request_id=request_id)
    return request_id


def _trace(core: GatewayCore, request: Request, operation: str) -> RequestTrace | None:
    """The request's spans with tracing on (their trace id bound into its log lines); with it
    off, None, and the trace id of a ``traceparent`` the client sent is logged."""
    if core.tracing is None:
        trace_id = trace_id_of(request.headers.get(TRACEPARENT))
        if trace_id is not None:
            structlog.contextvars.bind_contextvars(trace_id=trace_id)
        return None
    trace = core.tracing.start(request.headers, operation)
    structlog.contextvars.bind_contextvars(trace_id=trace.trace_id)
    return trace


def _pass_trace(request: Request, admitted: Admitted) -> None:
    """With tracing off, forwards the client's trace context unchanged (if it sent one)."""
    traceparent = request.headers.get(TRACEPARENT)
    if traceparent is not None:
        admitted.trace_headers = {TRACEPARENT: traceparent}
        tracestate = request.headers.get(TRACESTATE)
        if tracestate is not None:
            admitted.trace_headers[TRACESTATE] = tracestate


def _client_address(core: GatewayCore, request: Request) -> str:
    """The address the abuse limits count against (X-Forwarded-For only from trusted proxies)."""
    peer = request.client.host if request.client else None
    return core.abuse.address(peer, request.headers.get("x-forwarded-for"))


def _error(error: GatewayError, request_id: str) -> JSONResponse:
    headers = {REQUEST_ID_HEADER: request_id}
    if error.retry_after_s is not None:
        headers["Retry-After"] = str(max(1, round(error.retry_after_s + 0.4999)))
    if error.should_retry is not None:
        headers["x-should-retry"] = "true" if error.should_retry else "false"
    return JSONResponse(error.body(request_id), status_code=error.status, headers=headers)


def _internal_error(request_id: str) -> JSONResponse:
    """500 for a bug: logged with its traceback, answered OpenAI-shaped."""
    logger.exception("unhandled error")
    error = GatewayError(
        "internal error in the gateway", status=500, grpc_code="INTERNAL", type="server_error"
    )
    return _error(error, request_id)


def _body_schema(model: type[BaseModel]) -> dict[str, Any]:
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": model.model_json_schema()}},
        }
    }


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused (413) as soon as it is known to exceed ``limit`` bytes.

    A declared Content-Length over the limit is refused before anything is read, and a body
    sent without one is never buffered past the limit.

    Raises:
        GatewayError: 413.
    """
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise errors.too_large(f"request body is {declared} bytes; the limit is {limit}")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise errors.too_large(f"request body is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


Endpoint = Callable[[Request], Awaitable[Response]]


class GatewayApp:
    """The gateway's ASGI application.

    The OpenAI POST endpoints go straight to their handlers: on the hot path, Starlette's
    middleware stack and FastAPI's routing and dependency solving cost about a third of the
    gateway's own CPU per request. Everything else (model listing, health, the OpenAPI spec,
    lifespan) is the FastAPI app, which declares the same endpoints with the same handlers,
    so the spec it serves describes what answers.

    Args:
        api: The FastAPI app.
        endpoints: Path -> handler of the POST endpoints to serve directly.
    """

    def __init__(self, api: FastAPI, endpoints: dict[str, Endpoint]) -> None:
        self.api = api
        self.endpoints = endpoints

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """ASGI entry point."""
        if scope["type"] == "http" and scope["method"] == "POST":
            endpoint = self.endpoints.get(scope["path"])
            if endpoint is not None:
                try:
                    response = await endpoint(Request(scope, receive))
                except ClientDisconnect:
                    return
                await response(scope, receive, send)
                return
        await self.api(scope, receive, send)


def create_app(core: GatewayCore) -> GatewayApp:
    """Builds the REST app around a core (started and closed by the app's lifespan)."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        from llmops_gateway.grpc_server import start_grpc

        await core.start()
        grpc_server = None
        if core.settings.grpc_port is not None:
            grpc_server = await start_grpc(core, core.settings.host, core.settings.grpc_port)
        try:
            yield
        finally:
            core.draining = True
            if grpc_server is not None:
                await grpc_server.drain(core.settings.drain_timeout_s)
            await core.close()

    docs = core.settings.docs_enabled
    app = FastAPI(
        title="llmops gateway",
        version="v1",
        description="OpenAI-compatible API of the llmops platform: authenticate with "
        "'Authorization: Bearer <key>'.",
        lifespan=lifespan,
        docs_url="/docs" if docs else None,
        redoc_url="/redoc" if docs else None,
        openapi_url="/openapi.json" if docs else None,
    )

    limit = core.settings.max_body_bytes

    async def generate(
        request: Request, endpoint: str, path: str, kind: type[Any], operation: str
    ) -> Response:
        started = time.monotonic()
        request_id = _request_id(request)
        trace = _trace(core, request, operation)
        admitted: Admitted | None = None
        tenant, model = "unknown", "unknown"
        core.metrics.in_flight.inc()
        try:
            caller = await core.authenticate_client(
                request.headers.get("authorization"), _client_address(core, request), trace
            )
            tenant = caller.tenant.name
            data, body = parse_body(await read_body(request, limit), kind, limit)
            admitted = await core.admit_generation(caller, data, body, trace)
            if trace is None:
                _pass_trace(request, admitted)
            model = admitted.model
            if body.streaming and not body.usage_in_stream_options:
                # The Responses API streams its usage in response.completed, always.
                return await _stream(core, admitted, path, data, request_id, True, endpoint)
            if body.streaming:
                wants_usage = bool((data.get("stream_options") or {}).get("include_usage"))
                data["stream_options"] = {
                    **(data.get("stream_options") or {}),
                    "include_usage": True,
                }
                return await _stream(core, admitted, path, data, request_id, wants_usage, endpoint)
            return await _unary(core, admitted, path, data, request_id, endpoint)
        except GatewayError as error:
            core.metrics.record(endpoint, model, tenant, error.status, started)
            if trace is not None and admitted is None:  # settlement ends an admitted one's
                trace.end(error.status)
            return _error(error, request_id)
        except ClientDisconnect:
            if trace is not None and admitted is None:
                trace.end(0)
            raise
        except Exception:
            core.metrics.record(endpoint, model, tenant, 500, started)
            if trace is not None and admitted is None:
                trace.end(500)
            return _internal_error(request_id)
        finally:
            core.metrics.in_flight.dec()

    @app.post(
        CHAT_PATH,
        openapi_extra=_body_schema(ChatRequest),
        responses=STREAMING_RESPONSES,
    )
    async def chat_completions(request: Request) -> Response:
        """OpenAI chat completions, streaming (SSE) or not."""
        return await generate(request, "chat", CHAT_PATH, ChatRequest, "chat")

    @app.post(
        COMPLETIONS_PATH,
        openapi_extra=_body_schema(CompletionRequest),
        responses=STREAMING_RESPONSES,
    )
    async def completions(request: Request) -> Response:
        """OpenAI text completions, streaming (SSE) or not."""
        return await generate(
            request, "completions", COMPLETIONS_PATH, CompletionRequest, "text_completion"
        )

    @app.post(
        RESPONSES_PATH,
        openapi_extra=_body_schema(ResponsesRequest),
        responses=STREAMING_RESPONSES,
    )
    async def responses(request: Request) -> Response:
        """OpenAI Responses API, streaming (SSE) or not, relayed to backends that serve it
        (vLLM's OpenAI server does); the reservation is bounded by ``max_output_tokens``."""
        return await generate(request, "responses", RESPONSES_PATH, ResponsesRequest, "chat")

    @app.post(
        EMBEDDINGS_PATH, openapi_extra=_body_schema(EmbeddingRequest), responses=GENERATION_ERRORS
    )
    async def embeddings(request: Request) -> Response:
        """OpenAI embeddings."""
        started = time.monotonic()
        request_id = _request_id(request)
        trace = _trace(core, request, "embeddings")
        admitted: Admitted | None = None
        tenant, model = "unknown", "unknown"
        try:
            caller = await core.authenticate_client(
                request.headers.get("authorization"), _client_address(core, request), trace
            )
            tenant = caller.tenant.name
            raw = await read_body(request, limit)
            data, body = parse_body(raw, EmbeddingRequest, limit)
            admitted = await core.admit(
                caller, body.model, estimate_tokens(body.input), 0, False, trace=trace
            )
            if trace is None:
                _pass_trace(request, admitted)
            return await _unary(core, admitted, EMBEDDINGS_PATH, data, request_id, "embeddings")
        except GatewayError as error:
            core.metrics.record("embeddings", model, tenant, error.status, started)
            if trace is not None and admitted is None:
                trace.end(error.status)
            return _error(error, request_id)
        except ClientDisconnect:
            if trace is not None and admitted is None:
                trace.end(0)
            raise
        except Exception:
            core.metrics.record("embeddings", model, tenant, 500, started)
            if trace is not None and admitted is None:
                trace.end(500)
            return _internal_error(request_id)

    @app.get("/v1/models", responses=_responses(401, 429))
    async def models(request: Request) -> Response:
        """The models the caller's key may use."""
        request_id = _request_id(request)
        try:
            caller = await core.authenticate_client(
                request.headers.get("authorization"), _client_address(core, request)
            )
        except GatewayError as error:
            return _error(error, request_id)
        names = await core.models_for(caller)
        return JSONResponse({"object": "list", "data": [model_object(n) for n in names]})

    @app.get("/v1/models/{model:path}", responses=_responses(401, 404, 429))
    async def model(request: Request, model: str) -> Response:
        """One model the caller's key may use (the ``openai`` SDK's ``models.retrieve``)."""
        request_id = _request_id(request)
        try:
            caller = await core.authenticate_client(
                request.headers.get("authorization"), _client_address(core, request)
            )
            return JSONResponse(await core.model_info(caller, model))
        except GatewayError as error:
            return _error(error, request_id)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        """Starlette's own errors (unknown URL, wrong method), OpenAI-shaped."""
        request_id = _request_id(request)
        method, path = request.method, request.url.path
        if exc.status_code == 404:
            return _error(errors.route_not_found(method, path), request_id)
        if exc.status_code == 405:
            error = errors.method_not_allowed(method, path)
            response = _error(error, request_id)
            if exc.headers and "allow" in {k.lower() for k in exc.headers}:
                response.headers.update(exc.headers)
            return response
        return _error(
            GatewayError(
                str(exc.detail),
                status=exc.status_code,
                grpc_code="UNKNOWN",
                type="invalid_request_error",
            ),
            request_id,
        )

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        """FastAPI's parameter validation, OpenAI-shaped (400, as OpenAI answers)."""
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(part) for part in first["loc"]) or None
        error = errors.invalid(f"invalid {where}: {first['msg']}", param=where)
        return _error(error, _request_id(request))

    @app.exception_handler(Exception)
    async def unhandled(request: Request, exc: Exception) -> Response:
        """A bug: logged with its traceback, answered OpenAI-shaped."""
        return _internal_error(_request_id(request))

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        """Liveness."""
        return {"status": "ok"}

    @app.get("/readyz", responses={503: {"description": "Draining: send no new requests."}})
    async def readyz() -> Response:
        """Readiness: false while draining (so load balancers stop sending), and with
        backend discovery on, until the cluster's LLMDeployments have been listed."""
        if core.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        if not core.ready:
            return JSONResponse({"status": "discovering backends"}, status_code=503)
        return JSONResponse({"status": "ready"})

    return GatewayApp(
        app,
        {
            CHAT_PATH: chat_completions,
            COMPLETIONS_PATH: completions,
            RESPONSES_PATH: responses,
            EMBEDDINGS_PATH: embeddings,
        },
    )


async def _unary(
    core: GatewayCore,
    admitted: Admitted,
    path: str,
    data: dict[str, Any],
    request_id: str,
    endpoint: str,
) -> Response:
    status, payload, body = await core.call(admitted, path, data, request_id)
    core.metrics.record(
        endpoint, admitted.model, admitted.caller.tenant.name, status, admitted.started
    )
    if status != 200 and not isinstance(body.get("error"), dict):
        return _error(errors.upstream(status, payload, body), request_id)
    return Response(
        payload,
        status_code=status,
        media_type="application/json",
        headers={REQUEST_ID_HEADER: request_id},
    )


async def _stream(
    core: GatewayCore,
    admitted: Admitted,
    path: str,
    data: dict[str, Any],
    request_id: str,
    wants_usage: bool,
    endpoint: str,
) -> Response:
    response = await core.post(admitted, path, data, request_id)
    # Counted when the stream starts; its latency is the time to the response head.
    core.metrics.record(
        endpoint, admitted.model, admitted.caller.tenant.name, response.status, admitted.started
    )
    if response.status != 200 or not response.content_type.startswith("text/event-stream"):
        async with response:
            payload = await response.read()
        await core.settle(admitted, 0, 0)
        body = json_object(payload)
        if response.status != 200 and not isinstance(body.get("error"), dict):
            return _error(errors.upstream(response.status, payload, body), request_id)
        return Response(
            payload,
            status_code=response.status,
            media_type=response.content_type,
            headers={REQUEST_ID_HEADER: request_id},
        )
    return StreamingResponse(
        relay_sse(core, admitted, response, wants_usage, request_id),
        media_type="text/event-stream",
        headers={REQUEST_ID_HEADER: request_id, "Cache-Control": "no-cache"},
    )
