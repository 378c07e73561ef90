"""The protocol-independent gateway: authenticate, admit, route, relay, settle.

REST (and gRPC) adapters call these methods and map `GatewayError` to their own wire format.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import aiohttp
import structlog
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from llmops_contract import REQUEST_ID_HEADER, RequestBodyError, parse_request_body
from llmops_gateway import errors
from llmops_gateway.abuse import AbuseLimits, Count
from llmops_gateway.admission import Admission, RedisAdmission, Rejection, Reservation
from llmops_gateway.discovery import ClusterBackends, KubeAccess
from llmops_gateway.hold import (
    EXPIRED,
    Hold,
    HoldExpiredError,
    Holds,
    cold_start_timeout,
    scaled_to_zero,
)
from llmops_gateway.keys import KeyIndex, KeyRejectedError, KeyStore, Tenant
from llmops_gateway.logs import events
from llmops_gateway.metrics import GatewayMetrics
from llmops_gateway.settings import GatewaySettings
from llmops_gateway.tokens import TokenCounter
from llmops_gateway.tracing import TRACEPARENT, TRACESTATE, RequestTrace, Tracing, trace_id_of
from llmops_gateway.usage_records import (
    UsageRecord,
    build_recorder,
    current_request_id,
    gpu_seconds,
    new_record_id,
    timestamp,
)

logger = logging.getLogger("llmops.gateway")
# The per-request line and the key audit take structlog's native path (`logs.events`).
settled_log = events("llmops.gateway")
audit = events("llmops.gateway.audit")

MODELS_TTL_S = 10.0
NOT_READY_RETRY_S = 10.0
UNAVAILABLE_RETRY_S = 1.0
"""Retry-After for a backend that refused the connection or answered 503 without one."""
UPSTREAM_RETRY_PAUSE_S = 0.25
"""Pause before the one retry of a backend that was unavailable (a replica switch)."""


class GenerationRequest(BaseModel):
    """The fields of a chat or completion request the gateway itself reads; the rest pass.

    Every optional field takes ``null`` as OpenAI's API does (the default then applies).
    """

    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1, description="Model name.")
    stream: bool | None = Field(default=False, description="Stream the answer as SSE.")
    stream_options: dict[str, Any] | None = Field(
        default=None, description="Streaming options (include_usage)."
    )
    max_tokens: int | None = Field(default=None, ge=1, description="Output token limit.")
    max_completion_tokens: int | None = Field(
        default=None,
        ge=1,
        description="Same, newer name; with both set, the larger one applies (the engine "
        "may honour either).",
    )
    n: int | None = Field(default=1, ge=1, le=128, description="Choices to generate.")
    user: str | None = Field(default=None, description="End-user id, passed through.")

    @property
    def streaming(self) -> bool:
        """Whether the answer is streamed (``null`` means no)."""
        return bool(self.stream)

    def output_limit(self) -> int | None:
        """The output limit the request sets: the larger of its two names, or None."""
        if self.max_tokens is None:
            return self.max_completion_tokens
        if self.max_completion_tokens is None:
            return self.max_tokens
        return max(self.max_tokens, self.max_completion_tokens)

    def prompt_text(self) -> Any:
        """The part of the request that becomes the prompt."""
        return None

    def generations(self) -> int:
        """How many outputs the request can generate: ``n`` for each prompt."""
        return self.n or 1

    limit_field: ClassVar[str] = "max_tokens"
    """The field that carries the output limit upstream (one normalised value)."""
    usage_in_stream_options: ClassVar[bool] = True
    """Whether a stream's usage is asked for with ``stream_options.include_usage``."""


class ChatRequest(GenerationRequest):
    """OpenAI chat completion request (fields the gateway reads; others pass through)."""

    messages: list[dict[str, Any]] = Field(min_length=1, description="The conversation.")

    def prompt_text(self) -> Any:
        """The conversation."""
        return self.messages


class CompletionRequest(GenerationRequest):
    """OpenAI text completion request (fields the gateway reads; others pass through)."""

    prompt: str | list[str] | list[int] | list[list[int]] = Field(description="The prompt(s).")

    def prompt_text(self) -> Any:
        """The prompt or prompts."""
        return self.prompt

    def generations(self) -> int:
        """``n`` for each prompt: a list of strings or of token lists is one prompt each."""
        prompts = self.prompt
        many = isinstance(prompts, list) and prompts and not isinstance(prompts[0], int)
        return (self.n or 1) * (len(prompts) if many else 1)


class ResponsesRequest(GenerationRequest):
    """OpenAI Responses API request (fields the gateway reads; others pass through).

    The output limit is ``max_output_tokens``; one output per request. A stream's usage
    arrives in its ``response.completed`` event without being asked for.
    """

    input: str | list[Any] = Field(description="The input: text, or a list of input items.")
    instructions: str | None = Field(default=None, description="System instructions.")
    max_output_tokens: int | None = Field(
        default=None, ge=1, description="Output token limit (reasoning included)."
    )
    limit_field: ClassVar[str] = "max_output_tokens"
    usage_in_stream_options: ClassVar[bool] = False

    def output_limit(self) -> int | None:
        """``max_output_tokens``."""
        return self.max_output_tokens

    def prompt_text(self) -> Any:
        """The instructions and the input."""
        return [self.instructions or "", self.input]

    def generations(self) -> int:
        """One output: the Responses API has no ``n``."""
        return 1


class EmbeddingRequest(BaseModel):
    """OpenAI embeddings request (fields the gateway reads; others pass through)."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1, description="Embedding model name.")
    input: str | list[str] | list[int] | list[list[int]] = Field(description="Text(s) to embed.")


@dataclass(frozen=True)
class Caller:
    """An authenticated caller."""

    key_id: str
    tenant: Tenant


@dataclass
class Admitted:
    """A request that passed authentication, routing and admission."""

    caller: Caller
    model: str
    backend: str
    reservation: Reservation | None
    prompt_estimate: int
    started: float = field(default_factory=time.monotonic)
    arrived: float = field(default_factory=time.time)
    record_id: str = field(default_factory=new_record_id)
    """The dedupe key of its usage record."""
    request_id: str = ""
    path: str = ""
    status: int = 0
    """The backend's HTTP status, once it answered (or the gateway's error for it)."""
    first_token: float | None = None
    cached_tokens: int = 0
    outcome: str | None = None
    """``error`` or ``cancelled`` when a response that started failed or was cut."""
    trace: RequestTrace | None = None
    """Its spans, with tracing on; settlement ends them."""
    trace_headers: dict[str, str] | None = None
    """With tracing off, the client's ``traceparent``/``tracestate``, forwarded unchanged."""


@dataclass(frozen=True)
class Operation:
    """An OpenAI endpoint the gateway relays: how it is counted, traced and sent upstream."""

    endpoint: str
    """Its ``endpoint`` label in the metrics."""
    path: str
    """The backend's path for it."""
    kind: type[BaseModel]
    """The request's model (the fields the gateway reads)."""
    span: str
    """The GenAI operation its trace names."""


CHAT = Operation("chat", "/v1/chat/completions", ChatRequest, "chat")
COMPLETIONS = Operation("completions", "/v1/completions", CompletionRequest, "text_completion")
RESPONSES = Operation("responses", "/v1/responses", ResponsesRequest, "chat")
EMBEDDINGS = Operation("embeddings", "/v1/embeddings", EmbeddingRequest, "embeddings")

Body = Callable[[], Awaitable[bytes | dict[str, Any]]]
"""How the core gets a request's body: the raw JSON (REST), or the JSON object an adapter
built from its own message (gRPC). Read after authentication; may raise `GatewayError` (a
body over the limit, a part the wire format cannot carry) or `errors.ClientGoneError`."""


@dataclass(frozen=True)
class Call:
    """A request as an adapter hands it to the core, whatever its wire format."""

    headers: Mapping[str, str]
    """Its headers or metadata: ``authorization``, ``traceparent``, ``tracestate``."""
    address: str
    """The client address the abuse limits count against."""
    request_id: str
    """Its request id (see `request_id_of`)."""


@dataclass
class Reply:
    """A backend's answer to relay: a whole body, or server-sent events as they come."""

    status: int
    payload: bytes = b""
    """The whole body (none for a stream)."""
    data: dict[str, Any] = field(default_factory=dict)
    """``payload`` as a JSON object ({} if not one)."""
    media_type: str = "application/json"
    events: AsyncGenerator[bytes, None] | None = None
    """A stream's whole SSE events; its end, failure or the client's going settles it."""


def request_id_of(headers: Mapping[str, str]) -> str:
    """The caller's request id (or a new one), bound into every log line of the request."""
    request_id = headers.get(REQUEST_ID_HEADER) or uuid.uuid4().hex
    structlog.contextvars.bind_contextvars(request_id=request_id)
    return request_id


def context_length(model: dict[str, Any]) -> int | None:
    """A model's context length from its /v1/models entry, where the backend reports it.

    vLLM writes ``max_model_len``; Ray Serve LLM writes ``metadata.max_request_context_length``
    (ray/llm/_internal/serve/core/configs/openai_api_models.py), null unless the engine's
    ``max_model_len`` is configured.
    """
    length = model.get("max_model_len")
    if length is None:
        metadata = model.get("metadata")
        length = metadata.get("max_request_context_length") if isinstance(metadata, dict) else None
    return length if isinstance(length, int) and length > 0 else None


def model_object(name: str, parent: str | None = None) -> dict[str, Any]:
    """The OpenAI model object the gateway shows for ``name``; a LoRA adapter's ``parent`` is
    its base model (as vLLM lists LoRA modules, vllm/entrypoints/openai/models/serving.py)."""
    entry: dict[str, Any] = {"id": name, "object": "model", "created": 0, "owned_by": "llmops"}
    if parent is not None:
        entry["parent"] = parent
    return entry


def json_object(payload: bytes) -> dict[str, Any]:
    """A body parsed as a JSON object; {} for an empty, malformed or non-object body."""
    try:
        data = json.loads(payload) if payload else {}
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def estimate_tokens(value: Any) -> int:
    """A generous token estimate of text (about 3 characters a token), for reservations.

    Over-estimating only holds tokens until `settle` swaps in the real count.
    """
    if isinstance(value, str):
        return len(value) // 3 + 1
    if isinstance(value, int):
        return 1
    if isinstance(value, list):
        return sum(estimate_tokens(item) for item in value) + 1
    if isinstance(value, dict):
        return sum(estimate_tokens(v) for v in value.values()) + 4
    return 0


def parse_body(raw: bytes, model_cls: type[BaseModel], limit: int) -> tuple[dict[str, Any], Any]:
    """Parses and checks a JSON body, as the graph's router does (`llmops_contract`).

    Returns:
        The JSON object and the validated model.

    Raises:
        GatewayError: 413 over ``limit`` bytes, 400 for malformed JSON or wrong types.
    """
    try:
        return parse_request_body(raw, model_cls, limit)
    except RequestBodyError as exc:
        if exc.status == 413:
            raise errors.too_large(exc.message) from exc
        raise errors.invalid(exc.message, param=exc.param) from exc


def validate_body(data: dict[str, Any], model_cls: type[BaseModel]) -> Any:
    """Checks a JSON object an adapter built, with the errors `parse_body` gives.

    Raises:
        GatewayError: 400 for a missing field or a wrong type.
    """
    try:
        return model_cls.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "body"
        raise errors.invalid(f"invalid {where}: {first['msg']}", param=where) from None


class GatewayCore:
    """Authentication, admission, routing and upstream calls, shared by REST and gRPC.

    Args:
        settings: Process settings.
        store: Where keys and tenants are read from (re-read every few seconds).
        admission: The limiter (Redis or memory).
        metrics: The process's metrics.
    """

    def __init__(
        self,
        settings: GatewaySettings,
        store: KeyStore,
        admission: Admission,
        metrics: GatewayMetrics,
    ) -> None:
        self.settings = settings
        self.store = store
        self.admission = admission
        self.metrics = metrics
        self.session: aiohttp.ClientSession | None = None
        self.tokens = TokenCounter(settings)
        self._keys_version = store.version()
        self._keys = KeyIndex(store.load())
        self._default_models: list[str] = []
        self._context_lengths: dict[str, int] = {}
        self._parents: dict[str, str] = {}
        """The default backend's adapters' ``parent`` as its model list gives it."""
        self._models_loaded = -math.inf
        self.draining = False
        self.cluster: ClusterBackends | None = None
        self.holds = Holds(
            settings,
            metrics,
            lambda model: self.cluster is not None and self.cluster.at_zero(model),
        )
        self._tasks: set[asyncio.Task[None]] = set()
        self.usage = build_recorder(settings, admission)
        self.tracing = Tracing.from_settings(settings)
        self.abuse = AbuseLimits(
            settings.client_rate_limit,
            settings.client_refused_key_limit,
            settings.trusted_proxies,
            admission.redis if isinstance(admission, RedisAdmission) else None,
        )

    def spawn(self, work: Coroutine[Any, Any, None]) -> None:
        """Runs background work (usage settlement) that must not be cancelled with a request."""
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def start(self) -> None:
        """Opens the upstream connection pool and starts the usage records' flush."""
        if self.usage is not None:
            self.usage.start()
        timeout = aiohttp.ClientTimeout(
            total=self.settings.request_timeout_s, sock_connect=self.settings.connect_timeout_s
        )
        self.session = aiohttp.ClientSession(
            timeout=timeout, connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=300)
        )
        if self.settings.discover_backends:
            access = KubeAccess.configure(self.settings.kube_api_url)
            self.cluster = ClusterBackends(access, self.settings.discover_namespaces)
            await self.cluster.start()

    @property
    def ready(self) -> bool:
        """Whether to take requests: not draining, and the cluster's models listed once."""
        return not self.draining and (self.cluster is None or self.cluster.synced.is_set())

    async def close(self) -> None:
        """Waits for pending settlements and closes the pool."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.usage is not None:
            await self.usage.close()  # after the settlements: their records flush too
        if self.cluster is not None:
            await self.cluster.close()
        await self.tokens.close()
        if self.session is not None:
            await self.session.close()
        if self.tracing is not None:
            await asyncio.to_thread(self.tracing.close)  # exports the spans still batched

    # -- authentication --------------------------------------------------------------------

    def _index(self) -> KeyIndex:
        """The key index, reloaded as soon as the store changes (new or revoked keys)."""
        version = self.store.version()
        if version != self._keys_version:
            try:
                self._keys = KeyIndex(self.store.load())
                self._keys_version = version
            except (OSError, ValueError) as exc:
                logger.warning("keeping the previous keys: cannot reload them: %s", exc)
        return self._keys

    def authenticate(self, authorization: str | None) -> Caller:
        """Checks an ``Authorization: Bearer <key>`` header value.

        Raises:
            GatewayError: 401 without a key, or with an invalid or revoked one.
        """
        try:
            return self._caller(authorization)
        except KeyRejectedError as exc:
            raise self._refused(exc) from None

    def _caller(self, authorization: str | None) -> Caller:
        """`authenticate`, raising `KeyRejectedError` for a key it refuses (not audited)."""
        if not authorization:
            raise errors.unauthenticated(
                "missing API key: send the header 'Authorization: Bearer <key>'"
            )
        scheme, _, key = authorization.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise errors.unauthenticated("the Authorization header must be 'Bearer <key>'")
        record, tenant = self._index().authenticate(key.strip())
        return Caller(record.id, tenant)

    @staticmethod
    def _refused(exc: KeyRejectedError) -> errors.GatewayError:
        """Audits a refused key (never the key: its public id, only for a stored key, its
        tenant and why) and returns the 401."""
        audit.warning("api key refused", key_id=exc.key_id, tenant=exc.tenant, reason=exc.reason)
        return errors.unauthenticated(str(exc))

    async def authenticate_client(
        self, authorization: str | None, address: str, trace: RequestTrace | None = None
    ) -> Caller:
        """`authenticate` behind the per-address abuse limits, counting refused keys.

        Raises:
            GatewayError: 429 when ``address`` is over a limit; else as `authenticate`.
        """
        count = self.abuse.begin(address)
        caller = await self._authenticate_counted(authorization, count, trace)
        await count.result()
        return caller

    async def _authenticate_counted(
        self, authorization: str | None, count: Count, trace: RequestTrace | None
    ) -> Caller:
        """`authenticate` for a request whose per-address count is under way: a refused key
        waits for the count (an address over its limit gets 429, and no audit line), then
        counts against its address's refused keys."""
        if trace is not None:
            with trace.step("auth"):
                return await self._authenticate_counted(authorization, count, None)
        refused: errors.GatewayError | KeyRejectedError
        try:
            return self._caller(authorization)
        except (errors.GatewayError, KeyRejectedError) as exc:
            refused = exc
        await count.result()
        await self.abuse.refused(count.address)
        if isinstance(refused, KeyRejectedError):
            raise self._refused(refused) from None
        raise refused

    # -- routing ---------------------------------------------------------------------------

    async def served_models(self) -> dict[str, str]:
        """Model name -> backend URL for every model the gateway can reach now.

        Explicit ``backends`` first, then models the cluster's LLMDeployments report ready,
        then the models the default backend lists.
        """
        table = dict(self.settings.backends)
        if self.cluster is not None:
            for name, backend in self.cluster.table.items():
                if backend.ready:
                    table.setdefault(name, backend.url)
        default = self.settings.default_backend
        if default is not None:
            if time.monotonic() - self._models_loaded > MODELS_TTL_S:
                self._default_models = await self._fetch_models(default)
                self._models_loaded = time.monotonic()
            for name in self._default_models:
                table.setdefault(name, default)
        return table

    async def _fetch_models(self, backend: str) -> list[str]:
        assert self.session is not None
        try:
            async with self.session.get(
                f"{backend}/v1/models", timeout=aiohttp.ClientTimeout(total=5)
            ) as response:
                payload = await response.json()
            items = payload.get("data", [])
            names = [str(item["id"]) for item in items]
        except (aiohttp.ClientError, TimeoutError, ValueError, KeyError, AttributeError) as exc:
            logger.warning("cannot list models of %s: %s", backend, exc)
            return self._default_models
        for item in items:
            length = context_length(item)
            if length is not None:
                self._context_lengths[str(item["id"])] = length
            if isinstance(item.get("parent"), str):
                self._parents[str(item["id"])] = item["parent"]
        return names

    def default_output(self, model: str) -> int:
        """Output tokens to reserve per generation for a request that sets no limit.

        The model's context length where the default backend's model list reports it (the
        engine then generates up to that, less the prompt); otherwise ``default_max_tokens``,
        which the gateway then also sets upstream so the reservation still bounds the output.
        """
        length = self._context_lengths.get(model)
        return max(1, length - 1) if length is not None else self.settings.default_max_tokens

    def knows_context(self, model: str) -> bool:
        """Whether the model's context length (and so its own output bound) is known."""
        return model in self._context_lengths

    async def models_for(self, caller: Caller) -> list[dict[str, Any]]:
        """The model objects of the models the caller's tenant may use; a LoRA adapter's has
        its base model as ``parent`` (from its LLMDeployment, else the default backend's list).
        """
        served = await self.served_models()
        parents = {**self._parents, **(self.cluster.parents if self.cluster else {})}
        return [model_object(n, parents.get(n)) for n in served if caller.tenant.may_use(n)]

    async def route(self, caller: Caller, model: str) -> str:
        """The backend for ``model``.

        Raises:
            GatewayError: 404 when nobody serves it or the tenant may not use it (as OpenAI
                does: a model the key may not use is not revealed to exist), 503 while a
                model the tenant may use is still loading.
        """
        table = await self.served_models()
        if model not in table or not caller.tenant.may_use(model):
            pending = self.cluster.table.get(model) if self.cluster is not None else None
            if pending is not None and model not in table and caller.tenant.may_use(model):
                raise errors.unavailable(
                    f"model {model!r} is not ready yet ({pending.state} in "
                    f"{pending.deployment}); retry shortly",
                    retry_after_s=NOT_READY_RETRY_S,
                )
            raise errors.model_not_found(model)
        return table[model]

    async def model_info(self, caller: Caller, model: str) -> dict[str, Any]:
        """The OpenAI model object of ``model``.

        Raises:
            GatewayError: 404 when the caller may not use it or nobody serves it.
        """
        for entry in await self.models_for(caller):
            if entry["id"] == model:
                return entry
        raise errors.model_not_found(model)

    # -- admission -------------------------------------------------------------------------

    async def admit_generation(
        self,
        caller: Caller,
        data: dict[str, Any],
        body: GenerationRequest,
        trace: RequestTrace | None = None,
    ) -> Admitted:
        """Routes and reserves a chat or text completion, bounding all it can generate.

        The reservation is the prompt estimate plus the output limit times ``n`` times the
        number of prompts. The limit is the larger of ``max_tokens`` and
        ``max_completion_tokens``, forwarded upstream as ``max_tokens`` alone, so what the
        engine honours is what was reserved. Without either, the model's context length
        bounds the output when known; otherwise ``default_max_tokens`` is set upstream.

        Args:
            caller: The authenticated caller.
            data: The JSON body, normalised in place for the upstream request.
            body: ``data`` validated.
            trace: The request's spans (tracing on), given to the admitted request.

        Raises:
            GatewayError: as `admit`.
        """
        limit = body.output_limit()
        if limit is not None:
            data.pop("max_completion_tokens", None)
            data[body.limit_field] = limit
        # Counted with the model's tokenizer where its backend serves it (`TokenCounter`).
        backend = (await self.served_models()).get(body.model)
        admitted = await self.admit(
            caller,
            body.model,
            await self.tokens.count(self.session, backend, body.model, data),
            limit,
            body.streaming,
            generations=body.generations(),
            trace=trace,
        )
        if limit is None and not self.knows_context(admitted.model):
            data[body.limit_field] = self.settings.default_max_tokens
        return admitted

    async def admit(
        self,
        caller: Caller,
        model: str,
        prompt_estimate: int,
        max_tokens: int | None,
        stream: bool,
        *,
        generations: int = 1,
        trace: RequestTrace | None = None,
    ) -> Admitted:
        """`_admit`, writing a usage record (status ``rejected``) for a refusal.

        Raises:
            GatewayError: as `_admit`.
        """
        arrived = time.time()
        try:
            if trace is None:
                admitted = await self._admit(
                    caller, model, prompt_estimate, max_tokens, stream, generations=generations
                )
            else:
                trace.model(model, max_tokens)
                with trace.step("admission"):
                    admitted = await self._admit(
                        caller, model, prompt_estimate, max_tokens, stream, generations=generations
                    )
                admitted.trace = trace
        except errors.GatewayError as error:
            if self.usage is not None:
                record = UsageRecord(
                    id=new_record_id(),
                    request_id=current_request_id(),
                    time=timestamp(arrived),
                    tenant=caller.tenant.name,
                    key_id=caller.key_id,
                    model=model,
                    endpoint="",
                    backend="",
                    status="rejected",
                    code=error.status,
                    prompt_tokens=0,
                    completion_tokens=0,
                    cached_tokens=0,
                    latency_s=round(time.time() - arrived, 4),
                    ttft_s=None,
                    trace_id="" if trace is None else trace.trace_id,
                )
                self.spawn(self.usage.write(record))
            raise
        admitted.arrived, admitted.request_id = arrived, current_request_id()
        return admitted

    async def _admit(
        self,
        caller: Caller,
        model: str,
        prompt_estimate: int,
        max_tokens: int | None,
        stream: bool,
        *,
        generations: int = 1,
    ) -> Admitted:
        """Routes and reserves a request: ``prompt_estimate + generations * max_tokens``.

        ``max_tokens`` None reserves `default_output` for the model.

        Raises:
            GatewayError: 403/404 from routing, 429 over a limit, 503 when draining or when
                Redis is down in fail-closed mode.
        """
        if self.draining:
            raise errors.unavailable("the gateway is shutting down; retry", retry_after_s=1.0)
        backend = await self.route(caller, model)
        tenant = caller.tenant
        output = self.default_output(model) if max_tokens is None else max_tokens
        try:
            verdict = await self.admission.admit(
                tenant, prompt_estimate + generations * output, stream=stream
            )
        except Exception as exc:  # the limiter's store is down: apply the configured mode
            mode = self.settings.redis_failure_mode
            self.metrics.redis_errors.labels(mode=mode).inc()
            logger.error("admission store unreachable (%s), failing %s", type(exc).__name__, mode)
            if mode == "closed":
                raise errors.unavailable(
                    "rate limiter unavailable; retry shortly", retry_after_s=1.0
                ) from None
            return Admitted(caller, model, backend, None, prompt_estimate)
        if isinstance(verdict, Rejection):
            self.metrics.rejections.labels(tenant=tenant.name, reason=verdict.reason).inc()
            if verdict.reason == "request_too_large":
                raise errors.invalid(verdict.message, param="max_tokens")
            if verdict.reason == "tokens_per_day":
                raise errors.insufficient_quota(verdict.message, verdict.retry_after_s)
            raise errors.rate_limited(verdict.message, verdict.reason, verdict.retry_after_s)
        return Admitted(caller, model, backend, verdict, prompt_estimate)

    async def settle(self, admitted: Admitted, prompt_tokens: int, completion_tokens: int) -> None:
        """Records real usage; never raises (usage must not break a finished response)."""
        trace = admitted.trace
        if trace is None:
            await self._settle(admitted, prompt_tokens, completion_tokens)
            return
        trace.end_relay(admitted.status)
        with trace.step("settlement"):
            await self._settle(admitted, prompt_tokens, completion_tokens)
        first = admitted.first_token
        usage = {
            "input_tokens": prompt_tokens,
            "output_tokens": completion_tokens,
            "ttft_s": None if first is None else round(first - admitted.started, 4),
        }
        trace.end(admitted.status, usage)

    async def _settle(self, admitted: Admitted, prompt_tokens: int, completion_tokens: int) -> None:
        tenant, model = admitted.caller.tenant.name, admitted.model
        settled_log.info(
            "request settled",
            tenant=tenant,
            key_id=admitted.caller.key_id,
            model=model,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            duration_s=round(time.monotonic() - admitted.started, 4),
        )
        self.metrics.count_tokens(tenant, model, prompt_tokens, completion_tokens)
        latency = round(time.monotonic() - admitted.started, 4)
        gpu = self.settings.gpu_models.get(model)
        charged = 0.0 if gpu is None else gpu_seconds(latency, gpu.gpus, gpu.slots)
        if charged:
            self.metrics.gpu_seconds.labels(tenant=tenant, model=model).inc(charged)
        writes = []
        if self.usage is not None:
            record = self.usage_record(admitted, prompt_tokens, completion_tokens, latency)
            writes.append(self.usage.write(record))  # never raises: queues what fails
        if admitted.reservation is None:
            await asyncio.gather(*writes)
            return
        # Sent together, so on Redis the record pipelines with the settlement: one round trip.
        settled, *_ = await asyncio.gather(
            self.admission.settle(admitted.reservation, prompt_tokens + completion_tokens),
            *writes,
            return_exceptions=True,
        )
        if isinstance(settled, Exception):  # the reservation expires with its window anyway
            self.metrics.redis_errors.labels(mode=self.settings.redis_failure_mode).inc()
            logger.error("could not settle usage (%s)", type(settled).__name__)

    def usage_record(
        self,
        admitted: Admitted,
        prompt_tokens: int,
        completion_tokens: int,
        latency: float | None = None,
    ) -> UsageRecord:
        """The usage record of an admitted request that ended now (``latency`` ago it
        arrived; default: measured now)."""
        first = admitted.first_token
        if latency is None:
            latency = round(time.monotonic() - admitted.started, 4)
        gpu = self.settings.gpu_models.get(admitted.model)
        return UsageRecord(
            id=admitted.record_id,
            request_id=admitted.request_id,
            time=timestamp(admitted.arrived),
            tenant=admitted.caller.tenant.name,
            key_id=admitted.caller.key_id,
            model=admitted.model,
            endpoint=admitted.path,
            backend=admitted.backend,
            status=admitted.outcome or ("ok" if admitted.status == 200 else "error"),
            code=admitted.status,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            cached_tokens=admitted.cached_tokens,
            latency_s=latency,
            ttft_s=None if first is None else round(first - admitted.started, 4),
            gpu_seconds=0.0 if gpu is None else gpu_seconds(latency, gpu.gpus, gpu.slots),
            trace_id=self._trace_id(admitted),
        )

    @staticmethod
    def _trace_id(admitted: Admitted) -> str:
        """The trace id of a request: its spans', or with tracing off, its caller's if sent."""
        if admitted.trace is not None:
            return admitted.trace.trace_id
        if admitted.trace_headers is not None:
            return trace_id_of(admitted.trace_headers.get(TRACEPARENT)) or ""
        return ""

    def _failed(self, admitted: Admitted, error: errors.GatewayError) -> errors.GatewayError:
        """Settles a request the backend never answered (no tokens), returning ``error``."""
        admitted.status = error.status
        self.spawn(self.settle(admitted, 0, 0))
        return error

    # -- upstream --------------------------------------------------------------------------

    async def post(
        self, admitted: Admitted, path: str, body: dict[str, Any], request_id: str
    ) -> aiohttp.ClientResponse:
        """Sends a request to the backend, retrying where nothing can have been answered.

        A backend that refused or dropped the connection before its response head, or that
        answered 503 (an engine restarting, Serve with no replica or under backpressure), is
        asked once more after a short pause: no byte reached the client, and the request's
        one reservation stays (charged once, whatever the attempts). A second failure is the
        client's 503 with Retry-After, which the ``openai`` SDKs retry by themselves.

        A model with no serving replica (the router's scaled-to-zero 503, or discovery's
        ``readyReplicas: 0``) holds the request until it serves or the hold deadline passes
        (`llmops_gateway.hold`); a request that expires or is cancelled while held is
        released and charged nothing.

        Raises:
            GatewayError: 503 when the backend cannot be reached or is unavailable, or the
                model did not serve within its hold deadline; 504 on timeout.
        """
        assert self.session is not None
        url = f"{admitted.backend}{path}"
        headers = {REQUEST_ID_HEADER: request_id}
        if admitted.trace is not None:
            headers.update(admitted.trace.start_relay(url))
        elif admitted.trace_headers is not None:
            headers.update(admitted.trace_headers)
        admitted.request_id, admitted.path = request_id, path
        hold: Hold | None = self.holds.join(admitted.model)
        attempt = 1
        try:
            while True:
                if hold is not None:
                    await hold.turn()
                try:
                    response = await self.session.post(url, json=body, headers=headers)
                except TimeoutError:  # before ClientConnectionError: a read timeout is both
                    raise self._failed(
                        admitted,
                        errors.timed_out(
                            f"backend for {admitted.model!r} did not answer in "
                            f"{self.settings.request_timeout_s:.0f} s"
                        ),
                    ) from None
                except aiohttp.ClientConnectionError as exc:  # refused, reset, dropped
                    if hold is not None:  # still starting: the hold's deadline decides
                        hold.cold()
                        continue
                    if attempt == 2:
                        reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
                        raise self._failed(
                            admitted,
                            errors.unavailable(
                                f"backend for {admitted.model!r} is unreachable: {reason}",
                                retry_after_s=UNAVAILABLE_RETRY_S,
                            ),
                        ) from None
                    attempt += 1
                    await asyncio.sleep(UPSTREAM_RETRY_PAUSE_S)
                    continue
                if response.status != 503:
                    if hold is not None:
                        hold.served()
                    admitted.status = response.status
                    return response
                async with response:
                    try:
                        payload = await response.read()
                    except (aiohttp.ClientError, TimeoutError):
                        payload = b""
                data = json_object(payload)
                if scaled_to_zero(data) and self.holds.enabled(admitted.model):
                    if hold is None:
                        hold = self.holds.hold(admitted.model)
                    hold.cold()
                    continue
                if hold is not None:
                    hold.served()
                if attempt == 2:
                    raise self._failed(
                        admitted,
                        errors.upstream_unavailable(
                            payload, data, response.headers.get("Retry-After")
                        ),
                    )
                attempt += 1
                await asyncio.sleep(UPSTREAM_RETRY_PAUSE_S)
        except HoldExpiredError:
            assert hold is not None
            raise self._failed(
                admitted, cold_start_timeout(admitted.model, hold.waited_s)
            ) from None
        except asyncio.CancelledError:
            if hold is not None and hold.outcome is None:  # the client left while held
                admitted.outcome = "cancelled"
                self.spawn(self.settle(admitted, 0, 0))
            raise
        finally:
            if hold is not None:
                hold.close(EXPIRED if hold.outcome is None and admitted.status else None)

    async def call(
        self, admitted: Admitted, path: str, body: dict[str, Any], request_id: str
    ) -> tuple[int, bytes, dict[str, Any]]:
        """Sends a non-streaming request and settles its usage.

        Returns:
            The backend's status, its raw body, and the body as a JSON object ({} if not one).
        """
        try:
            response = await self.post(admitted, path, body, request_id)
            async with response:
                payload = await response.read()
                status = response.status
        except asyncio.CancelledError:  # the client went away (gRPC cancels the handler)
            if admitted.outcome is None:  # else `post` released it: cancelled while held
                admitted.outcome = "cancelled"
                self.spawn(self.settle(admitted, admitted.prompt_estimate, 0))
            raise
        admitted.first_token = time.monotonic()
        data = json_object(payload)
        # Failed requests generated nothing; a success without usage is charged the estimate.
        usage = _openai_usage(data.get("usage")) if status == 200 else {}
        details = usage.get("prompt_tokens_details")
        if isinstance(details, dict):
            admitted.cached_tokens = int(details.get("cached_tokens") or 0)
        prompt = int(usage.get("prompt_tokens", admitted.prompt_estimate if status == 200 else 0))
        # Off the response path: until it lands, the reservation (an upper bound) still holds.
        self.spawn(self.settle(admitted, prompt, int(usage.get("completion_tokens", 0))))
        return status, payload, data

    # -- the pipeline: one call per request, REST and gRPC alike -------------------------

    async def generate(self, operation: Operation, call: Call, body: Body) -> Reply:
        """Serves one request: authenticate, parse, estimate, admit, relay, settle.

        The request is counted in the metrics and its trace ended here, once, however it
        ends; settlement runs when the backend answered, failed, or the client went away.

        Args:
            operation: The endpoint.
            call: Who asks, and how to reach them.
            body: How to read its body (after authentication).

        Returns:
            The backend's success: its body, or its stream of events.

        Raises:
            GatewayError: every refusal and failure, as the client should see it; a bug is
                logged with its traceback and becomes a 500.
            ClientGoneError: the client went away before its body was read.
        """
        started = time.monotonic()
        trace = self._start_trace(call.headers, operation.span)
        admitted: Admitted | None = None
        tenant, model = "unknown", "unknown"
        self.metrics.in_flight.inc()
        try:
            # The per-address count is sent first and awaited last before admission, so its
            # round trip overlaps authentication and parsing; its 429 wins over their errors.
            count = self.abuse.begin(call.address)
            try:
                caller = await self._authenticate_counted(
                    call.headers.get("authorization"), count, trace
                )
                tenant = caller.tenant.name
                raw = await body()
                if isinstance(raw, bytes):
                    data, request = parse_body(raw, operation.kind, self.settings.max_body_bytes)
                else:
                    data, request = raw, validate_body(raw, operation.kind)
            except errors.GatewayError:
                await count.result()
                raise
            except BaseException:
                count.abandon()
                raise
            await count.result()
            if isinstance(request, GenerationRequest):
                admitted = await self.admit_generation(caller, data, request, trace)
            else:
                estimate = estimate_tokens(request.input)
                admitted = await self.admit(caller, request.model, estimate, 0, False, trace=trace)
            model = admitted.model
            if trace is None:
                _pass_trace(call.headers, admitted)
            if isinstance(request, GenerationRequest) and request.streaming:
                reply = await self._stream(admitted, operation.path, data, call.request_id, request)
            else:
                reply = await self._unary(admitted, operation.path, data, call.request_id)
        except errors.GatewayError as error:
            self.metrics.record(operation.endpoint, model, tenant, error.status, started)
            if trace is not None and admitted is None:  # settlement ends an admitted one's
                trace.end(error.status)
            raise
        except errors.ClientGoneError:
            if trace is not None and admitted is None:
                trace.end(0)
            raise
        except Exception:
            logger.exception("unhandled error")
            self.metrics.record(operation.endpoint, model, tenant, 500, started)
            if trace is not None and admitted is None:
                trace.end(500)
            raise errors.internal() from None
        finally:
            self.metrics.in_flight.dec()
        # A stream is counted when it starts: its latency is the time to the response head.
        self.metrics.record(operation.endpoint, model, tenant, reply.status, admitted.started)
        return reply

    async def list_models(self, call: Call) -> list[dict[str, Any]]:
        """The model objects of the models the caller's key may use (`models_for`).

        Raises:
            GatewayError: 401 or 429 as `authenticate_client`.
        """
        caller = await self.authenticate_client(call.headers.get("authorization"), call.address)
        return await self.models_for(caller)

    async def retrieve_model(self, call: Call, model: str) -> dict[str, Any]:
        """The OpenAI model object of ``model``, for a caller that may use it.

        Raises:
            GatewayError: 401 or 429 as `authenticate_client`; 404 as `model_info`.
        """
        caller = await self.authenticate_client(call.headers.get("authorization"), call.address)
        return await self.model_info(caller, model)

    def _start_trace(self, headers: Mapping[str, str], operation: str) -> RequestTrace | None:
        """The request's spans with tracing on (their trace id bound into its log lines); with
        it off, None, and the trace id of a ``traceparent`` the client sent is logged."""
        if self.tracing is None:
            trace_id = trace_id_of(headers.get(TRACEPARENT))
            if trace_id is not None:
                structlog.contextvars.bind_contextvars(trace_id=trace_id)
            return None
        trace = self.tracing.start(headers, operation)
        structlog.contextvars.bind_contextvars(trace_id=trace.trace_id)
        return trace

    async def _unary(
        self, admitted: Admitted, path: str, data: dict[str, Any], request_id: str
    ) -> Reply:
        status, payload, body = await self.call(admitted, path, data, request_id)
        if status != 200:
            raise errors.upstream(status, payload, body)
        return Reply(status, payload, body)

    async def _stream(
        self,
        admitted: Admitted,
        path: str,
        data: dict[str, Any],
        request_id: str,
        request: GenerationRequest,
    ) -> Reply:
        wants_usage = True  # the Responses API streams its usage in response.completed
        if request.usage_in_stream_options:
            options = data.get("stream_options") or {}
            wants_usage = bool(options.get("include_usage"))
            data["stream_options"] = {**options, "include_usage": True}  # to settle it
        response = await self.post(admitted, path, data, request_id)
        if response.status != 200 or not response.content_type.startswith("text/event-stream"):
            async with response:
                payload = await response.read()
            await self.settle(admitted, 0, 0)
            if response.status != 200:
                raise errors.upstream(response.status, payload, json_object(payload))
            return Reply(response.status, payload, media_type=response.content_type)
        events = relay_sse(self, admitted, response, wants_usage, request_id)
        return Reply(200, media_type="text/event-stream", events=events)


def _pass_trace(headers: Mapping[str, str], admitted: Admitted) -> None:
    """With tracing off, forwards the client's trace context unchanged (if it sent one)."""
    traceparent = headers.get(TRACEPARENT)
    if traceparent is not None:
        admitted.trace_headers = {TRACEPARENT: traceparent}
        tracestate = headers.get(TRACESTATE)
        if tracestate is not None:
            admitted.trace_headers[TRACESTATE] = tracestate


USAGE_KEY = b'"usage"'
ERROR_EVENT = b'data: {"error"'
RESPONSE_FAILED = b"event: response.failed"
SPACED = b', "'
"""A separator only spaced JSON has (``json.dumps`` defaults): inside a JSON string a quote is
escaped, so these bytes cannot come from generated text."""
COMPACT_MARKS = (
    (
        *(b'"content":"', b'"text":"', b'"reasoning":"', b'"reasoning_content":"'),
        b'"function":{',
        b'"type":"response.output_text.delta"',
        b'"type":"response.reasoning_text.delta"',
        b'"type":"response.function_call_arguments.delta"',
    ),
    (b'"content":""', b'"text":""', b'"reasoning":""', b'"reasoning_content":""'),
)
SPACED_MARKS = (
    (
        *(b'"content": "', b'"text": "', b'"reasoning": "', b'"reasoning_content": "'),
        b'"function": {',
        b'"type": "response.output_text.delta"',
        b'"type": "response.reasoning_text.delta"',
        b'"type": "response.function_call_arguments.delta"',
    ),
    (b'"content": ""', b'"text": ""', b'"reasoning": ""', b'"reasoning_content": ""'),
)
"""Marks of a chunk with generated tokens: chat and completion text, reasoning (vLLM's
``reasoning``, older servers' ``reasoning_content``), each tool-call delta (one ``function``
object: the name, then argument pieces), and the Responses API's text, reasoning and argument
deltas (its closing events repeat the whole text once more: a stream cut before its usage is
charged a few chunks extra, never fewer)."""


def _openai_usage(usage: Any) -> dict[str, Any]:
    """A usage object with the chat names: the Responses API's input/output names mapped."""
    if not isinstance(usage, dict):
        return {}
    if "input_tokens" in usage and "prompt_tokens" not in usage:
        return {
            "prompt_tokens": usage.get("input_tokens", 0),
            "completion_tokens": usage.get("output_tokens", 0),
            "prompt_tokens_details": usage.get("input_tokens_details"),
        }
    return usage


def content_chunks(events: bytes, spaced: bool = False) -> int:
    """How many chunks in ``events`` carry generated text.

    The first chat chunk carries only the role (``"content":""``): it is no token, so it is
    neither charged nor taken as the first token.

    Args:
        events: Whole SSE events.
        spaced: The backend writes JSON with spaces after separators (vLLM writes it compact).
    """
    marks, empty = SPACED_MARKS if spaced else COMPACT_MARKS
    return sum(events.count(mark) for mark in marks) - sum(events.count(mark) for mark in empty)


def _split_complete(buffer: bytes) -> int:
    """Where the last complete SSE event in ``buffer`` ends (0: none yet)."""
    lf, crlf = buffer.rfind(b"\n\n"), buffer.rfind(b"\r\n\r\n")
    return max(lf + 2 if lf >= 0 else 0, crlf + 4 if crlf >= 0 else 0)


def _usage_chunk(event: bytes) -> dict[str, Any] | None:
    """The chunk of one SSE line when it carries a usage object (any JSON spacing)."""
    if not event.startswith(b"data:") or USAGE_KEY not in event:
        return None
    try:
        chunk = json.loads(event[5:])
    except ValueError:
        return None
    if isinstance(chunk, dict) and isinstance(chunk.get("usage"), dict):
        return chunk
    if isinstance(chunk, dict) and isinstance(chunk.get("response"), dict):
        # The Responses API: usage comes in response.completed (or .incomplete, .failed).
        usage = chunk["response"].get("usage")
        if isinstance(usage, dict):
            return {"usage": usage}
    return None


async def relay_sse(
    core: GatewayCore,
    admitted: Admitted,
    response: aiohttp.ClientResponse,
    client_wants_usage: bool,
    request_id: str = "",
) -> AsyncGenerator[bytes, None]:
    """Relays an upstream SSE stream as it arrives, settling usage however it ends.

    Yields whole events, as many as each read from upstream completed (never waiting for
    more), so a fast stream costs one write per read rather than one per line. Usage comes
    from the final usage chunk (always requested upstream), found and parsed whatever the
    backend's JSON spacing; when the client did not ask for it, that chunk is dropped. A
    client that disconnects is charged for the content chunks relayed so far; a stream that
    fails upstream ends with an error event.
    """
    prompt_tokens, completion_tokens, counted = admitted.prompt_estimate, 0, 0
    usage_seen = finished = False
    spaced: bool | None = None
    buffer = b""
    core.metrics.streams.inc()
    try:
        async for data in response.content.iter_any():
            buffer += data
            end = _split_complete(buffer)
            if not end:
                continue
            events, buffer = buffer[:end], buffer[end:]
            if spaced is None and (start := events.find(b"data:")) >= 0:
                # The first data line shows the backend's style (a later error event may
                # differ: vLLM writes its chunks compact, its error events with json.dumps;
                # Responses API events open with an `event:` line).
                spaced = SPACED in events[start : events.find(b"\n", start)]
            if USAGE_KEY in events:
                kept, dropped = [], False
                for event in events.splitlines(keepends=True):
                    if dropped and not event.strip():
                        dropped = False  # the blank line that ended the dropped event
                        continue
                    chunk = _usage_chunk(event)
                    if chunk is not None:
                        usage = _openai_usage(chunk["usage"])
                        prompt_tokens = int(usage.get("prompt_tokens", prompt_tokens))
                        completion_tokens = int(usage.get("completion_tokens", counted))
                        details = usage.get("prompt_tokens_details")
                        if isinstance(details, dict):
                            admitted.cached_tokens = int(details.get("cached_tokens") or 0)
                        usage_seen = True
                        dropped = not client_wants_usage and chunk.get("choices") == []
                        if dropped:
                            continue
                    kept.append(event)
                events = b"".join(kept)
            contents = content_chunks(events, bool(spaced))
            if contents and not counted:
                admitted.first_token = time.monotonic()
                core.metrics.ttft.labels(model=admitted.model).observe(
                    admitted.first_token - admitted.started
                )
            counted += contents
            if ERROR_EVENT in events or RESPONSE_FAILED in events:  # the engine failed mid-stream
                admitted.outcome = "error"
            if events.strip():
                yield events
        if buffer:
            yield buffer
        finished = True
    except (aiohttp.ClientError, TimeoutError) as exc:
        admitted.outcome = "error"
        failure = errors.GatewayError(
            f"the stream failed upstream: {type(exc).__name__}",
            status=502,
            grpc_code="UNAVAILABLE",
            type="server_error",
        )
        yield f"data: {json.dumps(failure.body(request_id))}\n\ndata: [DONE]\n\n".encode()
    finally:
        core.metrics.streams.dec()
        response.close()
        if not finished and admitted.outcome is None:
            admitted.outcome = "cancelled"
        # A disconnect cancels this generator: settle in a task the cancellation cannot cut.
        core.spawn(
            core.settle(admitted, prompt_tokens, completion_tokens if usage_seen else counted)
        )
