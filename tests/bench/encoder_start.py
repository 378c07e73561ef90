"""Benchmark: what serving the encoder costs, this graph's `TextEncoder` vs vLLM's pooling runner.

Each runs in a fresh process on the same model folder (the embedded all-MiniLM-L6-v2 unless
``--source`` names another): seconds from process start until the model is loaded and until the
first vector, and the peak resident memory of the process and its children (vLLM starts an
EngineCore process), sampled every 0.2 s. The two first vectors are compared (cosine), which
checks that both read the folder's pooling the same way.

    .venv/bin/python -m tests.bench.encoder_start [--source embedded://all-minilm-l6-v2]
        [--json docs/bench/encoder-start-cpu.json]

Not a test: results go to docs/benchmarks.md by hand, with date and machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil

from llmops_services.routing import cosine
from llmops_services.sources import resolve_source

SENTENCE = "What is the capital of France?"


def _since_start() -> float:
    return time.time() - float(psutil.Process().create_time())


def _child(kind: str, folder: str) -> None:
    """Loads the model one way and prints the timings and the first vector as JSON."""
    if kind == "encoder":
        from llmops_services.encoder import TextEncoder

        encoder = TextEncoder(Path(folder), device="cpu")
        loaded = _since_start()
        vector = encoder.encode([SENTENCE])[0][0]
    else:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        from vllm import LLM

        llm = LLM(
            model=folder, runner="pooling", enforce_eager=True, dtype="float32", max_model_len=256
        )
        loaded = _since_start()
        vector = list(llm.embed([SENTENCE])[0].outputs.embedding)
    print(json.dumps({"loaded_s": loaded, "first_vector_s": _since_start(), "vector": vector}))


def measure(kind: str, folder: Path) -> dict[str, Any]:
    """Runs one loader in a fresh process; its timings, peak memory and first vector."""
    command = [sys.executable, "-m", "tests.bench.encoder_start", "--child", kind, str(folder)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    parent, peak = psutil.Process(process.pid), 0
    while process.poll() is None:
        try:
            tree = [parent, *parent.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in tree))
        except psutil.Error:
            pass
        time.sleep(0.2)
    assert process.stdout is not None
    # vLLM logs to stdout too: the result is the line this script printed.
    lines = [
        line
        for line in process.stdout.read().decode().splitlines()
        if line.startswith('{"loaded_s"')
    ]
    if process.returncode or not lines:
        raise RuntimeError(f"{kind} failed with exit code {process.returncode}")
    result: dict[str, Any] = json.loads(lines[-1])
    result["peak_rss_mib"] = peak / 2**20
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default="embedded://all-minilm-l6-v2")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--child", nargs=2, metavar=("KIND", "FOLDER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(*args.child)
        return
    folder = resolve_source(args.source)
    results = {kind: measure(kind, folder) for kind in ("encoder", "vllm")}
    summary: dict[str, Any] = {
        "source": args.source,
        "load_avg_1m_after": os.getloadavg()[0],
        "cosine_of_first_vectors": cosine(results["encoder"]["vector"], results["vllm"]["vector"]),
    }
    for kind, result in results.items():
        summary[kind] = {k: v for k, v in result.items() if k != "vector"}
    text = json.dumps(summary, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
