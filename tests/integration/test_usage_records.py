"""Usage records written by real gateway processes to a real Redis, read back as billing does.

The stub upstream (tests/fakes/openai_stub.py) reports usage as vLLM does (a usage object on
a whole answer, a final usage chunk on a stream with ``include_usage``); the records must
carry exactly its counts, once each, whichever of two gateways on one Redis served the
request, for success, a backend 4xx, a gateway refusal (404, 429) and a client that cancels
mid-stream.
"""

from __future__ import annotations

import asyncio
import signal
import threading
import time
import uuid
from decimal import Decimal
from pathlib import Path

import grpc
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner

from llmops_cli.main import app
from llmops_gateway.core import estimate_tokens
from llmops_gateway.grpc_api import gateway_pb2 as pb
from llmops_gateway.grpc_api import gateway_pb2_grpc as pb_grpc
from llmops_gateway.keys import FileKeyStore, Tenant
from llmops_gateway.redis_pipe import PipelinedRedis
from llmops_gateway.usage_records import RedisUsageSink, UsageRecord, read_stream
from tests.conftest import free_port, redis_server
from tests.integration.gateway_fixtures import gateway, stub_upstream

MESSAGES = [{"role": "user", "content": "count the tokens of this prompt"}]


def _records(url: str) -> list[UsageRecord]:
    async def read() -> list[UsageRecord]:
        redis = PipelinedRedis(url)
        try:
            return [record async for record in read_stream(redis, 0)]
        finally:
            await redis.close()

    return asyncio.run(read())


def _wait_records(
    url: str, tenants: set[str], count: int, timeout_s: float = 15
) -> list[UsageRecord]:
    """The records of ``tenants`` once there are ``count`` of them (they land after the reply)."""
    deadline = time.monotonic() + timeout_s
    while True:
        records = [r for r in _records(url) if r.tenant in tenants]
        if len(records) >= count or time.monotonic() > deadline:
            return records
        time.sleep(0.1)


def _gpu_seconds_metric(metrics_url: str, tenant: str, model: str) -> float:
    """``llmops_gateway_gpu_seconds_total`` of one tenant and model on one gateway."""
    text = httpx.get(metrics_url, timeout=10).text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "llmops_gateway_gpu_seconds_total"
        and sample.labels == {"tenant": tenant, "model": model}
    )


def _chat(url: str, key: str, request_id: str, **body: object) -> httpx.Response:
    return httpx.post(
        f"{url}/v1/chat/completions",
        headers={"authorization": f"Bearer {key}", "x-request-id": request_id},
        json={"model": "stub-chat", "messages": MESSAGES, "max_tokens": 5, **body},
        timeout=30,
    )


def test_one_record_per_request_with_the_engines_counts(tmp_path: Path, redis_url: str) -> None:
    suffix = uuid.uuid4().hex[:6]
    store = FileKeyStore(tmp_path / "keys.json")
    acme, beta = f"acme-{suffix}", f"beta-{suffix}"
    acme_key_record, acme_key = store.create(Tenant(name=acme))
    _, beta_key = store.create(Tenant(name=beta, requests_per_minute=1))
    # "slow" is a GPU model: 2 GPUs a replica, 4 sequences at once.
    gpu_models = {"slow": {"gpus": 2, "slots": 4}}
    settings = {"keys_file": store.path, "redis_url": redis_url, "gpu_models": gpu_models}
    with (
        stub_upstream() as upstream,
        stub_upstream(token_delay=0.05, models=("slow",)) as slow,
        gateway(tmp_path, default_backend=upstream, backends={"slow": slow}, **settings) as a,
        gateway(tmp_path, default_backend=upstream, backends={"slow": slow}, **settings) as b,
    ):
        unary = _chat(a.url, acme_key, "r-unary")
        assert unary.status_code == 200
        stream_usage = None
        with httpx.stream(
            "POST",
            f"{b.url}/v1/chat/completions",
            headers={"authorization": f"Bearer {acme_key}", "x-request-id": "r-stream"},
            json={
                "model": "stub-chat",
                "messages": MESSAGES,
                "max_tokens": 7,
                "stream": True,
                "stream_options": {"include_usage": True},
            },
            timeout=30,
        ) as stream:
            for line in stream.iter_lines():
                if line.startswith("data: {") and '"usage"' in line:
                    stream_usage = httpx.Response(200, content=line[6:]).json()["usage"]
        assert stream_usage is not None
        failed = _chat(a.url, acme_key, "r-400", stub_error={"status": 400, "shape": "openai"})
        assert failed.status_code == 400
        assert _chat(b.url, acme_key, "r-404", model="no-such-model").status_code == 404
        assert _chat(a.url, beta_key, "r-first").status_code == 200
        assert _chat(b.url, beta_key, "r-429").status_code == 429
        # The same core behind gRPC: unary and streaming.
        with grpc.insecure_channel(b.grpc_target) as channel:
            stub = pb_grpc.GatewayStub(channel)
            request = pb.ChatCompletionRequest(
                model="stub-chat",
                messages=[pb.Message(role="user", content="hi")],
                params=pb.SamplingParams(max_tokens=4),
            )
            auth = ("authorization", f"Bearer {acme_key}")
            reply = stub.CreateChatCompletion(request, metadata=[auth, ("x-request-id", "g-unary")])
            chunks = list(
                stub.StreamChatCompletion(request, metadata=[auth, ("x-request-id", "g-stream")])
            )
        grpc_stream_usage = [c.usage for c in chunks if c.HasField("usage")][-1]
        # A client that reads three tokens of a slow stream, then goes away.
        read = 0
        with httpx.stream(
            "POST",
            f"{a.url}/v1/chat/completions",
            headers={"authorization": f"Bearer {acme_key}", "x-request-id": "r-cancel"},
            json={
                "model": "slow",
                "messages": MESSAGES,
                "max_tokens": 100,
                "ignore_eos": True,
                "stream": True,
            },
            timeout=30,
        ) as stream:
            for line in stream.iter_lines():
                if '"content":"tok' in line:
                    read += 1
                if read == 3:
                    break
        records = _wait_records(redis_url, {acme, beta}, 9)
        gpu_metric = sum(_gpu_seconds_metric(g.metrics_url, acme, "slow") for g in (a, b))
    by_request = {r.request_id: r for r in records}
    assert len(records) == 9, [r.request_id for r in records]  # nothing doubled
    assert len({r.id for r in records}) == 9
    assert set(by_request) == {
        "r-unary",
        "r-stream",
        "r-400",
        "r-404",
        "r-first",
        "r-429",
        "r-cancel",
        "g-unary",
        "g-stream",
    }

    usage = unary.json()["usage"]
    ok = by_request["r-unary"]
    assert (ok.status, ok.code, ok.tenant, ok.key_id) == ("ok", 200, acme, acme_key_record.id)
    assert (ok.prompt_tokens, ok.completion_tokens) == (usage["prompt_tokens"], 5)
    assert (ok.endpoint, ok.backend, ok.model) == ("/v1/chat/completions", upstream, "stub-chat")
    assert ok.ttft_s is not None
    assert 0 < ok.ttft_s <= ok.latency_s
    streamed = by_request["r-stream"]
    assert streamed.status == "ok"
    assert streamed.prompt_tokens == stream_usage["prompt_tokens"]
    assert streamed.completion_tokens == stream_usage["completion_tokens"] == 7
    assert streamed.ttft_s is not None
    bad = by_request["r-400"]
    assert (bad.status, bad.code, bad.prompt_tokens, bad.completion_tokens) == ("error", 400, 0, 0)
    unknown = by_request["r-404"]
    assert (unknown.status, unknown.code, unknown.model) == ("rejected", 404, "no-such-model")
    limited = by_request["r-429"]
    assert (limited.status, limited.code, limited.tenant) == ("rejected", 429, beta)
    assert (limited.prompt_tokens, limited.completion_tokens) == (0, 0)
    assert by_request["r-first"].status == "ok"
    g_unary, g_stream = by_request["g-unary"], by_request["g-stream"]
    assert (g_unary.status, g_unary.completion_tokens) == ("ok", reply.usage.completion_tokens)
    assert g_unary.prompt_tokens == reply.usage.prompt_tokens
    assert (g_stream.status, g_stream.completion_tokens) == ("ok", 4)
    assert g_stream.prompt_tokens == grpc_stream_usage.prompt_tokens
    assert reply.usage.completion_tokens == grpc_stream_usage.completion_tokens == 4
    cancelled = by_request["r-cancel"]
    assert (cancelled.status, cancelled.code, cancelled.model) == ("cancelled", 200, "slow")
    # No usage chunk arrives on a cut stream: the prompt is the gateway's estimate, the
    # completion the content chunks relayed (at least what the client read, far from 100).
    assert cancelled.prompt_tokens == estimate_tokens(MESSAGES)
    assert 3 <= cancelled.completion_tokens < 50
    # GPU-seconds: latency x GPUs per replica / sequences per replica; none for other models.
    assert cancelled.gpu_seconds == pytest.approx(cancelled.latency_s * 2 / 4, abs=1e-6)
    assert cancelled.gpu_seconds > 0
    assert all(r.gpu_seconds == 0 for r in records if r.model != "slow")
    # The dashboard's counter charges what the record does.
    assert gpu_metric == pytest.approx(cancelled.gpu_seconds, abs=1e-6)

    # What billing sees: the CLI over the same stream.
    day = by_request["r-unary"].day
    result = CliRunner().invoke(
        app,
        [
            "usage",
            "--from",
            day,
            "--to",
            day,
            "--by",
            "tenant,model",
            "--format",
            "csv",
            "--redis-url",
            redis_url,
        ],
    )
    assert result.exit_code == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith((acme, beta))]
    acme_prompt = sum(
        r.prompt_tokens for r in records if r.tenant == acme and r.model == "stub-chat"
    )
    acme_completion = sum(
        r.completion_tokens for r in records if r.tenant == acme and r.model == "stub-chat"
    )
    slow_gpu = Decimal(str(cancelled.gpu_seconds)).quantize(Decimal("0.001"))
    assert rows == [
        f"{acme},no-such-model,1,1,0,0,0,0.000",
        f"{acme},slow,1,0,{cancelled.prompt_tokens},{cancelled.completion_tokens},0,{slow_gpu}",
        f"{acme},stub-chat,5,1,{acme_prompt},{acme_completion},0,0.000",
        f"{beta},stub-chat,2,1,{by_request['r-first'].prompt_tokens},5,0,0.000",
    ]


def test_a_retried_write_lands_once(redis_url: str) -> None:
    """A write whose reply was lost is retried from the queue: the record id dedupes it."""
    record = UsageRecord(
        id=uuid.uuid4().hex,
        request_id="same",
        time="2026-12-01T00:00:00.000Z",
        tenant=f"dedupe-{uuid.uuid4().hex[:6]}",
        key_id="k",
        model="m",
        endpoint="/v1/completions",
        backend="http://b",
        status="ok",
        code=200,
        prompt_tokens=1,
        completion_tokens=2,
        cached_tokens=0,
        latency_s=0.1,
        ttft_s=None,
    )

    async def write_twice() -> None:
        redis = PipelinedRedis(redis_url)
        sink = RedisUsageSink(redis, retention_days=90, owned=True)
        try:
            assert await sink.write([record]) == []
            assert await sink.write([record, record]) == []
        finally:
            await sink.close()

    asyncio.run(write_twice())
    assert [r for r in _records(redis_url) if r.tenant == record.tenant] == [record]


def test_records_survive_a_redis_restart_and_a_sigterm_mid_stream(tmp_path: Path) -> None:
    """Redis down when a request ends: the record is written once Redis is back. SIGTERM with
    a stream in flight: the stream drains and its record is written before the exit."""
    store = FileKeyStore(tmp_path / "keys.json")
    tenant = f"blip-{uuid.uuid4().hex[:6]}"
    _, key = store.create(Tenant(name=tenant))
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    with (
        stub_upstream() as upstream,
        stub_upstream(token_delay=0.02, models=("slow",)) as slow,
        gateway(
            tmp_path,
            default_backend=upstream,
            backends={"slow": slow},
            keys_file=store.path,
            redis_url=url,
            redis_failure_mode="open",
            drain_timeout_s=20,
        ) as gw,
    ):
        with redis_server(port, tmp_path):
            assert _chat(gw.url, key, "before").status_code == 200
            assert [r.request_id for r in _wait_records(url, {tenant}, 1)] == ["before"]
        assert _chat(gw.url, key, "during").status_code == 200  # admitted: failing open
        time.sleep(1.5)  # a flush or two fails while Redis is down
        with redis_server(port, tmp_path):
            records = _wait_records(url, {tenant}, 1)
            assert [(r.request_id, r.completion_tokens) for r in records] == [("during", 5)]
            # A 50-token stream (~1 s) is in flight when the gateway gets SIGTERM.
            lines: list[str] = []

            def stream() -> None:
                with httpx.stream(
                    "POST",
                    f"{gw.url}/v1/chat/completions",
                    headers={"authorization": f"Bearer {key}", "x-request-id": "draining"},
                    json={
                        "model": "slow",
                        "messages": MESSAGES,
                        "max_tokens": 50,
                        "ignore_eos": True,
                        "stream": True,
                    },
                    timeout=30,
                ) as response:
                    lines.extend(response.iter_lines())

            client = threading.Thread(target=stream)
            client.start()
            deadline = time.monotonic() + 10
            while not any("tok" in line for line in lines) and time.monotonic() < deadline:
                time.sleep(0.01)
            gw.process.send_signal(signal.SIGTERM)
            client.join(timeout=30)
            gw.process.wait(timeout=30)
            assert "data: [DONE]" in lines
            drained = [r for r in _records(url) if r.tenant == tenant]
    assert [(r.request_id, r.status, r.completion_tokens) for r in drained] == [
        ("during", "ok", 5),
        ("draining", "ok", 50),
    ]


def test_without_redis_records_go_to_a_file_beside_the_keys(tmp_path: Path) -> None:
    """`llmops up` has no Redis: records are JSON lines in usage.jsonl next to the key file,
    where `llmops usage` reads them by default."""
    store = FileKeyStore(tmp_path / "keys.json")
    _, key = store.create(Tenant(name="local"))
    with (
        stub_upstream() as upstream,
        gateway(tmp_path, default_backend=upstream, keys_file=store.path) as gw,
    ):
        reply = _chat(gw.url, key, "local-1")
        assert reply.status_code == 200
        path = tmp_path / "usage.jsonl"
        deadline = time.monotonic() + 10
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
    usage = reply.json()["usage"]
    result = CliRunner().invoke(
        app,
        ["usage", "--by", "tenant,model", "--format", "csv"],
        env={"LLMOPS_KEYS_FILE": str(store.path), "LLMOPS_GATEWAY_REDIS_URL": ""},
    )
    assert result.exit_code == 0, result.stderr
    assert result.stdout.splitlines() == [
        "tenant,model,requests,failed,prompt_tokens,completion_tokens,cached_tokens,gpu_seconds",
        f"local,stub-chat,1,0,{usage['prompt_tokens']},{usage['completion_tokens']},0,0.000",
    ]


def _stream_chat(
    url: str,
    key: str,
    request_id: str,
    lines: list[str],
    stop_after: int | None = None,
    **body: object,
) -> None:
    """Streams a chat into ``lines``; with ``stop_after``, goes away after that many tokens."""
    payload = {"model": "stub-chat", "messages": MESSAGES, "max_tokens": 5, "stream": True, **body}
    with httpx.stream(
        "POST",
        f"{url}/v1/chat/completions",
        headers={"authorization": f"Bearer {key}", "x-request-id": request_id},
        json=payload,
        timeout=30,
    ) as response:
        for line in response.iter_lines():
            lines.append(line)
            if stop_after is not None and sum('"content":"tok' in x for x in lines) >= stop_after:
                return


def _stream_usage(lines: list[str]) -> dict[str, int]:
    (usage,) = [
        httpx.Response(200, content=line[6:]).json()["usage"]
        for line in lines
        if line.startswith("data: {") and '"usage"' in line
    ]
    return dict(usage)


def test_three_replicas_on_one_redis_lose_and_double_nothing(
    tmp_path: Path, redis_url: str
) -> None:
    """Three gateways share one Redis: every outcome (success, backend 4xx, 429 from the
    shared limit, a client cancel, a SIGTERM with a stream in flight) is one record, with the
    counts the engine reported, whichever replica served it; none is missing or written twice.
    """
    suffix = uuid.uuid4().hex[:6]
    store = FileKeyStore(tmp_path / "keys.json")
    acme, beta = f"acme3-{suffix}", f"beta3-{suffix}"
    _, acme_key = store.create(Tenant(name=acme))
    _, beta_key = store.create(Tenant(name=beta, requests_per_minute=2))
    settings = {"keys_file": store.path, "redis_url": redis_url, "drain_timeout_s": 20}
    with (
        stub_upstream() as upstream,
        stub_upstream(token_delay=0.02, models=("slow",)) as slow,
        gateway(tmp_path, default_backend=upstream, backends={"slow": slow}, **settings) as g1,
        gateway(tmp_path, default_backend=upstream, backends={"slow": slow}, **settings) as g2,
        gateway(tmp_path, default_backend=upstream, backends={"slow": slow}, **settings) as g3,
    ):
        replicas = [g1, g2, g3]
        replies: dict[str, httpx.Response] = {}
        streamed: dict[str, list[str]] = {}
        for n, gw in enumerate(replicas):
            replies[f"ok-{n}"] = _chat(gw.url, acme_key, f"ok-{n}")
            streamed[f"stream-{n}"] = []
            _stream_chat(
                gw.url,
                acme_key,
                f"stream-{n}",
                streamed[f"stream-{n}"],
                max_tokens=6,
                stream_options={"include_usage": True},
            )
            replies[f"bad-{n}"] = _chat(
                gw.url, acme_key, f"bad-{n}", stub_error={"status": 400, "shape": "openai"}
            )
            replies[f"limited-{n}"] = _chat(gw.url, beta_key, f"limited-{n}")
        # The limit is shared: two requests pass, the third (on another replica) is refused.
        assert [replies[f"limited-{n}"].status_code for n in range(3)] == [200, 200, 429]
        assert all(replies[f"ok-{n}"].status_code == 200 for n in range(3))
        assert all(replies[f"bad-{n}"].status_code == 400 for n in range(3))
        # A client that reads three tokens of a slow stream on g2, then goes away.
        _stream_chat(
            g2.url,
            acme_key,
            "cancel",
            [],
            stop_after=3,
            model="slow",
            max_tokens=100,
            ignore_eos=True,
        )
        # SIGTERM to g3 with a 40-token stream (~1 s) in flight: it drains, then exits.
        draining: list[str] = []
        client = threading.Thread(
            target=_stream_chat,
            args=(g3.url, acme_key, "sigterm", draining),
            kwargs={
                "model": "slow",
                "max_tokens": 40,
                "ignore_eos": True,
                "stream_options": {"include_usage": True},
            },
        )
        client.start()
        deadline = time.monotonic() + 10
        while not any("tok" in line for line in draining) and time.monotonic() < deadline:
            time.sleep(0.01)
        g3.process.send_signal(signal.SIGTERM)
        client.join(timeout=30)
        g3.process.wait(timeout=30)
        assert "data: [DONE]" in draining
        records = _wait_records(redis_url, {acme, beta}, 14)
        time.sleep(1.5)  # a retried write would land within a flush interval: none may
        records = [r for r in _records(redis_url) if r.tenant in {acme, beta}]

    by_request = {r.request_id: r for r in records}
    assert len(records) == len(by_request) == 14, sorted(r.request_id for r in records)
    assert len({r.id for r in records}) == 14
    for n in range(3):
        ok, usage = by_request[f"ok-{n}"], replies[f"ok-{n}"].json()["usage"]
        assert (ok.status, ok.code) == ("ok", 200)
        assert (ok.prompt_tokens, ok.completion_tokens) == (
            usage["prompt_tokens"],
            usage["completion_tokens"],
        )
        stream, usage = by_request[f"stream-{n}"], _stream_usage(streamed[f"stream-{n}"])
        assert (stream.status, stream.completion_tokens) == ("ok", usage["completion_tokens"])
        assert stream.prompt_tokens == usage["prompt_tokens"]
        bad = by_request[f"bad-{n}"]
        assert (bad.status, bad.code, bad.prompt_tokens, bad.completion_tokens) == (
            "error",
            400,
            0,
            0,
        )
    limited = [by_request[f"limited-{n}"] for n in range(3)]
    assert [(r.status, r.code) for r in limited] == [("ok", 200), ("ok", 200), ("rejected", 429)]
    cancelled = by_request["cancel"]
    assert (cancelled.status, cancelled.model) == ("cancelled", "slow")
    assert 3 <= cancelled.completion_tokens < 100
    drained, usage = by_request["sigterm"], _stream_usage(draining)
    assert (drained.status, drained.completion_tokens) == ("ok", usage["completion_tokens"])
    assert usage["completion_tokens"] == 40
    # What the engine generated, request for request, is what was recorded.
    engine_total = (
        sum(replies[f"ok-{n}"].json()["usage"]["completion_tokens"] for n in range(3))
        + sum(_stream_usage(streamed[f"stream-{n}"])["completion_tokens"] for n in range(3))
        + sum(replies[f"limited-{n}"].json()["usage"]["completion_tokens"] for n in range(2))
        + usage["completion_tokens"]
    )
    recorded = sum(r.completion_tokens for r in records if r.request_id != "cancel")
    assert recorded == engine_total
