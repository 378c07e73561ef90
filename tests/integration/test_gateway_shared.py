"""Three gateway processes sharing one Redis, faults, and draining."""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time
import urllib.request
from pathlib import Path

import httpx
import pytest

from llmops_gateway.keys import FileKeyStore, Tenant
from tests.integration.gateway_fixtures import gateway, stub_upstream


def _post(url: str, key: str, body: dict[str, object], timeout: float = 30) -> httpx.Response:
    return httpx.post(
        f"{url}/v1/completions",
        headers={"authorization": f"Bearer {key}"},
        json=body,
        timeout=timeout,
    )


async def _fire(urls: list[str], key: str, body: dict[str, object], count: int) -> list[int]:
    async with httpx.AsyncClient(timeout=60) as client:

        async def one(i: int) -> int:
            response = await client.post(
                f"{urls[i % len(urls)]}/v1/completions",
                headers={"authorization": f"Bearer {key}"},
                json=body,
            )
            if body.get("stream"):
                await response.aread()
            return response.status_code

        return list(await asyncio.gather(*(one(i) for i in range(count))))


def test_three_gateways_share_request_and_token_limits(tmp_path: Path, redis_url: str) -> None:
    store = FileKeyStore(tmp_path / "keys.json")
    _, rpm_key = store.create(Tenant(name="rpm", requests_per_minute=40))
    # Each stream reserves 1 (prompt) + 100 tokens and, with ignore_eos, uses ~all of them.
    _, tpm_key = store.create(
        Tenant(name="tpm", tokens_per_minute=2_020, requests_per_minute=10_000)
    )
    with (
        stub_upstream() as upstream,
        gateway(tmp_path, default_backend=upstream, keys_file=store.path, redis_url=redis_url) as a,
        gateway(tmp_path, default_backend=upstream, keys_file=store.path, redis_url=redis_url) as b,
        gateway(tmp_path, default_backend=upstream, keys_file=store.path, redis_url=redis_url) as c,
    ):
        urls = [a.url, b.url, c.url]
        statuses = asyncio.run(
            _fire(urls, rpm_key, {"model": "stub-chat", "prompt": "x", "max_tokens": 1}, 120)
        )
        assert statuses.count(200) == 40
        assert statuses.count(429) == 80
        body = {
            "model": "stub-chat",
            "prompt": "x",
            "max_tokens": 100,
            "stream": True,
            "ignore_eos": True,
        }
        statuses = asyncio.run(_fire(urls, tpm_key, body, 60))
        assert statuses.count(200) == 20  # 20 * 101 = 2020
        assert statuses.count(429) == 40


def test_redis_down_fails_closed_or_open_as_configured(tmp_path: Path) -> None:
    store = FileKeyStore(tmp_path / "keys.json")
    _, key = store.create(Tenant(name="acme"))
    dead_redis = "redis://127.0.0.1:9/0"
    body = {"model": "stub-chat", "prompt": "x", "max_tokens": 1}
    with stub_upstream() as upstream:
        with gateway(
            tmp_path,
            default_backend=upstream,
            keys_file=store.path,
            redis_url=dead_redis,
            redis_failure_mode="closed",
        ) as closed:
            response = _post(closed.url, key, body)
            assert response.status_code == 503
            assert "rate limiter unavailable" in response.json()["error"]["message"]
            assert response.headers["retry-after"] == "1"
            with urllib.request.urlopen(closed.metrics_url) as metrics:
                text = metrics.read().decode()
            assert 'llmops_gateway_redis_errors_total{mode="closed"} 1.0' in text
        assert "failing closed" in closed.log.read_text()
        with gateway(
            tmp_path,
            default_backend=upstream,
            keys_file=store.path,
            redis_url=dead_redis,
            redis_failure_mode="open",
        ) as opened:
            assert _post(opened.url, key, body).status_code == 200
        assert "failing open" in opened.log.read_text()


def test_hanging_backend_times_out_with_504(tmp_path: Path) -> None:
    store = FileKeyStore(tmp_path / "keys.json")
    _, key = store.create(Tenant(name="acme"))
    with (
        stub_upstream() as upstream,
        gateway(
            tmp_path, backends={"hang": upstream}, keys_file=store.path, request_timeout_s=1.5
        ) as gw,
    ):
        started = time.monotonic()
        response = _post(gw.url, key, {"model": "hang", "prompt": "x", "max_tokens": 1})
        elapsed = time.monotonic() - started
    assert response.status_code == 504
    assert response.json()["error"]["type"] == "timeout_error"
    assert 1.4 < elapsed < 5


def test_client_disconnect_cancels_upstream_and_settles(tmp_path: Path, redis_url: str) -> None:
    store = FileKeyStore(tmp_path / "keys.json")
    _, key = store.create(Tenant(name="acme", tokens_per_minute=1_000))
    with (
        stub_upstream(token_delay=0.05) as upstream,
        gateway(
            tmp_path, default_backend=upstream, keys_file=store.path, redis_url=redis_url
        ) as gw,
    ):
        body = {
            "model": "stub-chat",
            "prompt": "x",
            "max_tokens": 900,
            "stream": True,
            "ignore_eos": True,
        }
        with httpx.stream(
            "POST",
            f"{gw.url}/v1/completions",
            json=body,
            timeout=30,
            headers={"authorization": f"Bearer {key}"},
        ) as response:
            for received, _ in enumerate(response.iter_lines()):
                if received >= 10:
                    break
        deadline = time.monotonic() + 10
        while json.loads(httpx.get(f"{upstream}/stats").text)["cancelled"] < 1:
            assert time.monotonic() < deadline, "upstream generation was not cancelled"
            time.sleep(0.05)
        # The 900-token reservation was settled to what was relayed (about 10-20 tokens),
        # so a request reserving 900 fits again.
        deadline = time.monotonic() + 5
        while (
            _post(gw.url, key, {"model": "stub-chat", "prompt": "x", "max_tokens": 900}).status_code
            != 200
        ):
            assert time.monotonic() < deadline, "the disconnected stream was never settled"
            time.sleep(0.1)


def test_sigterm_drains_streams_and_refuses_new_requests(tmp_path: Path) -> None:
    store = FileKeyStore(tmp_path / "keys.json")
    _, key = store.create(Tenant(name="acme"))
    with (
        stub_upstream(token_delay=0.1) as upstream,
        gateway(tmp_path, default_backend=upstream, keys_file=store.path, drain_timeout_s=20) as gw,
    ):
        body = {
            "model": "stub-chat",
            "prompt": "x",
            "max_tokens": 30,
            "stream": True,
            "ignore_eos": True,
        }
        received: list[str] = []

        def stream() -> None:
            with httpx.stream(
                "POST",
                f"{gw.url}/v1/completions",
                json=body,
                timeout=30,
                headers={"authorization": f"Bearer {key}"},
            ) as response:
                received.extend(line for line in response.iter_lines() if line)

        reader = threading.Thread(target=stream)
        reader.start()
        time.sleep(0.5)
        gw.process.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        with pytest.raises(httpx.HTTPError):
            # The listening socket is closed: new requests are refused, not dropped mid-way.
            _post(gw.url, key, {"model": "stub-chat", "prompt": "x", "max_tokens": 1}, 2)
        reader.join(timeout=30)
        assert received[-1] == "data: [DONE]"
        assert sum(1 for line in received if '"text"' in line) == 30
        # uvicorn re-raises the signal once drained, so the exit is "terminated by SIGTERM".
        assert gw.process.wait(timeout=30) in (0, -signal.SIGTERM)
