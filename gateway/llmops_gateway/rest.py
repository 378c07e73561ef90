"""The REST adapter: OpenAI-compatible FastAPI app over `GatewayCore`."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from llmops_contract import REQUEST_ID_HEADER
from llmops_gateway import errors
from llmops_gateway.core import (
    CHAT,
    COMPLETIONS,
    EMBEDDINGS,
    RESPONSES,
    Call,
    ChatRequest,
    CompletionRequest,
    EmbeddingRequest,
    GatewayCore,
    Operation,
    Reply,
    ResponsesRequest,
    request_id_of,
)
from llmops_gateway.errors import GatewayError

logger = logging.getLogger("llmops.gateway")
CHAT_PATH = CHAT.path
COMPLETIONS_PATH = COMPLETIONS.path
EMBEDDINGS_PATH = EMBEDDINGS.path
RESPONSES_PATH = RESPONSES.path


class TokenizeRequest(BaseModel):
    """vLLM's /tokenize (a prompt, or chat messages) and /detokenize (token ids) requests:
    the fields the gateway reads; others pass through."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1, description="The model whose tokenizer is used.")
    prompt: str | None = Field(default=None, description="/tokenize: text to tokenize.")
    messages: list[Any] | None = Field(
        default=None, description="/tokenize: chat messages, rendered with the chat template."
    )
    tokens: list[int] | None = Field(default=None, description="/detokenize: token ids.")

    @property
    def input(self) -> Any:
        """What the admission estimate counts."""
        return [self.prompt, self.messages, self.tokens]


class ScoreRequest(BaseModel):
    """vLLM's /v1/score request (queries and documents; vLLM's other spellings of the two
    sides pass through too): the fields the gateway reads."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1, description="The scoring (embedding) model.")

    @property
    def input(self) -> Any:
        """What the admission estimate counts: every text of either side."""
        return [
            value
            for key, value in (self.model_extra or {}).items()
            if key in {"queries", "documents", "items", "text_1", "text_2", "data_1", "data_2"}
        ]


class RerankRequest(BaseModel):
    """vLLM's /v1/rerank request: the fields the gateway reads; others pass through."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1, description="The scoring (embedding) model.")
    query: str = Field(description="What the documents are ranked against.")
    documents: list[str] = Field(min_length=1, description="The documents to rank.")

    @property
    def input(self) -> Any:
        """What the admission estimate counts."""
        return [self.query, self.documents]


# Admitted and charged as embeddings are: the estimate is reserved, the backend's usage (or,
# without one, the estimate) is charged.
TOKENIZE = Operation("tokenize", "/tokenize", TokenizeRequest, "tokenize")
DETOKENIZE = Operation("detokenize", "/detokenize", TokenizeRequest, "detokenize")
SCORE = Operation("score", "/v1/score", ScoreRequest, "score")
RERANK = Operation("rerank", "/v1/rerank", RerankRequest, "rerank")


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
    """The request's id: the caller's or a new one, the same for its answer and its logs."""
    state = request.scope.setdefault("state", {})
    request_id = state.get("request_id")
    if request_id is None:
        request_id = state["request_id"] = request_id_of(request.headers)
    return str(request_id)


def _call(core: GatewayCore, request: Request) -> Call:
    """The request as the core takes it. The abuse limits count the peer's address, or
    X-Forwarded-For's client where the peer is a trusted proxy."""
    peer = request.client.host if request.client else None
    address = core.abuse.address(peer, request.headers.get("x-forwarded-for"))
    return Call(request.headers, address, _request_id(request))


def _error(error: GatewayError, request_id: str) -> Response:
    headers = {REQUEST_ID_HEADER: request_id}
    if error.upstream_body is not None:  # the backend's own error, already OpenAI-shaped
        return Response(
            error.upstream_body,
            status_code=error.status,
            media_type="application/json",
            headers=headers,
        )
    if error.retry_after_s is not None:
        headers["Retry-After"] = str(max(1, round(error.retry_after_s + 0.4999)))
    if error.should_retry is not None:
        headers["x-should-retry"] = "true" if error.should_retry else "false"
    return JSONResponse(error.body(request_id), status_code=error.status, headers=headers)


def _reply(reply: Reply, request_id: str) -> Response:
    """The backend's answer: its body, or its server-sent events as they come."""
    if reply.events is not None:
        return StreamingResponse(
            reply.events,
            media_type="text/event-stream",
            headers={REQUEST_ID_HEADER: request_id, "Cache-Control": "no-cache"},
        )
    return Response(
        reply.payload,
        status_code=reply.status,
        media_type=reply.media_type,
        headers={REQUEST_ID_HEADER: request_id},
    )


def _body_schema(model: type[BaseModel]) -> dict[str, Any]:
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": model.model_json_schema()}},
        }
    }


CLIENT_WATCH_AFTER_S = 0.5
"""A request still unanswered this long after its body was read (held for a model at zero,
or a long generation that is not streamed) starts watching for its client leaving; quicker
requests never pay for the watch."""


class ClientWatch:
    """Cancels a request's work when its client disconnects before the answer starts.

    The ASGI server does not stop a handler whose client left; a held request would stay held
    (its quota reserved) and a long non-streamed generation would run to its end. Once armed,
    after `CLIENT_WATCH_AFTER_S` this waits for the server's ``http.disconnect`` and cancels
    the handler's task; the core then ends the request as cancelled (hold released, nothing
    charged for an answer nobody got). A streamed answer, once it starts, is watched by the
    streaming response itself.
    """

    def __init__(self, request: Request) -> None:
        self.request = request
        task = asyncio.current_task()
        assert task is not None
        self.task = task
        self.left = False
        self._timer: asyncio.TimerHandle | None = None
        self._watcher: asyncio.Task[None] | None = None

    def arm(self) -> None:
        """Starts the watch after `CLIENT_WATCH_AFTER_S`; only once the body has been read."""
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(CLIENT_WATCH_AFTER_S, self._start)

    def _start(self) -> None:
        self._watcher = asyncio.create_task(self._watch())

    async def _watch(self) -> None:
        while True:
            message = await self.request.receive()
            if message["type"] == "http.disconnect":
                self.left = True
                self.task.cancel()
                return

    def stop(self) -> None:
        """Ends the watch (the answer is ready, or the request failed)."""
        if self._timer is not None:
            self._timer.cancel()
        if self._watcher is not None:
            self._watcher.cancel()

    def gone(self) -> Response:
        """What is sent to a client that left: nothing reads it (499, as nginx logs it)."""
        if self.task.cancelling():
            self.task.uncancel()
        return Response(status_code=499)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused (413) as soon as it is known to exceed ``limit`` bytes.

    A declared Content-Length over the limit is refused before anything is read, and a body
    sent without one is never buffered past the limit.

    Raises:
        GatewayError: 413.
        ClientGoneError: the client went away before it was read.
    """
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise errors.too_large(f"request body is {declared} bytes; the limit is {limit}")
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise errors.too_large(f"request body is over the limit of {limit} bytes")
            chunks.append(chunk)
    except ClientDisconnect:
        raise errors.ClientGoneError from None
    return b"".join(chunks)


class RequestRoute(APIRoute):
    """A route whose endpoint takes the request alone and returns a response.

    It is called as it is, without FastAPI's dependency solving (nothing to solve), which
    on the hot path costs more CPU than the rest of the request's routing; the route is
    still matched by FastAPI's router, its errors still reach the app's exception handlers
    (FastAPI's ``request_response`` wraps it as any route), and the OpenAPI spec still
    documents it as declared.
    """

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        """The endpoint itself."""
        endpoint: Callable[[Request], Coroutine[Any, Any, Response]] = self.endpoint
        return endpoint


def create_app(core: GatewayCore) -> FastAPI:
    """Builds the REST app around a core (started and closed by the app's lifespan).

    Each endpoint turns its request into one call of the core and the core's answer into a
    response; every `GatewayError`, from the core or from FastAPI's own routing, becomes a
    response in one handler.
    """

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
    relayed = APIRouter(route_class=RequestRoute)

    async def relay(request: Request, operation: Operation) -> Response:
        call = _call(core, request)
        watch = ClientWatch(request)

        async def body() -> bytes:
            raw = await read_body(request, limit)
            watch.arm()  # the body is read: the client's next message can only be its leaving
            return raw

        try:
            reply = await core.generate(operation, call, body)
        except asyncio.CancelledError:
            if not watch.left:
                raise
            return watch.gone()
        finally:
            watch.stop()
        if watch.left:
            return watch.gone()
        return _reply(reply, call.request_id)

    @relayed.post(
        CHAT_PATH,
        openapi_extra=_body_schema(ChatRequest),
        responses=STREAMING_RESPONSES,
    )
    async def chat_completions(request: Request) -> Response:
        """OpenAI chat completions, streaming (SSE) or not."""
        return await relay(request, CHAT)

    @relayed.post(
        COMPLETIONS_PATH,
        openapi_extra=_body_schema(CompletionRequest),
        responses=STREAMING_RESPONSES,
    )
    async def completions(request: Request) -> Response:
        """OpenAI text completions, streaming (SSE) or not."""
        return await relay(request, COMPLETIONS)

    @relayed.post(
        RESPONSES_PATH,
        openapi_extra=_body_schema(ResponsesRequest),
        responses=STREAMING_RESPONSES,
    )
    async def responses(request: Request) -> Response:
        """OpenAI Responses API, streaming (SSE) or not, relayed to backends that serve it
        (vLLM's OpenAI server does); the reservation is bounded by ``max_output_tokens``."""
        return await relay(request, RESPONSES)

    @relayed.post(
        EMBEDDINGS_PATH, openapi_extra=_body_schema(EmbeddingRequest), responses=GENERATION_ERRORS
    )
    async def embeddings(request: Request) -> Response:
        """OpenAI embeddings."""
        return await relay(request, EMBEDDINGS)

    @relayed.post(
        TOKENIZE.path, openapi_extra=_body_schema(TokenizeRequest), responses=GENERATION_ERRORS
    )
    async def tokenize(request: Request) -> Response:
        """vLLM's /tokenize: a prompt or chat messages to the model's token ids."""
        return await relay(request, TOKENIZE)

    @relayed.post(
        DETOKENIZE.path, openapi_extra=_body_schema(TokenizeRequest), responses=GENERATION_ERRORS
    )
    async def detokenize(request: Request) -> Response:
        """vLLM's /detokenize: the model's token ids back to text."""
        return await relay(request, DETOKENIZE)

    @relayed.post(SCORE.path, openapi_extra=_body_schema(ScoreRequest), responses=GENERATION_ERRORS)
    async def score(request: Request) -> Response:
        """vLLM's /v1/score: a score per (query, document) pair."""
        return await relay(request, SCORE)

    @relayed.post(
        RERANK.path, openapi_extra=_body_schema(RerankRequest), responses=GENERATION_ERRORS
    )
    async def rerank(request: Request) -> Response:
        """vLLM's /v1/rerank: the documents, most relevant to the query first."""
        return await relay(request, RERANK)

    app.include_router(relayed)

    @app.get("/v1/models", responses=_responses(401, 429))
    async def models(request: Request) -> Response:
        """The models the caller's key may use."""
        data = await core.list_models(_call(core, request))
        return JSONResponse({"object": "list", "data": data})

    @app.get("/v1/models/{model:path}", responses=_responses(401, 404, 429))
    async def model(request: Request, model: str) -> Response:
        """One model the caller's key may use (the ``openai`` SDK's ``models.retrieve``)."""
        return JSONResponse(await core.retrieve_model(_call(core, request), model))

    @app.exception_handler(GatewayError)
    async def gateway_error(request: Request, exc: GatewayError) -> Response:
        """Every error a caller should see, OpenAI-shaped, with its request id."""
        return _error(exc, _request_id(request))

    @app.exception_handler(errors.ClientGoneError)
    async def client_gone(request: Request, exc: errors.ClientGoneError) -> Response:
        """Nobody to answer: the client left before its request was read."""
        return Response(status_code=499)

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
        """A bug outside the core's pipeline: logged with its traceback, answered
        OpenAI-shaped."""
        logger.error("unhandled error", exc_info=exc)
        return _error(errors.internal(), _request_id(request))

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

    return app
