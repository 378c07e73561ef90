"""The gateway's pipelined Redis connection against a real redis-server."""

from __future__ import annotations

import asyncio
import socket
import uuid

import pytest

from llmops_gateway.redis_pipe import (
    Address,
    PipelinedRedis,
    RedisReplyError,
    RedisUnavailableError,
    Script,
    encode,
)


def test_commands_are_encoded_as_bulk_string_arrays() -> None:
    assert encode(("SET", "k", 12, b"\x00v")) == (
        b"*4\r\n$3\r\nSET\r\n$1\r\nk\r\n$2\r\n12\r\n$2\r\n\x00v\r\n"
    )


def test_urls_give_host_port_tls_credentials_and_database() -> None:
    assert Address.from_url("rediss://app:p%40ss@redis.example:6380/3") == Address(
        "redis.example", 6380, True, "app", "p@ss", 3
    )
    assert Address.from_url("redis://:secret@10.0.0.1") == Address(
        "10.0.0.1", 6379, False, None, "secret", 0
    )
    with pytest.raises(ValueError, match="not a redis"):
        Address.from_url("http://redis:6379")
    with pytest.raises(ValueError, match="is a number"):
        Address.from_url("redis://redis:6379/cache")


async def test_concurrent_calls_each_get_their_own_reply(redis_url: str) -> None:
    redis = PipelinedRedis(redis_url)
    prefix = uuid.uuid4().hex
    try:
        await asyncio.gather(*(redis.call("SET", f"{prefix}:{i}", i) for i in range(500)))
        replies = await asyncio.gather(*(redis.call("GET", f"{prefix}:{i}") for i in range(500)))
        assert replies == [str(i).encode() for i in range(500)]
        await redis.call("SET", f"{prefix}:text", "abc")
        with pytest.raises(RedisReplyError, match="not an integer"):
            await redis.call("INCR", f"{prefix}:text")
        # An error reply fails only its own call; the connection goes on.
        assert await redis.call("GET", f"{prefix}:7") == b"7"
    finally:
        await redis.close()


async def test_scripts_are_reloaded_when_redis_forgot_them(redis_url: str) -> None:
    redis = PipelinedRedis(redis_url)
    script = Script(f"return {{KEYS[1], ARGV[1], '{uuid.uuid4().hex}'}}")
    try:
        first = await redis.evalsha(script, ["k"], [5])
        assert first[:2] == [b"k", b"5"]
        await redis.call("SCRIPT", "FLUSH")  # what a Redis restart does
        assert await redis.evalsha(script, ["k"], [6]) == [b"k", b"6", first[2]]
    finally:
        await redis.close()


async def test_a_silent_server_times_out_and_the_next_call_reconnects(redis_url: str) -> None:
    # A listener that accepts and never answers, in place of a stuck Redis.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        port = silent.getsockname()[1]
        redis = PipelinedRedis(f"redis://127.0.0.1:{port}/0", timeout_s=0.2)
        with pytest.raises(RedisUnavailableError, match=r"did not answer in 0\.2 s"):
            await redis.call("PING")
        await redis.close()
    healthy = PipelinedRedis(redis_url, timeout_s=0.5)
    try:
        assert await healthy.call("PING") == b"PONG"
        # Drop the connection under it: waiting calls fail, the next one reconnects.
        protocol = await healthy._connection()
        assert protocol.transport is not None
        protocol.transport.abort()
        await asyncio.sleep(0.05)
        assert await healthy.call("PING") == b"PONG"
    finally:
        await healthy.close()


async def test_credentials_in_the_url_are_used_and_a_wrong_password_is_named_not_shown(
    redis_url: str,
) -> None:
    admin = PipelinedRedis(redis_url)
    user = f"u{uuid.uuid4().hex[:8]}"
    await admin.call("ACL", "SETUSER", user, "on", ">right-pass", "~*", "+@all")
    await admin.close()
    host = redis_url.removeprefix("redis://")
    good = PipelinedRedis(f"redis://{user}:right-pass@{host}")
    assert await good.call("ACL", "WHOAMI") == user.encode()
    await good.close()
    bad = PipelinedRedis(f"redis://{user}:not-the-password@{host}")
    with pytest.raises(RedisUnavailableError, match="WRONGPASS") as caught:
        await bad.call("PING")
    assert "not-the-password" not in str(caught.value)
