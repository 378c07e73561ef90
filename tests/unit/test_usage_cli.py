"""`llmops usage` over records written by the gateway's own JSONL writer.

The records go through `FileUsageSink` (what a gateway without Redis appends with), so the
file format the CLI reads is the one the gateway writes.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from llmops_cli.main import app
from llmops_gateway.usage_records import FileUsageSink, UsageRecord

PRICES = """\
currency: EUR
models:
  m-a: {input: 0.5, output: 1.5, cached_input: 0.25}
  m-b: {input: 2, output: 6}
"""


def _record(
    n: int,
    time: str,
    tenant: str,
    key: str,
    model: str,
    prompt: int,
    completion: int,
    cached: int = 0,
    status: str = "ok",
) -> UsageRecord:
    return UsageRecord(
        id=f"rec-{n}",
        request_id=f"req-{n}",
        time=time,
        tenant=tenant,
        key_id=key,
        model=model,
        endpoint="/v1/chat/completions",
        backend="http://graph:8000",
        status=status,
        code=500 if status == "error" else 200,
        prompt_tokens=prompt,
        completion_tokens=completion,
        cached_tokens=cached,
        latency_s=0.5,
        ttft_s=0.1,
    )


RECORDS = [
    _record(1, "2026-12-01T10:00:00.000Z", "acme", "k1", "m-a", 1000, 500, cached=200),
    _record(2, "2026-12-03T12:30:00.250Z", "acme", "k2", "m-a", 3000, 1500),
    _record(3, "2026-12-07T23:59:59.999Z", "acme", "k1", "m-b", 100, 0, status="error"),
    _record(4, "2026-12-05T08:00:00.000Z", "beta", "k3", "m-a", 2000, 1000, 1000, "cancelled"),
    _record(5, "2026-11-30T23:59:59.999Z", "beta", "k3", "m-a", 9, 9),  # before --from
    _record(6, "2026-12-08T00:00:00.000Z", "acme", "k1", "m-a", 9, 9),  # after --to
    _record(7, "2026-12-02T00:00:00.000Z", "beta", "k3", "m-c", 10, 10),  # no price
]


@pytest.fixture
def usage_file(tmp_path: Path) -> Path:
    path = tmp_path / "usage.jsonl"
    # Two appends, as a gateway writes batches.
    assert asyncio.run(FileUsageSink(path).write(RECORDS[:3])) == []
    assert asyncio.run(FileUsageSink(path).write(RECORDS[3:])) == []
    return path


def _usage(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, ["usage", *args])
    return result.exit_code, result.stdout, result.stderr


def test_csv_by_tenant_and_model_with_costs(usage_file: Path, tmp_path: Path) -> None:
    """The acceptance command: a date range, tenant and model groups, CSV with cost."""
    prices = tmp_path / "prices.yaml"
    prices.write_text(PRICES)
    code, out, err = _usage(
        *("--from", "2026-12-01", "--to", "2026-12-07", "--by", "tenant,model"),
        *("--format", "csv", "--prices", str(prices), "--file", str(usage_file)),
    )
    assert code == 0, err
    # m-a: (prompt - cached) * 0.5 + cached * 0.25 + completion * 1.5, per 1M tokens.
    assert out == (
        "tenant,model,requests,failed,prompt_tokens,completion_tokens,cached_tokens,cost\n"
        "acme,m-a,2,0,4000,2000,200,0.004950\n"
        "acme,m-b,1,1,100,0,0,0.000200\n"
        "beta,m-a,1,0,2000,1000,1000,0.002250\n"
        "beta,m-c,1,0,10,10,0,0.000000\n"
    )
    assert "no price for m-c" in err


def test_by_key_and_day_without_prices(usage_file: Path) -> None:
    code, out, err = _usage(
        *("--from", "2026-12-01", "--to", "2026-12-03", "--by", "key,day", "--format", "csv"),
        *("--file", str(usage_file)),
    )
    assert code == 0, err
    assert out == (
        "key,day,requests,failed,prompt_tokens,completion_tokens,cached_tokens\n"
        "k1,2026-12-01,1,0,1000,500,200\n"
        "k2,2026-12-03,1,0,3000,1500,0\n"
        "k3,2026-12-02,1,0,10,10,0\n"
    )


def test_json_and_table(usage_file: Path, tmp_path: Path) -> None:
    prices = tmp_path / "prices.json"
    prices.write_text(json.dumps({"models": {"m-a": {"input": 1, "output": 2}}}))
    code, out, _ = _usage(
        *("--from", "2026-12-05", "--to", "2026-12-05", "--by", "tenant", "--format", "json"),
        *("--prices", str(prices), "--file", str(usage_file)),
    )
    assert code == 0
    assert json.loads(out) == {
        "currency": "USD",
        "rows": [
            {
                "tenant": "beta",
                "requests": 1,
                "failed": 0,
                "prompt_tokens": 2000,
                "completion_tokens": 1000,
                "cached_tokens": 1000,
                "cost": 0.004,
            }
        ],
    }
    code, out, _ = _usage("--from", "2026-12-01", "--to", "2026-12-07", "--file", str(usage_file))
    assert code == 0
    assert out.splitlines()[1].split() == [
        *("┃", "tenant", "┃", "model", "┃", "requests", "┃", "failed", "┃", "prompt_tokens"),
        *("┃", "completion_tokens", "┃", "cached_tokens", "┃"),
    ]
    assert "│ acme   │ m-a   │ 2        │ 0      │ 4000" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--by", "tenant,region"), "group by tenant, key, model, day"),
        (("--from", "2026-12-09", "--to", "2026-12-01"), "--from is after --to"),
        (("--from", "12/01/2026"), "is not a day"),
    ],
)
def test_bad_arguments(usage_file: Path, args: tuple[str, ...], message: str) -> None:
    code, _, err = _usage(*args, "--file", str(usage_file))
    assert code == 2
    assert message in " ".join(err.split())


def test_a_line_that_is_no_record_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "usage.jsonl"
    path.write_text('{"id": "x"}\n')
    code, _, err = _usage("--file", str(path))
    assert code == 1
    assert "usage.jsonl:1: not a usage record" in err
