"""Benchmark: latency the gateway adds (auth + Redis limits + relay) over calling the upstream.

Starts the stub upstream (tests/fakes/openai_stub.py), a real redis-server and one gateway, then
sends open-loop load (requests leave on a fixed schedule, whether or not earlier ones finished)
at each rate to the stub directly and through the gateway, same run, and prints latency
percentiles and the difference. A last phase relays streams to count SSE events per second.

    .venv/bin/python -m tests.bench.gateway_overhead [--rates 200,500] [--seconds 10]

Not a test: results go to docs/benchmarks.md by hand, with date and machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import aiohttp

from llmops_gateway.keys import FileKeyStore, Tenant
from llmops_gateway.local import stop_process
from tests.conftest import free_port
from tests.integration.gateway_fixtures import gateway, stub_upstream

BODY = {"model": "stub-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


async def open_loop(
    url: str, headers: dict[str, str], rate: int, seconds: float
) -> dict[str, float]:
    """Sends ``rate`` requests a second for ``seconds``; returns latency percentiles (ms)."""
    latencies: list[float] = []
    errors = 0
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one() -> None:
            nonlocal errors
            started = time.perf_counter()
            try:
                async with session.post(url, json=BODY, headers=headers) as response:
                    await response.read()
                    if response.status != 200:
                        errors += 1
                        return
            except aiohttp.ClientError:
                errors += 1
                return
            latencies.append((time.perf_counter() - started) * 1000)

        tasks = []
        start = time.perf_counter()
        total = int(rate * seconds)
        for i in range(total):
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one()))
        await asyncio.gather(*tasks)
    q = statistics.quantiles(latencies, n=100)
    return {
        "sent": total,
        "errors": errors,
        "p50": q[49],
        "p90": q[89],
        "p99": q[98],
        "max": max(latencies),
    }


async def sse_rate(url: str, headers: dict[str, str], streams: int, tokens: int) -> float:
    """Relays ``streams`` concurrent streams of ``tokens`` events; returns events per second."""
    body = {**BODY, "stream": True, "max_tokens": tokens, "ignore_eos": True}
    async with aiohttp.ClientSession() as session:

        async def one() -> int:
            count = 0
            async with session.post(url, json=body, headers=headers) as response:
                async for line in response.content:
                    if line.startswith(b"data: {"):
                        count += 1
            return count

        started = time.perf_counter()
        counts = await asyncio.gather(*(one() for _ in range(streams)))
        return sum(counts) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", default="200,500", help="requests per second, comma-separated")
    parser.add_argument("--seconds", type=float, default=10.0, help="duration of each phase")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="llmops-bench-"))
    store = FileKeyStore(folder / "keys.json")
    _, key = store.create(
        Tenant(
            name="bench",
            requests_per_minute=10_000_000,
            tokens_per_minute=1_000_000_000,
            tokens_per_day=10**12,
            max_concurrent_streams=1000,
        )
    )
    redis_port = free_port()
    server = shutil.which("redis-server") or "redis-server"
    redis = subprocess.Popen(
        [server, "--port", str(redis_port), "--bind", "127.0.0.1", "--save", ""],
        stdout=subprocess.DEVNULL,
    )
    results: dict[str, object] = {}
    try:
        time.sleep(0.5)
        with (
            stub_upstream() as upstream,
            gateway(
                folder,
                default_backend=upstream,
                keys_file=store.path,
                redis_url=f"redis://127.0.0.1:{redis_port}/0",
                log_format="json",
            ) as gw,
        ):
            auth = {"authorization": f"Bearer {key}"}
            for rate in (int(r) for r in args.rates.split(",")):
                direct = asyncio.run(
                    open_loop(f"{upstream}/v1/chat/completions", {}, rate, args.seconds)
                )
                through = asyncio.run(
                    open_loop(f"{gw.url}/v1/chat/completions", auth, rate, args.seconds)
                )
                results[f"{rate}rps"] = {
                    "direct": direct,
                    "gateway": through,
                    "added_p50_ms": round(through["p50"] - direct["p50"], 2),
                    "added_p99_ms": round(through["p99"] - direct["p99"], 2),
                }
            results["sse_events_per_s_10_streams"] = round(
                asyncio.run(sse_rate(f"{gw.url}/v1/chat/completions", auth, 10, 20_000))
            )
    finally:
        stop_process(redis, timeout_s=5)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
