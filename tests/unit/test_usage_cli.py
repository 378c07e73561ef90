"""`llmops usage` over records written by the gateway's own JSONL writer.

The records go through `FileUsageSink` (what a gateway without Redis appends with), so the
file format the CLI reads is the one the gateway writes.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import asdict
from pathlib import Path

import pytest
from typer.testing import CliRunner

from llmops_cli.main import app
from llmops_gateway.usage_records import FileUsageSink, UsageRecord, gpu_seconds

PRICES = """\
currency: EUR
models:
  m-a: {input: 0.5, output: 1.5, cached_input: 0.25, gpu_hour: 3.6}
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
    gpu_seconds: float = 0.0,
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
        gpu_seconds=gpu_seconds,
    )


RECORDS = [
    _record(1, "2026-12-01T10:00:00.000Z", "acme", "k1", "m-a", 1000, 500, cached=200),
    _record(2, "2026-12-03T12:30:00.250Z", "acme", "k2", "m-a", 3000, 1500, gpu_seconds=1.5),
    _record(3, "2026-12-07T23:59:59.999Z", "acme", "k1", "m-b", 100, 0, status="error"),
    _record(
        4, "2026-12-05T08:00:00.000Z", "beta", "k3", "m-a", 2000, 1000, 1000, "cancelled", 0.75
    ),
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
    # m-a: (prompt - cached) * 0.5 + cached * 0.25 + completion * 1.5, per 1M tokens, plus
    # 3.6 per GPU-hour (0.001 per GPU-second).
    assert out == (
        "tenant,model,requests,failed,prompt_tokens,completion_tokens,cached_tokens,"
        "gpu_seconds,cost\n"
        "acme,m-a,2,0,4000,2000,200,1.500,0.006450\n"
        "acme,m-b,1,1,100,0,0,0.000,0.000200\n"
        "beta,m-a,1,0,2000,1000,1000,0.750,0.003000\n"
        "beta,m-c,1,0,10,10,0,0.000,0.000000\n"
    )
    assert "no price for m-c" in err


def test_by_key_and_day_without_prices(usage_file: Path) -> None:
    code, out, err = _usage(
        *("--from", "2026-12-01", "--to", "2026-12-03", "--by", "key,day", "--format", "csv"),
        *("--file", str(usage_file)),
    )
    assert code == 0, err
    assert out == (
        "key,day,requests,failed,prompt_tokens,completion_tokens,cached_tokens,gpu_seconds\n"
        "k1,2026-12-01,1,0,1000,500,200,0.000\n"
        "k2,2026-12-03,1,0,3000,1500,0,1.500\n"
        "k3,2026-12-02,1,0,10,10,0,0.000\n"
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
                "gpu_seconds": 0.75,
                "cost": 0.004,
            }
        ],
    }
    code, out, _ = _usage("--from", "2026-12-01", "--to", "2026-12-07", "--file", str(usage_file))
    assert code == 0
    assert out.splitlines()[1].split() == [
        *("┃", "tenant", "┃", "model", "┃", "requests", "┃", "failed", "┃", "prompt_tokens"),
        *("┃", "completion_tokens", "┃", "cached_tokens", "┃", "gpu_seconds", "┃"),
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


def test_gpu_hours_priced_alone_and_records_from_before_gpu_seconds(tmp_path: Path) -> None:
    """A model priced per GPU-hour only; a record written before the gpu_seconds and trace_id
    fields existed reads as 0 GPU-seconds (so it costs no GPU time) and no trace."""
    old = {k: v for k, v in asdict(RECORDS[0]).items() if k not in ("gpu_seconds", "trace_id")}
    path = tmp_path / "usage.jsonl"
    path.write_text(json.dumps(old) + "\n")
    assert asyncio.run(FileUsageSink(path).write([RECORDS[1]])) == []
    prices = tmp_path / "prices.yaml"
    prices.write_text("models:\n  m-a: {gpu_hour: 7.2}\n")
    code, out, err = _usage(
        *("--from", "2026-12-01", "--to", "2026-12-07", "--by", "day", "--format", "csv"),
        *("--prices", str(prices), "--file", str(path)),
    )
    assert code == 0, err
    assert out.splitlines()[1:] == [
        "2026-12-01,1,0,1000,500,200,0.000,0.000000",
        f"2026-12-03,1,0,3000,1500,0,1.500,{1.5 * 7.2 / 3600:.6f}",
    ]


@pytest.mark.parametrize(
    ("latency_s", "gpus", "slots", "expected"),
    [(2.0, 4, 16, 0.5), (2.0, 1, 1, 2.0), (0.3, 8, 64, 0.0375)],
)
def test_gpu_seconds_are_a_share_of_a_full_replica(
    latency_s: float, gpus: float, slots: int, expected: float
) -> None:
    """latency x GPUs per replica / sequences per replica: a replica running all its slots
    for a second is charged its GPUs' second, split over the requests in those slots."""
    assert gpu_seconds(latency_s, gpus, slots) == pytest.approx(expected)
    assert gpu_seconds(latency_s, gpus, slots) * slots == pytest.approx(latency_s * gpus)
