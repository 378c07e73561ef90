"""Durable usage records: one per finished request, the source of chargeback (`llmops usage`).

Every request that reached admission ends as one `UsageRecord` (success, backend error,
refusal, client cancel), written after its response is done:

- With Redis, to the stream `STREAM_KEY`, shared by every replica and trimmed by age
  (``XADD ... MINID ~``, `usage_retention_days`). Each record carries an id the gateway draws
  when it admits the request; the write script adds that id to a per-day set first and skips
  the ``XADD`` when it was there, so a write retried after a lost reply lands once. The
  client's ``x-request-id`` is kept as a field but is not the dedupe key: clients may reuse
  it, and a reused id must not drop a billable record.
- Without Redis (`llmops up`), as JSON lines appended to a file (one ``write`` per batch, so
  two processes appending to one file do not interleave lines).

A write that fails (Redis restarting, a timeout) leaves its records in a bounded in-memory
queue that a background task retries every second and `UsageRecorder.close` (the SIGTERM
drain) flushes once more: a record is written late, not never, unless the queue overflows
(the oldest are then dropped and logged) or the process dies with Redis still down.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import os
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import structlog

from llmops_gateway.admission import Admission, RedisAdmission
from llmops_gateway.redis_pipe import PipelinedRedis, Script
from llmops_gateway.settings import GatewaySettings

logger = logging.getLogger("llmops.gateway.usage")

STREAM_KEY = "llmops:{usage}:records"
"""The Redis stream of usage records (a hash tag keeps it and its dedupe sets in one slot)."""
SEEN_KEY = "llmops:{usage}:seen:"
"""Prefix of the per-day sets of record ids already written (dedupe), suffixed YYYYMMDD."""
SEEN_TTL_S = 3 * 86400
"""How long a day's dedupe set outlives its last write: longer than a record waits queued."""
BUFFER_RECORDS = 10_000
"""Records kept in memory while their store is unreachable (a few MB); older ones drop."""
FLUSH_INTERVAL_S = 1.0
USAGE_FILE_NAME = "usage.jsonl"
"""The JSONL file's name beside the key file, where `llmops up` and `llmops usage` meet."""

# KEYS: 1 stream, 2 the record day's dedupe set
# ARGV: 1 record id, 2 retention in ms, 3 dedupe set ttl (s), 4.. field, value, ...
_WRITE = Script("""
if redis.call('SADD', KEYS[2], ARGV[1]) == 0 then return 0 end
redis.call('EXPIRE', KEYS[2], ARGV[3])
local clock = redis.call('TIME')
local now_ms = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local oldest = string.format('%d', now_ms - tonumber(ARGV[2]))
redis.call('XADD', KEYS[1], 'MINID', '~', oldest, '*', unpack(ARGV, 4))
return 1
""")


@dataclass(frozen=True)
class UsageRecord:
    """What one finished request used.

    ``status`` is the outcome: ``ok``; ``error`` (the backend failed, before or during a
    stream); ``rejected`` (the gateway refused it: a limit, an unknown model, draining);
    ``cancelled`` (the client went away). ``code`` is the HTTP status the response started
    with (the gRPC API maps from the same), 0 when none was sent.

    ``gpu_seconds`` is what the request is charged of its model's GPUs, by `gpu_seconds`;
    ``trace_id`` the W3C trace id of its spans (with tracing off,
    its caller's ``traceparent``'s, or empty). Records written before
    these fields existed read as 0 and empty.
    """

    id: str
    request_id: str
    time: str
    """When the request arrived: ISO 8601, UTC, milliseconds (``2026-12-01T09:30:00.123Z``)."""
    tenant: str
    key_id: str
    model: str
    endpoint: str
    backend: str
    status: str
    code: int
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    latency_s: float
    ttft_s: float | None
    gpu_seconds: float = 0.0
    trace_id: str = ""

    @property
    def day(self) -> str:
        """The UTC day of ``time``: ``YYYY-MM-DD``."""
        return self.time[:10]

    def fields(self) -> list[str]:
        """Field, value, field, value... as stream fields (None as an empty string)."""
        out: list[str] = []
        for name in _FIELD_NAMES:  # the values are flat: no `asdict` deep copy
            value = getattr(self, name)
            out += [name, "" if value is None else str(value)]
        return out

    @classmethod
    def from_fields(cls, data: dict[str, Any]) -> UsageRecord:
        """A record from stream fields or a JSON object (strings or typed values).

        Raises:
            KeyError, ValueError: a field is missing or not of its type.
        """
        values: dict[str, Any] = {}
        for spec in fields(cls):
            if spec.name not in data and spec.name in _ADDED_FIELDS:
                continue  # an older record: the field's default
            raw = data[spec.name]
            if isinstance(raw, bytes):
                raw = raw.decode()
            if spec.type == "int":
                values[spec.name] = int(raw)
            elif spec.type == "float":
                values[spec.name] = float(raw)
            elif spec.type == "float | None":
                values[spec.name] = None if raw in ("", None) else float(raw)
            else:
                values[spec.name] = str(raw)
        return cls(**values)


_FIELD_NAMES = tuple(spec.name for spec in fields(UsageRecord))

_ADDED_FIELDS = frozenset({"gpu_seconds", "trace_id"})
"""Fields records did not always have."""


def gpu_seconds(latency_s: float, gpus: float, slots: int) -> float:
    """GPU-seconds charged to one request: its share of a full replica for as long as it ran.

    ``latency_s * gpus / slots``: a replica of ``gpus`` GPUs runs up to ``slots`` sequences at
    once (vLLM's ``max_num_seqs``), and each request holds one slot from arrival to its last
    byte. A replica that runs full is charged exactly its GPU time across its requests; idle
    capacity is charged to nobody (it is the platform's cost, not a tenant's), and a request
    alone on a replica is not charged the whole replica. The charge does not depend on what
    else ran at the time, so the same request always costs the same.

    Args:
        latency_s: The request's latency (arrival to last byte).
        gpus: GPUs one replica of the model holds.
        slots: Sequences one replica runs at once.
    """
    return round(latency_s * gpus / max(slots, 1), 6)


def timestamp(epoch_s: float) -> str:
    """``epoch_s`` as the records' time format."""
    # isoformat, not strftime: the same text at a quarter of the cost (one per request).
    return datetime.fromtimestamp(epoch_s, UTC).isoformat(timespec="milliseconds")[:-6] + "Z"


class UsageSink(Protocol):
    """Where records go."""

    async def write(self, records: Sequence[UsageRecord]) -> list[UsageRecord]:
        """Writes ``records``; returns those that could not be written (to retry)."""
        ...

    async def close(self) -> None:
        """Releases what the sink holds."""
        ...


class RedisUsageSink:
    """Records to the Redis stream, deduplicated by record id.

    Args:
        redis: The connection; sharing the admission limiter's pipelines a record with the
            settlement of the same request (one round trip for both).
        retention_days: Entries older than this are trimmed as new ones are added.
        owned: Close the connection with the sink.
    """

    def __init__(self, redis: PipelinedRedis, retention_days: float, owned: bool) -> None:
        self.redis = redis
        self.retention_ms = int(retention_days * 86400 * 1000)
        self.owned = owned

    async def write(self, records: Sequence[UsageRecord]) -> list[UsageRecord]:
        """Sends every record at once (pipelined); returns those whose write failed."""
        if len(records) == 1:  # each request's own record: no gather's task to pay for
            try:
                results: list[Any] = [await self._write(records[0])]
            except Exception as exc:
                results = [exc]
        else:
            results = await asyncio.gather(
                *(self._write(record) for record in records), return_exceptions=True
            )
        failed = [
            r for r, result in zip(records, results, strict=True) if isinstance(result, Exception)
        ]
        if failed:
            first = next(result for result in results if isinstance(result, Exception))
            logger.warning("cannot write %d usage records to Redis yet (%s)", len(failed), first)
        return failed

    async def _write(self, record: UsageRecord) -> Any:
        return await self.redis.evalsha(
            _WRITE,
            [STREAM_KEY, SEEN_KEY + record.day.replace("-", "")],
            [record.id, self.retention_ms, SEEN_TTL_S, *record.fields()],
            later=True,  # off every request's path: it goes with the next request's calls
        )

    async def close(self) -> None:
        """Closes the connection when the sink opened it."""
        if self.owned:
            await self.redis.close()


class FileUsageSink:
    """Records as JSON lines appended to a file (no Redis: a local gateway)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    async def write(self, records: Sequence[UsageRecord]) -> list[UsageRecord]:
        """Appends the records in one write; on failure, all are to retry."""
        data = "".join(json.dumps(asdict(r), separators=(",", ":")) + "\n" for r in records)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, data.encode())
            finally:
                os.close(fd)
        except OSError as exc:
            logger.warning("cannot append %d usage records to %s: %s", len(records), self.path, exc)
            return list(records)
        return []

    async def close(self) -> None:
        """Nothing to release."""


class UsageRecorder:
    """Writes records off the request path, keeping failed ones for a later flush.

    Args:
        sink: Where records go.
        buffer: Most records kept while the sink is unreachable.
    """

    def __init__(self, sink: UsageSink, buffer: int = BUFFER_RECORDS) -> None:
        self.sink = sink
        self.pending: collections.deque[UsageRecord] = collections.deque(maxlen=buffer)
        self.dropped = 0
        self._flusher: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Starts the background flush of queued records."""
        self._flusher = asyncio.get_running_loop().create_task(self._flush_forever())

    async def write(self, record: UsageRecord) -> None:
        """Writes one record now, or queues it; never raises."""
        try:
            failed = await self.sink.write([record])
        except Exception as exc:  # a sink bug must not lose the record either
            logger.error("usage sink failed: %s", exc)
            failed = [record]
        self._queue(failed)

    def _queue(self, records: Sequence[UsageRecord]) -> None:
        for record in records:
            if len(self.pending) == self.pending.maxlen:
                self.dropped += 1
                logger.error(
                    "usage buffer full: dropped record %s (%d dropped so far)",
                    self.pending[0].id,
                    self.dropped,
                )
            self.pending.append(record)

    async def flush(self) -> int:
        """Tries once to write every queued record.

        Returns:
            How many are still queued.
        """
        if not self.pending:
            return 0
        batch = list(self.pending)
        self.pending.clear()
        try:
            failed = await self.sink.write(batch)
        except Exception as exc:
            logger.error("usage sink failed: %s", exc)
            failed = batch
        self._queue(failed)
        return len(self.pending)

    async def _flush_forever(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_INTERVAL_S)
            await self.flush()

    async def close(self) -> None:
        """Stops the background flush, flushes once more and closes the sink."""
        if self._flusher is not None:
            self._flusher.cancel()
            await asyncio.gather(self._flusher, return_exceptions=True)
        left = await self.flush()
        if left:
            logger.error("exiting with %d usage records unwritten (their store is down)", left)
        await self.sink.close()


# -- reading (`llmops usage`) ---------------------------------------------------------------


async def read_stream(
    redis: PipelinedRedis, since_ms: int, page: int = 1000
) -> AsyncIterator[UsageRecord]:
    """The stream's records added at or after ``since_ms`` (epoch milliseconds), oldest first.

    A record is added when its request ends, or later after a Redis outage, never before its
    ``time``: entries added before the start of a range cannot hold records inside it.
    """
    start = f"{max(since_ms, 0)}-0"
    while True:
        entries = await redis.call("XRANGE", STREAM_KEY, start, "+", "COUNT", page)
        for _, flat in entries:
            values = dict(zip(flat[::2], flat[1::2], strict=True))
            yield UsageRecord.from_fields({k.decode(): v for k, v in values.items()})
        if len(entries) < page:
            return
        start = "(" + entries[-1][0].decode()


def read_file(path: Path) -> Iterator[UsageRecord]:
    """The records of a JSONL usage file (a missing file holds none).

    Raises:
        ValueError: a line is not a record; the message names the line.
    """
    if not path.exists():
        return
    with path.open() as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                yield UsageRecord.from_fields(json.loads(line))
            except (KeyError, ValueError, TypeError) as exc:
                raise ValueError(f"{path}:{number}: not a usage record: {exc}") from None


def new_record_id() -> str:
    """A record id: drawn once per request, the dedupe key of its write."""
    return uuid.uuid4().hex


def current_request_id() -> str:
    """The request id the REST middleware or gRPC servicer bound to this task's context."""
    value = structlog.contextvars.get_contextvars().get("request_id")
    return str(value) if value else ""


def build_recorder(settings: GatewaySettings, admission: Admission) -> UsageRecorder | None:
    """The recorder a gateway writes to: the admission limiter's Redis (one connection, so a
    record pipelines with its request's settlement), else `settings.usage_file`, else a file
    beside the key file; None without any of them (no records)."""
    if isinstance(admission, RedisAdmission):
        sink = RedisUsageSink(admission.redis, settings.usage_retention_days, owned=False)
        return UsageRecorder(sink)
    path = settings.usage_file
    if path is None and settings.keys_file is not None:
        path = settings.keys_file.parent / USAGE_FILE_NAME
    return None if path is None else UsageRecorder(FileUsageSink(path))
