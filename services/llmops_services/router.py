"""The router: the graph's OpenAI-compatible ingress.

Requests name a model; the router sends them to that model's deployment. Model ``auto`` is
routed semantically: the encoder embeds the prompt (a chat's first user message, so a
conversation stays on the model it started on) and the LLM whose route examples are nearest
answers it, or the default model when none is nearer than ``router.min_similarity`` (the
response's ``model`` and the ``x-llmops-routed-model`` header say which).
Streams are relayed chunk by chunk; an error after a stream started ends it with an explicit
``error`` event, never a silent cut.
"""

from __future__ import annotations

import asyncio
import base64
import json
import struct
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import AbstractContextManager, nullcontext
from typing import Any, Literal, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from opentelemetry import trace
from opentelemetry.trace import Span, Status, StatusCode
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import (
    BackPressureError,
    DeploymentUnavailableError,
    RayServeException,
    ReplicaUnavailableError,
)
from ray.serve.handle import DeploymentHandle

from llmops_contract import (
    APP_NAME,
    AUTO_MODEL,
    REQUEST_ID_HEADER,
    ROUTED_MODEL_HEADER,
    TOKENIZER_PATH,
    GraphConfig,
    RequestBodyError,
    parse_request_body,
)
from llmops_contract.graph import ADAPTERS_KEY, REQUEST_TIMEOUT_HEADER
from llmops_services.errors import ServingError, model_not_found
from llmops_services.metrics import RouterMetrics
from llmops_services.replicas import ReplicaStates, scaled_to_zero
from llmops_services.routing import DecisionCache, RouteDecision, RouteIndex, conversation_text
from llmops_services.tracing import OPERATION, REQUEST_MODEL, tracer

MAX_BODY_BYTES = 8 * 1024 * 1024
RESTART_RETRY_AFTER_S = 5
"""Retry-After of a 503 while a model's engine or replica is down: Serve notices a dead
engine at its next health check and starts a new replica, which takes tens of seconds."""
UNAVAILABLE_ERRORS: tuple[type[BaseException], ...] = (
    RayActorError,  # the replica's process died or is unreachable (ActorDiedError, ...)
    ReplicaUnavailableError,
    DeploymentUnavailableError,
    BackPressureError,
)
"""What a deployment handle raises while a model has no replica that can take a request."""
ENGINE_DEAD = "EngineDeadError"
"""vLLM's error for an engine whose process died (vllm/v1/engine/exceptions.py), matched by
name: importing vLLM here costs the router seconds of start-up (see `Router.__init__`)."""

M = TypeVar("M", bound=BaseModel)


class EmbeddingsRequest(BaseModel):
    """OpenAI's embeddings request."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1)
    user: str | None = None


class ScoreRequest(BaseModel):
    """vLLM's /v1/score request: ``queries`` and ``documents`` (or vLLM's other spellings of
    the two sides: ``text_1``/``text_2``, ``data_1``/``data_2``, ``queries``/``items``)."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    queries: str | list[str] | None = None
    documents: str | list[str] | None = None
    items: str | list[str] | None = None
    text_1: str | list[str] | None = None
    text_2: str | list[str] | None = None
    data_1: str | list[str] | None = None
    data_2: str | list[str] | None = None

    def sides(self) -> tuple[str | list[str], str | list[str]]:
        """The two sides to score, whichever names the request used.

        Raises:
            ServingError: 400 when a side is missing.
        """
        for first, second in (
            ("queries", "documents"),
            ("queries", "items"),
            ("text_1", "text_2"),
            ("data_1", "data_2"),
        ):
            left, right = getattr(self, first), getattr(self, second)
            if left is not None and right is not None:
                return left, right
        raise ServingError(
            "score needs queries and documents (or text_1 and text_2)", param="documents"
        )


class RerankRequest(BaseModel):
    """vLLM's /v1/rerank request (Jina's and Cohere's shape)."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    query: str
    documents: list[str] = Field(min_length=1)
    top_n: int = Field(default=0, ge=0)
    return_documents: bool = True


def _score_pairs(left: str | list[str], right: str | list[str]) -> list[tuple[str, str]]:
    """vLLM's pairing of a score request's sides: one against each (1:N), or pairwise (N:N).

    Raises:
            ServingError: 400 for empty sides or lists of different lengths.
    """
    lefts = [left] if isinstance(left, str) else list(left)
    rights = [right] if isinstance(right, str) else list(right)
    if not lefts or not rights or not all(lefts) or not all(rights):
        raise ServingError("score inputs must be non-empty strings", param="documents")
    if len(lefts) == 1:
        return [(lefts[0], text) for text in rights]
    if len(lefts) != len(rights):
        raise ServingError(
            f"{len(lefts)} queries and {len(rights)} documents: send one query, or as many "
            "queries as documents",
            param="documents",
        )
    return list(zip(lefts, rights, strict=True))


class ResponsesShape(BaseModel):
    """The fields of a Responses API request the router reads; vLLM checks the rest."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    input: Any = None
    stream: bool = False


class _ModelField(BaseModel):
    """Just the fields that pick a request's shape."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    messages: Any = None


app = FastAPI(
    title="llmops serving graph",
    description="OpenAI-compatible ingress of the llmops Ray Serve graph.",
    version="v1",
)


def _request_id(request: Request) -> str:
    return request.headers.get(REQUEST_ID_HEADER) or uuid.uuid4().hex


def _error_response(error: ServingError, request_id: str) -> JSONResponse:
    headers = {REQUEST_ID_HEADER: request_id}
    if error.status == 503:
        headers["Retry-After"] = str(RESTART_RETRY_AFTER_S)
    return JSONResponse(error.body(request_id), status_code=error.status, headers=headers)


def engine_unavailable(model: str) -> ServingError:
    """The 503 for a model whose engine is dead or restarting, or that has no replica now:
    OpenAI's shape for a server error, which clients and the ``openai`` SDK retry."""
    return ServingError(
        f"model {model!r} is restarting or has no replica ready; retry shortly",
        status=503,
        type="server_error",
        code="engine_unavailable",
    )


def _is_unavailable(exc: BaseException) -> bool:
    """Whether a handle call failed because the model cannot serve now (engine dead, replica
    gone or overloaded) rather than because of the request.

    An exception raised in the replica arrives as Ray's ``RayTaskError``, made an instance of
    its cause's class too (``as_instanceof_cause``); its ``cause`` is checked as well.
    """
    for error in (exc, getattr(exc, "cause", None), exc.__cause__):
        if error is None:
            continue
        if isinstance(error, UNAVAILABLE_ERRORS):
            return True
        if any(cls.__name__ == ENGINE_DEAD for cls in type(error).__mro__):
            return True
    return False


async def _parse(request: Request, model_cls: type[M]) -> M:
    """Reads a JSON body into a request model, as the gateway does (`llmops_contract`); every
    failure is a 400 that says what (413 over the size limit)."""
    try:
        _, body = parse_request_body(await request.body(), model_cls, MAX_BODY_BYTES)
    except RequestBodyError as exc:
        raise ServingError(exc.message, status=exc.status, param=exc.param) from exc
    return body


async def _parse_json(request: Request, model_cls: type[M]) -> tuple[dict[str, Any], M]:
    """`_parse`, also returning the JSON object, for a body relayed as it came."""
    try:
        return parse_request_body(await request.body(), model_cls, MAX_BODY_BYTES)
    except RequestBodyError as exc:
        raise ServingError(exc.message, status=exc.status, param=exc.param) from exc


def _check_generation_args(body: Any) -> None:
    """Rejects arguments vLLM would reject less clearly, or not at all."""
    for field in ("max_tokens", "max_completion_tokens"):
        value = getattr(body, field, None)
        if value is not None and value < 1:
            raise ServingError(f"{field} must be at least 1, got {value}", param=field)
    n = getattr(body, "n", None)
    if n is not None and n < 1:
        raise ServingError(f"n must be at least 1, got {n}", param="n")


def _embedding_payload(vector: list[float], encoding: str) -> list[float] | str:
    if encoding == "base64":
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
    return vector


def _app_name() -> str:
    """The Serve application this router runs in (the graph's usual name outside a replica)."""
    try:
        return str(serve.get_replica_context().app_name)
    except RayServeException:
        return APP_NAME


async def _probe(call: Any, timeout_s: float = 5.0) -> str:
    try:
        await asyncio.wait_for(call, timeout=timeout_s)
    except Exception as exc:  # any failure means not ready; the message says which
        return f"error: {type(exc).__name__}"
    return "ok"


def _embedding_inputs(value: Any) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        raise ServingError("input must be a non-empty string or list of strings", param="input")
    if not all(isinstance(item, str) for item in value):
        raise ServingError(
            "input must be text: token-id inputs are not supported by this encoder",
            param="input",
        )
    if any(not item for item in value):
        raise ServingError("input must not contain empty strings", param="input")
    return list(value)


def _as_error(item: Any) -> ServingError | None:
    """Turns Ray Serve LLM's ErrorResponse into a ServingError; None for anything else."""
    error = getattr(item, "error", None)
    if error is None or not hasattr(error, "message"):
        return None
    status = int(getattr(error, "code", 500) or 500)
    kind = "invalid_request_error" if status < 500 else "server_error"
    return ServingError(
        error.message,
        status=status,
        type=kind,
        param=getattr(error, "param", None),
        code="engine_unavailable" if status == 503 else None,
    )


def request_deadline(request: Request, limit_s: float) -> float:
    """When a request must be done (``time.monotonic()``): the graph's ``request_timeout_s``
    from now, or sooner when the request asks for less in `REQUEST_TIMEOUT_HEADER`.

    Raises:
        ServingError: 400 for a header that is not a positive number of seconds.
    """
    asked = request.headers.get(REQUEST_TIMEOUT_HEADER)
    if asked is not None:
        try:
            seconds = float(asked)
        except ValueError:
            seconds = float("nan")
        if not seconds > 0:  # also refuses nan
            raise ServingError(
                f"{REQUEST_TIMEOUT_HEADER} must be a positive number of seconds, got {asked!r}",
                param=REQUEST_TIMEOUT_HEADER,
            )
        limit_s = min(limit_s, seconds)
    return time.monotonic() + limit_s


def _left(deadline: float) -> float:
    return max(deadline - time.monotonic(), 0.0)


def request_timed_out() -> ServingError:
    """The 504 of a request whose deadline passed (the gateway's shape for its own)."""
    return ServingError(
        "the request did not finish before its deadline; the model stopped working on it",
        status=504,
        type="timeout_error",
        code="timeout",
    )


def _cancel(call: Any) -> None:
    """Cancels a deployment handle call, if it is one still running.

    Serve cancels the replica's task; the engine's generator is closed in it
    (`engine_guarded`), and vLLM aborts the request then (vllm/v1/engine/async_llm.py,
    ``generate``), freeing its sequence slot and KV cache.
    """
    cancel = getattr(call, "cancel", None)
    if cancel is not None:
        cancel()


async def _sse(
    first: Any, rest: AsyncIterator[Any], deadline: float = float("inf"), done_marker: bool = True
) -> AsyncIterator[str]:
    """Relays Serve LLM stream batches as SSE; a failure becomes an error event.

    Each batch the LLM deployment sends leaves as one body chunk: one message to the HTTP
    proxy per batch, not per token. Past ``deadline`` the stream ends with a timeout event;
    then, and when the client leaves, the upstream call is cancelled, so the engine stops.
    ``done_marker``: end with ``data: [DONE]`` (chat and completions do; the Responses API's
    events do not).
    """
    done = False
    finished = False
    try:
        batch: Any = first
        while True:
            texts = []
            for item in batch if isinstance(batch, list) else [batch]:
                error = _as_error(item)
                if error is not None:
                    texts.append(f"data: {json.dumps(error.body())}\n\n")
                    continue
                text = item if isinstance(item, str) else f"data: {item.model_dump_json()}\n\n"
                done = done or text.rstrip().endswith("[DONE]")
                texts.append(text)
            if texts:
                yield "".join(texts)
            batch = await asyncio.wait_for(rest.__anext__(), timeout=_left(deadline))
    except StopAsyncIteration:
        finished = True
    except TimeoutError:
        yield f"data: {json.dumps(request_timed_out().body())}\n\n"
    except Exception as exc:  # the stream already started: tell the client, do not cut it
        failure = ServingError(
            f"the stream failed upstream: {type(exc).__name__}", status=502, type="server_error"
        )
        yield f"data: {json.dumps(failure.body())}\n\n"
    finally:
        if not finished:
            _cancel(rest)
    if not done and done_marker:
        yield "data: [DONE]\n\n"


@serve.ingress(app)
class Router:
    """Ingress deployment.

    Args:
        config: The `GraphConfig` as a dict.
        llms: Model name -> handle of its LLM deployment.
        encoder: Handle of the encoder deployment, or None.
    """

    def __init__(
        self,
        config: dict[str, Any],
        llms: dict[str, DeploymentHandle],
        encoder: DeploymentHandle | None = None,
    ) -> None:
        self.config = GraphConfig.model_validate(config)
        # vLLM's request models: their import pulls in vLLM, torch and transformers, about 11 s
        # of CPU. Here the replica pays it before it reports ready; on the first request it
        # blocked the router's event loop, every request and health check with it.
        from ray.llm._internal.serve.core.configs.openai_api_models import (
            DetokenizeRequest,
            TokenizeChatRequest,
            TokenizeCompletionRequest,
        )
        from ray.serve.llm.openai_api_models import ChatCompletionRequest, CompletionRequest

        self._request_models: dict[str, type[BaseModel]] = {
            "chat": ChatCompletionRequest,
            "completions": CompletionRequest,
            "tokenize": TokenizeCompletionRequest,
            "tokenize_chat": TokenizeChatRequest,
            "detokenize": DetokenizeRequest,
        }
        self.llms = {name: handle.options(stream=True) for name, handle in llms.items()}
        # The adapter table comes from the graph config when `build_app` gets it whole, and
        # from the router's Serve user_config when a Serve config carries it (`reconfigure`).
        self._set_adapters(
            {adapter.name: llm.name for llm in self.config.llms for adapter in llm.adapters}
        )
        self._probes = llms
        self.encoder = encoder
        self.created = int(time.time())
        self._route_index: RouteIndex | None = None
        self._route_lock = asyncio.Lock()
        self._decisions = DecisionCache()
        self._encoder_dimensions: int | None = None
        self.metrics = RouterMetrics()
        self.replicas = ReplicaStates(
            _app_name(),
            {llm.name: llm.deployment_name for llm in self.config.llms},
        )

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Takes the adapter table (adapter name -> base model) from the router's Serve
        user_config (`llmops_contract.graph.router_user_config`): Serve calls this after the
        constructor and on the running replica whenever that user_config alone changes, so an
        adapter added to a running graph is routed and listed, and a removed one answers 404.

        Raises:
            ValueError: the user_config is malformed, names a base model this graph does not
                serve, or reuses a model's name.
        """
        table = user_config.get(ADAPTERS_KEY) if isinstance(user_config, dict) else None
        if not isinstance(table, dict):
            raise ValueError(f"user_config must be {{{ADAPTERS_KEY!r}: {{...}}}}")
        for adapter, base in table.items():
            if base not in self.llms:
                raise ValueError(f"adapter {adapter!r}: the graph serves no model {base!r}")
            if adapter in self.llms or adapter == AUTO_MODEL:
                raise ValueError(f"adapter {adapter!r} has a model's name")
        self._set_adapters({str(adapter): str(base) for adapter, base in table.items()})

    def _set_adapters(self, adapters: dict[str, str]) -> None:
        # A LoRA adapter is served by its base model's deployment: requests name the adapter
        # alone, as vLLM serves them (--lora-modules name=path), since names are unique
        # across models and adapters and a tenant's allow-list names what clients send.
        # The adapter reaches the replica as Serve's multiplexed model id (one handle per
        # adapter): Ray Serve LLM's LLMServer loads it from that, and Serve prefers a replica
        # that already holds it. Both tables are replaced at once, never changed in place.
        kept = getattr(self, "adapters", {})
        handles = getattr(self, "_adapter_handles", {})
        self._adapter_handles = {
            adapter: handles[adapter]
            if kept.get(adapter) == base
            else self.llms[base].options(multiplexed_model_id=adapter)
            for adapter, base in adapters.items()
        }
        self.adapters = adapters

    async def _check_serving(self, model: str) -> None:
        """Raises the scaled-to-zero 503 when the model has no running replica: a request
        sent to its handle then would wait, and wake it (`llmops_services.replicas`). A model
        scaled to zero whose last replica still drains its requests takes no new ones either."""
        state = await self.replicas.get(model)
        if state is not None and (state.running == 0 or state.target == 0):
            raise scaled_to_zero(model)

    # -- routing ---------------------------------------------------------------------------

    @property
    def semantic_enabled(self) -> bool:
        """True when `auto` can route: an encoder and at least one model with examples."""
        return self.encoder is not None and any(llm.route_examples for llm in self.config.llms)

    async def _routes(self) -> RouteIndex:
        """Route example embeddings, computed and stacked once on first use."""
        async with self._route_lock:
            if self._route_index is None:
                assert self.encoder is not None
                examples = [
                    (llm.name, text) for llm in self.config.llms for text in llm.route_examples
                ]
                vectors, _ = await self.encoder.embed.remote([text for _, text in examples])
                routes: dict[str, list[list[float]]] = {}
                for (name, _), vector in zip(examples, vectors, strict=True):
                    routes.setdefault(name, []).append(vector)
                self._route_index = RouteIndex(routes)
            return self._route_index

    async def resolve_model(self, model: str | None, prompt: str) -> RouteDecision:
        """Maps a request's model field to a served LLM.

        Raises:
            ServingError: 404 for an unknown model, 400 for an embedding model.
        """
        if not model:
            return RouteDecision(self.config.default_llm, 0.0, policy="default")
        if model in self.llms:
            return RouteDecision(model, 1.0, policy="name")
        if model in self.adapters:
            return RouteDecision(self.adapters[model], 1.0, policy="name")
        if model == AUTO_MODEL:
            if not self.semantic_enabled or self.encoder is None:
                return RouteDecision(self.config.default_llm, 0.0, policy="default")
            decision = self._decisions.get(prompt)
            if decision is None:
                (vector,), _ = await self.encoder.embed.remote([prompt or " "])
                index = await self._routes()
                decision = index.route(
                    vector, self.config.default_llm, self.config.router.min_similarity
                )
                self._decisions.put(prompt, decision)
            return decision
        if self.config.encoder is not None and model == self.config.encoder.name:
            raise ServingError(
                f"{model!r} is an embedding model: call /v1/embeddings with it",
                param="model",
                code="wrong_model_type",
            )
        raise model_not_found(model, self.model_names())

    def model_names(self) -> list[str]:
        """Every model name a client may send."""
        names = [*self.llms, *self.adapters]
        if self.config.encoder is not None:
            names.append(self.config.encoder.name)
        if self.semantic_enabled:
            names.append(AUTO_MODEL)
        return names

    # -- generation ------------------------------------------------------------------------

    async def _generate(self, request: Request, kind: str) -> Response:
        request_id = _request_id(request)
        tracing = tracer()
        span: Span | None = None
        if tracing is not None:  # Ray Serve made this replica's request span current
            operation = "chat" if kind == "chat" else "text_completion"
            span = tracing.start_span("route", attributes={OPERATION: operation})
        scope: AbstractContextManager[Any] = (
            nullcontext() if span is None else trace.use_span(span, end_on_exit=True)
        )
        with scope:
            return await self._dispatch(request, kind, request_id, span)

    async def _dispatch(
        self, request: Request, kind: str, request_id: str, span: Span | None
    ) -> Response:
        """Sends a generation to its model's deployment; ``span`` (tracing on) is current, so
        the handle call carries it, and ends when the first chunk is back."""
        stream: Any = None
        try:
            deadline = request_deadline(request, self.config.router.request_timeout_s)
            body: Any = await _parse(request, self._request_models[kind])
            if kind == "chat":
                if not body.messages:
                    raise ServingError("messages must not be empty", param="messages")
                prompt = conversation_text(body.messages)
            else:
                prompt = body.prompt if isinstance(body.prompt, str) else ""
            _check_generation_args(body)
            decision = await self.resolve_model(body.model, prompt)
            self.metrics.routed(decision)
            await self._check_serving(decision.model)
            if span is not None:
                span.set_attributes(
                    {
                        REQUEST_MODEL: body.model or "",
                        "llmops.routed_model": decision.model,
                        "llmops.route_policy": decision.policy,
                    }
                )
            adapter = body.model if body.model in self.adapters else None
            body.model = adapter or decision.model
            body.request_id = request_id
            handle = self._adapter_handles[adapter] if adapter else self.llms[decision.model]
            stream = getattr(handle, kind).remote(body)
            first = await asyncio.wait_for(stream.__anext__(), timeout=_left(deadline))
        except ServingError as error:
            if span is not None:
                span.set_status(Status(StatusCode.ERROR, error.message))
            return _error_response(error, request_id)
        except TimeoutError:
            _cancel(stream)
            if span is not None:
                span.set_status(Status(StatusCode.ERROR, "timeout"))
            return _error_response(request_timed_out(), request_id)
        except Exception as exc:
            _cancel(stream)
            if not _is_unavailable(exc):
                raise
            if span is not None:
                span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
            return _error_response(engine_unavailable(body.model), request_id)
        headers = {REQUEST_ID_HEADER: request_id, ROUTED_MODEL_HEADER: decision.model}
        head = first[0] if isinstance(first, list) and first else first
        upstream_error = _as_error(head)
        if upstream_error is not None:
            return _error_response(upstream_error, request_id)
        if not getattr(body, "stream", False):
            return JSONResponse(head.model_dump(exclude_none=True), headers=headers)
        return StreamingResponse(
            _sse(first, stream, deadline), media_type="text/event-stream", headers=headers
        )

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        """OpenAI chat completions, streaming or not."""
        return await self._generate(request, "chat")

    @app.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        """OpenAI text completions, streaming or not."""
        return await self._generate(request, "completions")

    # -- embeddings ------------------------------------------------------------------------

    @app.post("/v1/embeddings")
    async def embeddings(self, request: Request) -> Response:
        """OpenAI embeddings from the encoder deployment."""
        request_id = _request_id(request)
        try:
            body = await _parse(request, EmbeddingsRequest)
            encoder = self.config.encoder
            if encoder is None or self.encoder is None:
                raise ServingError("this graph serves no embedding model", status=404)
            if body.model and body.model != encoder.name:
                if body.model in self.llms:
                    raise ServingError(
                        f"{body.model!r} is a chat model; embeddings come from {encoder.name!r}",
                        param="model",
                        code="wrong_model_type",
                    )
                raise model_not_found(body.model, self.model_names())
            if body.dimensions is not None and body.dimensions != await self._dimensions():
                raise ServingError(
                    f"{encoder.name} makes {await self._dimensions()}-dimension vectors; "
                    "omit dimensions or set it to that",
                    param="dimensions",
                )
            texts = _embedding_inputs(body.input)
            vectors, tokens = await self.encoder.embed.remote(texts)
        except ServingError as error:
            return _error_response(error, request_id)
        encoding = body.encoding_format
        return JSONResponse(
            {
                "object": "list",
                "model": encoder.name,
                "data": [
                    {
                        "object": "embedding",
                        "index": i,
                        "embedding": _embedding_payload(vector, encoding),
                    }
                    for i, vector in enumerate(vectors)
                ],
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            },
            headers={REQUEST_ID_HEADER: request_id},
        )

    async def _dimensions(self) -> int:
        if self._encoder_dimensions is None:
            assert self.encoder is not None
            self._encoder_dimensions = int(await self.encoder.dimensions.remote())
        return self._encoder_dimensions

    # -- the Responses API -------------------------------------------------------------------

    @app.post("/v1/responses")
    async def responses(self, request: Request) -> Response:
        """OpenAI's Responses API, answered by vLLM's Responses serving in the model's replica
        (`LLMDeployment.responses`), streaming or not, within the request's deadline."""
        request_id = _request_id(request)
        stream: Any = None
        model = ""
        try:
            deadline = request_deadline(request, self.config.router.request_timeout_s)
            data, shape = await _parse_json(request, ResponsesShape)
            prompt = shape.input if isinstance(shape.input, str) else ""
            decision = await self.resolve_model(shape.model, prompt)
            self.metrics.routed(decision)
            model = decision.model
            await self._check_serving(model)
            adapter = shape.model if shape.model in self.adapters else None
            data["model"] = adapter or model
            data["request_id"] = request_id
            handle = self._adapter_handles[adapter] if adapter else self.llms[model]
            stream = handle.responses.remote(data)
            first = await asyncio.wait_for(stream.__anext__(), timeout=_left(deadline))
        except ServingError as error:
            return _error_response(error, request_id)
        except TimeoutError:
            _cancel(stream)
            return _error_response(request_timed_out(), request_id)
        except Exception as exc:
            _cancel(stream)
            if not _is_unavailable(exc):
                raise
            return _error_response(engine_unavailable(model), request_id)
        upstream_error = _as_error(first)
        if upstream_error is not None:
            return _error_response(upstream_error, request_id)
        headers = {REQUEST_ID_HEADER: request_id, ROUTED_MODEL_HEADER: model}
        if not shape.stream:
            return JSONResponse(first, headers=headers)
        return StreamingResponse(
            _sse(first, stream, deadline, done_marker=False),
            media_type="text/event-stream",
            headers=headers,
        )

    # -- tokenize, score and rerank -----------------------------------------------------------

    async def _engine_answer(self, model: str, method: str, body: Any) -> Any:
        """One whole answer of a model's engine (tokenize, detokenize, ...).

        Raises:
            ServingError: the engine's error, 504 past the graph's timeout, 503 while the
                model cannot serve.
        """
        await self._check_serving(model)
        stream: Any = None
        try:
            stream = getattr(self.llms[model], method).remote(body)
            answer = await asyncio.wait_for(
                stream.__anext__(), timeout=self.config.router.request_timeout_s
            )
        except TimeoutError as exc:
            _cancel(stream)
            raise request_timed_out() from exc
        except Exception as exc:
            _cancel(stream)
            if not _is_unavailable(exc):
                raise
            raise engine_unavailable(model) from exc
        error = _as_error(answer)
        if error is not None:
            raise error
        return answer

    async def _token_model(self, model: str | None) -> str:
        """The LLM a tokenize or detokenize request names (or the default one): token ids
        belong to one model's tokenizer, so ``auto`` is refused."""
        if model == AUTO_MODEL:
            raise ServingError(
                "token ids depend on the model's tokenizer: name a model, not 'auto'",
                param="model",
            )
        return (await self.resolve_model(model, "")).model

    @app.post("/tokenize")
    async def tokenize(self, request: Request) -> Response:
        """vLLM's /tokenize: a ``prompt``, or chat ``messages`` rendered with the model's
        chat template, to the model's token ids."""
        request_id = _request_id(request)
        try:
            shape = await _parse(request, _ModelField)
            kind = "tokenize_chat" if shape.messages is not None else "tokenize"
            body: Any = await _parse(request, self._request_models[kind])
            body.model = await self._token_model(body.model)
            answer = await self._engine_answer(body.model, "tokenize", body)
        except ServingError as error:
            return _error_response(error, request_id)
        return JSONResponse(
            answer.model_dump(exclude_none=True), headers={REQUEST_ID_HEADER: request_id}
        )

    @app.post("/detokenize")
    async def detokenize(self, request: Request) -> Response:
        """vLLM's /detokenize: a model's token ids back to text."""
        request_id = _request_id(request)
        try:
            body: Any = await _parse(request, self._request_models["detokenize"])
            body.model = await self._token_model(body.model)
            answer = await self._engine_answer(body.model, "detokenize", body)
        except ServingError as error:
            return _error_response(error, request_id)
        return JSONResponse(answer.model_dump(), headers={REQUEST_ID_HEADER: request_id})

    def _scoring_model(self, model: str | None) -> str:
        """The embedding model a score or rerank request may name (or none).

        vLLM scores only with pooling models (a cross-encoder, or an embedding model's
        cosine similarity); this graph's pooling model is its encoder, so that scores.
        """
        encoder = self.config.encoder
        if encoder is None or self.encoder is None:
            raise ServingError(
                "this graph serves no embedding model, which score and rerank need", status=404
            )
        if model is None or model == encoder.name:
            return encoder.name
        if model in self.llms or model == AUTO_MODEL:
            raise ServingError(
                f"{model!r} is a generative model; score and rerank come from the embedding "
                f"model {encoder.name!r} (cosine similarity of its embeddings)",
                param="model",
                code="wrong_model_type",
            )
        raise model_not_found(model, self.model_names())

    async def _similarities(self, pairs: list[tuple[str, str]]) -> tuple[list[float], int]:
        """Cosine similarity of each pair's embeddings, every distinct text embedded once
        (the encoder's vectors are unit length: the dot product is the cosine).

        Returns:
            One score per pair, and the input tokens embedded.
        """
        assert self.encoder is not None
        texts = list(dict.fromkeys(text for pair in pairs for text in pair))
        vectors, tokens = await self.encoder.embed.remote(texts)
        by_text = dict(zip(texts, vectors, strict=True))
        scores = [
            sum(a * b for a, b in zip(by_text[left], by_text[right], strict=True))
            for left, right in pairs
        ]
        return scores, tokens

    @app.post("/v1/score")
    async def score(self, request: Request) -> Response:
        """vLLM's /v1/score: one score per (query, document) pair, 1:N or N:N."""
        request_id = _request_id(request)
        try:
            body = await _parse(request, ScoreRequest)
            model = self._scoring_model(body.model)
            scores, tokens = await self._similarities(_score_pairs(*body.sides()))
        except ServingError as error:
            return _error_response(error, request_id)
        return JSONResponse(
            {
                "id": f"score-{request_id}",
                "object": "list",
                "created": int(time.time()),
                "model": model,
                "data": [
                    {"index": i, "object": "score", "score": value}
                    for i, value in enumerate(scores)
                ],
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            },
            headers={REQUEST_ID_HEADER: request_id},
        )

    @app.post("/v1/rerank")
    async def rerank(self, request: Request) -> Response:
        """vLLM's /v1/rerank (Jina's and Cohere's shape): the documents, most relevant to
        the query first, ``top_n`` of them (0: all)."""
        request_id = _request_id(request)
        try:
            body = await _parse(request, RerankRequest)
            model = self._scoring_model(body.model)
            pairs = _score_pairs(body.query, body.documents)
            scores, tokens = await self._similarities(pairs)
        except ServingError as error:
            return _error_response(error, request_id)
        order = sorted(range(len(scores)), key=lambda i: scores[i], reverse=True)
        if body.top_n:
            order = order[: body.top_n]
        results = []
        for i in order:
            result: dict[str, Any] = {"index": i, "relevance_score": scores[i]}
            if body.return_documents:
                result["document"] = {"text": body.documents[i]}
            results.append(result)
        return JSONResponse(
            {
                "id": f"rerank-{request_id}",
                "model": model,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
                "results": results,
            },
            headers={REQUEST_ID_HEADER: request_id},
        )

    # -- tokenizer files -------------------------------------------------------------------

    @app.get(TOKENIZER_PATH)
    async def tokenizer_file(self, model: str, request: Request) -> Response:
        """The ``tokenizer.json`` a model's engine loaded, byte for byte (the gateway counts
        prompt tokens with it); 404 in OpenAI's shape for an unknown model or one without."""
        request_id = _request_id(request)
        try:
            # An adapter's requests are counted with its base model's tokenizer.
            handle = self._probes.get(self.adapters.get(model, model))
            if handle is None:
                if self.config.encoder is not None and model == self.config.encoder.name:
                    raise ServingError(
                        f"{model!r} is an embedding model: the graph serves tokenizers of its LLMs",
                        status=404,
                        param="model",
                        code="tokenizer_not_found",
                    )
                raise model_not_found(model, list(self.llms))
            # At zero the call would wait for a replica, and wake the model.
            await self._check_serving(model)
            content = await handle.tokenizer_json.remote()
            if content is None:
                raise ServingError(
                    f"model {model!r} has no tokenizer.json (a slow tokenizer only)",
                    status=404,
                    param="model",
                    code="tokenizer_not_found",
                )
        except ServingError as error:
            return _error_response(error, request_id)
        except Exception as exc:
            if not _is_unavailable(exc):
                raise
            return _error_response(engine_unavailable(model), request_id)
        return Response(
            content,
            media_type="application/json",
            headers={REQUEST_ID_HEADER: request_id, "Cache-Control": "max-age=300"},
        )

    # -- models and health -----------------------------------------------------------------

    @app.get("/v1/models")
    async def models(self) -> dict[str, Any]:
        """The models this graph serves, OpenAI-shaped; an adapter's ``parent`` is its base
        model (as vLLM lists LoRA modules, vllm/entrypoints/openai/models/serving.py)."""
        data: list[dict[str, Any]] = []
        for name in self.model_names():
            entry = {"id": name, "object": "model", "created": self.created, "owned_by": "llmops"}
            if name in self.adapters:
                entry["parent"] = self.adapters[name]
            data.append(entry)
        return {"object": "list", "data": data}

    @app.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        """Liveness: the router process answers."""
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz(self) -> Response:
        """Readiness: every model deployment answers its health check; one scaled to zero
        is not probed (the probe would wake it) and counts as ready."""
        checks: dict[str, str] = {}
        for name, handle in self._probes.items():
            replicas = await self.replicas.get(name)
            if replicas is not None and replicas.running == 0 and replicas.target == 0:
                checks[name] = "ok (scaled to zero)"
                continue
            checks[name] = await _probe(handle.check_health.remote())
        if self.encoder is not None and self.config.encoder is not None:
            checks[self.config.encoder.name] = await _probe(self.encoder.dimensions.remote())
        ready = all(state.startswith("ok") for state in checks.values())
        return JSONResponse(
            {"status": "ready" if ready else "not ready", "models": checks},
            status_code=200 if ready else 503,
        )
