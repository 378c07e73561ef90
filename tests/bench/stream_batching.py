"""Benchmark: what stream-chunk batching costs the first token, and how many messages it saves.

Feeds the same timed token streams (a first token after a prefill, then one token per decode
step, as a GPU engine makes them) through Ray Serve LLM's `Batcher` (a fixed clock from the
start of the request) and through `llmops_services.llm.batch_stream` (at most one batch per
interval, a chunk after a quiet interval at once), same run, and prints per batcher: how long
after the engine made it the first token left (p50, p95, max), how long tokens waited on
average, and messages per token.

    .venv/bin/python -m tests.bench.stream_batching [--interval-ms 50] [--step-ms 15]
        [--prefill-ms 20,37,64,91] [--tokens 64] [--streams 200]

Not a test: results go to docs/benchmarks.md by hand, with date and machine.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from ray.llm._internal.serve.utils.batcher import Batcher

from llmops_services.llm import batch_stream


async def _tokens(prefill_s: float, step_s: float, count: int) -> AsyncIterator[float]:
    """Yields, per token, the monotonic time the engine made it."""
    await asyncio.sleep(prefill_s)
    for _ in range(count):
        yield time.monotonic()
        await asyncio.sleep(step_s)


async def _one(batches: AsyncIterator[list[float]]) -> tuple[float, list[float], int]:
    first = -1.0
    waits: list[float] = []
    messages = 0
    async for batch in batches:
        now = time.monotonic()
        messages += 1
        waits.extend(now - made for made in batch)
        if first < 0:
            first = now - batch[0]
    return first, waits, messages


def _ray(items: AsyncIterator[float], interval_s: float) -> AsyncIterator[list[float]]:
    stream: AsyncIterator[list[float]] = Batcher(items, interval_ms=interval_s * 1000).stream()
    return stream


async def _run(
    batcher: Callable[[AsyncIterator[float], float], AsyncIterator[list[float]]],
    args: argparse.Namespace,
) -> dict[str, float]:
    prefills = [float(ms) / 1000 for ms in args.prefill_ms.split(",")]
    results = await asyncio.gather(
        *(
            _one(
                batcher(
                    _tokens(prefills[i % len(prefills)], args.step_ms / 1000, args.tokens),
                    args.interval_ms / 1000,
                )
            )
            for i in range(args.streams)
        )
    )
    firsts = sorted(first * 1000 for first, _, _ in results)
    waits = [wait * 1000 for _, stream_waits, _ in results for wait in stream_waits]
    messages = sum(count for _, _, count in results)
    return {
        "first p50": statistics.median(firsts),
        "first p95": firsts[int(0.95 * (len(firsts) - 1))],
        "first max": firsts[-1],
        "mean wait": statistics.fmean(waits),
        "messages/token": messages / len(waits),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--interval-ms", type=float, default=50.0, help="batch interval")
    parser.add_argument("--step-ms", type=float, default=15.0, help="time per decode step")
    parser.add_argument(
        "--prefill-ms", default="20,37,64,91", help="first-token times, used in turn"
    )
    parser.add_argument("--tokens", type=int, default=64, help="tokens per stream")
    parser.add_argument("--streams", type=int, default=200, help="streams, all at once")
    args = parser.parse_args()
    rows: list[tuple[str, dict[str, Any]]] = []
    # Alternate, twice each, so a drift of the machine shows as a difference between passes.
    for _ in range(2):
        rows.append(("Ray Serve LLM Batcher", asyncio.run(_run(_ray, args))))
        rows.append(("llmops batch_stream", asyncio.run(_run(batch_stream, args))))
    keys = list(rows[0][1])
    print("| batcher | " + " | ".join(keys) + " |")
    print("|---|" + "---|" * len(keys))
    for name, row in rows:
        print(f"| {name} | " + " | ".join(f"{row[key]:.2f}" for key in keys) + " |")


if __name__ == "__main__":
    main()
