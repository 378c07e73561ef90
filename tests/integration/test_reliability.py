"""Faults and abuse at the gateway, with a real Redis and the stub upstream: nothing is lost.

Every request a case sends is counted as succeeded, failed with an explicit error (named), or
lost (tests.reliability); each case asserts that none is lost and that failures are the
expected, explicit ones. docs/reliability.md records the counts.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import pytest

from llmops_gateway.grpc_api import gateway_pb2 as pb
from llmops_gateway.grpc_api import gateway_pb2_grpc as pb_grpc
from llmops_gateway.keys import FileKeyStore, Tenant
from llmops_gateway.local import stop_process
from tests.conftest import free_port
from tests.integration.gateway_fixtures import Gateway, gateway, stub_upstream
from tests.reliability import outcome, rss_mib, send

CHAT = "/v1/chat/completions"
MALFORMED = b'{"model": "stub-chat", "messages": ['


def chat_body(max_tokens: int = 4, **extra: object) -> dict[str, object]:
    return {
        "model": "stub-chat",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": max_tokens,
        **extra,
    }


async def steady(
    url: str, key: str, rate: float, seconds: float, body: dict[str, object]
) -> list[tuple[float, str]]:
    """Open-loop load; (send time on the monotonic clock, kind) per request."""
    results: list[tuple[float, str]] = []
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        start = time.monotonic()

        async def one(at: float) -> None:
            results.append((at, await send(client, CHAT, json=body, key=key)))

        tasks = []
        for i in range(int(rate * seconds)):
            delay = start + i / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(time.monotonic())))
        await asyncio.gather(*tasks)
    return results


def metric(gw: Gateway, pattern: str) -> float:
    """The value of the first metrics line matching ``pattern`` (0 when absent)."""
    with urllib.request.urlopen(gw.metrics_url, timeout=5) as response:
        text = response.read().decode()
    found = re.search(rf"^{pattern} ([0-9.e+]+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


@dataclass
class RedisServer:
    """A redis-server this test can stop and start again on the same port."""

    folder: Path
    port: int
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server") or "redis-server"
        self.process = subprocess.Popen(
            [
                *(binary, "--bind", "127.0.0.1", "--port", str(self.port)),
                *("--save", "", "--appendonly", "no", "--dir", str(self.folder)),
            ],
            stdout=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.05)

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process, timeout_s=5)
            self.process = None


@contextmanager
def redis_server(folder: Path) -> Iterator[RedisServer]:
    server = RedisServer(folder, free_port())
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def store(tmp_path: Path) -> FileKeyStore:
    return FileKeyStore(tmp_path / "keys.json")


def unlimited(store: FileKeyStore, name: str, **limits: int) -> str:
    values = {
        "requests_per_minute": 1_000_000,
        "tokens_per_minute": 10**9,
        "tokens_per_day": 10**12,
        "max_concurrent_streams": 1000,
        **limits,
    }
    return store.create(Tenant(name=name, **values))[1]  # type: ignore[arg-type]


# --- Redis outage -------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["closed", "open"])
def test_redis_outage_under_load_follows_the_failure_mode(
    tmp_path: Path, store: FileKeyStore, mode: str
) -> None:
    load_key = unlimited(store, "load")
    after_key = unlimited(store, "after", requests_per_minute=20)
    result = outcome(f"Redis stopped for 3 s and restarted under 40 rps (fail {mode})")
    with (
        redis_server(tmp_path) as redis,
        stub_upstream() as upstream,
        gateway(
            tmp_path,
            default_backend=upstream,
            keys_file=store.path,
            redis_url=redis.url,
            redis_failure_mode=mode,
        ) as gw,
    ):

        async def scenario() -> tuple[list[tuple[float, str]], float, float]:
            load = asyncio.create_task(steady(gw.url, load_key, 40, 9, chat_body()))
            await asyncio.sleep(3)
            stopped = time.monotonic()
            await asyncio.to_thread(redis.stop)
            await asyncio.sleep(3)
            await asyncio.to_thread(redis.start)
            restarted = time.monotonic()
            return await load, stopped, restarted

        # Send times and the outage share one clock (the load starts a little after scenario()).
        results, down, up = asyncio.run(scenario())
        for _, kind in results:
            result.record(kind)
        before = [kind for at, kind in results if at < down - 0.1]
        during = [kind for at, kind in results if down + 0.5 < at < up - 0.2]
        after = [kind for at, kind in results if at > up + 1.0]
        assert set(before) == {"200"}
        assert set(during) == ({"503"} if mode == "closed" else {"200"}), during
        assert set(after) == {"200"}, after
        assert result.lost == 0
        errors = metric(gw, f'llmops_gateway_redis_errors_total{{mode="{mode}"}}')
        assert errors >= len(during)
        # Limits hold again once Redis is back: exactly the tenant's 20 requests a minute.
        statuses = [
            kind for _, kind in asyncio.run(steady(gw.url, after_key, 50, 0.6, chat_body()))
        ]
        assert statuses.count("200") == 20
        assert statuses.count("429") == 10
        result.measured = {"during outage": len(during), "after recovery rpm 20 of 30": 20}
    assert f"failing {mode}" in gw.log.read_text()


@contextmanager
def blackhole_listener() -> Iterator[int]:
    """A TCP listener that accepts connections and never answers (a lost Redis node, a
    half-open network path); yields its port."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(512)
    held: list[socket.socket] = []
    stopping = False

    def accept() -> None:
        while not stopping:
            try:
                held.append(listener.accept()[0])
            except OSError:
                return

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stopping = True
        listener.close()
        for conn in held:
            conn.close()


@pytest.mark.parametrize("mode", ["closed", "open"])
def test_a_redis_that_never_answers_costs_each_request_one_timeout_at_most(
    tmp_path: Path, store: FileKeyStore, mode: str
) -> None:
    """A Redis that accepts and never answers, with a password in the URL so that the
    connect itself hangs (AUTH): a burst of 40 concurrent requests, then 20 requests/s for
    4 s. Every request is answered (503 when failing closed, 200 when open) within the Redis
    timeout plus a margin; before one reconnect was shared by all waiters, the k-th waiting
    request waited about k timeouts."""
    key = unlimited(store, "blackhole")
    timeout_s, margin_s = 1.0, 0.5
    result = outcome(
        f"Redis that accepts and never answers, 40-request burst + 20 rps (fail {mode})"
    )
    with (
        blackhole_listener() as port,
        stub_upstream() as upstream,
        gateway(
            tmp_path,
            default_backend=upstream,
            keys_file=store.path,
            redis_url=f"redis://:secret@127.0.0.1:{port}/0",
            redis_failure_mode=mode,
            redis_timeout_s=timeout_s,
            redis_retry_interval_s=1.0,
        ) as gw,
    ):

        async def scenario() -> list[tuple[str, float]]:
            async with httpx.AsyncClient(base_url=gw.url, timeout=30) as client:

                async def timed() -> tuple[str, float]:
                    started = time.monotonic()
                    kind = await send(client, CHAT, json=chat_body(), key=key)
                    return kind, time.monotonic() - started

                answers = await asyncio.gather(*(timed() for _ in range(40)))
                paced: list[asyncio.Task[tuple[str, float]]] = []
                for _ in range(80):
                    paced.append(asyncio.create_task(timed()))
                    await asyncio.sleep(0.05)
                return [*answers, *await asyncio.gather(*paced)]

        answers = asyncio.run(scenario())
    for kind, _ in answers:
        result.record(kind)
    kinds = {kind for kind, _ in answers}
    assert kinds == ({"503"} if mode == "closed" else {"200"}), kinds
    waits = sorted(wait for _, wait in answers)
    assert waits[-1] < timeout_s + margin_s, waits[-5:]
    result.measured = {
        "slowest answer s": round(waits[-1], 2),
        "median answer s": round(waits[len(waits) // 2], 3),
        "answered at once (< 50 ms)": sum(wait < 0.05 for wait in waits),
    }


# --- draining, timeouts, disconnects ------------------------------------------------------


def test_sigterm_finishes_every_stream_and_refuses_new_requests(
    tmp_path: Path, store: FileKeyStore
) -> None:
    key = unlimited(store, "drain")
    result = outcome("SIGTERM with 10 streams in flight (3 s each), 20 new requests after it")
    with (
        stub_upstream(token_delay=0.1) as upstream,
        gateway(tmp_path, default_backend=upstream, keys_file=store.path, drain_timeout_s=20) as gw,
    ):
        body = chat_body(30, stream=True, ignore_eos=True)

        async def scenario() -> tuple[list[str], list[str], float]:
            async with httpx.AsyncClient(base_url=gw.url, timeout=30) as client:
                streams = [
                    asyncio.create_task(send(client, CHAT, json=body, key=key)) for _ in range(10)
                ]
                await asyncio.sleep(0.5)
                signalled = time.monotonic()
                gw.process.send_signal(signal.SIGTERM)
                await asyncio.sleep(0.3)
                late = [await send(client, CHAT, json=chat_body(), key=key) for _ in range(20)]
                finished = await asyncio.gather(*streams)
                await asyncio.to_thread(gw.process.wait, 30)
                return list(finished), late, time.monotonic() - signalled

        finished, late, drained_s = asyncio.run(scenario())
    for kind in finished + late:
        result.record(kind)
    assert finished == ["200"] * 10
    assert set(late) == {"refused"}
    assert drained_s < 20
    result.measured = {"drained in s": round(drained_s, 1)}


def test_hanging_backend_gets_504_and_deadline_exceeded(
    tmp_path: Path, store: FileKeyStore
) -> None:
    key = unlimited(store, "hang")
    result = outcome("backend that never answers, deadline 1.5 s (5 REST + 5 gRPC requests)")
    with (
        stub_upstream() as upstream,
        gateway(
            tmp_path, backends={"hang": upstream}, keys_file=store.path, request_timeout_s=1.5
        ) as gw,
    ):
        body = {"model": "hang", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1}
        elapsed = []
        for _ in range(5):
            started = time.monotonic()
            response = httpx.post(
                f"{gw.url}{CHAT}", json=body, headers={"authorization": f"Bearer {key}"}, timeout=10
            )
            elapsed.append(time.monotonic() - started)
            result.record(str(response.status_code))
            assert response.json()["error"]["type"] == "timeout_error"
        with grpc.insecure_channel(gw.grpc_target) as channel:
            stub = pb_grpc.GatewayStub(channel)
            request = pb.ChatCompletionRequest(
                model="hang", messages=[pb.Message(role="user", content="x")]
            )
            for _ in range(5):
                started = time.monotonic()
                with pytest.raises(grpc.RpcError) as caught:
                    stub.CreateChatCompletion(
                        request, metadata=[("authorization", f"Bearer {key}")], timeout=10
                    )
                elapsed.append(time.monotonic() - started)
                result.record(caught.value.code().name)
    assert result.failed == {"504": 5, "DEADLINE_EXCEEDED": 5}
    assert all(1.4 < s < 4 for s in elapsed), elapsed
    result.measured = {"answered after s": f"{min(elapsed):.2f}-{max(elapsed):.2f}"}


# --- abuse --------------------------------------------------------------------------------


def test_malformed_and_oversized_grpc_messages_are_refused(
    tmp_path: Path, store: FileKeyStore
) -> None:
    key = unlimited(store, "grpc-abuse")
    result = outcome("malformed (5) and oversized 2 MiB (5) gRPC messages, then a valid call")
    metadata = [("authorization", f"Bearer {key}")]
    with (
        stub_upstream() as upstream,
        gateway(tmp_path, default_backend=upstream, keys_file=store.path) as gw,
        grpc.insecure_channel(
            gw.grpc_target, options=[("grpc.max_send_message_length", 8 << 20)]
        ) as channel,
    ):
        raw = channel.unary_unary(
            "/llmops.v1.Gateway/CreateChatCompletion",
            request_serializer=lambda data: data,
            response_deserializer=lambda data: data,
        )
        malformed = [
            b"\xff\xfe\xfd",  # wire type 7 does not exist
            b"\x0a\xff\xff\xff\xff\x0f",  # a string of 4 GiB, then nothing
            b"\x0a\x05hello\x12",  # a field cut before its length
            b"\x12\x80\x80\x80\x80\x10",  # a length past the end
            b"\x0b",  # a group that never ends
        ]
        for payload in malformed:
            with pytest.raises(grpc.RpcError) as caught:
                raw(payload, metadata=metadata, timeout=10)
            result.record(caught.value.code().name)
        huge = pb.ChatCompletionRequest(
            model="stub-chat", messages=[pb.Message(role="user", content="x" * (2 << 20))]
        )
        stub = pb_grpc.GatewayStub(channel)
        for _ in range(5):
            with pytest.raises(grpc.RpcError) as caught:
                stub.CreateChatCompletion(huge, metadata=metadata, timeout=10)
            result.record(caught.value.code().name)
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        reply = stub.CreateChatCompletion(
            pb.ChatCompletionRequest(
                model="stub-chat", messages=[pb.Message(role="user", content="hi")]
            ),
            metadata=metadata,
            timeout=10,
        )
        assert reply.choices[0].message.content
        result.ok()
        assert gw.process.poll() is None
    assert result.lost == 0
    assert result.failed == {"INVALID_ARGUMENT": 5, "RESOURCE_EXHAUSTED": 5}


def test_huge_requests_get_4xx_and_idle_connections_stay_cheap(
    tmp_path: Path, store: FileKeyStore
) -> None:
    key = store.create(Tenant(name="abuse"))[1]  # default limits: 200,000 tokens a minute
    result = outcome("huge prompts, max_tokens and bodies (4 kinds x 5); 2,000 idle connections")
    with (
        stub_upstream() as upstream,
        gateway(tmp_path, default_backend=upstream, keys_file=store.path) as gw,
    ):
        headers = {"authorization": f"Bearer {key}"}
        cases = {
            # ~900 KB of prompt: under the 1 MiB body limit, over the tenant's token rate.
            "long prompt": {
                **chat_body(),
                "messages": [{"role": "user", "content": "w " * 450_000}],
            },
            "max_tokens 10^9": chat_body(10**9),
            "max_tokens 2^70": chat_body(2**70),
        }
        with httpx.Client(base_url=gw.url, headers=headers, timeout=30) as client:
            for name, body in cases.items():
                for _ in range(5):
                    response = client.post(CHAT, json=body)
                    assert response.status_code == 400, (name, response.text)
                    assert "max_tokens" in response.json()["error"]["message"]
                    result.record("400")
            oversized = (
                b'{"model": "stub-chat", "messages": [], "pad": "' + b"x" * (2 << 20) + b'"}'
            )
            for _ in range(5):
                response = client.post(
                    CHAT, content=oversized, headers={"content-type": "application/json"}
                )
                assert response.status_code == 413
                result.record("413")

            before = rss_mib(gw.process.pid)
            idle = []
            for _ in range(2000):
                conn = socket.create_connection(("127.0.0.1", int(gw.url.rsplit(":", 1)[1])))
                idle.append(conn)
            time.sleep(1.0)
            during = rss_mib(gw.process.pid)
            # Real requests keep being served meanwhile.
            for _ in range(20):
                kind = str(client.post(CHAT, json=chat_body()).status_code)
                result.record(kind)
                assert kind == "200"
            for conn in idle:
                conn.close()
        assert gw.process.poll() is None
    growth = during - before
    result.measured = {"RSS with 2,000 idle connections": f"+{growth:.1f} MiB"}
    assert growth < 64, f"2,000 idle connections cost {growth:.1f} MiB"
    assert result.lost == 0


# --- security -----------------------------------------------------------------------------


def test_tenants_are_isolated_and_keys_never_leak(tmp_path: Path, store: FileKeyStore) -> None:
    _, key_a = store.create(Tenant(name="tenant-a", allowed_models=["stub-chat"]))
    _, key_b = store.create(Tenant(name="tenant-b", allowed_models=["stub-embed"]))
    result = outcome("tenant isolation and key secrecy (requests with A's, B's and bad keys)")
    with (
        stub_upstream() as upstream,
        gateway(tmp_path, default_backend=upstream, keys_file=store.path) as gw,
        httpx.Client(base_url=gw.url, timeout=30) as client,
    ):

        def call(key: str, path: str, body: dict[str, object] | None = None) -> httpx.Response:
            headers = {"authorization": f"Bearer {key}"}
            if body is None:
                return client.get(path, headers=headers)
            return client.post(path, json=body, headers=headers)

        listing_a = call(key_a, "/v1/models").json()
        assert [m["id"] for m in listing_a["data"]] == ["stub-chat"]
        listing_b = call(key_b, "/v1/models").json()
        assert [m["id"] for m in listing_b["data"]] == ["stub-embed"]
        result.ok(2)
        denied = call(key_a, "/v1/embeddings", {"model": "stub-embed", "input": "x"})
        # As OpenAI answers: a model the key may not use is indistinguishable from one that
        # does not exist (nothing about other tenants' models leaks).
        assert denied.status_code == 404
        assert denied.json()["error"]["code"] == "model_not_found"
        assert "tenant-b" not in denied.text
        unknown = call(key_a, "/v1/embeddings", {"model": "no-such-model", "input": "x"})
        assert denied.json()["error"]["message"].replace("stub-embed", "M") == unknown.json()[
            "error"
        ]["message"].replace("no-such-model", "M")
        result.record("404")
        assert call(key_a, CHAT, chat_body()).status_code == 200
        result.ok()
        secret_a = key_a.split("_", 2)[2]  # the secret may itself contain "_"
        forged = key_a[: -len(secret_a)] + "x" * len(secret_a)
        for bad in (forged, key_b + "x", "llmops_nonsense", secret_a):
            response = call(bad, CHAT, chat_body())
            assert response.status_code == 401
            result.record("401")
            assert secret_a not in response.text
            assert bad not in response.text
        # The API port serves no metrics; the metrics port no API (whatever the path, it
        # answers metrics, and refuses POST).
        assert client.get("/metrics").status_code == 404
        metrics_root = gw.metrics_url.removesuffix("/metrics")
        not_api = httpx.get(
            f"{metrics_root}/v1/models", headers={"authorization": f"Bearer {key_a}"}
        )
        assert not_api.text.startswith("# HELP")
        refused = httpx.post(f"{metrics_root}{CHAT}", json=chat_body())
        assert refused.status_code == 405
        with urllib.request.urlopen(gw.metrics_url, timeout=5) as response:
            metrics_text = response.read().decode()
    log_text = gw.log.read_text()
    stored = store.path.read_text()
    for key in (key_a, key_b):
        secret = key.split("_", 2)[2]
        assert secret not in log_text
        assert secret not in metrics_text
        assert secret not in stored  # hashed at rest
    assert 'tenant="tenant-a"' in metrics_text  # tenants are labels; keys are not
    assert result.lost == 0


# --- soak ---------------------------------------------------------------------------------

SOAK_S = float(os.environ.get("LLMOPS_SOAK_SECONDS", "600"))
# Growth is measured from the first memory sample after the warm-up (shorter in short soaks).
WARMUP_S = min(60.0, SOAK_S / 4)
SAMPLE_S = min(10.0, SOAK_S / 12)


@pytest.mark.slow
@pytest.mark.timeout(SOAK_S + 300)
def test_soak_mixed_traffic_keeps_memory_flat(tmp_path: Path, store: FileKeyStore) -> None:
    key = unlimited(store, "soak")
    limited = store.create(Tenant(name="soak-limited", requests_per_minute=30))[1]
    result = outcome(f"soak: {SOAK_S / 60:.0f} min of mixed traffic at 40 rps to the stub")
    with (
        redis_server(tmp_path) as redis,
        stub_upstream() as upstream,
        gateway(
            tmp_path, default_backend=upstream, keys_file=store.path, redis_url=redis.url
        ) as gw,
    ):
        usage = chat_body(16, stream=True, stream_options={"include_usage": True})
        mix: list[tuple[str, str, str, dict[str, object] | None]] = [
            ("chat", CHAT, key, chat_body(8)),
            ("stream", CHAT, key, chat_body(16, stream=True)),
            ("stream with usage", CHAT, key, usage),
            ("completion", "/v1/completions", key, {"model": "stub-chat", "prompt": "hi"}),
            ("embedding", "/v1/embeddings", key, {"model": "stub-embed", "input": ["a", "b"]}),
            ("malformed JSON", CHAT, key, None),
            ("over the rate limit", CHAT, limited, chat_body(2)),
        ]
        weights = [10, 4, 2, 2, 2, 1, 1]
        schedule = [entry for entry, w in zip(mix, weights, strict=True) for _ in range(w)]
        expected = {"malformed JSON": {"400"}, "over the rate limit": {"200", "429"}}
        samples: list[tuple[float, float]] = []
        unexpected: list[tuple[str, str]] = []

        async def soak() -> None:
            rate = 40.0
            async with httpx.AsyncClient(base_url=gw.url, timeout=30) as client:
                start = time.monotonic()
                tasks: set[asyncio.Task[None]] = set()

                async def one(
                    name: str, path: str, caller: str, body: dict[str, object] | None
                ) -> None:
                    if body is None:
                        kind = await send(client, path, content=MALFORMED, key=caller)
                    else:
                        kind = await send(client, path, json=body, key=caller)
                    result.record(kind)
                    if kind not in expected.get(name, {"200"}):
                        unexpected.append((name, kind))

                i = 0
                next_sample = 0.0
                while (now := time.monotonic() - start) < SOAK_S:
                    if now >= next_sample:
                        samples.append((now, rss_mib(gw.process.pid)))
                        next_sample += SAMPLE_S
                    task = asyncio.create_task(one(*schedule[i % len(schedule)]))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                    i += 1
                    await asyncio.sleep(max(0.0, start + i / rate - time.monotonic()))
                await asyncio.gather(*tasks)

        asyncio.run(soak())
    warm = [rss for at, rss in samples if at >= WARMUP_S]
    growth = (max(warm) - warm[0]) / warm[0]
    result.measured = {
        "RSS after warm-up": f"{warm[0]:.1f} MiB",
        "RSS max": f"{max(warm):.1f} MiB",
        "growth": f"{100 * growth:.1f}%",
    }
    assert not unexpected, unexpected[:10]
    assert result.lost == 0
    assert not [kind for kind in result.failed if kind.startswith("5")]
    assert growth < 0.10, result.measured
