"""Per-address abuse limits: which address counts, and slowapi/limits' fixed windows.

X-Forwarded-For is read as nginx's ``$proxy_add_x_forwarded_for`` and Envoy's
``xff_num_trusted_hops`` read it: each proxy appends the address it saw, so the client is the
rightmost entry that is not one of our own proxies. Window semantics are those of
``limits/strategies.py`` ``FixedWindowRateLimiter`` (the N+1th hit in a window is refused).
"""

from __future__ import annotations

import asyncio
import socket

import pytest

from llmops_gateway.abuse import AbuseLimits
from llmops_gateway.errors import GatewayError
from llmops_gateway.redis_pipe import PipelinedRedis


@pytest.mark.parametrize(
    ("peer", "forwarded", "client"),
    [
        ("203.0.113.9", "198.51.100.1", "203.0.113.9"),  # not a proxy: header ignored
        ("10.0.0.5", "198.51.100.1", "198.51.100.1"),
        ("10.0.0.5", "1.1.1.1, 198.51.100.1", "198.51.100.1"),  # spoofed left entry ignored
        ("10.0.0.5", "198.51.100.1, 10.0.0.7", "198.51.100.1"),  # two of our proxies
        ("10.0.0.5", "10.0.0.9, 10.0.0.7", "10.0.0.9"),  # only proxies: the farthest
        ("10.0.0.5", None, "10.0.0.5"),
        ("10.0.0.5", "not-an-ip", "not-an-ip"),
        ("fd00::1", "2001:db8::7", "2001:db8::7"),
        (None, None, "unknown"),
    ],
)
def test_the_client_is_the_nearest_address_that_is_not_our_proxy(
    peer: str | None, forwarded: str | None, client: str
) -> None:
    limits = AbuseLimits(None, "3/minute", ["10.0.0.0/8", "fd00::/8"])
    assert limits.address(peer, forwarded) == client


def test_refused_keys_block_the_address_for_the_rest_of_the_window() -> None:
    async def scenario() -> None:
        limits = AbuseLimits(None, "2/minute", [])
        for _ in range(2):
            await limits.check("a")
            await limits.refused("a")
        with pytest.raises(GatewayError, match="too many refused API keys from a") as blocked:
            await limits.check("a")
        assert blocked.value.status == 429
        assert blocked.value.retry_after_s is not None
        assert 0 < blocked.value.retry_after_s <= 60
        await limits.check("b")  # other addresses are not affected

    asyncio.run(scenario())


def test_every_request_counts_when_a_rate_is_set() -> None:
    async def scenario() -> None:
        limits = AbuseLimits("3/second", None, [])
        for _ in range(3):
            await limits.check("a")
        with pytest.raises(GatewayError, match="too many requests from a"):
            await limits.check("a")

    asyncio.run(scenario())


def test_no_limits_configured_counts_nothing() -> None:
    async def scenario() -> None:
        limits = AbuseLimits(None, None, [])
        assert not limits.enabled
        for _ in range(100):
            await limits.check("a")
            await limits.refused("a")

    asyncio.run(scenario())


def test_without_redis_each_replica_keeps_limiting_in_memory() -> None:
    """A Redis that refuses connections: the counts fall back to this process's memory."""
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]  # bound, not listening: connections are refused

        async def scenario() -> None:
            redis = PipelinedRedis(f"redis://127.0.0.1:{port}/0", timeout_s=0.5)
            limits = AbuseLimits(None, "2/minute", [], redis)
            for _ in range(2):
                await limits.check("a")
                await limits.refused("a")
            with pytest.raises(GatewayError, match="too many refused API keys from a"):
                await limits.check("a")

        asyncio.run(scenario())
