"""Admission limits on a real Redis shared by several gateway instances, and in memory."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable

import pytest

from llmops_gateway.admission import (
    Admission,
    MemoryAdmission,
    RedisAdmission,
    Rejection,
    Reservation,
)
from llmops_gateway.keys import Tenant
from llmops_gateway.redis_pipe import RedisUnavailableError


def _tenant(**limits: int) -> Tenant:
    return Tenant(name=f"t{uuid.uuid4().hex[:8]}", **limits)


@pytest.fixture(params=["redis", "memory"])
async def make(
    request: pytest.FixtureRequest, redis_url: str
) -> AsyncIterator[Callable[[], Admission]]:
    """Makes admission instances; Redis ones share one server like gateway replicas do."""
    made: list[RedisAdmission] = []
    memory = MemoryAdmission()
    shared_prefix = f"test:{uuid.uuid4().hex[:8]}"

    def factory() -> Admission:
        if request.param == "memory":
            return memory
        instance = RedisAdmission(redis_url, prefix=shared_prefix)
        made.append(instance)
        return instance

    yield factory
    for instance in made:
        await instance.close()


async def test_token_reservations_are_atomic_across_instances(
    make: Callable[[], Admission],
) -> None:
    gateways = [make() for _ in range(3)]
    tenant = _tenant(tokens_per_minute=5_000, requests_per_minute=10_000)
    results = await asyncio.gather(*(gateways[i % 3].admit(tenant, 100) for i in range(200)))
    admitted = [r for r in results if isinstance(r, Reservation)]
    assert len(admitted) == 50
    rejected = [r for r in results if isinstance(r, Rejection)]
    assert {r.reason for r in rejected} == {"tokens_per_minute"}
    assert all(0 < r.retry_after_s <= 60 for r in rejected)


async def test_settling_returns_unused_tokens(make: Callable[[], Admission]) -> None:
    admission = make()
    tenant = _tenant(tokens_per_minute=1_500)
    first = await admission.admit(tenant, 1_000)
    assert isinstance(first, Reservation)
    assert isinstance(await admission.admit(tenant, 1_000), Rejection)
    await admission.settle(first, 100)
    assert isinstance(await admission.admit(tenant, 1_000), Reservation)
    # 100 + 1000 in the window now: 401 more do not fit, 400 do.
    assert isinstance(await admission.admit(tenant, 401), Rejection)
    assert isinstance(await admission.admit(tenant, 400), Reservation)


async def test_settling_more_than_reserved_counts_the_real_usage(
    make: Callable[[], Admission],
) -> None:
    admission = make()
    tenant = _tenant(tokens_per_minute=1_000)
    reservation = await admission.admit(tenant, 100)
    assert isinstance(reservation, Reservation)
    await admission.settle(reservation, 950)
    assert isinstance(await admission.admit(tenant, 100), Rejection)
    assert isinstance(await admission.admit(tenant, 50), Reservation)


async def test_request_rate_is_exact_across_instances(make: Callable[[], Admission]) -> None:
    gateways = [make() for _ in range(3)]
    tenant = _tenant(requests_per_minute=25)
    results = await asyncio.gather(*(gateways[i % 3].admit(tenant, 1) for i in range(90)))
    assert sum(isinstance(r, Reservation) for r in results) == 25
    rejections = [r for r in results if isinstance(r, Rejection)]
    assert {r.reason for r in rejections} == {"requests_per_minute"}
    assert all(0 < r.retry_after_s <= 60 for r in rejections)


async def test_daily_budget(make: Callable[[], Admission]) -> None:
    admission = make()
    tenant = _tenant(tokens_per_day=1_000, tokens_per_minute=1_000)
    reservation = await admission.admit(tenant, 800)
    assert isinstance(reservation, Reservation)
    await admission.settle(reservation, 800)
    rejection = await admission.admit(tenant, 300)
    assert isinstance(rejection, Rejection)
    assert rejection.reason == "tokens_per_day"
    assert rejection.retry_after_s <= 86_400


async def test_concurrent_streams_are_capped_and_released(
    make: Callable[[], Admission],
) -> None:
    admission = make()
    tenant = _tenant(max_concurrent_streams=2)
    first = await admission.admit(tenant, 10, stream=True)
    second = await admission.admit(tenant, 10, stream=True)
    assert isinstance(first, Reservation)
    assert isinstance(second, Reservation)
    third = await admission.admit(tenant, 10, stream=True)
    assert isinstance(third, Rejection)
    assert third.reason == "concurrent_streams"
    assert isinstance(await admission.admit(tenant, 10), Reservation)  # not a stream
    await admission.settle(first, 5)
    assert isinstance(await admission.admit(tenant, 10, stream=True), Reservation)


async def test_a_request_bigger_than_the_limit_is_refused_outright(
    make: Callable[[], Admission],
) -> None:
    rejection = await make().admit(_tenant(tokens_per_minute=100), 101)
    assert isinstance(rejection, Rejection)
    assert rejection.reason == "request_too_large"
    assert "lower max_tokens" in rejection.message


async def test_unreachable_redis_raises_for_the_caller_to_decide() -> None:
    admission = RedisAdmission("redis://127.0.0.1:9/0")
    with pytest.raises(RedisUnavailableError, match=r"cannot use Redis at 127\.0\.0\.1:9"):
        await admission.admit(_tenant(), 10)
    await admission.close()


async def test_a_full_window_expires_at_once(redis_url: str) -> None:
    """Tens of thousands of members leaving the window in one call (after a busy minute)."""
    admission = RedisAdmission(redis_url, prefix=f"test:{uuid.uuid4().hex[:8]}")
    tenant = _tenant(requests_per_minute=100_000, tokens_per_minute=10**9)
    keys = admission._keys(tenant.name, 0)
    long_ago = 1.0  # seconds since the epoch: far outside any window
    members = {f"m{i}": long_ago for i in range(20_000)}
    scores = [part for member in members for part in (long_ago, member)]
    await admission.redis.call("ZADD", keys[0], *scores)
    await admission.redis.call("HSET", keys[1], *[part for m in members for part in (m, 5)])
    await admission.redis.call("SET", keys[2], 5 * len(members))
    try:
        reservation = await admission.admit(tenant, 7)
        assert isinstance(reservation, Reservation)
        assert await admission.redis.call("ZCARD", keys[0]) == 1
        assert int(await admission.redis.call("GET", keys[2])) == 7
    finally:
        await admission.close()
