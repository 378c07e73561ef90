"""A pipelined Redis connection for the gateway's admission scripts.

Redis answers the commands of one connection in the order they were sent, so every request
the gateway is serving can share one connection: each call writes its command and waits for
its own reply, in order, with no pool to check connections in and out. On the admission hot
path this costs a fraction of a general-purpose client's per-call CPU, which the gateway
spends on every request (replies are parsed by hiredis, in C).

What it supports is what the gateway needs: ``redis://`` and ``rediss://`` (TLS) URLs with an
optional user, password and database number, TLS with a private CA, a client certificate and
a server name, commands, and Lua scripts by SHA with a reload when Redis has forgotten them
(after a restart).

A connection that fails or stops answering within the timeout is dropped and every call waiting
on it fails with `RedisUnavailableError`. Then, for ``retry_interval_s``, calls fail at once
(the gateway's failure mode answers without waiting); the first call after that starts one
reconnect, which every call arriving meanwhile shares: a Redis that accepts connections but
never answers costs each request at most one timeout, never one timeout per request queued
ahead of it.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import hashlib
import math
import ssl
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast
from urllib.parse import unquote, urlsplit

import hiredis

Arg = str | bytes | int | float

When = Literal["now", "turn", "later"]
"""When a command is written (`_Protocol.queue`)."""

LATER_S = 0.01
"""Longest a call sent later waits for another call to share its write."""


class RedisUnavailableError(Exception):
    """Redis could not be reached, or did not answer in time."""


class RedisReplyError(Exception):
    """Redis answered a command with an error."""


@dataclass(frozen=True)
class Script:
    """A Lua script, called by its SHA-1."""

    source: str

    @functools.cached_property
    def sha(self) -> str:
        """What EVALSHA names the script by."""
        return hashlib.sha1(self.source.encode()).hexdigest()  # noqa: S324 (Redis's own choice)

    def call(self, keys: list[str], args: list[Arg]) -> tuple[Arg, ...]:
        """The EVALSHA command that runs it on ``keys`` with ``args``."""
        return ("EVALSHA", self.sha, len(keys), *keys, *args)


def encode(args: tuple[Arg, ...]) -> bytes:
    """One command in the Redis protocol (an array of bulk strings), packed by hiredis in C."""
    # (hiredis types its argument as a one-element tuple; it takes any length.)
    return cast(bytes, hiredis.pack_command(cast(Any, args)))


@dataclass(frozen=True)
class Address:
    """Where and how to connect, from a ``redis://`` or ``rediss://`` URL."""

    host: str
    port: int
    tls: bool
    username: str | None
    password: str | None
    db: int

    @classmethod
    def from_url(cls, url: str) -> Address:
        """Parses ``redis[s]://[[user]:password@]host[:port][/db]``.

        Raises:
            ValueError: another scheme, or a database that is not a number.
        """
        parts = urlsplit(url)
        if parts.scheme not in ("redis", "rediss"):
            raise ValueError(f"not a redis:// or rediss:// URL: {parts.scheme}://...")
        path = parts.path.strip("/")
        if path and not path.isdigit():
            raise ValueError(f"the database in a Redis URL is a number, not {path!r}")
        return cls(
            host=parts.hostname or "127.0.0.1",
            port=parts.port or 6379,
            tls=parts.scheme == "rediss",
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
            db=int(path) if path else 0,
        )


@dataclass(frozen=True)
class TlsOptions:
    """TLS beyond the system CAs, for ``rediss://`` URLs.

    Attributes:
        ca_file: CA bundle (PEM) that signs the server certificate; None: the system CAs.
        cert_file: Client certificate (PEM) for mutual TLS.
        key_file: Its private key (PEM); None: inside ``cert_file``.
        server_name: Name the server certificate must carry, when it is not the URL's host.
    """

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    server_name: str | None = None

    def context(self) -> ssl.SSLContext:
        """The client-side SSL context (certificate and host name checked)."""
        context = ssl.create_default_context(cafile=self.ca_file)
        if self.cert_file is not None:
            context.load_cert_chain(self.cert_file, self.key_file)
        return context


@dataclass
class Counts:
    """What a connection has sent, over its reconnects (tests pin the hot path's cost)."""

    commands: int = 0
    writes: int = 0
    """Socket writes (each sends every command queued in one loop turn)."""


class _Protocol(asyncio.Protocol):
    def __init__(self, counts: Counts | None = None) -> None:
        self.counts = counts or Counts()
        self.reader = hiredis.Reader(replyError=RedisReplyError)
        self.waiting: collections.deque[asyncio.Future[Any]] = collections.deque()
        self.deadlines: collections.deque[float] = collections.deque()
        """When each waiting call's reply is due (loop time), oldest first."""
        self.watchdog: asyncio.TimerHandle | None = None
        self.transport: asyncio.Transport | None = None
        self.lost: Exception | None = None
        self.outgoing: list[bytes] = []
        self.soon = False
        """Whether a flush is due at the end of this loop turn."""
        self.timer: asyncio.TimerHandle | None = None
        """The flush due in `LATER_S` for calls sent later."""

    def queue(self, data: bytes, when: When = "turn") -> None:
        """Sends ``data`` after every command queued before it: ``"turn"``, with every other
        command queued in this turn of the event loop; ``"now"``, at once if the connection is
        idle, else as ``"turn"``; ``"later"``, with the next command sent sooner, or within
        `LATER_S`.

        On loopback a socket write costs more CPU than Redis running the script, and a request
        makes its calls in bursts (a settlement and its usage record; requests arriving
        together): one write per loop turn sends each burst with one system call. A call whose
        caller has other work to do before it needs the reply is sent at once while nothing
        else is on its way, so that Redis answers while that work runs; in a burst it joins
        the turn's write, since then the writes, not the wait, are what delay everyone. A call
        nobody waits on (a settlement, after its answer was sent) rides along with the next
        request's calls, saving its own write and read.
        """
        self.outgoing.append(data)
        self.counts.commands += 1
        # Calls written and not answered yet: every waiting call but those still queued here.
        if when == "now" and not self.soon and len(self.waiting) == len(self.outgoing):
            self.flush()
        elif when != "later":
            if not self.soon:
                self.soon = True
                asyncio.get_running_loop().call_soon(self.flush)
        elif self.timer is None and not self.soon:
            self.timer = asyncio.get_running_loop().call_later(LATER_S, self.flush)

    def flush(self) -> None:
        """Writes the commands queued so far (dropped if the connection is gone: their
        callers' futures fail with it)."""
        self.soon = False
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if not self.outgoing:  # sent already, with a call sent at once
            return
        data = b"".join(self.outgoing)
        self.outgoing.clear()
        if self.transport is not None and self.lost is None and not self.transport.is_closing():
            self.transport.write(data)
            self.counts.writes += 1

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport (uvloop's does not subclass asyncio.Transport).
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        while (reply := self.reader.gets()) is not False:
            future = self.waiting.popleft()
            self.deadlines.popleft()
            if future.done():  # its caller went away
                continue
            if isinstance(reply, RedisReplyError):
                future.set_exception(reply)
            else:
                future.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        # A connection dropped for its silence fails its calls with that reason.
        self.lost = self.lost or RedisUnavailableError(
            f"connection to Redis lost: {exc or 'closed'}"
        )
        if self.watchdog is not None:
            self.watchdog.cancel()
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.deadlines.clear()
        while self.waiting:
            future = self.waiting.popleft()
            if not future.done():
                future.set_exception(self.lost)


class PipelinedRedis:
    """One shared, pipelined Redis connection.

    Args:
        url: ``redis://`` or ``rediss://`` URL.
        timeout_s: Longest a connect or a reply may take.
        retry_interval_s: After a failure, how long calls fail at once before a reconnect.
        tls: CA, client certificate and server name for ``rediss://``.

    Raises:
        ValueError: a bad URL, or TLS options with a ``redis://`` URL.
    """

    def __init__(
        self,
        url: str,
        timeout_s: float = 2.0,
        retry_interval_s: float = 0.5,
        tls: TlsOptions | None = None,
    ) -> None:
        self.address = Address.from_url(url)
        if tls is not None and tls != TlsOptions() and not self.address.tls:
            raise ValueError("Redis TLS options need a rediss:// URL")
        self.timeout_s = timeout_s
        self.retry_interval_s = retry_interval_s
        self.tls = tls or TlsOptions()
        self._ssl = self.tls.context() if self.address.tls else None
        self._protocol: _Protocol | None = None
        self._connecting: asyncio.Future[_Protocol] | None = None
        self._down_until = -math.inf
        self._down_reason = ""
        self.counts = Counts()

    async def _connection(self) -> _Protocol:
        protocol = self._protocol
        if protocol is not None and protocol.lost is None:
            return protocol
        if self._connecting is None:
            wait = self._down_until - time.monotonic()
            if wait > 0:
                raise RedisUnavailableError(f"{self._down_reason}; next attempt in {wait:.1f} s")
            # One attempt for every caller: the first starts it, the rest await the same one.
            self._connecting = asyncio.ensure_future(self._connect_once())
        # Shielded: a caller that gives up must not cancel the attempt the others wait on.
        return await asyncio.shield(self._connecting)

    async def _connect_once(self) -> _Protocol:
        try:
            self._protocol = await self._connect()
            return self._protocol
        except RedisUnavailableError as exc:
            self._failed(str(exc))
            raise
        finally:
            self._connecting = None

    def _failed(self, reason: str) -> None:
        self._down_until = time.monotonic() + self.retry_interval_s
        self._down_reason = reason

    async def _connect(self) -> _Protocol:
        address = self.address
        where = f"Redis at {address.host}:{address.port}"
        loop = asyncio.get_running_loop()
        setup: list[tuple[Arg, ...]] = []
        if address.password is not None:
            setup.append(("AUTH", address.username or "default", address.password))
        if address.db:
            setup.append(("SELECT", address.db))
        protocol: _Protocol | None = None
        try:
            async with asyncio.timeout(self.timeout_s):
                _, protocol = await loop.create_connection(
                    lambda: _Protocol(self.counts),
                    address.host,
                    address.port,
                    ssl=self._ssl,
                    server_hostname=self.tls.server_name if self._ssl else None,
                )
                for command in setup:
                    await self._send(protocol, command)
        except (OSError, TimeoutError, RedisReplyError, RedisUnavailableError, ssl.SSLError) as exc:
            if protocol is not None:
                self._drop(protocol)
            # The reply to AUTH never holds the password; the URL is not repeated here.
            raise RedisUnavailableError(f"cannot use {where}: {exc or 'timeout'}") from None
        return protocol

    def _send(
        self, protocol: _Protocol, args: tuple[Arg, ...], when: When = "turn"
    ) -> asyncio.Future[Any]:
        assert protocol.transport is not None
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        protocol.waiting.append(future)
        protocol.deadlines.append(loop.time() + self.timeout_s)
        protocol.queue(encode(args), when)
        if protocol.watchdog is None:
            protocol.watchdog = loop.call_at(protocol.deadlines[0], self._watch, protocol, False)
        return future

    def _watch(self, protocol: _Protocol, looked_again: bool) -> None:
        """Drops the connection when its oldest unanswered call is past its deadline.

        One timer per connection, not one per call: Redis answers in order, so the oldest
        call's deadline is the first that can pass.
        """
        protocol.watchdog = None
        if protocol.lost is not None or not protocol.deadlines:
            return
        loop = asyncio.get_running_loop()
        deadline = protocol.deadlines[0]
        if loop.time() < deadline:
            protocol.watchdog = loop.call_at(deadline, self._watch, protocol, False)
            return
        if not looked_again:
            # A process that was stopped for a while (a loaded machine) finds its replies and
            # its timers due at once, and libuv runs timers before it reads sockets: read them
            # once more before calling Redis silent.
            protocol.watchdog = loop.call_later(0.001, self._watch, protocol, True)
            return
        reason = f"Redis did not answer in {self.timeout_s:g} s"
        if self._protocol is protocol:
            self._failed(reason)
        protocol.lost = RedisUnavailableError(reason)
        self._drop(protocol)

    async def call(self, *args: Arg, later: bool = False) -> Any:
        """Sends one command and returns its reply; with ``later``, the command may wait up to
        `LATER_S` for other commands to share its write (for a caller that is in no hurry).

        Raises:
            RedisUnavailableError: no connection, or no reply within the timeout (the connection
                is then dropped, so the next call starts afresh).
            RedisReplyError: Redis answered with an error.
        """
        protocol = await self._connection()
        return await self._send(protocol, args, "later" if later else "turn")

    async def evalsha(
        self, script: Script, keys: list[str], args: list[Arg], later: bool = False
    ) -> Any:
        """Runs a script by SHA, loading it first if Redis does not know it (yet, or anymore);
        ``later`` as for `call`."""
        command = script.call(keys, args)
        try:
            return await self.call(*command, later=later)
        except RedisReplyError as exc:
            if not str(exc).startswith("NOSCRIPT"):
                raise
        await self.call("SCRIPT", "LOAD", script.source)
        return await self.call(*command)

    def evalsha_now(
        self, script: Script, keys: list[str], args: list[Arg]
    ) -> asyncio.Future[Any] | None:
        """Sends a script call at once (while the connection is idle; in a burst, with this
        loop turn's other calls), for a caller that has work to do before it needs the reply,
        and returns the reply's future; None without a live connection now (then
        `evalsha` connects). The future fails as `call` does: with `RedisUnavailableError`,
        or with `RedisReplyError` (``NOSCRIPT`` too: then the script did not run, and
        `evalsha` loads and runs it). A caller that gives up cancels it.
        """
        protocol = self._protocol
        if protocol is None or protocol.lost is not None or protocol.transport is None:
            return None
        return self._send(protocol, script.call(keys, args), "now")

    def _drop(self, protocol: _Protocol) -> None:
        if protocol.transport is not None:
            protocol.transport.abort()

    async def close(self) -> None:
        """Closes the connection; calls waiting on it fail."""
        if self._protocol is not None and self._protocol.transport is not None:
            self._protocol.flush()  # calls sent later go before the connection closes
            self._protocol.transport.close()
            self._protocol = None
