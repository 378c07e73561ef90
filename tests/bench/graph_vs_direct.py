"""Benchmark: the serving graph (router -> LLM deployment) against the same vLLM engine direct.

Starts vLLM's own OpenAI server on the embedded SmolLM2 weights, measures it, stops it, then
starts `llmops up` (same weights, same engine arguments), measures it, and prints both, with
ratios. Same prompts, streaming, fixed output length (ignore_eos), concurrency 1 and 8.
Also reports the CPU each kind of process used per 1,000 tokens (read from /proc), and the
"worker share": the fraction of the time vLLM's compute worker ran, which, unlike tokens/s, does
not move with the machine's speed.

A machine's speed drifts by tens of percent over minutes, so with ``--cycles N`` the pair is
measured N times, in the order direct, graph and graph, direct alternately, and the summary
gives the median over cycles of each cycle's ratio. ``--variant KEY=VALUE`` (repeatable)
measures a second graph in every cycle with that environment added, e.g. a setting before a
change, so that its effect is seen in the same run.

    .venv/bin/python -m tests.bench.graph_vs_direct [--rounds 3] [--cycles 1] [--max-tokens 64]

Not a test: results go to docs/benchmarks.md by hand, with date and machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import openai

from llmops_services import default_graph_config, resolve_source
from llmops_services.llm import llm_config_for
from tests.conftest import free_port
from tests.reliability import processes

PROMPTS = [
    "Explain what a hash table is.",
    "Write a short poem about the sea.",
    "What causes the seasons on Earth?",
    "Give three tips for learning a new language.",
    "Describe how a bicycle works.",
    "Why is the sky blue?",
    "Summarise the plot of a heist movie.",
    "List some uses of copper.",
]


@dataclass
class Result:
    concurrency: int
    tokens_per_s: float
    ttft_p50_ms: float
    ttft_p95_ms: float
    requests: int
    tokens: int = 0
    cpu_s: dict[str, float] = field(default_factory=dict)
    """CPU seconds each kind of process used during the measurement."""


TICKS = os.sysconf("SC_CLK_TCK")


def _process_kind(argv: list[str]) -> str:
    """A process's kind: its Ray title without the method it runs now, or its program."""
    if argv and argv[0].startswith("ray::"):
        # "ray::ServeReplica:llmops:Router.handle_request" -> "ray::ServeReplica:llmops:Router";
        # replica ids ("#dbkkacdd") dropped: the replicas of one deployment add up.
        return re.sub(r"#[0-9a-z]{8}", "", argv[0].split(" ")[0].split(".")[0])
    if "-m" in argv[:-1]:
        return f"{Path(argv[0]).name} -m {argv[argv.index('-m') + 1]}"
    script = next((a for a in argv[1:] if not a.startswith("-")), "")
    return f"{Path(argv[0]).name} {Path(script).name[:40]}".strip() if argv else "?"


def _cpu_ticks() -> dict[int, tuple[str, int]]:
    """pid -> (kind, CPU ticks used so far) for every process on the machine."""
    return {pid: (_process_kind(p.argv), p.cpu_ticks) for pid, p in processes().items()}


def _cpu_used(before: dict[int, tuple[str, int]]) -> dict[str, float]:
    """CPU seconds used since ``before``, summed by process kind, largest first."""
    used: dict[str, float] = {}
    for pid, (kind, ticks) in _cpu_ticks().items():
        delta = ticks - before.get(pid, (kind, 0))[1]
        if delta > 0:
            used[kind] = used.get(kind, 0.0) + delta / TICKS
    ranked = sorted(used.items(), key=lambda item: -item[1])
    return {kind: round(seconds, 2) for kind, seconds in ranked if seconds >= 0.05}


def _wait(url: str, path: str, timeout_s: float = 900) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + path, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise TimeoutError(f"{url}{path} not ready")


async def _one(
    client: openai.AsyncOpenAI, model: str, prompt: str, max_tokens: int
) -> tuple[float, int]:
    started = time.perf_counter()
    ttft = -1.0
    tokens = 0
    stream = await client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": prompt}],
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    async for chunk in stream:
        if ttft < 0 and chunk.choices and chunk.choices[0].delta.content:
            ttft = time.perf_counter() - started
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return ttft, tokens


async def measure(url: str, model: str, concurrency: int, rounds: int, max_tokens: int) -> Result:
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    await _one(client, model, "warm up", 8)
    ttfts: list[float] = []
    tokens = 0
    cpu_before = _cpu_ticks()
    started = time.perf_counter()
    for r in range(rounds):
        batch = [PROMPTS[(r * concurrency + i) % len(PROMPTS)] for i in range(concurrency)]
        results = await asyncio.gather(*(_one(client, model, p, max_tokens) for p in batch))
        ttfts += [t for t, _ in results]
        tokens += sum(n for _, n in results)
    elapsed = time.perf_counter() - started
    cpu_s = _cpu_used(cpu_before)
    q = (
        statistics.quantiles([t * 1000 for t in ttfts], n=20)
        if len(ttfts) > 1
        else [ttfts[0] * 1000] * 19
    )
    return Result(
        concurrency,
        tokens / elapsed,
        statistics.median(ttfts) * 1000,
        q[18],
        len(ttfts),
        tokens,
        cpu_s,
    )


def _stop(process: subprocess.Popen[bytes]) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=120)
    except subprocess.TimeoutExpired:
        process.kill()


def direct_server(model: str, port: int) -> tuple[list[str], dict[str, str]]:
    """Command and environment of vLLM's own OpenAI server with the graph's engine settings."""
    spec = default_graph_config().llms[0]
    engine = spec.engine
    folder = resolve_source(spec.source)
    command = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(folder),
        "--served-model-name",
        model,
        "--port",
        str(port),
        "--host",
        "127.0.0.1",
        "--max-model-len",
        str(engine.max_model_len),
        "--max-num-seqs",
        str(engine.max_concurrent_sequences),
        "--enforce-eager",
        # The dtype the graph's LLM deployment passes (float32 on CPU for "auto").
        "--dtype",
        str(llm_config_for(spec).engine_kwargs["dtype"]),
    ]
    return command, {"VLLM_CPU_KVCACHE_SPACE": str(engine.cpu_kv_cache_gib)}


def run_direct(args: argparse.Namespace, model: str) -> list[Result]:
    port = free_port()
    command, extra = direct_server(model, port)
    env = dict(os.environ, **extra)
    with open(args.logs / "direct.log", "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        _wait(url, "/health")
        return [asyncio.run(measure(url, model, c, args.rounds, args.max_tokens)) for c in (1, 8)]
    finally:
        _stop(process)


def run_graph(args: argparse.Namespace, model: str, env: dict[str, str]) -> list[Result]:
    port = free_port()
    command = [sys.executable, "-m", "llmops_cli", "up", "--no-gateway", "--port", str(port)]
    with open(args.logs / "graph.log", "wb") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, **env)
        )
    try:
        url = f"http://127.0.0.1:{port}"
        _wait(url, "/readyz")
        return [asyncio.run(measure(url, model, c, args.rounds, args.max_tokens)) for c in (1, 8)]
    finally:
        _stop(process)


def _per_1k(result: Result) -> dict[str, float]:
    scale = 1000 / max(result.tokens, 1)
    return {kind: round(seconds * scale, 2) for kind, seconds in result.cpu_s.items()}


def _worker_share(result: Result) -> float:
    """Fraction of the wall time vLLM's compute worker was on a CPU.

    Its CPU time per token depends on how fast the machine is at the moment, this fraction
    does not: where it is lower than direct, something kept the worker off its core.
    """
    elapsed = result.tokens / result.tokens_per_s if result.tokens_per_s else 0.0
    return round(result.cpu_s.get("VLLM::Worker", 0.0) / elapsed, 3) if elapsed else 0.0


def _against(name: str, direct: Result, graph: Result) -> dict[str, object]:
    return {
        f"{name}_tok_s": round(graph.tokens_per_s, 2),
        f"{name}_throughput_ratio": round(graph.tokens_per_s / direct.tokens_per_s, 3),
        f"{name}_ttft_p50_ms": round(graph.ttft_p50_ms, 1),
        f"{name}_added_ttft_p50_ms": round(graph.ttft_p50_ms - direct.ttft_p50_ms, 1),
        f"{name}_ttft_p95_ms": round(graph.ttft_p95_ms, 1),
        f"{name}_worker_share": _worker_share(graph),
        # CPU seconds per 1,000 tokens, by process kind.
        f"{name}_cpu_s_per_1k_tokens": _per_1k(graph),
    }


def run_cycle(args: argparse.Namespace, model: str, cycle: int) -> list[dict[str, object]]:
    """One measurement of each setting; odd cycles run them in reverse order."""
    settings: list[tuple[str, dict[str, str] | None]] = [("direct", None), ("graph", {})]
    if args.variant:
        settings.append(("variant", dict(args.variant)))
    if cycle % 2:
        settings.reverse()
    results = {
        name: run_direct(args, model) if env is None else run_graph(args, model, env)
        for name, env in settings
    }
    rows = []
    for i, direct in enumerate(results["direct"]):
        row: dict[str, object] = {
            "cycle": cycle,
            "concurrency": direct.concurrency,
            "requests": direct.requests,
            "direct_tok_s": round(direct.tokens_per_s, 2),
            "direct_ttft_p50_ms": round(direct.ttft_p50_ms, 1),
            "direct_ttft_p95_ms": round(direct.ttft_p95_ms, 1),
            "direct_worker_share": _worker_share(direct),
            "direct_cpu_s_per_1k_tokens": _per_1k(direct),
        }
        for name in results.keys() - {"direct"}:
            row.update(_against(name, direct, results[name][i]))
        rows.append(row)
    return rows


def summarise(rows: list[dict[str, object]]) -> list[dict[str, object]]:
    """Per concurrency and setting: the median, lowest and highest over the cycles."""
    summary = []
    for concurrency in sorted({int(str(row["concurrency"])) for row in rows}):
        mine = [row for row in rows if row["concurrency"] == concurrency]
        entry: dict[str, object] = {"concurrency": concurrency, "cycles": len(mine)}
        for name in ("direct", "graph", "variant"):
            for measure in ("throughput_ratio", "added_ttft_p50_ms", "worker_share"):
                key = f"{name}_{measure}"
                values = [float(str(row[key])) for row in mine if key in row]
                if values:
                    entry[key] = {
                        "median": round(statistics.median(values), 3),
                        "min": min(values),
                        "max": max(values),
                    }
        summary.append(entry)
    return summary


def _env_pair(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="rounds per concurrency level")
    parser.add_argument("--cycles", type=int, default=1, help="times to measure each setting")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens per response")
    parser.add_argument(
        "--variant",
        type=_env_pair,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="environment of a second graph measured in each cycle (repeatable)",
    )
    parser.add_argument("--logs", type=Path, default=Path("/tmp/llmops-bench"))
    args = parser.parse_args()
    args.logs.mkdir(parents=True, exist_ok=True)
    model = default_graph_config().llms[0].name
    rows = []
    for cycle in range(args.cycles):
        rows += run_cycle(args, model, cycle)
        print(json.dumps(rows[-2:], indent=2), file=sys.stderr, flush=True)
    print(json.dumps({"cycles": rows, "summary": summarise(rows)}, indent=2))


if __name__ == "__main__":
    main()
