"""Benchmark aid: where the requests of a burst wait on their way to the engine.

Starts `llmops up --no-gateway` (or, with ``--direct``, vLLM's own OpenAI server) with a
start-up hook in every Python process it runs (`timeline_hook/sitecustomize.py`), sends bursts
of eight streamed chat completions, and prints, per burst, when each request reached each
stage, in ms after the first request's arrival at the router:

- ``router``: the router's handler started (graph only);
- ``fetch``: Ray Serve's replica began fetching the request's ASGI messages (its body, then
  until the client disconnects) from the HTTP proxy (graph only);
- ``routed``: Ray Serve's handle began picking a replica of the LLM deployment (graph only);
- ``llm``: the LLM replica's request handler started (graph only);
- ``engine``: vLLM's scheduler received the request; and, after ``|``, the steps that
  scheduled new requests (``+N``).

    .venv/bin/python -m tests.bench.burst_timeline [--bursts 12] [--direct | --replica-port 30000]

The hook wraps private functions of Ray Serve and vLLM (as of ray 2.60, vllm 0.32), so it
belongs here and never in `llmops up` itself. Not a test: results go to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import importlib.abc
import importlib.util
import inspect
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

TIMELINE_DIR_ENV = "LLMOPS_TIMELINE_DIR"
HOOK_DIR = Path(__file__).with_name("timeline_hook")
BURST = 8


_logs: dict[int, Any] = {}


def _log(event: str) -> None:
    """Appends a timestamped event to this process's log (one open file per process)."""
    pid = os.getpid()
    if pid not in _logs:
        _logs[pid] = open(f"{os.environ[TIMELINE_DIR_ENV]}/{pid}.log", "a", buffering=1)  # noqa: SIM115
    _logs[pid].write(f"{time.monotonic():.4f} {event}\n")


def _before(owner: Any, name: str, event: Callable[..., str | None]) -> None:
    """Wraps ``owner.name`` (sync, coroutine or async generator) to log ``event(*args)`` first."""
    original = getattr(owner, name)

    def note(args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        text = event(*args, **kwargs)
        if text:
            _log(text)

    if inspect.isasyncgenfunction(original):

        @functools.wraps(original)
        async def agen(*args: Any, **kwargs: Any) -> Any:
            note(args, kwargs)
            async for item in original(*args, **kwargs):
                yield item

        setattr(owner, name, agen)
    elif asyncio.iscoroutinefunction(original):

        @functools.wraps(original)
        async def coro(*args: Any, **kwargs: Any) -> Any:
            note(args, kwargs)
            return await original(*args, **kwargs)

        setattr(owner, name, coro)
    else:

        @functools.wraps(original)
        def sync(*args: Any, **kwargs: Any) -> Any:
            note(args, kwargs)
            return original(*args, **kwargs)

        setattr(owner, name, sync)


def _patch_scheduler(module: Any) -> None:
    _before(module.Scheduler, "add_request", lambda self, request: "engine")
    original = module.Scheduler.schedule

    def schedule(self: Any, *args: Any, **kwargs: Any) -> Any:
        output = original(self, *args, **kwargs)
        if output.scheduled_new_reqs:
            _log(f"step {len(output.scheduled_new_reqs)}")
        return output

    module.Scheduler.schedule = schedule


def _patch_router(module: Any) -> None:
    _before(module.Router, "_generate", lambda self, request, kind: "router")


def _patch_request_router(module: Any) -> None:
    def routed(self: Any, pending: Any, **_: Any) -> str | None:
        return "routed" if pending.metadata.call_method == "chat" else None

    _before(module.RequestRouter, "_choose_replica_for_request", routed)


def _patch_http_util(module: Any) -> None:
    _before(module.ASGIReceiveProxy, "fetch_until_disconnect", lambda self: "fetch")


def _patch_llm_server(module: Any) -> None:
    _before(module.LLMServer, "chat", lambda self, *args, **kwargs: "llm")


PATCHES: dict[str, Callable[[Any], None]] = {
    "vllm.v1.core.sched.scheduler": _patch_scheduler,
    "llmops_services.router": _patch_router,
    "ray.serve._private.request_router.request_router": _patch_request_router,
    "ray.llm._internal.serve.core.server.llm_server": _patch_llm_server,
    "ray.serve._private.http_util": _patch_http_util,
}


class _Hook(importlib.abc.MetaPathFinder):
    """Patches a module of PATCHES right after it is first executed."""

    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        if name not in PATCHES:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return spec
        loader: Any = spec.loader
        execute = loader.exec_module

        def exec_module(module: Any) -> None:
            execute(module)
            PATCHES[name](module)

        loader.exec_module = exec_module
        return spec


def install() -> None:
    """Called by the start-up hook in every process of the measured server."""
    sys.meta_path.insert(0, _Hook())


def _events(folder: Path) -> list[tuple[float, str]]:
    found = []
    for log in folder.glob("*.log"):
        for line in log.read_text().splitlines():
            stamp, _, event = line.partition(" ")
            found.append((float(stamp) * 1000, event))
    return sorted(found)


def report(events: list[tuple[float, str]], bursts: list[float]) -> list[tuple[str, float]]:
    """Per burst (``bursts``: monotonic ms when each was sent): its line, and how long after
    the first request the last one reached the LLM replica (the engine, direct); -1 if unseen.
    """
    found = []
    for start, end in zip(bursts, [*bursts[1:], float("inf")], strict=True):
        mine = [(t, e) for t, e in events if start <= t < end]
        first = next((t for t, e in mine if e in ("router", "engine")), start)
        stages: dict[str, list[int]] = {}
        for stage in ("router", "fetch", "routed", "llm", "engine"):
            times = [round(t - first) for t, e in mine if e == stage][:BURST]
            if times:
                stages[stage] = times
        steps = [f"+{e.split()[1]}@{round(t - first)}" for t, e in mine if e.startswith("step")]
        line = "; ".join(f"{stage} {times}" for stage, times in stages.items())
        arrivals = stages.get("llm") or stages.get("engine") or []
        spread = float(arrivals[-1] - arrivals[0]) if arrivals else -1.0
        found.append((f"{line} | {' '.join(steps[:4])}", spread))
    return found


async def _bursts(url: str, model: str, count: int, max_tokens: int) -> list[float]:
    import openai

    from tests.bench.graph_vs_direct import PROMPTS, _one

    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    await _one(client, model, "warm up", 4)
    sent = []
    for _ in range(count):
        sent.append(time.monotonic() * 1000)
        await asyncio.gather(*(_one(client, model, p, max_tokens) for p in PROMPTS[:BURST]))
        await asyncio.sleep(0.3)
    return sent


def main() -> None:
    from llmops_services import default_graph_config
    from tests.bench.graph_vs_direct import _stop, _wait, direct_server
    from tests.conftest import free_port

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bursts", type=int, default=12, help="bursts of eight requests")
    parser.add_argument("--max-tokens", type=int, default=16, help="tokens per response")
    parser.add_argument("--direct", action="store_true", help="vLLM's own server instead")
    parser.add_argument(
        "--replica-port",
        type=int,
        help="send the bursts to this port of the router replica itself (Ray Serve's direct"
        " ingress, from 30000 up), past the HTTP proxy",
    )
    args = parser.parse_args()
    spec = default_graph_config().llms[0]
    port = free_port()
    folder = Path(tempfile.mkdtemp(prefix="llmops-timeline-"))
    root = Path(__file__).resolve().parents[2]
    env = dict(
        os.environ,
        **{TIMELINE_DIR_ENV: str(folder)},
        PYTHONPATH=os.pathsep.join([str(HOOK_DIR), str(root), os.environ.get("PYTHONPATH", "")]),
    )
    if args.direct:
        command, extra = direct_server(spec.name, port)
        env.update(extra)
        ready = "/health"
    else:
        command = [sys.executable, "-m", "llmops_cli", "up", "--no-gateway", "--port", str(port)]
        ready = "/readyz"
    with open(folder / "server.out", "wb") as out:
        server = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        _wait(url, ready)
        if args.replica_port and not args.direct:
            url = f"http://127.0.0.1:{args.replica_port}"
            _wait(url, ready)
        sent = asyncio.run(_bursts(url, spec.name, args.bursts, args.max_tokens))
    finally:
        _stop(server)
    rows = report(_events(folder), sent)
    print("\n".join(line for line, _ in rows))
    spreads = [spread for _, spread in rows if spread >= 0]
    if spreads:
        late = sum(spread > 400 for spread in spreads)
        print(
            f"{len(rows)} bursts; last request at the LLM replica (or engine) after the first:"
            f" median {statistics.median(spreads):.0f} ms; over 400 ms in {late}"
        )


if __name__ == "__main__":
    main()
