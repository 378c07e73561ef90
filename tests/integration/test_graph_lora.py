"""LoRA adapters end to end: the `openai` client through `llmops up`'s gateway to vLLM.

Adapters for the embedded SmolLM2, made here with ``peft`` (random weights, saved as
folders), on a graph of their own whose engine holds one LoRA at a time (``max_loras: 1``).
Reproduces vLLM's LoRA serving (vllm/entrypoints/openai/models/serving.py: a request's
``model`` names the adapter; the model list gives its base as ``parent``) behind Ray Serve
LLM's multiplexing (ray/llm/_internal/serve/core/server/llm_server.py,
``_maybe_resolve_lora_from_multiplex``), and the gateway's per-tenant allow-list.

An adapter added to the running graph with `llmops adapters add` reaches the replicas as their
Serve user_config (ray/serve/_private/config.py: NeedsActorReconfigure; replica.py
``call_reconfigure``) and is served by the same replica and engine processes, as
test_scale_from_zero.py checks a scale leaves the other replicas alone.

Its own graph rather than tests/graph.yaml: the shared graph's model list is pinned by
test_graph.py. It starts before the shared graph (conftest's OWN_RAY_CLUSTER) and stops at the
end of this module, so the two never run at once.
"""

from __future__ import annotations

import itertools
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml

from llmops_gateway.keys import FileKeyStore, Tenant
from llmops_gateway.local import stop_process
from llmops_services.sources import resolve_source
from tests.conftest import READY_BANNER, free_port, graph_ready

pytestmark = pytest.mark.slow

BASE = "smollm2-lora-base"
GEO, LAW = "smollm2-geo-lora", "smollm2-law-lora"
POEM = "smollm2-poem-lora"
"""Used by the Responses API test alone: its first request there loads it."""
STARTUP_TIMEOUT_S = 600
_TENANTS = itertools.count()
PROMPT: Any = [{"role": "user", "content": "What is the capital of France?"}]


def make_adapter(folder: Path, seed: int) -> Path:
    """A random LoRA for the embedded SmolLM2 (rank 8 on q_proj and v_proj), saved by peft.

    ``init_lora_weights=False`` draws both LoRA matrices at random (peft's default zeroes
    one, which would leave the output unchanged); ``lora_alpha`` 64 scales them by 8, so that
    a short greedy answer changes too.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(resolve_source("embedded://smollm2-135m-instruct"))
    config = LoraConfig(
        r=8, lora_alpha=64, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    get_peft_model(base, config).save_pretrained(folder)
    return folder


@dataclass(frozen=True)
class LoraGraph:
    url: str
    graph_url: str
    keys_file: Path
    serve_api: str
    folder: Path


@pytest.fixture(scope="module")
def lora_graph(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoraGraph]:
    """`llmops up` serving one model with three adapters, no encoder."""
    folder = tmp_path_factory.mktemp("lora-graph")
    config = {
        "llms": [
            {
                "name": BASE,
                "source": "embedded://smollm2-135m-instruct",
                "engine": {
                    "enforce_eager": True,
                    "max_model_len": 512,
                    "max_concurrent_sequences": 4,
                    "extra_args": {"max_loras": 1, "max_lora_rank": 8},
                },
                "stream_batching_interval_ms": 0.0,
                "adapters": [
                    {"name": GEO, "source": str(make_adapter(folder / GEO, seed=1))},
                    {"name": LAW, "source": str(make_adapter(folder / LAW, seed=2))},
                    {"name": POEM, "source": str(make_adapter(folder / POEM, seed=3))},
                ],
            }
        ],
        "encoder": None,
    }
    (folder / "graph.yaml").write_text(yaml.safe_dump(config))
    port, graph_port, metrics_port, grpc_port = free_port(), free_port(), free_port(), free_port()
    api_port = free_port()
    log = folder / "llmops-up.log"
    command = [
        *(sys.executable, "-m", "llmops_cli", "up", "--config", str(folder / "graph.yaml")),
        *("--port", str(port), "--graph-port", str(graph_port)),
        *("--metrics-port", str(metrics_port), "--grpc-port", str(grpc_port)),
        *("--keys-file", str(folder / "keys.json")),
        *("--serve-api-port", str(api_port)),
    ]
    started = time.monotonic()
    with log.open("w") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, text=True)
    try:
        while not (
            READY_BANNER in log.read_text() and graph_ready(f"http://127.0.0.1:{graph_port}")
        ):
            if process.poll() is not None:
                pytest.fail(f"llmops up exited: {process.returncode}\n{log.read_text()[-4000:]}")
            if time.monotonic() - started > STARTUP_TIMEOUT_S:
                pytest.fail(f"not ready after {STARTUP_TIMEOUT_S} s:\n{log.read_text()[-4000:]}")
            time.sleep(1)
        yield LoraGraph(
            f"http://127.0.0.1:{port}",
            f"http://127.0.0.1:{graph_port}",
            folder / "keys.json",
            f"http://127.0.0.1:{api_port}",
            folder,
        )
    finally:
        stop_process(process, timeout_s=120)


def _client(graph: LoraGraph, models: list[str]) -> openai.OpenAI:
    tenant = f"tenant-{next(_TENANTS)}"
    _, key = FileKeyStore(graph.keys_file).create(Tenant(name=tenant, allowed_models=models))
    return openai.OpenAI(base_url=f"{graph.url}/v1", api_key=key, max_retries=0)


def _answer(client: openai.OpenAI, model: str) -> str:
    reply = client.chat.completions.create(
        model=model, messages=PROMPT, temperature=0, max_tokens=24
    )
    assert reply.model == model
    return reply.choices[0].message.content or ""


def _eventually(call: Any, timeout_s: float = 30) -> Any:
    """The gateway reloads its key file on change: a new key works within a moment."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return call()
        except openai.AuthenticationError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def test_adapters_are_listed_with_their_base_as_parent(lora_graph: LoraGraph) -> None:
    listed = httpx.get(f"{lora_graph.graph_url}/v1/models", timeout=30).json()["data"]
    parents = {entry["id"]: entry.get("parent") for entry in listed}
    assert parents == {BASE: None, GEO: BASE, LAW: BASE, POEM: BASE}
    client = _client(lora_graph, ["*"])
    names = _eventually(lambda: {model.id for model in client.models.list()})
    assert names == {BASE, GEO, LAW, POEM}


def test_an_adapter_is_served_by_name_and_changes_the_output(lora_graph: LoraGraph) -> None:
    client = _client(lora_graph, ["*"])
    base = _eventually(lambda: _answer(client, BASE))
    geo = _answer(client, GEO)
    law = _answer(client, LAW)  # the engine holds one LoRA: GEO is evicted for it
    assert geo != base
    assert law not in {base, geo}
    # Evicted and loaded again, an adapter answers as before; the base model is unchanged.
    assert _answer(client, GEO) == geo
    assert _answer(client, BASE) == base
    stream = client.chat.completions.create(
        model=LAW, messages=PROMPT, temperature=0, max_tokens=24, stream=True
    )
    assert "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices) == law


def test_an_adapter_is_refused_to_a_tenant_without_it(lora_graph: LoraGraph) -> None:
    allowed = _client(lora_graph, [BASE, GEO])
    assert _eventually(lambda: _answer(allowed, GEO))
    base_only = _client(lora_graph, [BASE])
    assert _eventually(lambda: _answer(base_only, BASE))
    with pytest.raises(openai.NotFoundError):
        _answer(base_only, GEO)
    assert {model.id for model in base_only.models.list()} == {BASE}
    with pytest.raises(openai.NotFoundError):
        _answer(allowed, LAW)


def test_the_responses_api_serves_an_adapter(lora_graph: LoraGraph) -> None:
    """`LLMDeployment.responses` loads the request's adapter as chat does: without that, an
    adapter no chat request loaded before is an unknown model to vLLM's Responses serving."""
    client = _client(lora_graph, ["*"])

    def text(model: str) -> str:
        reply = client.responses.create(
            model=model,
            input="What is the capital of France?",
            temperature=0,
            max_output_tokens=24,
        )
        return reply.output_text

    base = _eventually(lambda: text(BASE))
    assert text(POEM) not in {base, ""}


def _processes(graph: LoraGraph) -> dict[str, set[tuple[str, int, float]]]:
    """Per deployment: each replica's id and pid, and the vLLM EngineCore process below it
    (vLLM names it ``VLLM::EngineCore``), with their start times."""
    import psutil

    from llmops_cli.scale import _client

    details = _client(graph.serve_api).get_serve_details()
    deployments = details["applications"]["llmops"]["deployments"]
    seen: dict[str, set[tuple[str, int, float]]] = {}
    for name, deployment in deployments.items():
        for replica in deployment.get("replicas", []):
            process = psutil.Process(replica["pid"])
            engines = [
                child
                for child in process.children(recursive=True)
                if "EngineCore" in " ".join([child.name(), *child.cmdline()])
            ]
            family = [process, *engines]
            seen.setdefault(name, set()).update(
                (replica["replica_id"], p.pid, p.create_time()) for p in family
            )
    return seen


def _adapters_command(graph: LoraGraph, *args: str) -> None:
    command = [sys.executable, "-m", "llmops_cli", "adapters", *args]
    done = subprocess.run(
        [*command, "--serve-api", graph.serve_api], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr


def _listed(graph: LoraGraph) -> dict[str, Any]:
    listed = httpx.get(f"{graph.graph_url}/v1/models", timeout=30).json()["data"]
    return {entry["id"]: entry.get("parent") for entry in listed}


def _until(check: Any, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "not within the timeout"
        time.sleep(0.5)


def test_an_adapter_added_to_the_running_graph_restarts_nothing(lora_graph: LoraGraph) -> None:
    new = "smollm2-new-lora"
    folder = make_adapter(lora_graph.folder / new, seed=4)
    client = _client(lora_graph, ["*"])
    base = _eventually(lambda: _answer(client, BASE))
    before = _processes(lora_graph)
    engine = before[f"llm-{BASE}"]
    assert len(engine) > 1, engine  # the replica and its EngineCore

    _adapters_command(lora_graph, "add", BASE, new, str(folder))
    _until(lambda: _listed(lora_graph).get(new) == BASE)

    def served() -> str:
        try:
            return _answer(client, new)
        except openai.NotFoundError:  # the gateway lists the graph's models every 10 s
            return ""

    deadline = time.monotonic() + 60
    answer = served()
    while not answer and time.monotonic() < deadline:
        time.sleep(1)
        answer = served()
    assert answer not in {base, ""}
    # Same replicas, same processes: the router and the engine took the adapter in place.
    assert _processes(lora_graph) == before

    _adapters_command(lora_graph, "remove", BASE, new)
    _until(lambda: new not in _listed(lora_graph))
    missing = httpx.post(
        f"{lora_graph.graph_url}/v1/chat/completions",
        json={"model": new, "messages": PROMPT, "max_tokens": 4},
        timeout=60,
    )
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "model_not_found"
    assert _answer(client, GEO)  # the adapters of the graph config still serve
    assert _processes(lora_graph) == before
