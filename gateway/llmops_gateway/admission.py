"""Admission control: request rate, token rate, daily token budget, concurrent streams.

Token limits are where gateways leak: a check that reads usage, then lets the request run, then
writes usage, admits every request that arrives while the first ones are still generating. Here
admission *reserves* ``prompt_tokens + max_tokens`` atomically (one Redis script shared by all
gateway replicas) in a trailing 60-second window and in the tenant's UTC-day budget, and
``settle`` replaces the reservation with the real count when the request ends (streams and
disconnects included), returning what was not used.

Requests per minute use the ``limits`` library's moving window on the same Redis.
`MemoryAdmission` implements the same contract in-process for a single local gateway.
"""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from dataclasses import dataclass
from typing import Protocol

from limits import RateLimitItemPerMinute
from limits.aio.storage import MemoryStorage, RedisStorage
from limits.aio.strategies import MovingWindowRateLimiter

from llmops_gateway.keys import Tenant

WINDOW_S = 60.0
DAY_S = 86400
STREAM_LEASE_S = 3600.0


@dataclass(frozen=True)
class Rejection:
    """Why a request was not admitted, and when to retry."""

    reason: str
    """One of: requests_per_minute, tokens_per_minute, tokens_per_day, concurrent_streams,
    request_too_large."""
    message: str
    retry_after_s: float


@dataclass(frozen=True)
class Reservation:
    """Tokens held for one admitted request until `settle`."""

    id: str
    tenant: str
    tokens: int
    day: int
    stream: bool


class Admission(Protocol):
    """The admission contract the gateway core uses."""

    async def admit(
        self, tenant: Tenant, tokens: int, *, stream: bool = False
    ) -> Reservation | Rejection:
        """Reserves one request and ``tokens`` tokens, or says why not."""
        ...

    async def settle(self, reservation: Reservation, used_tokens: int) -> None:
        """Replaces the reservation with the tokens really used and ends a stream's lease."""
        ...


def _day(now: float) -> int:
    return int(now // DAY_S)


def _seconds_to_midnight(now: float) -> float:
    return DAY_S - (now % DAY_S)


# KEYS: 1 window zset (member -> admitted time), 2 window amounts hash, 3 window total,
#       4 day counter, 5 streams zset (member -> lease expiry)
# ARGV: window_s, tpm, tokens, member, tpd, day_ttl, stream(0/1), max_streams, lease_s
# Time comes from the Redis server, so gateway replicas with skewed clocks agree.
_ADMIT = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local window = tonumber(ARGV[1])
local tpm = tonumber(ARGV[2])
local tokens = tonumber(ARGV[3])
local member = ARGV[4]
local tpd = tonumber(ARGV[5])
local day_ttl = tonumber(ARGV[6])
local stream = ARGV[7] == '1'
local max_streams = tonumber(ARGV[8])
local lease = tonumber(ARGV[9])

local expired = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now - window)
if #expired > 0 then
  local amounts = redis.call('HMGET', KEYS[2], unpack(expired))
  local freed = 0
  for _, a in ipairs(amounts) do freed = freed + (tonumber(a) or 0) end
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
  redis.call('HDEL', KEYS[2], unpack(expired))
  redis.call('DECRBY', KEYS[3], freed)
end

if stream then
  redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', now)
  if redis.call('ZCARD', KEYS[5]) >= max_streams then
    local soonest = redis.call('ZRANGE', KEYS[5], 0, 0, 'WITHSCORES')
    return {'concurrent_streams', tostring(tonumber(soonest[2]) - now)}
  end
end

local used_day = tonumber(redis.call('GET', KEYS[4]) or '0')
if used_day + tokens > tpd then
  return {'tokens_per_day', tostring(day_ttl)}
end

local total = tonumber(redis.call('GET', KEYS[3]) or '0')
if total + tokens > tpm then
  -- Retry when enough of the oldest reservations have left the window.
  local need = total + tokens - tpm
  local oldest = redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')
  local retry = window
  for i = 1, #oldest, 2 do
    need = need - (tonumber(redis.call('HGET', KEYS[2], oldest[i])) or 0)
    if need <= 0 then retry = tonumber(oldest[i + 1]) + window - now break end
  end
  return {'tokens_per_minute', tostring(retry)}
end

redis.call('ZADD', KEYS[1], now, member)
redis.call('HSET', KEYS[2], member, tokens)
redis.call('INCRBY', KEYS[3], tokens)
redis.call('INCRBY', KEYS[4], tokens)
redis.call('EXPIRE', KEYS[4], day_ttl + 3600)
for i = 1, 3 do redis.call('EXPIRE', KEYS[i], math.ceil(window) * 2) end
if stream then
  redis.call('ZADD', KEYS[5], now + lease, member)
  redis.call('EXPIRE', KEYS[5], math.ceil(lease) * 2)
end
return {'ok', '0'}
"""

# KEYS: 1 window zset, 2 window amounts hash, 3 window total, 4 day counter, 5 streams zset
# ARGV: member, used tokens
_SETTLE = """
local member = ARGV[1]
local used = tonumber(ARGV[2])
local reserved = tonumber(redis.call('HGET', KEYS[2], member) or '-1')
if reserved >= 0 then
  redis.call('HSET', KEYS[2], member, used)
  redis.call('INCRBY', KEYS[3], used - reserved)
end
redis.call('INCRBY', KEYS[4], used - tonumber(ARGV[3]))
redis.call('ZREM', KEYS[5], member)
return reserved
"""


class RedisAdmission:
    """Admission shared by every gateway replica through one Redis.

    Args:
        url: ``redis://host:port/db``.
        prefix: Key prefix, so several gateways can share a Redis.
        max_connections: Redis connections this process may open for admission.
    """

    def __init__(self, url: str, prefix: str = "llmops:gw", max_connections: int = 64) -> None:
        import redis.asyncio as aioredis

        self.prefix = prefix
        # A bounded pool that makes callers wait for a connection (up to the socket timeout)
        # instead of failing when a burst needs more connections than Redis should get.
        pool = aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            timeout=2.0,
            socket_timeout=2.0,
            socket_connect_timeout=2.0,
        )
        self.redis = aioredis.Redis(connection_pool=pool)
        self._admit = self.redis.register_script(_ADMIT)
        self._settle = self.redis.register_script(_SETTLE)
        self._requests = MovingWindowRateLimiter(
            RedisStorage(f"async+{url}", implementation="redispy", key_prefix=f"{prefix}:rpm")
        )

    def _keys(self, tenant: str, day: int) -> list[str]:
        base = f"{self.prefix}:{{{tenant}}}"
        return [f"{base}:tw", f"{base}:ta", f"{base}:tt", f"{base}:day:{day}", f"{base}:streams"]

    async def admit(
        self, tenant: Tenant, tokens: int, *, stream: bool = False
    ) -> Reservation | Rejection:
        """Reserves one request and ``tokens`` tokens, or says why not.

        Raises:
            redis.exceptions.RedisError: Redis is unreachable (the caller applies its
                fail-open or fail-closed setting).
        """
        early = await _precheck(self._requests, tenant, tokens)
        if early is not None:
            return early
        now = time.time()
        member = uuid.uuid4().hex
        day = _day(now)
        verdict, retry = await self._admit(
            keys=self._keys(tenant.name, day),
            args=[
                WINDOW_S,
                tenant.tokens_per_minute,
                tokens,
                member,
                tenant.tokens_per_day,
                math.ceil(_seconds_to_midnight(now)),
                int(stream),
                tenant.max_concurrent_streams,
                STREAM_LEASE_S,
            ],
        )
        reason = verdict.decode() if isinstance(verdict, bytes) else str(verdict)
        if reason != "ok":
            return _rejection(reason, tenant, float(retry))
        return Reservation(member, tenant.name, tokens, day, stream)

    async def settle(self, reservation: Reservation, used_tokens: int) -> None:
        """Replaces the reservation with the real usage."""
        await self._settle(
            keys=self._keys(reservation.tenant, reservation.day),
            args=[reservation.id, used_tokens, reservation.tokens],
        )

    async def close(self) -> None:
        """Closes the Redis connections."""
        await self.redis.aclose()


async def _precheck(
    requests: MovingWindowRateLimiter, tenant: Tenant, tokens: int
) -> Rejection | None:
    """The checks both backends make first: request size, then the request rate."""
    if tokens > tenant.tokens_per_minute:
        return Rejection(
            "request_too_large",
            f"this request may use {tokens} tokens (prompt + max_tokens), more than the "
            f"tenant's {tenant.tokens_per_minute} tokens per minute: lower max_tokens",
            0.0,
        )
    rpm = RateLimitItemPerMinute(tenant.requests_per_minute)
    if not await requests.hit(rpm, tenant.name):
        stats = await requests.get_window_stats(rpm, tenant.name)
        return Rejection(
            "requests_per_minute",
            f"tenant {tenant.name} is over {tenant.requests_per_minute} requests per minute",
            max(stats.reset_time - time.time(), 0.001),
        )
    return None


def _rejection(reason: str, tenant: Tenant, retry_after_s: float) -> Rejection:
    messages = {
        "tokens_per_minute": f"tenant {tenant.name} is over {tenant.tokens_per_minute} tokens "
        "per minute (reserved as prompt + max_tokens until a request ends)",
        "tokens_per_day": f"tenant {tenant.name} has used its {tenant.tokens_per_day} tokens "
        "for today (UTC)",
        "concurrent_streams": f"tenant {tenant.name} already has "
        f"{tenant.max_concurrent_streams} streams open",
    }
    return Rejection(reason, messages[reason], max(retry_after_s, 0.001))


class MemoryAdmission:
    """The same contract in one process, for `llmops up` without Redis."""

    def __init__(self) -> None:
        self._lock = asyncio.Lock()
        self._requests = MovingWindowRateLimiter(MemoryStorage())
        self._window: dict[str, dict[str, tuple[float, int]]] = {}
        self._days: dict[tuple[str, int], int] = {}
        self._streams: dict[str, set[str]] = {}

    async def admit(
        self, tenant: Tenant, tokens: int, *, stream: bool = False
    ) -> Reservation | Rejection:
        """Reserves one request and ``tokens`` tokens, or says why not."""
        early = await _precheck(self._requests, tenant, tokens)
        if early is not None:
            return early
        async with self._lock:
            now = time.time()
            window = self._window.setdefault(tenant.name, {})
            for member in [m for m, (at, _) in window.items() if at <= now - WINDOW_S]:
                del window[member]
            streams = self._streams.setdefault(tenant.name, set())
            if stream and len(streams) >= tenant.max_concurrent_streams:
                return _rejection("concurrent_streams", tenant, 1.0)
            day = _day(now)
            if self._days.get((tenant.name, day), 0) + tokens > tenant.tokens_per_day:
                return _rejection("tokens_per_day", tenant, _seconds_to_midnight(now))
            total = sum(amount for _, amount in window.values())
            if total + tokens > tenant.tokens_per_minute:
                need, retry = total + tokens - tenant.tokens_per_minute, WINDOW_S
                for at, amount in sorted(window.values()):
                    need -= amount
                    if need <= 0:
                        retry = at + WINDOW_S - now
                        break
                return _rejection("tokens_per_minute", tenant, retry)
            member = uuid.uuid4().hex
            window[member] = (now, tokens)
            self._days[(tenant.name, day)] = self._days.get((tenant.name, day), 0) + tokens
            if stream:
                streams.add(member)
            return Reservation(member, tenant.name, tokens, day, stream)

    async def settle(self, reservation: Reservation, used_tokens: int) -> None:
        """Replaces the reservation with the real usage."""
        async with self._lock:
            window = self._window.get(reservation.tenant, {})
            if reservation.id in window:
                at, _ = window[reservation.id]
                window[reservation.id] = (at, used_tokens)
            key = (reservation.tenant, reservation.day)
            self._days[key] = self._days.get(key, 0) + used_tokens - reservation.tokens
            self._streams.get(reservation.tenant, set()).discard(reservation.id)
