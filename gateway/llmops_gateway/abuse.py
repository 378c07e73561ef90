"""Per-client-address abuse limits, checked before a key is even looked at.

Two fixed-window limits per client address: every request counts against ``rate``, and every
request whose key is refused (missing, unknown, expired, revoked) also counts against
``refused_rate``; an address over either gets 429 with Retry-After, whatever key it sends
next, so key guessing is throttled without costing real tenants anything.

The limits are `limits` rate-limit strings (``"600/minute"``), applied by a `slowapi`
`Limiter` in memory. With the gateway's Redis configured, the counts are shared by every
replica through one small script on the gateway's own pipelined connection (the `limits`
Redis storage would open a second, blocking client); while Redis is down, each replica falls
back to its own memory counts rather than refusing or admitting everyone. A request's count
is sent when the request begins (`begin`) and its answer read just before admission, so Redis
answers while the gateway authenticates and parses; an address over its limit still gets 429
ahead of any other error of its request.

The client address is the TCP peer, unless the peer is a trusted proxy: then the
X-Forwarded-For entries are read from the right, past trusted proxies, and the first other
one is the client. A header from anyone else is ignored, since a client can write any value.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import time
from typing import Any

from limits import RateLimitItem, parse
from slowapi import Limiter

from llmops_gateway import errors
from llmops_gateway.redis_pipe import (
    Arg,
    PipelinedRedis,
    RedisReplyError,
    RedisUnavailableError,
    Script,
)

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# KEYS: the address's request counter, its refused-key counter. ARGV: window and limit of
# each, and whether this call counts a request (1) or a refused key (0).
# Returns {allowed (1/0), milliseconds until the blocking window ends, the blocking limit}.
_COUNT = Script(
    """
local counted = KEYS[2]
local window, limit = tonumber(ARGV[3]), tonumber(ARGV[4])
if ARGV[5] == '1' then
  local refused = tonumber(redis.call('GET', KEYS[2]) or '0')
  if refused >= tonumber(ARGV[4]) then
    return {0, redis.call('PTTL', KEYS[2]), 'refused'}
  end
  counted, window, limit = KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2])
end
local count = redis.call('INCR', counted)
if count == 1 then redis.call('PEXPIRE', counted, window) end
if count > limit then
  return {0, redis.call('PTTL', counted), ARGV[5] == '1' and 'req' or 'refused'}
end
return {1, 0, ''}
"""
)


class Count:
    """One request's count against its address's limits, under way (`AbuseLimits.begin`)."""

    __slots__ = ("_limits", "_sent", "address", "done")

    def __init__(self, limits: AbuseLimits, address: str, sent: asyncio.Future[Any] | None) -> None:
        self._limits = limits
        self._sent = sent
        self.address = address
        self.done = False

    async def result(self) -> None:
        """Waits for the count (once; later calls return at once).

        Raises:
            GatewayError: 429 when the address is over its request or refused-key limit.
        """
        if self.done:
            return
        self.done = True
        if self._limits.enabled:
            await self._limits._count(self.address, request=True, sent=self._sent)

    def abandon(self) -> None:
        """Drops an unawaited count (its request ended some other way)."""
        if self._sent is not None and not self.done:
            self._sent.cancel()
        self.done = True


def _networks(entries: list[str]) -> list[Network]:
    return [ipaddress.ip_network(entry, strict=False) for entry in entries]


class AbuseLimits:
    """Per-address request and refused-key limits.

    Args:
        rate: Requests per address (a `limits` string); None: no request limit.
        refused_rate: Refused keys per address; None: not limited.
        trusted_proxies: Addresses or CIDR networks whose X-Forwarded-For is believed.
        redis: The gateway's Redis connection, to share counts between replicas.
        prefix: Redis key prefix.
    """

    def __init__(
        self,
        rate: str | None,
        refused_rate: str | None,
        trusted_proxies: list[str],
        redis: PipelinedRedis | None = None,
        prefix: str = "llmops:gw:abuse",
    ) -> None:
        self.rate: RateLimitItem | None = parse(rate) if rate else None
        self.refused_rate: RateLimitItem | None = parse(refused_rate) if refused_rate else None
        self.trusted = _networks(trusted_proxies)
        # Parsing an address costs more than the counting: remember the recent answers.
        self._trusted = functools.lru_cache(maxsize=4096)(self._is_trusted)
        self.redis = redis
        self.prefix = prefix
        # slowapi's limiter over `limits`' in-memory storage: no I/O, so its synchronous calls
        # are safe on the event loop. Its key function is unused: the adapters find addresses.
        self.memory = Limiter(key_func=lambda: "", storage_uri="memory://", headers_enabled=False)

    @property
    def enabled(self) -> bool:
        """Whether any limit is configured."""
        return self.rate is not None or self.refused_rate is not None

    def _is_trusted(self, address: str) -> bool:
        if not self.trusted:
            return False
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in network for network in self.trusted)

    def address(self, peer: str | None, forwarded_for: str | None) -> str:
        """The client's address: the peer, or for a trusted proxy, from X-Forwarded-For."""
        client = peer or "unknown"
        if not forwarded_for or not self._trusted(client):
            return client
        for hop in reversed(forwarded_for.split(",")):
            hop = hop.strip()
            if not hop:
                continue
            client = hop
            if not self._trusted(hop):
                break
        return client

    def begin(self, address: str) -> Count:
        """Starts counting one request from ``address``: with Redis, the count is sent now, so
        its round trip overlaps what the request does until `Count.result` is awaited."""
        sent = None
        if self.enabled and self.redis is not None:
            sent = self.redis.evalsha_now(_COUNT, *self._script_input(address, request=True))
        return Count(self, address, sent)

    async def check(self, address: str) -> None:
        """Counts one request from ``address``.

        Raises:
            GatewayError: 429 when the address is over its request or refused-key limit.
        """
        await self.begin(address).result()

    async def refused(self, address: str) -> None:
        """Counts a refused key from ``address`` (the request is answered 401 anyway)."""
        if self.refused_rate is not None:
            await self._count(address, request=False)

    async def _count(
        self, address: str, *, request: bool, sent: asyncio.Future[Any] | None = None
    ) -> None:
        if self.redis is not None:
            try:
                blocked, retry_s = await self._count_redis(address, request, sent)
            except (RedisUnavailableError, RedisReplyError):
                blocked, retry_s = self._count_memory(address, request)
        else:
            blocked, retry_s = self._count_memory(address, request)
        if blocked:
            raise errors.rate_limited(
                f"too many refused API keys from {address}"
                if blocked == "refused"
                else f"too many requests from {address}",
                "client_rate_limit_exceeded",
                max(retry_s, 0.0),
            )

    def _script_input(self, address: str, request: bool) -> tuple[list[str], list[Arg]]:
        """The count script's keys and arguments."""
        rate, refused = self.rate, self.refused_rate
        # One hash tag per address: both keys in one slot, as a script on Redis Cluster needs.
        base = f"{self.prefix}:{{{address}}}"
        keys = [f"{base}:req", f"{base}:refused"]
        args: list[Arg] = [
            rate.get_expiry() * 1000 if rate else 1,
            rate.amount if rate else 2**62,
            refused.get_expiry() * 1000 if refused else 1,
            refused.amount if refused else 2**62,
            1 if request else 0,
        ]
        return keys, args

    async def _count_redis(
        self, address: str, request: bool, sent: asyncio.Future[Any] | None
    ) -> tuple[str, float]:
        """The limit that blocks (``req``, ``refused``; empty: none) and seconds to wait.
        ``sent``: the reply to the count sent already (`begin`), if it was."""
        assert self.redis is not None
        reply = None
        if sent is not None:
            try:
                reply = await sent
            except RedisReplyError as exc:
                if not str(exc).startswith("NOSCRIPT"):
                    raise
        if reply is None:  # not sent, or not run (a Redis that has not loaded the script)
            reply = await self.redis.evalsha(_COUNT, *self._script_input(address, request))
        allowed, retry_ms, limit = reply
        blocked = "" if allowed else (limit.decode() if isinstance(limit, bytes) else str(limit))
        return blocked, int(retry_ms) / 1000

    def _count_memory(self, address: str, request: bool) -> tuple[str, float]:
        """As `_count_redis`, in this process's memory."""
        limiter = self.memory.limiter
        refused = self.refused_rate
        if request and refused is not None and not limiter.test(refused, "refused", address):
            reset = limiter.get_window_stats(refused, "refused", address).reset_time
            return "refused", reset - time.time()
        item = self.rate if request else self.refused_rate
        namespace = "req" if request else "refused"
        if item is None or limiter.hit(item, namespace, address):
            return "", 0.0
        reset = limiter.get_window_stats(item, namespace, address).reset_time
        return namespace, reset - time.time()
