"""The per-address count overlaps the request's own work, and still decides first.

With Redis, the count is written to the socket when the request begins and its reply is read
only before admission, so Redis answers while the gateway authenticates and parses the body
(one round trip off the request's path). What must not change: an address over its limit gets
429 whatever else is wrong with its request (a refused key, a malformed body), a refused key at
such an address writes no audit line, refused keys count after the request's own count, and a
Redis that has forgotten the script (restarted: ``NOSCRIPT``, redis/src/eval.c) still counts.
Run against a real redis-server through `GatewayCore.generate`, the pipeline both adapters call.
"""

from __future__ import annotations

import io
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from llmops_gateway.admission import RedisAdmission
from llmops_gateway.core import CHAT, Call, GatewayCore
from llmops_gateway.errors import GatewayError
from llmops_gateway.keys import FileKeyStore, Tenant
from llmops_gateway.logs import configure_logging
from llmops_gateway.metrics import GatewayMetrics
from llmops_gateway.redis_pipe import PipelinedRedis
from llmops_gateway.settings import GatewaySettings

BODY = b'{"model": "stub-chat", "messages": [{"role": "user", "content": "hi"}]}'


@pytest.fixture(name="setup")
async def setup_fixture(
    redis_url: str, tmp_path: Path
) -> AsyncIterator[tuple[GatewayCore, str, PipelinedRedis]]:
    """A core on the real Redis with 2 requests per address per minute, and its key; no
    upstream (the requests here end before admission)."""
    store = FileKeyStore(tmp_path / "keys.json")
    _, key = store.create(Tenant(name="overlap"))
    settings = GatewaySettings(
        default_backend="http://127.0.0.1:9",
        keys_file=store.path,
        redis_url=redis_url,
        client_rate_limit="2/minute",
        client_refused_key_limit="100/minute",
    )
    admission = RedisAdmission(redis_url, prefix="llmops:test-overlap")
    core = GatewayCore(settings, store, admission, GatewayMetrics.create())
    observer = PipelinedRedis(redis_url)
    await core.start()
    try:
        yield core, key, observer
    finally:
        await core.close()
        await admission.close()
        await observer.close()


async def _generate(core: GatewayCore, address: str, key: str, body: bytes) -> GatewayError:
    call = Call({"authorization": f"Bearer {key}"}, address, "req-overlap")

    async def read() -> bytes:
        return body

    with pytest.raises(GatewayError) as raised:
        await core.generate(CHAT, call, read)
    return raised.value


async def test_the_count_is_in_flight_while_the_body_is_read(
    setup: tuple[GatewayCore, str, PipelinedRedis],
) -> None:
    core, key, _ = setup
    redis = core.abuse.redis
    assert redis is not None
    await core.abuse.check("warm-up")  # connects and loads the script
    seen: list[tuple[int, int]] = []

    async def read() -> bytes:
        protocol = redis._protocol
        assert protocol is not None
        # Written already, and not answered yet as far as the gateway has read.
        seen.append((redis.counts.writes - before, len(protocol.waiting)))
        return b"{not json"

    before = redis.counts.writes
    call = Call({"authorization": f"Bearer {key}"}, "198.51.100.1", "req-overlap")
    with pytest.raises(GatewayError) as raised:
        await core.generate(CHAT, call, read)
    assert raised.value.status == 400
    assert seen == [(1, 1)]


async def test_an_address_over_its_limit_gets_429_whatever_else_is_wrong(
    setup: tuple[GatewayCore, str, PipelinedRedis], monkeypatch: pytest.MonkeyPatch
) -> None:
    core, key, observer = setup
    address = "198.51.100.2"
    assert (await _generate(core, address, key, b"{not json")).status == 400
    assert (await _generate(core, address, "llmops_nope_nope", BODY)).status == 401
    stream = io.StringIO()
    monkeypatch.setattr("sys.stderr", stream)
    configure_logging("json")
    try:
        for body, used_key in ((b"{not json", key), (BODY, "llmops_nope_nope")):
            blocked = await _generate(core, address, used_key, body)
            assert blocked.status == 429, blocked.message
            assert blocked.code == "client_rate_limit_exceeded"
    finally:
        logging.getLogger().handlers.clear()
    # A refused key at a blocked address: not audited, not counted as a refused key.
    assert not [line for line in stream.getvalue().splitlines() if "api key refused" in line], (
        stream.getvalue()
    )
    base = f"llmops:gw:abuse:{{{address}}}"
    assert int(await observer.call("GET", f"{base}:req")) == 4
    assert int(await observer.call("GET", f"{base}:refused")) == 1


async def test_a_redis_that_forgot_the_script_still_counts(
    setup: tuple[GatewayCore, str, PipelinedRedis],
) -> None:
    core, key, observer = setup
    address = "198.51.100.3"
    await core.abuse.check("warm-up")
    assert await observer.call("SCRIPT", "FLUSH") == b"OK"
    assert (await _generate(core, address, key, b"{not json")).status == 400
    assert int(await observer.call("GET", f"llmops:gw:abuse:{{{address}}}:req")) == 1
