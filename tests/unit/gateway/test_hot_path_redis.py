"""What one request costs the gateway in Redis calls and socket writes.

On loopback a socket write costs the gateway more CPU than Redis spends running the script it
carries (the 2026-12-05 profile in docs/benchmarks.md, "Gateway alone, on the stub upstream"),
so the hot path's calls and writes are pinned here: a change that adds a round trip, or sends
the settlement and its usage record in writes of their own, fails. Counted on the gateway's own
connection (`PipelinedRedis.counts`) against a real redis-server, whose ``INFO commandstats``
(Redis's own count of the commands it ran) must agree.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from aiohttp import web

from llmops_gateway import redis_pipe
from llmops_gateway.admission import RedisAdmission
from llmops_gateway.core import GatewayCore
from llmops_gateway.keys import FileKeyStore, Tenant
from llmops_gateway.metrics import GatewayMetrics
from llmops_gateway.redis_pipe import PipelinedRedis
from llmops_gateway.rest import create_app
from llmops_gateway.settings import GatewaySettings
from tests.fakes.openai_stub import make_app

BODY = {"model": "stub-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}

CALLS_PER_REQUEST = 4
"""Per-address count, admission, settlement, usage record."""
WRITES_PER_REQUEST = 2
"""The count and the admission; the settlement and its usage record ride along with the next
request's write (`LATER_S`)."""


@pytest.fixture(name="upstream")
async def upstream_fixture() -> AsyncIterator[str]:
    """The stub upstream, in this test's event loop."""
    runner = web.AppRunner(make_app(["stub-chat"], 0.0))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


async def _run_a_while(core: GatewayCore) -> None:
    """Lets the core's background tasks (settlements) run until they wait on Redis."""
    if core._tasks:
        await asyncio.wait(core._tasks, timeout=0.2)


async def _evalsha_calls(redis: PipelinedRedis) -> int:
    """EVALSHA calls Redis has run (``INFO commandstats``: ``cmdstat_evalsha:calls=N,...``)."""
    info = (await redis.call("INFO", "commandstats")).decode()
    for line in info.splitlines():
        if line.startswith("cmdstat_evalsha:"):
            return int(line.split("calls=")[1].split(",")[0])
    return 0


async def test_one_request_costs_four_calls_in_two_writes(
    redis_url: str, upstream: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Long enough that no settlement leaves on its own during the test: each rides along.
    monkeypatch.setattr(redis_pipe, "LATER_S", 60.0)
    store = FileKeyStore(tmp_path / "keys.json")
    _, key = store.create(Tenant(name="hot-path"))
    settings = GatewaySettings(
        default_backend=upstream,
        keys_file=store.path,
        redis_url=redis_url,
        client_rate_limit="1000000/minute",
    )
    admission = RedisAdmission(redis_url, prefix="llmops:test-hot-path")
    core = GatewayCore(settings, store, admission, GatewayMetrics.create())
    observer = PipelinedRedis(redis_url)
    await core.start()
    try:
        transport = httpx.ASGITransport(app=create_app(core))
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
            headers = {"authorization": f"Bearer {key}"}
            # The first request loads the scripts (SCRIPT LOAD after NOSCRIPT) and connects.
            assert (
                await client.post("/v1/chat/completions", json=BODY, headers=headers)
            ).is_success
            await _run_a_while(core)  # its settlement: queued
            await admission.redis.call("PING")  # and sent along (after NOSCRIPT, once more)
            await _run_a_while(core)
            await admission.redis.call("PING")
            await asyncio.gather(*core._tasks)
            counts = admission.redis.counts
            calls, writes = counts.commands, counts.writes
            ran = await _evalsha_calls(observer)
            requests = 5
            for _ in range(requests):
                response = await client.post("/v1/chat/completions", json=BODY, headers=headers)
                assert response.status_code == 200
            # The last settlement is queued (settlements run after their answers), then sent
            # with one more command, as the next request's count would carry it.
            await _run_a_while(core)  # no settlement ends: their replies wait
            assert counts.commands - calls == requests * CALLS_PER_REQUEST
            await admission.redis.call("PING")
            await asyncio.gather(*core._tasks)
        assert counts.commands - calls == requests * CALLS_PER_REQUEST + 1
        assert counts.writes - writes == requests * WRITES_PER_REQUEST + 1
        # Redis ran as many (tests run one at a time: nothing else calls this server now).
        assert await _evalsha_calls(observer) - ran == requests * CALLS_PER_REQUEST
    finally:
        await core.close()
        await admission.close()
        await observer.close()
