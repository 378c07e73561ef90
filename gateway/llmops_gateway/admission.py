"""Admission control: request rate, token rate, daily token budget, concurrent streams.

Token limits are where gateways leak: a check that reads usage, then lets the request run, then
writes usage, admits every request that arrives while the first ones are still generating. Here
admission *reserves* ``prompt_tokens + max_tokens`` atomically (one Redis script shared by all
gateway replicas) in a trailing 60-second window and in the tenant's UTC-day budget, and
``settle`` replaces the reservation with the real count when the request ends (streams and
disconnects included), returning what was not used.

The request rate is checked in the same script, over the same window: every admitted request
is a member of it, so requests per minute is its size. One round trip admits a request, and a
request refused for any reason counts against no limit. `MemoryAdmission` implements the same
contract in-process for a single local gateway.
"""

from __future__ import annotations

import itertools
import math
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Protocol

from llmops_gateway.keys import Tenant
from llmops_gateway.redis_pipe import PipelinedRedis, Script, TlsOptions

WINDOW_S = 60.0
DAY_S = 86400
STREAM_LEASE_S = 3600.0
# Oldest window members a refusal looks at to say when to retry (bounds a refusal's cost).
RETRY_SCAN = 256


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
# ARGV: window_s, tpm, tokens, member, tpd, day_ttl, stream(0/1), max_streams, lease_s, rpm
# Time comes from the Redis server, so gateway replicas with skewed clocks agree.
_ADMIT = Script("""
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
local rpm = tonumber(ARGV[10])

-- In batches: unpack() takes a few thousand values at most, and a window that filled at a
-- high rate can expire tens of thousands of members at once.
while true do
  local expired = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now - window, 'LIMIT', 0, 1000)
  if #expired == 0 then break end
  local amounts = redis.call('HMGET', KEYS[2], unpack(expired))
  local freed = 0
  for _, a in ipairs(amounts) do freed = freed + (tonumber(a) or 0) end
  redis.call('ZREM', KEYS[1], unpack(expired))
  redis.call('HDEL', KEYS[2], unpack(expired))
  redis.call('DECRBY', KEYS[3], freed)
end

-- Every request admitted in the window is a member of it.
if redis.call('ZCARD', KEYS[1]) >= rpm then
  local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  return {'requests_per_minute', tostring(tonumber(oldest[2]) + window - now)}
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
  -- Retry when enough of the oldest reservations have left the window. Looking at the
  -- oldest 256 only keeps a flood of refused requests cheap; past them, retry = window.
  local need = total + tokens - tpm
  local oldest = redis.call('ZRANGE', KEYS[1], 0, 255, 'WITHSCORES')
  local retry = window
  if #oldest > 0 then
    local names = {}
    for i = 1, #oldest, 2 do names[#names + 1] = oldest[i] end
    local amounts = redis.call('HMGET', KEYS[2], unpack(names))
    for i, a in ipairs(amounts) do
      need = need - (tonumber(a) or 0)
      if need <= 0 then retry = tonumber(oldest[2 * i]) + window - now break end
    end
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
""")

# KEYS: 1 window zset, 2 window amounts hash, 3 window total, 4 day counter, 5 streams zset
# ARGV: member, used tokens
_SETTLE = Script("""
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
""")


class RedisAdmission:
    """Admission shared by every gateway replica through one Redis.

    Args:
        url: ``redis://`` or ``rediss://`` URL (user, password and database optional).
        prefix: Key prefix, so several gateways can share a Redis.
        timeout_s: Longest a Redis call may take before it counts as Redis being down.
        retry_interval_s: After Redis fails, how long calls fail at once before a reconnect.
        tls: CA, client certificate and server name for ``rediss://``.
    """

    def __init__(
        self,
        url: str,
        prefix: str = "llmops:gw",
        timeout_s: float = 2.0,
        retry_interval_s: float = 0.5,
        tls: TlsOptions | None = None,
    ) -> None:
        self.prefix = prefix
        self.redis = PipelinedRedis(
            url, timeout_s=timeout_s, retry_interval_s=retry_interval_s, tls=tls
        )

    def _keys(self, tenant: str, day: int) -> list[str]:
        base = f"{self.prefix}:{{{tenant}}}"
        return [f"{base}:tw", f"{base}:ta", f"{base}:tt", f"{base}:day:{day}", f"{base}:streams"]

    async def admit(
        self, tenant: Tenant, tokens: int, *, stream: bool = False
    ) -> Reservation | Rejection:
        """Reserves one request and ``tokens`` tokens, or says why not.

        Raises:
            RedisUnavailableError: Redis is unreachable (the caller applies its fail-open or
                fail-closed setting).
        """
        if tokens > tenant.tokens_per_minute:
            return _too_large(tenant, tokens)
        now = time.time()
        member = uuid.uuid4().hex
        day = _day(now)
        verdict, retry = await self.redis.evalsha(
            _ADMIT,
            self._keys(tenant.name, day),
            [
                WINDOW_S,
                tenant.tokens_per_minute,
                tokens,
                member,
                tenant.tokens_per_day,
                math.ceil(_seconds_to_midnight(now)),
                int(stream),
                tenant.max_concurrent_streams,
                STREAM_LEASE_S,
                tenant.requests_per_minute,
            ],
        )
        reason = verdict.decode() if isinstance(verdict, bytes) else str(verdict)
        if reason != "ok":
            return _rejection(reason, tenant, float(retry))
        return Reservation(member, tenant.name, tokens, day, stream)

    async def settle(self, reservation: Reservation, used_tokens: int) -> None:
        """Replaces the reservation with the real usage."""
        await self.redis.evalsha(
            _SETTLE,
            self._keys(reservation.tenant, reservation.day),
            [reservation.id, used_tokens, reservation.tokens],
            later=True,  # nobody waits on it: it goes with the next request's calls
        )

    async def close(self) -> None:
        """Closes the Redis connection."""
        await self.redis.close()


def _too_large(tenant: Tenant, tokens: int) -> Rejection:
    """A request that could not fit the tenant's token rate even alone."""
    return Rejection(
        "request_too_large",
        f"this request may use {tokens} tokens (prompt + max_tokens for each prompt and "
        "choice; without max_tokens, up to the model's context length), more than the "
        f"tenant's {tenant.tokens_per_minute} tokens per minute: lower max_tokens (or n)",
        0.0,
    )


def _rejection(reason: str, tenant: Tenant, retry_after_s: float) -> Rejection:
    messages = {
        "tokens_per_minute": f"tenant {tenant.name} is over {tenant.tokens_per_minute} tokens "
        "per minute (reserved as prompt + max_tokens until a request ends)",
        "tokens_per_day": f"tenant {tenant.name} has used its {tenant.tokens_per_day} tokens "
        "for today (UTC)",
        "concurrent_streams": f"tenant {tenant.name} already has "
        f"{tenant.max_concurrent_streams} streams open",
        "requests_per_minute": f"tenant {tenant.name} is over {tenant.requests_per_minute} "
        "requests per minute",
    }
    return Rejection(reason, messages[reason], max(retry_after_s, 0.001))


@dataclass
class _Window:
    """One tenant's trailing window in memory: admitted requests in admission order."""

    members: OrderedDict[str, tuple[float, int]] = field(default_factory=OrderedDict)
    total: int = 0
    streams: set[str] = field(default_factory=set)

    def expire(self, now: float) -> None:
        while self.members:
            member, (at, amount) = next(iter(self.members.items()))
            if at > now - WINDOW_S:
                return
            del self.members[member]
            self.total -= amount


class MemoryAdmission:
    """The same contract in one process, for `llmops up` without Redis.

    Each step between awaits runs alone on the event loop, so no lock is needed; expiring
    old members and summing the window cost O(1) per request, whatever the rate.
    """

    def __init__(self) -> None:
        self._windows: dict[str, _Window] = {}
        self._days: dict[tuple[str, int], int] = {}

    async def admit(
        self, tenant: Tenant, tokens: int, *, stream: bool = False
    ) -> Reservation | Rejection:
        """Reserves one request and ``tokens`` tokens, or says why not."""
        if tokens > tenant.tokens_per_minute:
            return _too_large(tenant, tokens)
        now = time.time()
        window = self._windows.setdefault(tenant.name, _Window())
        window.expire(now)
        if len(window.members) >= tenant.requests_per_minute:
            oldest, _ = next(iter(window.members.values()))
            return _rejection("requests_per_minute", tenant, oldest + WINDOW_S - now)
        if stream and len(window.streams) >= tenant.max_concurrent_streams:
            return _rejection("concurrent_streams", tenant, 1.0)
        day = _day(now)
        if self._days.get((tenant.name, day), 0) + tokens > tenant.tokens_per_day:
            return _rejection("tokens_per_day", tenant, _seconds_to_midnight(now))
        if window.total + tokens > tenant.tokens_per_minute:
            need, retry = window.total + tokens - tenant.tokens_per_minute, WINDOW_S
            for at, amount in itertools.islice(window.members.values(), RETRY_SCAN):
                need -= amount
                if need <= 0:
                    retry = at + WINDOW_S - now
                    break
            return _rejection("tokens_per_minute", tenant, retry)
        member = uuid.uuid4().hex
        window.members[member] = (now, tokens)
        window.total += tokens
        self._days[(tenant.name, day)] = self._days.get((tenant.name, day), 0) + tokens
        if stream:
            window.streams.add(member)
        return Reservation(member, tenant.name, tokens, day, stream)

    async def settle(self, reservation: Reservation, used_tokens: int) -> None:
        """Replaces the reservation with the real usage."""
        window = self._windows.get(reservation.tenant)
        if window is not None:
            if reservation.id in window.members:
                at, reserved = window.members[reservation.id]
                window.members[reservation.id] = (at, used_tokens)
                window.total += used_tokens - reserved
            window.streams.discard(reservation.id)
        key = (reservation.tenant, reservation.day)
        self._days[key] = self._days.get(key, 0) + used_tokens - reservation.tokens
