"""`llmops usage`: usage and cost per tenant, key, model and day, from the gateway's records.

The records are the gateway's durable ones (`llmops_gateway.usage_records`): the Redis stream
every replica writes to, or the JSONL file a gateway without Redis (`llmops up`) appends to.
No Prometheus is involved, so counters that reset or scrapes that were missed change nothing.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from rich.console import Console
from rich.table import Table

from llmops_cli.keys import default_keys_file

if TYPE_CHECKING:
    # Imported where records are read: the gateway's Redis client needs the `gateway` extra,
    # and `llmops --help` must work without it.
    from llmops_gateway.usage_records import UsageRecord

GROUPS = {"tenant": "tenant", "key": "key_id", "model": "model", "day": "day"}
"""``--by`` names -> the record attribute each groups on."""
STREAM_SLACK = timedelta(hours=1)
"""How far before ``--from`` the stream is read: clock skew between gateways and Redis."""
MILLION = Decimal(1_000_000)
HOUR_S = Decimal(3600)
COST_PLACES = Decimal("0.000001")
GPU_SECONDS_PLACES = Decimal("0.001")


class Format(StrEnum):
    """Output formats."""

    table = "table"
    csv = "csv"
    json = "json"


class ModelPrice(BaseModel):
    """A model's prices: per million tokens, per GPU-hour, or both (the charges add up)."""

    model_config = ConfigDict(extra="forbid")

    input: Decimal = Field(default=Decimal(0), ge=0, description="Per 1M prompt tokens.")
    output: Decimal = Field(default=Decimal(0), ge=0, description="Per 1M completion tokens.")
    cached_input: Decimal | None = Field(
        default=None, ge=0, description="Per 1M cached prompt tokens; default: `input`."
    )
    gpu_hour: Decimal = Field(
        default=Decimal(0),
        ge=0,
        description="Per GPU-hour, on the GPU-seconds each record was charged (the gateway's "
        "`gpu_models` rule: latency x GPUs per replica / concurrent sequences per replica).",
    )


class PriceList(BaseModel):
    """The ``--prices`` file (YAML or JSON)."""

    model_config = ConfigDict(extra="forbid")

    currency: str = Field(default="USD", description="Shown with the cost; no conversion.")
    models: dict[str, ModelPrice] = Field(description="Model name -> its prices.")

    def cost(self, record: UsageRecord) -> Decimal | None:
        """What ``record`` costs, or None when its model has no price."""
        price = self.models.get(record.model)
        if price is None:
            return None
        cached = min(record.cached_tokens, record.prompt_tokens)
        cached_price = price.input if price.cached_input is None else price.cached_input
        tokens = (
            (record.prompt_tokens - cached) * price.input
            + cached * cached_price
            + record.completion_tokens * price.output
        ) / MILLION
        return tokens + Decimal(str(record.gpu_seconds)) * price.gpu_hour / HOUR_S


@dataclass
class Row:
    """One group's totals."""

    requests: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    gpu_seconds: Decimal = field(default_factory=Decimal)
    cost: Decimal = field(default_factory=Decimal)

    def add(self, record: UsageRecord, cost: Decimal | None) -> None:
        """Counts one record in."""
        self.requests += 1
        self.failed += record.status in ("error", "rejected")
        self.prompt_tokens += record.prompt_tokens
        self.completion_tokens += record.completion_tokens
        self.cached_tokens += record.cached_tokens
        self.gpu_seconds += Decimal(str(record.gpu_seconds))
        self.cost += cost or 0


def summarize(
    records: Iterable[UsageRecord],
    first: str,
    last: str,
    by: list[str],
    prices: PriceList | None,
) -> tuple[list[tuple[tuple[str, ...], Row]], set[str]]:
    """Totals per group of the records whose UTC day is in ``first``..``last`` (inclusive).

    Returns:
        The groups, sorted, with their totals; and the models that had no price.
    """
    rows: dict[tuple[str, ...], Row] = {}
    unpriced: set[str] = set()
    for record in records:
        if not first <= record.day <= last:
            continue
        cost = prices.cost(record) if prices is not None else None
        if prices is not None and cost is None:
            unpriced.add(record.model)
        group = tuple(str(getattr(record, GROUPS[name])) for name in by)
        rows.setdefault(group, Row()).add(record, cost)
    return sorted(rows.items()), unpriced


def render(
    rows: list[tuple[tuple[str, ...], Row]],
    by: list[str],
    output: Format,
    prices: PriceList | None,
) -> str:
    """The summary in ``output`` format (the table as plain text)."""
    counts = ["requests", "failed", "prompt_tokens", "completion_tokens", "cached_tokens"]
    header = [*by, *counts, "gpu_seconds"] + (["cost"] if prices is not None else [])
    lines: list[list[str]] = []
    objects: list[dict[str, object]] = []
    for group, row in rows:
        values: list[object] = [getattr(row, name) for name in counts]
        values.append(row.gpu_seconds.quantize(GPU_SECONDS_PLACES))
        if prices is not None:
            values.append(row.cost.quantize(COST_PLACES))
        lines.append([*group, *(str(v) for v in values)])
        objects.append(dict(zip(header, [*group, *values], strict=True)))
    if output is Format.csv:
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(lines)
        return buffer.getvalue()
    if output is Format.json:
        currency = {"currency": prices.currency} if prices is not None else {}
        return json.dumps({**currency, "rows": objects}, indent=2, default=float) + "\n"
    table = Table(*header)
    for line in lines:
        table.add_row(*line)
    console = Console(file=io.StringIO(), width=200, color_system=None)
    console.print(table)
    assert isinstance(console.file, io.StringIO)
    return console.file.getvalue()


def load_prices(path: Path) -> PriceList:
    """Reads a price file.

    Raises:
        typer.BadParameter: unreadable or not a price list.
    """
    try:
        return PriceList.model_validate(yaml.safe_load(path.read_text()))
    except (OSError, yaml.YAMLError) as exc:
        raise typer.BadParameter(f"cannot read {path}: {exc}", param_hint="--prices") from exc
    except ValidationError as exc:
        lines = [f"{'.'.join(map(str, e['loc'])) or '.'}: {e['msg']}" for e in exc.errors()]
        raise typer.BadParameter(
            f"{path} is not a price list:\n  " + "\n  ".join(lines), param_hint="--prices"
        ) from exc


async def _stream_records(url: str, since: datetime) -> list[UsageRecord]:
    from llmops_gateway.redis_pipe import PipelinedRedis
    from llmops_gateway.usage_records import read_stream

    redis = PipelinedRedis(url, timeout_s=30.0)
    try:
        since_ms = int((since - STREAM_SLACK).timestamp() * 1000)
        return [record async for record in read_stream(redis, since_ms)]
    finally:
        await redis.close()


def _day(value: str, option: str) -> datetime:
    try:
        return datetime.strptime(value, "%Y-%m-%d").replace(tzinfo=UTC)
    except ValueError:
        raise typer.BadParameter(
            f"{value!r} is not a day (YYYY-MM-DD)", param_hint=option
        ) from None


def usage_command(
    first: Annotated[
        str | None,
        typer.Option(
            "--from", help="First UTC day, YYYY-MM-DD (default: the 1st of --to's month)."
        ),
    ] = None,
    last: Annotated[
        str | None,
        typer.Option("--to", help="Last UTC day, included, YYYY-MM-DD (default: today)."),
    ] = None,
    by: Annotated[
        str,
        typer.Option(help="Group by, comma-separated: tenant, key, model, day."),
    ] = "tenant,model",
    output: Annotated[Format, typer.Option("--format", help="Output format.")] = Format.table,
    prices: Annotated[
        Path | None,
        typer.Option(
            help="YAML or JSON price list, per 1M tokens and per GPU-hour: {currency: USD, "
            "models: {<model>: {input: 0.5, output: 1.5, cached_input: 0.25, gpu_hour: 2.5}}}; "
            "adds a cost column.",
            dir_okay=False,
        ),
    ] = None,
    redis_url: Annotated[
        str | None,
        typer.Option(
            envvar="LLMOPS_GATEWAY_REDIS_URL",
            help="Read the gateways' Redis stream (the URL they use); default: the file.",
        ),
    ] = None,
    usage_file: Annotated[
        Path | None,
        typer.Option(
            "--file",
            help="JSONL records of a gateway without Redis (default: its usage file "
            "beside the key file `llmops up` uses).",
        ),
    ] = None,
) -> None:
    """Requests, tokens and cost per tenant, key, model or day, from the usage records.

    Each request a gateway admitted, or refused at admission (a limit, an unknown model),
    is one record: `failed` counts backend errors and refusals; a cancelled request is
    charged what it generated. `gpu_seconds` sums what the records of GPU models were
    charged (latency x GPUs per replica / concurrent sequences per replica). Days are the UTC
    days the requests arrived.
    """
    groups = [name.strip() for name in by.split(",") if name.strip()]
    unknown = [name for name in groups if name not in GROUPS]
    if unknown or not groups:
        raise typer.BadParameter(
            f"group by {', '.join(GROUPS)} (comma-separated), not {by!r}", param_hint="--by"
        )
    end = _day(last, "--to") if last else datetime.now(UTC)
    start = _day(first, "--from") if first else end.replace(day=1)
    if start > end:
        raise typer.BadParameter("--from is after --to", param_hint="--from")
    price_list = load_prices(prices) if prices is not None else None
    from llmops_gateway.redis_pipe import RedisReplyError, RedisUnavailableError
    from llmops_gateway.usage_records import USAGE_FILE_NAME, read_file

    try:
        if redis_url:
            records: Iterable[UsageRecord] = asyncio.run(_stream_records(redis_url, start))
        else:
            records = list(read_file(usage_file or default_keys_file().parent / USAGE_FILE_NAME))
    except (RedisUnavailableError, RedisReplyError, ValueError) as exc:
        typer.echo(f"Error: cannot read the usage records: {exc}", err=True)
        raise typer.Exit(1) from exc
    rows, unpriced = summarize(
        records, start.strftime("%Y-%m-%d"), end.strftime("%Y-%m-%d"), groups, price_list
    )
    if unpriced:
        typer.echo(
            f"warning: no price for {', '.join(sorted(unpriced))}: their cost counts as 0",
            err=True,
        )
    sys.stdout.write(render(rows, groups, output, price_list))
