"""Open-loop serving sweep: vLLM's own server, the graph's ingress and the gateway, one run.

Every measurement is one `vllm bench serve` run (``tests/bench/vllm_bench_serve.py``; random
prompts from a fixed seed, Poisson arrivals at a fixed request rate, streaming, output length
fixed with ``ignore_eos``), so TTFT, TPOT, ITL, end-to-end latency, throughput and goodput are
vLLM's own definitions. The three targets run side by side on the same machine for the whole
sweep, and at each rate they are measured one after the other in an order that rotates from
rate to rate, so a drift of the machine's speed hits all three alike.

Cases (``--case``):

- ``chat`` (default): the rate sweep above. Starts ``python -m vllm.entrypoints.openai.api_server``
  on the graph's converted SmolLM2 weights with the graph's engine arguments (direct), and
  ``llmops up`` (the graph's ingress on ``--graph-port``, the gateway with a fresh key in front).
- ``prefix``: every prompt starts with the same ``--prefix-len`` tokens; a graph with two
  replicas of the LLM, once with prefix-aware routing and once without (two ``llmops up`` runs
  one after the other), graph ingress only.
- ``model-auto``: the same chat load with ``model: auto`` (the router picks) against the named
  model, through the graph and the gateway.
- ``embeddings``: ``/v1/embeddings`` at a rate sweep, graph and gateway (the encoder batches
  requests up to its ``max_batch_size``).
- ``gateway-stub``: the gateway alone in front of the stub upstream (runs
  ``tests.bench.gateway_overhead`` with the arguments after ``--``).

``--profile gpu`` holds the same sweep sized for a GPU node (model, rates, objective); with
``--direct-url``, ``--graph-url`` and ``--gateway-url`` the script starts nothing and measures
servers that already run (e.g. port-forwarded from a cluster).

    .venv/bin/python -m tests.bench.serving_sweep [--case chat] [--rates 0.5 1 2] [--seconds 20]

Writes ``<out>/<case>-<profile>[-<tag>].json`` (every point: the `vllm bench serve` command, its
metrics, the load average before and after, the cores each process tree used) and the same
name with ``.png``.
Not a test: the results go to docs/benchmarks.md by hand.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tests.conftest import free_port
from tests.reliability import processes

ROOT = Path(__file__).resolve().parents[2]
BENCH = [sys.executable, "-m", "tests.bench.vllm_bench_serve"]
# What `vllm bench serve` reports, kept per point (the p50s are vLLM's "median_*").
METRICS = [
    "completed",
    "failed",
    "duration",
    "request_throughput",
    "request_goodput",
    "output_throughput",
    "total_token_throughput",
    *(
        f"{stat}_{metric}_ms"
        for metric in ("ttft", "tpot", "itl", "e2el")
        for stat in ("mean", "median", "p99")
    ),
]


@dataclass(frozen=True)
class Profile:
    """The load of one sweep: what a request looks like, the rates, the objective."""

    description: str
    input_len: int
    output_len: int
    rates: tuple[float, ...]
    slo: tuple[str, ...]
    """`vllm bench serve --goodput` pairs, milliseconds."""
    seconds: float
    """Arrivals per rate last about this long (num_prompts = rate x seconds)."""


PROFILES = {
    # SmolLM2-135M in float32 on a 2-core VM: about 50 output tokens/s at 8 concurrent streams.
    "cpu": Profile(
        "embedded SmolLM2-135M-Instruct, float32, 2-core VM shared by engine, proxy, router, "
        "gateway and the load generator",
        input_len=128,
        output_len=32,
        rates=(0.5, 1.0, 2.0, 3.0),
        slo=("ttft:2000", "tpot:250"),
        seconds=20,
    ),
    # Llama 3.1 8B Instruct in bfloat16 on one L40S/A100/H100-class GPU
    # (deploy/examples/llama-8b-gpu.yaml), the ShareGPT-like shape of vLLM's own benchmarks.
    "gpu": Profile(
        "Llama-3.1-8B-Instruct, bfloat16, one GPU per replica (deploy/examples/llama-8b-gpu.yaml)",
        input_len=512,
        output_len=128,
        rates=(1, 2, 4, 8, 12, 16, 24, 32),
        slo=("ttft:500", "tpot:50"),
        seconds=60,
    ),
}


@dataclass(frozen=True)
class Target:
    name: str
    url: str
    model: str
    api_key: str | None = None


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def load_average() -> list[float]:
    """1, 5 and 15 minute load averages (what `uptime` prints)."""
    return [round(x, 2) for x in os.getloadavg()]


def machine() -> dict[str, object]:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        mem_kib = int(Path("/proc/meminfo").read_text().split()[1])
    except OSError:
        mem_kib = 0
    versions = {}
    for package in ("vllm", "ray", "torch"):
        try:
            module = __import__(package)
            versions[package] = str(getattr(module, "__version__", "?"))
        except ImportError:
            pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(mem_kib / 2**20, 1),
        "python": platform.python_version(),
        **versions,
    }


def _wait_http(url: str, timeout_s: float, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited ({process.returncode}) before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise TimeoutError(f"{url} not ready after {timeout_s:.0f} s")


TICKS = os.sysconf("SC_CLK_TCK")
# Process trees whose CPU a point reports apart from the rest of the machine: pid -> name.
ROOTS: dict[int, str] = {}


def _kind(argv: list[str]) -> str:
    """A process's kind: its Ray or vLLM title, or its module or program."""
    if argv and argv[0].startswith(("ray::", "VLLM::")):
        return re.sub(r"#[0-9a-z]{8}", "", argv[0].split(" ")[0].split(".")[0])
    if "-m" in argv[:-1]:
        return argv[argv.index("-m") + 1]
    return Path(argv[0]).name if argv else "?"


def _cpu_snapshot() -> dict[int, tuple[str, int]]:
    """pid -> (group/kind, CPU ticks so far); group is the ROOTS tree it is in, else "other"."""
    found = processes()
    snapshot = {}
    for pid, process in found.items():
        group, up = "other", pid
        for _ in range(64):
            if up in ROOTS:
                group = ROOTS[up]
                break
            if up not in found or up <= 1:
                break
            up = found[up].parent
        snapshot[pid] = (f"{group}/{_kind(process.argv)}", process.cpu_ticks)
    return snapshot


def _cpu_used(before: dict[int, tuple[str, int]], seconds: float) -> dict[str, float]:
    """Cores used on average since ``before``, by group/kind (>= 0.02 core), largest first."""
    used: dict[str, float] = {}
    for pid, (kind, ticks) in _cpu_snapshot().items():
        delta = ticks - before.get(pid, (kind, 0))[1]
        if delta > 0:
            used[kind] = used.get(kind, 0.0) + delta / TICKS / seconds
    ranked = sorted(used.items(), key=lambda item: -item[1])
    return {kind: round(cores, 2) for kind, cores in ranked if cores >= 0.02}


def _children(pid: int) -> set[int]:
    """Every live descendant of ``pid``, from /proc."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    found: set[int] = set()
    frontier = {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def _stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM and wait; then kill what it left behind (vLLM's EngineCore ignores SIGTERM)."""
    left = _children(process.pid)
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=120)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    for pid in left | _children(process.pid):
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def direct_command(port: int) -> tuple[list[str], dict[str, str], str, Path]:
    """vLLM's own OpenAI server with the graph's engine settings; also its model and weights."""
    from llmops_services import default_graph_config, resolve_source
    from llmops_services.llm import llm_config_for

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
        spec.name,
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
    if engine.enable_prefix_caching:
        command.append("--enable-prefix-caching")
    env = {"VLLM_CPU_KVCACHE_SPACE": str(engine.cpu_kv_cache_gib)}
    return command, env, spec.name, folder


@contextmanager
def direct_server(logs: Path) -> Iterator[tuple[Target, list[str]]]:
    port = free_port()
    command, extra, model, _ = direct_command(port)
    with open(logs / "direct.log", "wb") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, **extra)
        )
    ROOTS[process.pid] = "direct"
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_http(f"{url}/health", 900, process)
        yield Target("direct", url, model), command
    finally:
        _stop(process)


@contextmanager
def llmops_up(
    logs: Path, name: str, gateway: bool = True, config: Path | None = None
) -> Iterator[tuple[dict[str, str], list[str]]]:
    """`llmops up` on free ports; yields {"graph": url, "gateway": url, "key": key}."""
    port, graph_port = free_port(), free_port()
    command = [sys.executable, "-m", "llmops_cli", "up", "--port", str(port)]
    command += ["--graph-port", str(graph_port), "--ray-metrics-port", str(free_port())]
    if config is not None:
        command += ["--config", str(config)]
    keys = Path(tempfile.mkdtemp(prefix="llmops-sweep-keys-")) / "keys.json"
    if gateway:
        command += ["--metrics-port", str(free_port()), "--grpc-port", str(free_port())]
        command += ["--keys-file", str(keys)]
    else:
        command.append("--no-gateway")
    log_path = logs / f"{name}.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    ROOTS[process.pid] = "llmops-up"
    try:
        deadline = time.monotonic() + 900
        text = ""
        # The banner: "ready at", then (with the gateway) the key, then the examples.
        while "Press Ctrl-C" not in text:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"llmops up did not start; see {log_path}")
            time.sleep(2)
            text = log_path.read_text(errors="replace")
        found = re.search(r"API key \(tenant 'local'; shown once\): (\S+)", text)
        if gateway and not found:
            raise RuntimeError(f"llmops up printed no API key; see {log_path}")
        urls = {"graph": f"http://127.0.0.1:{graph_port if gateway else port}"}
        if gateway:
            urls["gateway"] = f"http://127.0.0.1:{port}"
        if found:
            urls["key"] = found.group(1)
        yield urls, command
    finally:
        _stop(process)


def bench_command(
    target: Target,
    profile: Profile,
    rate: float,
    num_prompts: int,
    tokenizer: str,
    result: Path,
    args: argparse.Namespace,
    backend: str = "openai-chat",
    seed: int = 0,
    warmups: int = 2,
) -> list[str]:
    endpoint = "/v1/embeddings" if backend == "openai-embeddings" else "/v1/chat/completions"
    command = [
        *BENCH,
        "--backend",
        backend,
        "--base-url",
        target.url,
        "--endpoint",
        endpoint,
        "--model",
        target.model,
        "--tokenizer",
        tokenizer,
        "--dataset-name",
        "random",
        "--random-input-len",
        str(profile.input_len),
        "--random-output-len",
        str(profile.output_len),
        "--random-range-ratio",
        "0",
        "--random-prefix-len",
        str(args.prefix_len if args.case == "prefix" else 0),
        "--seed",
        str(seed),
        "--num-prompts",
        str(num_prompts),
        "--request-rate",
        str(rate),
        "--burstiness",
        "1.0",
        "--num-warmups",
        str(warmups),
        "--percentile-metrics",
        "ttft,tpot,itl,e2el" if backend != "openai-embeddings" else "e2el",
        "--metric-percentiles",
        "50,99",
        "--save-result",
        "--result-dir",
        str(result.parent),
        "--result-filename",
        result.name,
        "--disable-tqdm",
        "--ready-check-timeout-sec",
        "60",
    ]
    if backend != "openai-embeddings":
        command += ["--ignore-eos", "--temperature", "0", "--goodput", *profile.slo]
    return command


def measure(
    target: Target,
    profile: Profile,
    rate: float,
    tokenizer: str,
    args: argparse.Namespace,
    backend: str = "openai-chat",
    seed: int = 0,
    label: str | None = None,
    num_prompts: int = 0,
) -> dict[str, Any]:
    """One `vllm bench serve` run; its metrics, command and the load around it."""
    num_prompts = num_prompts or max(args.min_prompts, math.ceil(rate * profile.seconds))
    label = label or target.name
    result = args.logs / f"{label}-{rate:g}-{seed}.json"
    result.unlink(missing_ok=True)
    command = bench_command(
        target, profile, rate, num_prompts, tokenizer, result, args, backend, seed
    )
    env = dict(os.environ)
    env.pop("OPENAI_API_KEY", None)
    if target.api_key:
        env["OPENAI_API_KEY"] = target.api_key
    load_before = load_average()
    started = time.monotonic()
    with open(args.logs / f"{label}-{rate:g}.log", "wb") as log:
        bench = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        ROOTS[bench.pid] = "load-generator"
        # vLLM bench loads the tokenizer and sends its warm-ups first: CPU is counted from then
        # to the end, so it covers the measured requests (and a few seconds of set-up).
        time.sleep(min(8.0, profile.seconds / 2))
        cpu_before, cpu_started = _cpu_snapshot(), time.monotonic()
        children_before = os.times()
        failed = bench.wait()
        seconds = time.monotonic() - cpu_started
        cpu = _cpu_used(cpu_before, seconds)
        del ROOTS[bench.pid]
        # The load generator has exited (so /proc no longer shows it): its CPU is in ours
        # (children's times), less what it had used when the count began.
        children = os.times()
        spent = children.children_user + children.children_system
        spent -= children_before.children_user + children_before.children_system
        spent -= cpu_before.get(bench.pid, ("", 0))[1] / TICKS  # its start-up and warm-ups
        cpu["load-generator"] = round(spent / seconds, 2)
    wall = time.monotonic() - started
    if failed:  # kept as a point without metrics: one target's failure ends no sweep
        tail = (args.logs / f"{label}-{rate:g}.log").read_text(errors="replace")
        error = next((line for line in reversed(tail.splitlines()) if "Error" in line), "?")
        print(f"{label} at {rate:g} req/s failed: {error}", file=sys.stderr, flush=True)
        return {"target": label, "rate": rate, "error": error[:300], "at": _now()}
    data = json.loads(result.read_text())
    point: dict[str, Any] = {
        "target": label,
        "rate": rate,
        "num_prompts": num_prompts,
        "load_before": load_before,
        "load_after": load_average(),
        "wall_s": round(wall, 1),
        "at": _now(),
        "command": " ".join(command[1:]).replace(str(ROOT) + "/", ""),
        # Cores used on average while it ran, by process tree and kind; "other/..." is work
        # on the machine that is none of the servers' nor the load generator's.
        "cores_used": cpu,
        "cores_used_by_other_work": round(
            sum(v for k, v in cpu.items() if k.startswith("other/")), 2
        ),
    }
    for key in METRICS:
        if key in data:
            point[key] = round(float(data[key]), 3)
    errors = [e for e in data.get("errors", []) if e]
    if errors:
        point["first_error"] = str(errors[0])[:300]
    print(
        json.dumps(
            {
                k: point.get(k)
                for k in (
                    "target",
                    "rate",
                    "completed",
                    "failed",
                    "request_goodput",
                    "median_ttft_ms",
                    "median_tpot_ms",
                )
            }
        ),
        flush=True,
    )
    return point


def sweep(
    targets: list[Target],
    profile: Profile,
    rates: list[float],
    tokenizer: str,
    args: argparse.Namespace,
    backend: str = "openai-chat",
) -> list[dict[str, Any]]:
    """Every rate against every target, the order rotating from one rate to the next."""
    for target in targets:  # warm-up: not recorded, another seed than the sweep's
        measure(target, profile, 2.0, tokenizer, args, backend, seed=1000, num_prompts=6)
    points = []
    for i, rate in enumerate(rates):
        order = targets[i % len(targets) :] + targets[: i % len(targets)]
        for target in order:
            points.append(measure(target, profile, rate, tokenizer, args, backend))
    return points


def _point(points: list[dict[str, Any]], target: str, rate: float) -> dict[str, Any] | None:
    found = (p for p in points if p["target"] == target and p["rate"] == rate)
    return next((p for p in found if "error" not in p), None)


def goals(points: list[dict[str, Any]], rates: list[float]) -> dict[str, Any]:
    """The issue's goals, from one run's points.

    The direct server's saturation is the most requests/s it completed at any rate; "below
    saturation" are the rates under it; "half saturation" is the swept rate nearest half of it.
    """
    direct = [p for p in points if p["target"] == "direct" and "error" not in p]
    if not direct:
        return {}
    saturation = max(p["request_throughput"] for p in direct)
    below = [r for r in rates if r < saturation]
    rows = []
    for rate in rates:
        d, g, w = (_point(points, name, rate) for name in ("direct", "graph", "gateway"))
        row: dict[str, Any] = {"rate": rate, "below_saturation": rate in below}
        if d and g and d["request_goodput"]:
            row["graph_goodput_ratio"] = round(g["request_goodput"] / d["request_goodput"], 3)
        if g and w and g["request_goodput"]:
            row["gateway_goodput_ratio"] = round(w["request_goodput"] / g["request_goodput"], 3)
        if d and g:
            row["graph_added_ttft_p50_ms"] = round(g["median_ttft_ms"] - d["median_ttft_ms"], 1)
        if d and w:
            row["added_ttft_p50_ms"] = round(w["median_ttft_ms"] - d["median_ttft_ms"], 1)
        rows.append(row)
    half = min(rates, key=lambda r: abs(r - saturation / 2))
    checked = [r for r in rows if r["below_saturation"]]
    half_row = next(r for r in rows if r["rate"] == half)
    return {
        "direct_saturation_req_s": saturation,
        "half_saturation_rate": half,
        "per_rate": rows,
        "graph_goodput_ge_0.95_direct": all(
            r.get("graph_goodput_ratio", 0) >= 0.95 for r in checked
        ),
        "gateway_goodput_ge_0.98_graph": all(
            r.get("gateway_goodput_ratio", 0) >= 0.98 for r in checked
        ),
        "added_ttft_p50_le_25ms_at_half": half_row.get("added_ttft_p50_ms", math.inf) <= 25,
    }


def plot(points: list[dict[str, Any]], title: str, path: Path, embeddings: bool = False) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (
        [("median_e2el_ms", "p99_e2el_ms", "latency (ms)"), ("request_throughput", None, "req/s")]
        if embeddings
        else [
            ("median_ttft_ms", "p99_ttft_ms", "TTFT (ms)"),
            ("median_tpot_ms", "p99_tpot_ms", "TPOT (ms)"),
            ("median_e2el_ms", "p99_e2el_ms", "end-to-end (ms)"),
            ("request_goodput", "request_throughput", "goodput (solid), throughput (req/s)"),
        ]
    )
    rows = (len(panels) + 1) // 2
    fig, grid = plt.subplots(rows, 2, figsize=(9, 3.4 * rows), squeeze=False)
    axes = list(grid.flat)
    names = list(dict.fromkeys(p["target"] for p in points))
    for ax, (p50, p99, label) in zip(axes, panels, strict=True):
        for i, name in enumerate(names):
            mine = sorted((p for p in points if p["target"] == name), key=lambda p: p["rate"])
            rates = [p["rate"] for p in mine]
            color = f"C{i}"
            ax.plot(rates, [p.get(p50, math.nan) for p in mine], "o-", color=color, label=name)
            if p99:
                ax.plot(rates, [p.get(p99, math.nan) for p in mine], "x--", color=color)
        ax.set_xlabel("offered rate (req/s)")
        ax.set_ylabel(label)
        if "ms" in label:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].legend(title="solid p50, dashed p99" if not embeddings else None, fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def write(args: argparse.Namespace, result: dict[str, Any], embeddings: bool = False) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"{args.case}-{args.profile}{'-' + args.tag if args.tag else ''}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    if result["points"]:
        title = f"{args.case} ({args.profile} profile), {result['date'][:16]} UTC"
        plot(result["points"], title, stem.with_suffix(".png"), embeddings)
    print(f"wrote {stem}.json and .png", file=sys.stderr)


def tokenizer_folder(encoder: bool = False) -> str:
    from llmops_services import default_graph_config, resolve_source

    graph = default_graph_config()
    if encoder and graph.encoder is not None:
        return str(resolve_source(graph.encoder.source))
    return str(resolve_source(graph.llms[0].source))


def run_chat(args: argparse.Namespace, profile: Profile, rates: list[float]) -> dict[str, Any]:
    servers: dict[str, Any] = {}
    with ExitStack() as stack:
        if args.graph_url:
            model = args.model or "auto"
            targets = [
                Target("direct", args.direct_url, model),
                Target("graph", args.graph_url, model),
                Target("gateway", args.gateway_url, model, args.api_key),
            ]
            targets = [t for t in targets if t.url]
            tokenizer = args.tokenizer or model
        else:
            model = direct_command(0)[2]
            targets = []
            if args.case == "chat":  # model-auto compares the graph with itself
                direct, servers["direct"] = stack.enter_context(direct_server(args.logs))
                targets.append(direct)
            urls, servers["llmops_up"] = stack.enter_context(llmops_up(args.logs, "llmops-up"))
            targets += [
                Target("graph", urls["graph"], model),
                Target("gateway", urls["gateway"], model, urls.get("key")),
            ]
            tokenizer = tokenizer_folder()
        if args.case == "model-auto":
            targets = [t for t in targets if t.name != "direct"]
            targets += [Target(f"{t.name}-auto", t.url, "auto", t.api_key) for t in targets]
        load = load_average()
        points = sweep(targets, profile, rates, tokenizer, args)
    return {
        "servers": servers,
        "load_at_start": load,
        "points": points,
        "goals": goals(points, rates) if args.case == "chat" else {},
    }


def run_prefix(args: argparse.Namespace, profile: Profile, rates: list[float]) -> dict[str, Any]:
    from llmops_services import default_graph_config

    points: list[dict[str, Any]] = []
    servers: dict[str, Any] = {}
    tokenizer = tokenizer_folder()
    for routing in (True, False):
        graph = default_graph_config()
        llm = graph.llms[0].model_copy(update={"replicas": 2, "prefix_aware_routing": routing})
        graph = graph.model_copy(update={"llms": [llm]})
        config = args.logs / f"prefix-{routing}.yaml"
        config.write_text(json.dumps(graph.model_dump(mode="json")))
        name = "prefix-aware" if routing else "no-prefix-routing"
        with llmops_up(args.logs, name, gateway=False, config=config) as (urls, command):
            servers[name] = command
            target = Target("graph", urls["graph"], llm.name)
            for rate in rates:
                points.append(measure(target, profile, rate, tokenizer, args, label=name))
    return {"servers": servers, "points": points, "goals": {}}


def run_embeddings(
    args: argparse.Namespace, profile: Profile, rates: list[float]
) -> dict[str, Any]:
    from llmops_services import default_graph_config

    encoder = default_graph_config().encoder
    assert encoder is not None, "the default graph has an encoder"
    with llmops_up(args.logs, "llmops-up-embeddings") as (urls, command):
        targets = [
            Target("graph", urls["graph"], encoder.name),
            Target("gateway", urls["gateway"], encoder.name, urls.get("key")),
        ]
        points = sweep(
            targets,
            profile,
            rates,
            tokenizer_folder(encoder=True),
            args,
            backend="openai-embeddings",
        )
    return {"servers": {"llmops_up": command}, "points": points, "goals": {}}


def run_gateway_stub(args: argparse.Namespace, passthrough: list[str]) -> int:
    """`tests.bench.gateway_overhead` with ``passthrough``; its JSON kept with date and load."""
    command = [sys.executable, "-m", "tests.bench.gateway_overhead", *passthrough]
    result: dict[str, Any] = {
        "case": args.case,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": "python -m tests.bench.serving_sweep " + " ".join(sys.argv[1:]),
        "machine": machine(),
        "uptime_before": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(),
    }
    done = subprocess.run(command, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    if done.returncode:
        return done.returncode
    result["uptime_after"] = subprocess.run(["uptime"], capture_output=True, text=True).stdout
    result["uptime_after"] = result["uptime_after"].strip()
    result["results"] = json.loads(done.stdout)
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"{args.case}{'-' + args.tag if args.tag else ''}.json"
    (args.out / name).write_text(json.dumps(result, indent=1) + "\n")
    print(done.stdout)
    return 0


def table(result: dict[str, Any]) -> str:
    """Markdown rows of a sweep's JSON, for docs/benchmarks.md: one row per rate and target."""
    baselines = {"graph": "direct", "gateway": "graph"}
    lines = [
        "| rate | target | goodput req/s (x baseline) | TTFT p50 / p99 ms | TPOT p50 / p99 ms "
        "| ITL p50 / p99 ms | E2E p50 / p99 ms | out tok/s | load 1 min | other work, cores |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    points = result["points"]
    for p in sorted(points, key=lambda p: (p["rate"], p["at"])):
        if "error" in p:
            lines.append(f"| {p['rate']:g} | {p['target']} | failed: {p['error'][:80]} |")
            continue
        base = _point(points, baselines.get(p["target"], ""), p["rate"])
        goodput = f"{p.get('request_goodput', math.nan):.3f}"
        if base and base.get("request_goodput"):
            goodput += f" ({p['request_goodput'] / base['request_goodput']:.2f})"
        if p.get("failed"):
            goodput += f", {p['failed']:.0f} failed"

        def pair(metric: str, point: dict[str, Any] = p) -> str:
            return f"{point.get(f'median_{metric}_ms', math.nan):,.0f} / " + (
                f"{point.get(f'p99_{metric}_ms', math.nan):,.0f}"
            )

        lines.append(
            f"| {p['rate']:g} | {p['target']} | {goodput} | {pair('ttft')} | {pair('tpot')} "
            f"| {pair('itl')} | {pair('e2el')} | {p.get('output_throughput', math.nan):.1f} "
            f"| {p['load_before'][0]:g} -> {p['load_after'][0]:g} "
            f"| {p.get('cores_used_by_other_work', math.nan):.2f} |"
        )
    return "\n".join(lines)


def rate_table(result: dict[str, Any]) -> str:
    """Markdown, one row per rate: direct, graph and gateway side by side (the chat case)."""
    names = ("direct", "graph", "gateway")
    lines = [
        "| rate req/s | direct goodput | graph / direct | gateway / graph "
        "| TTFT p50 (p99) ms: direct, graph, gateway | TPOT p50 ms | E2E p50 s "
        "| other work, cores |",
        "|---|---|---|---|---|---|---|---|",
    ]
    points = result["points"]
    for rate in sorted({p["rate"] for p in points}):
        d, g, w = trio = [_point(points, name, rate) or {} for name in names]

        def ratio(a: dict[str, Any], b: dict[str, Any]) -> str:
            if not a or not b or not b.get("request_goodput"):
                return "-"
            return f"{a['request_goodput'] / b['request_goodput']:.2f}"

        def each(key: str, scale: float = 1.0, digits: int = 0, trio: list[Any] = trio) -> str:
            return ", ".join(f"{x[key] * scale:,.{digits}f}" if key in x else "-" for x in trio)

        ttft = ", ".join(
            f"{x['median_ttft_ms']:,.0f} ({x['p99_ttft_ms']:,.0f})" if x else "-" for x in trio
        )
        lines.append(
            f"| {rate:g} | {d.get('request_goodput', math.nan):.3f} | {ratio(g, d)} "
            f"| {ratio(w, g)} | {ttft} | {each('median_tpot_ms')} "
            f"| {each('median_e2el_ms', 0.001, 1)} | {each('cores_used_by_other_work', 1, 2)} |"
        )
    return "\n".join(lines)


def main() -> None:
    argv = sys.argv[1:]
    passthrough: list[str] = []
    if "--" in argv:
        argv, passthrough = argv[: argv.index("--")], argv[argv.index("--") + 1 :]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--case",
        choices=["chat", "prefix", "model-auto", "embeddings", "gateway-stub"],
        default="chat",
    )
    parser.add_argument("--profile", choices=sorted(PROFILES), default="cpu")
    parser.add_argument("--rates", type=float, nargs="+", help="requests/s (profile's)")
    parser.add_argument("--seconds", type=float, help="arrivals per rate (profile's)")
    parser.add_argument("--min-prompts", type=int, default=12, help="requests per point, at least")
    parser.add_argument("--input-len", type=int, help="prompt tokens (profile's)")
    parser.add_argument("--output-len", type=int, help="output tokens (profile's)")
    parser.add_argument("--prefix-len", type=int, default=512, help="shared prefix (prefix case)")
    parser.add_argument("--slo", nargs="+", help="goodput objective, e.g. ttft:2000 tpot:250")
    parser.add_argument("--direct-url", help="measure this running vLLM server; start nothing")
    parser.add_argument("--graph-url", help="measure this running graph ingress")
    parser.add_argument("--gateway-url", help="measure this running gateway")
    parser.add_argument("--api-key", help="the gateway's key (with --gateway-url)")
    parser.add_argument("--model", help="model name (with the --*-url options)")
    parser.add_argument("--tokenizer", help="tokenizer (with the --*-url options)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "bench")
    parser.add_argument("--logs", type=Path, default=Path("/tmp/llmops-sweep"))
    parser.add_argument("--tag", default="", help="suffix of the output files' names")
    parser.add_argument("--table", type=Path, help="print a sweep JSON's rows as Markdown; exit")
    parser.add_argument("--by-rate", action="store_true", help="with --table: a row per rate")
    args = parser.parse_args(argv)
    if args.table:
        sweep_json = json.loads(args.table.read_text())
        print(rate_table(sweep_json) if args.by_rate else table(sweep_json))
        return
    # SIGTERM stops the sweep like Ctrl-C: the servers it started are stopped on the way out
    # (a background job started from a script ignores SIGINT).
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    if args.case == "gateway-stub":
        raise SystemExit(run_gateway_stub(args, passthrough))
    args.logs.mkdir(parents=True, exist_ok=True)
    base = PROFILES[args.profile]
    profile = Profile(
        base.description,
        args.input_len or base.input_len,
        args.output_len or base.output_len,
        tuple(args.rates or base.rates),
        tuple(args.slo or base.slo),
        args.seconds or base.seconds,
    )
    rates = list(profile.rates)
    result: dict[str, Any] = {
        "case": args.case,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": "python -m tests.bench.serving_sweep " + " ".join(sys.argv[1:]),
        "machine": machine(),
        "profile": {"name": args.profile, **profile.__dict__},
        "uptime_before": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(),
    }
    started = time.monotonic()
    if args.case == "prefix":
        result |= run_prefix(args, profile, rates)
    elif args.case == "embeddings":
        result |= run_embeddings(args, profile, rates)
    else:
        result |= run_chat(args, profile, rates)
    result["uptime_after"] = subprocess.run(["uptime"], capture_output=True, text=True).stdout
    result["uptime_after"] = result["uptime_after"].strip()
    result["wall_s"] = round(time.monotonic() - started, 1)
    write(args, result, embeddings=args.case == "embeddings")
    print(json.dumps(result.get("goals", {}), indent=1))


if __name__ == "__main__":
    main()
