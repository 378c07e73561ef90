"""Benchmark: latency the gateway adds (auth + Redis limits + relay) over calling the upstream.

Starts the stub upstream (tests/fakes/openai_stub.py), a real redis-server and one gateway (and,
with --litellm, LiteLLM's proxy on the same stub), then sends open-loop load (requests leave on
a fixed schedule, whether or not earlier ones finished) at each rate to the stub directly and
through each proxy, same run, and prints latency percentiles and the differences. Then it looks
for each one's highest rate with p99 under 100 ms and no errors, and relays streams to count SSE
events per second (the stub writing 64 events at a time, then one at a time as vLLM does).
With --tracing, a second gateway with OpenTelemetry tracing on at 100% sampling (spans exported
over OTLP/HTTP to an in-process receiver) is measured in the same phases, and what tracing adds
to p50 and p99 over the untraced gateway is reported.

The gateway runs with a per-client-address limit (slowapi over `limits`, far above the load) so
that check is on every request's path. Each phase also reports the CPU each process used (share
of one core: gateway, stub, redis, and this load generator), which says whether a miss is the
gateway's own cost or the processes competing for the machine's cores. With --pin the gateway
gets a core of its own and everything else shares the rest (needs >= 2 cores).

    .venv/bin/python -m tests.bench.gateway_overhead [--rates 25,200,500] [--seconds 10]
        [--sweep-seconds 5] [--litellm /path/to/venv/bin/litellm] [--tracing] [--pin]
        [--rounds 5] [--profile /tmp/gateway-profile] [--baseline /tmp/base]

With --baseline SRC, a second gateway runs from another checkout of this repository (for
example `git worktree add /tmp/base HEAD~1`: its gateway/ and contract/ packages come first on
PYTHONPATH) on the same stub and Redis, and each round measures both, in alternating order; the
report gives what this checkout's gateway adds over the baseline's (p50, p99, CPU per request)
per round and their medians: a change measured against its parent on the same minutes.

With --rounds N each rate is measured N times, the stub directly and then each proxy back to
back, and the report gives every round and the medians of the added p50 and p99: this machine's
speed drifts from one minute to the next (the direct phase's own p50 moves with it), and a
single round measures the drift as much as the gateway.

With --profile, `py-spy` (PyPI py-spy) samples the gateway during each gateway phase and writes
one speedscope file per rate; each phase also reports the gateway's CPU per request (us).

Not a test: results go to docs/benchmarks.md by hand, with date and machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import aiohttp
import psutil

from llmops_gateway.keys import FileKeyStore, Tenant
from llmops_gateway.local import stop_process
from tests.conftest import free_port
from tests.fakes.otlp_receiver import otlp_receiver
from tests.integration.gateway_fixtures import gateway, stub_upstream, wait_http

CLIENT_RATE_LIMIT = "100000000/minute"
"""Far above any phase's rate: the per-address check runs on every request, and passes."""
BODY = {"model": "stub-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
LITELLM_KEY = "sk-bench"


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


async def sse_rate(
    url: str, headers: dict[str, str], streams: int, tokens: int, burst: int
) -> float:
    """Relays ``streams`` concurrent streams of ``tokens`` events; returns events per second.

    ``burst``: events the stub writes at once (1: one write per event, as vLLM streams).
    """
    body = {**BODY, "stream": True, "max_tokens": tokens, "ignore_eos": True, "stub_burst": burst}
    async with aiohttp.ClientSession() as session:

        async def one() -> int:
            # Counted per read, not per line, so the client is not what limits the rate.
            count, tail, mark = 0, b"", b"\ndata: {"
            async with session.post(url, json=body, headers=headers) as response:
                async for data in response.content.iter_any():
                    data = tail + data
                    count += data.count(mark)
                    tail = data[-(len(mark) - 1) :]
            return count + 1  # the first event has no newline before it

        started = time.perf_counter()
        counts = await asyncio.gather(*(one() for _ in range(streams)))
        elapsed = time.perf_counter() - started
        # The stub, as vLLM, opens a chat stream with a role-only chunk before the tokens.
        assert counts == [tokens + 1] * streams, f"events lost: {counts}"
        return sum(counts) / elapsed


def cpu_seconds(processes: dict[str, psutil.Process]) -> dict[str, float]:
    """CPU time (user + system, seconds) each process has used so far."""
    used = {}
    for name, process in processes.items():
        times = process.cpu_times()
        used[name] = times.user + times.system
    return used


def cpu_share(
    before: dict[str, float], after: dict[str, float], seconds: float
) -> dict[str, float]:
    """Per process, the share of one core it used between two `cpu_seconds` snapshots."""
    return {name: round((after[name] - before[name]) / seconds, 2) for name in before}


def pin(processes: dict[str, psutil.Process], own_core: set[str]) -> dict[str, list[int]]:
    """Gives the processes named in ``own_core`` the last CPU (they are measured one at a
    time) and every other process the rest."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        raise SystemExit("--pin needs at least 2 CPUs")
    placed = {}
    for name, process in processes.items():
        chosen = cpus[-1:] if name in own_core else cpus[:-1]
        process.cpu_affinity(chosen)
        placed[name] = chosen
    return placed


def profile(pid: int, path: str) -> subprocess.Popen[bytes]:
    """Starts py-spy sampling ``pid`` into a speedscope file; SIGINT makes it write the file."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    return subprocess.Popen(
        [spy, "record", "--pid", str(pid), "--format", "speedscope", "-o", path, "--nonblocking"],
        stdout=subprocess.DEVNULL,
    )


SWEEP_RATES = (25, 50, 100, 200, 300, 400, 500, 600, 800, 1000, 1200, 1500, 2000)


def highest_rate(url: str, headers: dict[str, str], seconds: float) -> dict[str, object]:
    """The highest of SWEEP_RATES served with p99 under 100 ms and no errors (stops at the
    first rate that fails), and how that first failing rate went."""
    best: dict[str, object] = {"rate": 0}
    for rate in SWEEP_RATES:
        result = asyncio.run(open_loop(url, headers, rate, seconds))
        if result["errors"] or result["p99"] >= 100:
            best["first_failing"] = {"rate": rate, **result}
            break
        best = {"rate": rate, "p99": round(result["p99"], 2)}
    return best


@contextmanager
def litellm_proxy(binary: str, upstream: str, folder: Path) -> Iterator[str]:
    """LiteLLM's proxy (one worker, no database) in front of the same stub; yields its URL."""
    port = free_port()
    config = folder / "litellm.yaml"
    config.write_text(
        json.dumps(
            {
                "model_list": [
                    {
                        "model_name": BODY["model"],
                        "litellm_params": {
                            "model": f"openai/{BODY['model']}",
                            "api_base": f"{upstream}/v1",
                            "api_key": "unused",
                        },
                    }
                ],
                "general_settings": {"master_key": LITELLM_KEY},
            }
        )
    )
    log = (folder / "litellm.log").open("wb")
    process = subprocess.Popen(
        [binary, "--config", str(config), "--host", "127.0.0.1", "--port", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "LITELLM_LOG": "ERROR"},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/health/liveliness", timeout_s=180)
        yield url
    finally:
        stop_process(process, timeout_s=10)
        log.close()


def measure_rate(
    rate: int,
    args: argparse.Namespace,
    upstream: str,
    targets: dict[str, tuple[str, dict[str, str]]],
    processes: dict[str, psutil.Process],
    gateway_pid: int,
    chat: str,
    turn: int = 0,
) -> dict[str, object]:
    """One round at ``rate``: the stub directly, then each proxy, each for ``args.seconds``
    (with a baseline, the two gateways in the order of ``turn``: odd rounds baseline first)."""
    direct = asyncio.run(open_loop(f"{upstream}{chat}", {}, rate, args.seconds))
    phase: dict[str, object] = {"direct": direct}
    measured: dict[str, dict[str, float]] = {}
    order = list(targets)
    if turn % 2 and "gateway_baseline" in targets:
        order.remove("gateway_baseline")
        order.insert(0, "gateway_baseline")
    for name in order:
        url, headers = targets[name]
        profiling = None
        if args.profile and name == "gateway":
            profiling = profile(gateway_pid, f"{args.profile}-{rate}rps.json")
        before = cpu_seconds(processes)
        started = time.perf_counter()
        through = asyncio.run(open_loop(url, headers, rate, args.seconds))
        elapsed = time.perf_counter() - started
        after = cpu_seconds(processes)
        share = cpu_share(before, after, elapsed)
        if profiling is not None:
            profiling.send_signal(signal.SIGINT)
            profiling.wait(timeout=60)
        if name in processes:  # the gateways this tool starts (not a traced one or LiteLLM)
            used = after[name] - before[name]
            phase[f"{name}_cpu_us_per_request"] = round(used / through["sent"] * 1e6)
        phase[name] = measured[name] = through
        phase[f"{name}_cpu_share"] = share
        phase[f"{name}_added_p50_ms"] = round(through["p50"] - direct["p50"], 2)
        phase[f"{name}_added_p99_ms"] = round(through["p99"] - direct["p99"], 2)
    if args.tracing:
        off, on = measured["gateway"], measured["gateway_traced"]
        phase["tracing_added_p50_ms"] = round(on["p50"] - off["p50"], 2)
        phase["tracing_added_p99_ms"] = round(on["p99"] - off["p99"], 2)
    if "gateway_baseline" in measured:
        this, base = measured["gateway"], measured["gateway_baseline"]
        for what in ("p50", "p99"):
            phase[f"vs_baseline_{what}_ms"] = round(this[what] - base[what], 3)
        this_cpu = phase["gateway_cpu_us_per_request"]
        base_cpu = phase["gateway_baseline_cpu_us_per_request"]
        assert isinstance(this_cpu, int)
        assert isinstance(base_cpu, int)
        phase["vs_baseline_cpu_us_per_request"] = this_cpu - base_cpu
    return phase


def summarize(rounds: list[dict[str, object]], names: list[str]) -> dict[str, object]:
    """One round's phase as is; several: the median round's numbers per proxy (by added p50,
    the direct and proxied phases of a round being back to back) and every round's."""
    if len(rounds) == 1:
        return rounds[0]
    summary: dict[str, object] = {"rounds": len(rounds)}
    for name in names:

        def added(r: dict[str, object], what: str, name: str = name) -> float:
            value = r[f"{name}_added_{what}_ms"]
            assert isinstance(value, int | float)
            return float(value)

        ordered = sorted(rounds, key=lambda r: added(r, "p50"))
        summary[f"{name}_median_round"] = ordered[len(ordered) // 2]
        for what in ("p50", "p99"):
            per_round = [added(r, what) for r in rounds]
            summary[f"{name}_added_{what}_ms_per_round"] = per_round
            summary[f"{name}_median_added_{what}_ms"] = statistics.median(per_round)
        if f"{name}_cpu_us_per_request" in rounds[0]:
            summary[f"{name}_cpu_us_per_request_per_round"] = [
                r[f"{name}_cpu_us_per_request"] for r in rounds
            ]
    if "gateway_baseline" in names:
        for what in ("p50_ms", "p99_ms", "cpu_us_per_request"):
            per_round = [r[f"vs_baseline_{what}"] for r in rounds]
            summary[f"vs_baseline_{what}_per_round"] = per_round
            summary[f"vs_baseline_median_{what}"] = statistics.median(
                float(value) for value in per_round if isinstance(value, int | float)
            )
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", default="25,200,500", help="requests/s, comma-separated")
    parser.add_argument("--seconds", type=float, default=10.0, help="duration of each phase")
    parser.add_argument(
        "--sweep-seconds",
        type=float,
        default=5.0,
        help="duration of each rate while looking for the highest rate with p99 < 100 ms "
        "(0 skips the search)",
    )
    parser.add_argument(
        "--litellm",
        default=None,
        help="path to the `litellm` command (PyPI litellm[proxy], in a separate venv): also "
        "measure LiteLLM's proxy on the same stub",
    )
    parser.add_argument(
        "--tracing",
        action="store_true",
        help="also measure a gateway with tracing on (100%% sampling, OTLP/HTTP export)",
    )
    parser.add_argument(
        "--pin",
        action="store_true",
        help="give the (untraced) gateway a CPU of its own; the stub, redis, the load "
        "generator and any other proxy share the others",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="measure each rate this many times (direct, then each proxy, back to back) and "
        "report every round and the median: the machine's speed drifts between minutes",
    )
    parser.add_argument(
        "--baseline",
        default=None,
        help="another checkout of this repository: its gateway is measured too, in "
        "alternating order, and what this one adds over it is reported",
    )
    parser.add_argument(
        "--profile",
        default=None,
        help="py-spy the gateway during each of its phases; speedscope files under this prefix",
    )
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
        with ExitStack() as stack:
            upstream = stack.enter_context(stub_upstream())
            gw = stack.enter_context(
                gateway(
                    folder,
                    default_backend=upstream,
                    keys_file=store.path,
                    redis_url=f"redis://127.0.0.1:{redis_port}/0",
                    log_format="json",
                    client_rate_limit=CLIENT_RATE_LIMIT,
                )
            )
            processes = {
                "gateway": psutil.Process(gw.process.pid),
                "redis": psutil.Process(redis.pid),
                "load_generator": psutil.Process(),
            }
            for child in psutil.Process().children():
                if "tests.fakes.openai_stub" in child.cmdline():
                    processes["stub"] = child
            chat = "/v1/chat/completions"
            targets = {"gateway": (f"{gw.url}{chat}", {"authorization": f"Bearer {key}"})}
            if args.baseline:
                source = Path(args.baseline).resolve()
                path = os.pathsep.join(str(source / part) for part in ("gateway", "contract"))
                baseline = stack.enter_context(
                    gateway(
                        folder,
                        environment={"PYTHONPATH": path},
                        default_backend=upstream,
                        keys_file=store.path,
                        redis_url=f"redis://127.0.0.1:{redis_port}/0",
                        log_format="json",
                        client_rate_limit=CLIENT_RATE_LIMIT,
                    )
                )
                processes["gateway_baseline"] = psutil.Process(baseline.process.pid)
                targets["gateway_baseline"] = (f"{baseline.url}{chat}", targets["gateway"][1])
                results["baseline"] = str(source)
            if args.pin:
                results["pinned_cpus"] = pin(processes, {"gateway", "gateway_baseline"})
            if args.tracing:
                receiver = stack.enter_context(otlp_receiver())
                traced = stack.enter_context(
                    gateway(
                        folder,
                        default_backend=upstream,
                        keys_file=store.path,
                        redis_url=f"redis://127.0.0.1:{redis_port}/0",
                        log_format="json",
                        client_rate_limit=CLIENT_RATE_LIMIT,
                        otlp_traces_endpoint=receiver.url,
                        trace_sample=1.0,
                    )
                )
                targets["gateway_traced"] = (f"{traced.url}{chat}", targets["gateway"][1])
            if args.litellm:
                litellm = stack.enter_context(litellm_proxy(args.litellm, upstream, folder))
                auth_litellm = {"authorization": f"Bearer {LITELLM_KEY}"}
                targets["litellm"] = (f"{litellm}{chat}", auth_litellm)
            for rate in (int(r) for r in args.rates.split(",")):
                rounds: list[dict[str, object]] = []
                for turn in range(args.rounds):
                    rounds.append(
                        measure_rate(
                            rate, args, upstream, targets, processes, gw.process.pid, chat, turn
                        )
                    )
                results[f"{rate}rps"] = summarize(rounds, list(targets))
            if args.tracing:
                results["spans_received"] = len(receiver.spans)
            if args.sweep_seconds:
                sweep = {"direct": (f"{upstream}{chat}", {}), **targets}
                results["highest_rate_p99_under_100ms"] = {
                    name: highest_rate(url, headers, args.sweep_seconds)
                    for name, (url, headers) in sweep.items()
                }
            auth = targets["gateway"][1]
            chat = "/v1/chat/completions"
            for burst in (64, 1):
                results[f"sse_events_per_s_10_streams_burst_{burst}"] = {
                    "direct": round(
                        asyncio.run(sse_rate(f"{upstream}{chat}", {}, 10, 20_000, burst))
                    ),
                    "gateway": round(
                        asyncio.run(sse_rate(f"{gw.url}{chat}", auth, 10, 20_000, burst))
                    ),
                }
    finally:
        stop_process(redis, timeout_s=5)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
