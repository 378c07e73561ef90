"""LoRA adapters: the graph config, the replica's loader and the router's names.

Reproduces Ray Serve LLM's multiplexing contract (ray/llm/_internal/serve/core/server/
llm_server.py: ``_init_multiplex_loader`` builds the loader from ``model_downloader`` and awaits
``load_model_from_config(lora_model_id, llm_config)``; ``lora_config`` turns multiplexing on)
and vLLM's listing of LoRA modules with their base model as ``parent``
(vllm/entrypoints/openai/models/serving.py).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError
from starlette.requests import Request

from llmops_contract.sources import ModelSourceError
from llmops_services import GraphConfig, LLMSpec
from llmops_services.llm import (
    ADAPTER_FOLDERS_PER_REPLICA,
    AdapterLoader,
    llm_config_for,
    resolve_adapter,
)
from llmops_services.router import Router

BASE = "embedded://smollm2-135m-instruct"


def _adapter_folder(tmp_path: Path, name: str = "geo") -> Path:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    return folder


def _graph(adapters: list[dict[str, Any]], **engine: Any) -> dict[str, Any]:
    return {
        "llms": [
            {"name": "base", "source": BASE, "adapters": adapters, "engine": engine},
            {"name": "other", "source": BASE},
        ],
        "encoder": None,
    }


def test_adapter_names_are_unique_across_models_and_adapters(tmp_path: Path) -> None:
    folder = str(_adapter_folder(tmp_path))
    GraphConfig.model_validate(_graph([{"name": "geo", "source": folder}]))
    with pytest.raises(ValidationError, match="repeated: other"):
        GraphConfig.model_validate(_graph([{"name": "other", "source": folder}]))
    twice = [{"name": "geo", "source": folder}, {"name": "geo", "source": folder}]
    with pytest.raises(ValidationError, match="repeated: geo"):
        GraphConfig.model_validate(_graph(twice))
    with pytest.raises(ValidationError, match="pattern"):
        GraphConfig.model_validate(_graph([{"name": "base:geo", "source": folder}]))


def test_adapter_sources_and_lora_engine_args_are_checked(tmp_path: Path) -> None:
    folder = str(_adapter_folder(tmp_path))
    with pytest.raises(ValidationError, match=r"hf://, s3:// or a folder, not embedded://"):
        GraphConfig.model_validate(
            _graph([{"name": "geo", "source": "embedded://smollm2-135m-instruct"}])
        )
    GraphConfig.model_validate(_graph([{"name": "geo", "source": "s3://bucket/geo"}]))
    with pytest.raises(ValidationError, match="max_loras need adapters or lora"):
        GraphConfig.model_validate(_graph([], extra_args={"max_loras": 2}))
    with pytest.raises(ValidationError, match="'enable_lora' is set by adapters"):
        GraphConfig.model_validate(
            _graph([{"name": "geo", "source": folder}], extra_args={"enable_lora": True})
        )
    with pytest.raises(ValidationError, match="max_lora_rank"):  # vLLM's choices
        GraphConfig.model_validate(
            _graph([{"name": "geo", "source": folder}], extra_args={"max_lora_rank": 7})
        )


def test_a_model_without_adapters_dumps_as_before() -> None:
    # A serveConfigV2 whose args change redeploys every replica of the graph.
    spec = LLMSpec.model_validate({"name": "base", "source": BASE})
    assert "adapters" not in spec.model_dump()
    assert "enable_lora" not in llm_config_for(spec).engine_kwargs
    assert llm_config_for(spec).lora_config is None


def test_adapters_turn_on_lora_in_the_engine_and_serve_multiplexing(tmp_path: Path) -> None:
    folder = str(_adapter_folder(tmp_path))
    spec = LLMSpec.model_validate(
        {
            "name": "base",
            "source": BASE,
            "adapters": [{"name": "geo", "source": folder}, {"name": "law", "source": folder}],
            "engine": {"extra_args": {"max_loras": 1, "max_lora_rank": 8}},
        }
    )
    config = llm_config_for(spec)
    assert config.engine_kwargs["enable_lora"] is True
    assert config.engine_kwargs["max_loras"] == 1
    assert config.engine_kwargs["max_lora_rank"] == 8
    # Fixed at start: adapters added later through user_config fit it too.
    assert config.multiplex_config().max_num_models_per_replica == ADAPTER_FOLDERS_PER_REPLICA
    assert spec.model_dump()["adapters"][0] == {"name": "geo", "source": folder}


def test_lora_turns_lora_on_before_any_adapter() -> None:
    spec = LLMSpec.model_validate(
        {"name": "base", "source": BASE, "lora": True, "engine": {"extra_args": {"max_loras": 2}}}
    )
    config = llm_config_for(spec)
    assert config.engine_kwargs["enable_lora"] is True
    assert config.lora_config is not None
    assert spec.model_dump()["lora"] is True


def test_resolve_adapter_needs_a_peft_folder(tmp_path: Path) -> None:
    folder = _adapter_folder(tmp_path)
    assert resolve_adapter(str(folder)) == folder.resolve()
    assert resolve_adapter(f"file://{folder}") == folder.resolve()
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    with pytest.raises(ModelSourceError, match=r"no adapter_config\.json"):
        resolve_adapter(str(tmp_path / "model"))


async def test_the_adapter_loader_answers_ray_serve_llms_call(tmp_path: Path) -> None:
    folder = _adapter_folder(tmp_path)
    # Built as LLMServer._init_multiplex_loader builds it, with the llm_config it passes.
    loader = AdapterLoader({"geo": str(folder)}, None, download_timeout_s=30.0, max_tries=3)
    first = await loader.load_model_from_config(lora_model_id="geo", llm_config=None)
    second = await loader.load_model_from_config(lora_model_id="geo", llm_config=None)
    assert first.model_id == "geo"
    assert first.local_path == str(folder.resolve())
    assert first.lora_assigned_int_id != second.lora_assigned_int_id
    with pytest.raises(ValueError, match="'law' is not an adapter"):
        await loader.load_model_from_config(lora_model_id="law", llm_config=None)


class _Call:
    def __init__(self, answer: Any) -> None:
        self._answer = answer

    def __aiter__(self) -> _Call:
        return self

    async def __anext__(self) -> Any:
        if self._answer is None:
            raise StopAsyncIteration
        answer, self._answer = self._answer, None
        return answer


class _Method:
    def __init__(self, handle: _Handle, name: str) -> None:
        self._handle, self._name = handle, name

    def remote(self, body: Any) -> _Call:
        self._handle.calls.append((self._name, self._handle.opts, body))
        from ray.serve.llm.openai_api_models import ChatCompletionResponse

        return _Call(
            ChatCompletionResponse.model_validate(
                {
                    "id": "x",
                    "created": 0,
                    "model": body.model,
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": "hi"},
                            "finish_reason": "stop",
                        }
                    ],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
                }
            )
        )


class _Handle:
    """A Serve deployment handle: ``options`` and ``<method>.remote``, calls recorded."""

    def __init__(self, calls: list[Any], opts: dict[str, Any] | None = None) -> None:
        self.calls, self.opts = calls, opts or {}

    def options(self, **opts: Any) -> _Handle:
        return _Handle(self.calls, {**self.opts, **opts})

    def __getattr__(self, name: str) -> _Method:
        return _Method(self, name)


class _NoReplicaStates:
    async def get(self, model: str) -> None:
        return None


def _request(body: dict[str, Any]) -> Request:
    payload = json.dumps(body).encode()

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": payload, "more_body": False}

    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": []}
    return Request(scope, receive)


@pytest.fixture
async def router(tmp_path: Path) -> tuple[Router, list[Any]]:
    folder = str(_adapter_folder(tmp_path))
    config = GraphConfig.model_validate(_graph([{"name": "geo", "source": folder}]))
    calls: list[Any] = []
    handles = {"base": _Handle(calls), "other": _Handle(calls)}
    instance = Router.__new__(Router)
    # Serve's ingress wrapper makes the constructor a coroutine, as Serve awaits it.
    await Router.__init__(instance, config.model_dump(mode="json"), handles)
    instance.replicas = _NoReplicaStates()  # type: ignore[assignment]
    return instance, calls


async def test_the_router_lists_an_adapter_with_its_base_as_parent(
    router: tuple[Router, list[Any]],
) -> None:
    instance, _ = router
    listed = {entry["id"]: entry for entry in (await instance.models())["data"]}
    assert listed["geo"]["parent"] == "base"
    assert "parent" not in listed["base"]
    assert (await instance.resolve_model("geo", "")).model == "base"


async def test_an_adapter_request_goes_to_its_base_with_the_adapter_multiplexed(
    router: tuple[Router, list[Any]],
) -> None:
    instance, calls = router
    messages = [{"role": "user", "content": "hello"}]
    answer = await instance.chat_completions(_request({"model": "geo", "messages": messages}))
    assert answer.status_code == 200
    answer = await instance.chat_completions(_request({"model": "base", "messages": messages}))
    assert answer.status_code == 200
    (_, adapter_opts, adapter_body), (_, base_opts, base_body) = calls
    assert adapter_opts.get("multiplexed_model_id") == "geo"
    assert adapter_body.model == "geo"  # vLLM picks the LoRA by the request's model
    assert "multiplexed_model_id" not in base_opts
    assert base_body.model == "base"
    missing = await instance.chat_completions(_request({"model": "law", "messages": messages}))
    assert missing.status_code == 404


class _EngineClient:
    """What vLLM's OpenAIServingModels needs of the engine: loading an adapter takes a while."""

    model_config = renderer = input_processor = None

    def __init__(self) -> None:
        self.loaded: list[str] = []

    async def add_lora(self, request: Any) -> bool:
        await asyncio.sleep(0.05)
        self.loaded.append(request.lora_name)
        return True


def _replica(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, folder_name: str
) -> tuple[Any, _EngineClient]:
    """An LLMDeployment whose engine is Ray's VLLMEngine over vLLM's own serving models,
    with a fake engine client beneath; the request names adapter ``geo``."""
    from ray import serve
    from ray.llm._internal.serve.engines.vllm.vllm_engine import VLLMEngine
    from vllm.entrypoints.openai.models.protocol import BaseModelPath
    from vllm.entrypoints.openai.models.serving import OpenAIServingModels

    from llmops_services.llm import LLMDeployment

    folder = str(_adapter_folder(tmp_path, folder_name))
    spec = LLMSpec.model_validate(
        {"name": "base", "source": BASE, "adapters": [{"name": "geo", "source": folder}]}
    )
    client = _EngineClient()
    engine = VLLMEngine.__new__(VLLMEngine)
    engine._oai_models = OpenAIServingModels(client, [BaseModelPath("base", "/models/base")])
    server: Any = LLMDeployment.__new__(LLMDeployment)  # no engine start: only LoRA resolution
    server._llm_config = llm_config_for(spec)
    server.engine = engine
    server._lora_lock = asyncio.Lock()
    server._adapters = {"geo": folder}
    server.spec = spec
    loader = AdapterLoader(server._adapters)
    server._load_model = lambda name: loader.load_model_from_config(name, None)
    monkeypatch.setattr(serve, "get_multiplexed_model_id", lambda: "geo")
    return server, client


async def test_two_first_requests_for_an_adapter_load_it_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ray.serve.llm import LLMServer

    server, client = _replica(tmp_path, monkeypatch, "first")
    # Ray Serve LLM's own method: VLLMEngine.resolve_lora checks the name, then vLLM's
    # load_lora_adapter refuses the second load of the same name.
    racing = LLMServer._maybe_resolve_lora_from_multiplex
    results = await asyncio.gather(racing(server), racing(server), return_exceptions=True)
    assert any("already been loaded" in str(result) for result in results)

    server, client = _replica(tmp_path, monkeypatch, "second")
    await asyncio.gather(
        server._maybe_resolve_lora_from_multiplex(), server._maybe_resolve_lora_from_multiplex()
    )
    assert client.loaded == ["geo"]


async def test_the_router_takes_its_adapter_table_from_user_config(
    router: tuple[Router, list[Any]],
) -> None:
    """Serve calls ``reconfigure(user_config)`` on the running replica when the deployment's
    user_config alone changes (ray/serve/_private/replica.py, ``call_reconfigure``)."""
    instance, calls = router
    messages = [{"role": "user", "content": "hello"}]
    await instance.reconfigure({"adapters": {"geo": "base", "law": "other"}})
    listed = {entry["id"]: entry.get("parent") for entry in (await instance.models())["data"]}
    assert listed == {"base": None, "other": None, "geo": "base", "law": "other"}
    answer = await instance.chat_completions(_request({"model": "law", "messages": messages}))
    assert answer.status_code == 200
    (_, opts, body), *_ = calls
    assert opts.get("multiplexed_model_id") == "law"
    assert body.model == "law"
    # Removed: no longer listed, and a request for it is an unknown model.
    await instance.reconfigure({"adapters": {"law": "other"}})
    assert "geo" not in {entry["id"] for entry in (await instance.models())["data"]}
    missing = await instance.chat_completions(_request({"model": "geo", "messages": messages}))
    assert missing.status_code == 404
    assert json.loads(missing.body)["error"]["code"] == "model_not_found"
    wrong = [
        ({"adapters": {"x": "nope"}}, "serves no model 'nope'"),
        ({"adapters": {"other": "base"}}, "has a model's name"),
        ({"x": 1}, "user_config must be"),
    ]
    for user_config, message in wrong:
        with pytest.raises(ValueError, match=message):
            await instance.reconfigure(user_config)
    assert instance.adapters == {"law": "other"}


async def test_a_replica_reconfigured_drops_removed_adapters_and_reloads_changed_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """vLLM's serving models keep a loaded adapter by name (models/serving.py,
    ``lora_requests``; ``unload_lora_adapter`` drops it); Ray's VLLMEngine.resolve_lora loads
    a name only when it is not there yet."""
    server, client = _replica(tmp_path, monkeypatch, "first")
    models = server.engine._oai_models
    await server._maybe_resolve_lora_from_multiplex()
    assert models.lora_requests["geo"].lora_path == server._adapters["geo"]
    # Another source under the same name: the old weights go, the new ones load on demand.
    moved = str(_adapter_folder(tmp_path, "moved").resolve())
    await server.reconfigure({"adapters": [{"name": "geo", "source": moved}]})
    assert "geo" not in models.lora_requests
    await server._maybe_resolve_lora_from_multiplex()
    assert models.lora_requests["geo"].lora_path == moved
    assert client.loaded == ["geo", "geo"]
    # Removed: unloaded, and a request that still names it is refused.
    await server.reconfigure({"adapters": []})
    assert "geo" not in models.lora_requests
    with pytest.raises(ValueError, match="'geo' is not an adapter"):
        await server._maybe_resolve_lora_from_multiplex()
    with pytest.raises(ValueError, match="adapters"):
        await server.reconfigure({"adapters": "geo"})


async def test_a_model_without_lora_refuses_adapters_in_user_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server, _ = _replica(tmp_path, monkeypatch, "first")
    server.spec = LLMSpec.model_validate({"name": "base", "source": BASE})
    folder = str(tmp_path / "first")
    with pytest.raises(ValueError, match="runs without LoRA"):
        await server.reconfigure({"adapters": [{"name": "geo", "source": folder}]})
    await server.reconfigure({"adapters": []})
