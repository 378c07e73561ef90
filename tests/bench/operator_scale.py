"""Benchmark: the operator with 1,000 LLMDeployments on the KMock API server.

Runs the real `llmops operator` command in its own process, logged in through a kubeconfig to
the extended KMock emulator (tests/fakes/kube_api.py) served from this process, which records
every request it answers. Phases:

1. create N LLMDeployments (deploy/examples/llama-8b-gpu.yaml, renamed, with a shared cache so
   that each has a loader Job) and wait until every one has its 7 children; report what the
   controllers would (Job done, RayService running, ScaledObject ready) and wait until all
   are Ready;
2. change latency: patch spec.autoscaling.maxReplicas on a sample of CRs at a steady rate, then
   on all N at once; latency is from sending the CR patch to the API server receiving the
   patch of that CR's ScaledObject (same clock: both in this process);
3. operator memory (VmRSS / VmHWM of the operator process);
4. full resync: restart the operator; time until every CR has had a full pass (its loader Jobs
   listed, the last call of a pass), and API calls per CR in that pass.

    .venv/bin/python -m tests.bench.operator_scale [--objects 1000] [--sample 200] [--rate 10]

Not a test: results go to docs/benchmarks.md by hand, with date and machine.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import copy
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp.web
from kmock._internal import apps, dsl, rendering

from llmops_operator.render import DEPLOYMENT_LABEL
from tests.conftest import free_port
from tests.fakes.kube_api import LLMDEPLOYMENTS, KubeAPI
from tests.integration.operator_fixtures import (
    NAMESPACE,
    create,
    create_secret,
    example,
    live,
    llmd_path,
    patch,
    report_children_ready,
)

CR_NAME = re.compile(r"bench-\d{5}")
CHILDREN = (
    "v1/persistentvolumeclaims",
    "batch/v1/jobs",
    "ray.io/v1/rayservices",
    "v1/services",
    "keda.sh/v1alpha1/scaledobjects",
    "monitoring.coreos.com/v1/podmonitors",
    "networking.k8s.io/v1/networkpolicies",
    "llmops.dev/v1alpha1/llmmodels",  # one per model: its scale target
)
LLM_DEPLOYMENT = "llm-llama-3-1-8b-instruct"


_view_contains: Any = dsl.View.__contains__


def _fast_contains(view: dsl.View, item: Any) -> bool:
    """``request in view`` without replaying the request history through every filter.

    KMock's View.__contains__ iterates every retained request through the view's filters for
    each reaction it considers (kmock/_internal/dsl.py), so matching one request costs the
    history times the reactions: at 1,000 deployments the API server, not the operator, was
    the bottleneck. For the views the emulator's reactions are made of, membership is the
    same question asked of the one request: in the root's history, and through each filter.
    Slices (which depend on positions in the history) keep KMock's own answer.
    """
    if not isinstance(item, rendering.Request):
        return _view_contains(view, item)
    match view:
        case dsl.Root():
            return any(request is item for request in reversed(view._requests))
        case dsl.Filter():
            return _fast_contains(view._source, item) and bool(view.criteria(item))
        case dsl.Exclusion():
            return _fast_contains(view._source, item) and not any(
                _fast_contains(other, item) for other in view._exclusions
            )
        case dsl.Priority():
            return _fast_contains(view._source, item)
        case dsl.OrGroup():
            return any(_fast_contains(source, item) for source in view._sources)
        case dsl.AndGroup():
            return all(_fast_contains(source, item) for source in view._sources)
    return _view_contains(view, item)


dsl.View.__contains__ = _fast_contains  # type: ignore[method-assign]


class RecordingAPI(KubeAPI):
    """Records (time, method, path, CR name) for every request, and when ScaledObjects change."""

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        # The API server compiles CEL rules and evaluates them in Go; cel-python in this
        # process would be the benchmark's bottleneck, not the operator. The rules' behaviour
        # is tested (tests/integration/test_kube_api_rules.py), not their cost.
        self.cel_rules = False
        self.log: list[tuple[float, str, str, str]] = []
        self.max_replicas_seen: dict[tuple[str, int], float] = {}
        self._inflight: set[int] = set()

    async def _handle(self, request: rendering.Request) -> aiohttp.web.StreamResponse:
        # KMock matches each request against its whole request history (quadratic over a run);
        # the emulator's own reactions need none of it, so keep only the requests still in
        # flight and the last few (a request no longer in the history matches no reaction).
        recent = self._requests[-8:]
        self._requests[:] = [r for r in self._requests[:-8] if id(r) in self._inflight] + recent
        self._inflight.add(id(request))
        try:
            return await self._handle_recorded(request)
        finally:
            self._inflight.discard(id(request))

    async def _handle_recorded(self, request: rendering.Request) -> aiohttp.web.StreamResponse:
        now = time.monotonic()
        where = f"{request.url.path}?{request.url.query_string} {request.text[:2000]}"
        found = CR_NAME.search(where)
        self.log.append((now, request.method.value, request.url.path, found[0] if found else ""))
        if (
            found
            and request.method.value == "PATCH"
            and "/scaledobjects/" in request.url.path
            and isinstance(request.data, dict)
        ):
            value = request.data.get("spec", {}).get("maxReplicaCount")
            if isinstance(value, int):
                self.max_replicas_seen.setdefault((found[0], value), now)
        return await super()._handle(request)


def percentiles(values: list[float]) -> str:
    """p50 / p99 / max in milliseconds."""
    if len(values) < 2:
        return "n/a"
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return (
        f"p50 {statistics.median(ordered) * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms, "
        f"max {ordered[-1] * 1000:.0f} ms (n={len(ordered)})"
    )


async def wait_for(check: Callable[[], bool], what: str, within: float) -> float:
    """Polls ``check`` until true; returns the seconds waited."""
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > within:
            raise SystemExit(f"timed out after {within:.0f} s waiting for {what}")
        await asyncio.sleep(0.2)
    return time.monotonic() - started


class Operator:
    """`llmops operator` in a child process, logged in to the API server by kubeconfig."""

    def __init__(self, server: str, workdir: Path) -> None:
        self.kubeconfig = workdir / "kubeconfig"
        self.kubeconfig.write_text(
            "apiVersion: v1\nkind: Config\ncurrent-context: kmock\n"
            f"clusters: [{{name: kmock, cluster: {{server: '{server}'}}}}]\n"
            "users: [{name: bench, user: {token: bench}}]\n"
            "contexts: [{name: kmock, context: {cluster: kmock, user: bench}}]\n"
        )
        self.log = workdir / "operator.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {
            **os.environ,
            "KUBECONFIG": str(self.kubeconfig),
            "LLMOPS_OPERATOR_STANDALONE": "true",
            "LLMOPS_OPERATOR_METRICS_PORT": str(free_port()),
            "LLMOPS_OPERATOR_HEALTH_PORT": "0",
            "LLMOPS_OPERATOR_LOG_FORMAT": "json",
        }
        llmops = Path(sys.executable).with_name("llmops")
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [str(llmops), "operator"], env=env, stdout=log, stderr=subprocess.STDOUT
            )

    def memory_mib(self) -> tuple[float, float]:
        """Resident memory now and at its peak, MiB."""
        assert self.process is not None
        fields = {}
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            fields[key] = value.strip()
        return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None


def calls_per_cr(api: RecordingAPI, since: float, until: float, names: set[str]) -> str:
    """Mean requests per CR in a window, by method."""
    counts: collections.Counter[str] = collections.Counter()
    for at, method, _, cr in api.log:
        if since <= at <= until and cr in names:
            counts[method] += 1
    total = sum(counts.values())
    parts = ", ".join(f"{m} {c / len(names):.1f}" for m, c in sorted(counts.items()))
    return f"{total / len(names):.1f} ({parts})"


async def change_latencies(
    api: RecordingAPI, names: list[str], value: int, rate: float | None
) -> list[float]:
    """Patches maxReplicas on each CR (``rate`` a second, or all at once); latencies in s."""
    sent: dict[str, float] = {}

    async def one(name: str) -> None:
        sent[name] = time.monotonic()
        await patch(api, llmd_path(name), {"spec": {"autoscaling": {"maxReplicas": value}}})

    if rate is None:
        await asyncio.gather(*(one(n) for n in names))
    else:
        for name in names:
            await one(name)
            await asyncio.sleep(1 / rate)
    await wait_for(
        lambda: all((n, value) in api.max_replicas_seen for n in names),
        f"{len(names)} ScaledObjects patched to maxReplicaCount={value}",
        within=300,
    )
    return [api.max_replicas_seen[n, value] - sent[n] for n in names]


async def bench(objects: int, sample: int, rate: float) -> None:
    names = [f"bench-{i:05d}" for i in range(objects)]
    with tempfile.TemporaryDirectory() as tmp:
        async with RecordingAPI() as api, apps.Server(api):
            api.install_crds()
            operator = Operator(str(api.url).rstrip("/"), Path(tmp))
            try:
                await run_phases(api, operator, names, sample, rate)
            finally:
                operator.stop()
                print(f"operator log: {operator.log.stat().st_size} bytes", flush=True)


async def run_phases(
    api: RecordingAPI, operator: Operator, names: list[str], sample: int, rate: float
) -> None:
    template = example("llama-8b-gpu")
    template["spec"]["cache"]["accessMode"] = "ReadWriteMany"  # a PVC and a loader Job too
    await create_secret(api, template["spec"]["cache"]["credentialsSecret"], {"HF_TOKEN": "hf_x"})
    for name in names:
        manifest = copy.deepcopy(template)
        manifest["metadata"]["name"] = name
        await create(api, manifest)
    print(f"{len(names)} LLMDeployments created", flush=True)

    started = time.monotonic()
    operator.start()

    def all_children() -> bool:
        return all(len(live(api, r)) >= len(names) for r in CHILDREN)

    took = await wait_for(all_children, "every child created", within=900)
    count = len(names) * len(CHILDREN)
    print(f"initial reconcile: all {count} children in {took:.1f} s", flush=True)
    jobs = {j["metadata"]["labels"][DEPLOYMENT_LABEL]: n for n, j in live(api, CHILDREN[1]).items()}
    bound = {"status": {"phase": "Bound", "capacity": {"storage": "40Gi"}}}
    for name in names:
        # What the storage controller and the other controllers report.
        claim = f"/api/v1/namespaces/{NAMESPACE}/persistentvolumeclaims/{name}-model-cache"
        await patch(api, f"{claim}/status", bound)
        await report_children_ready(api, name, jobs[name], [LLM_DEPLOYMENT])

    def all_ready() -> bool:
        crs = live(api, LLMDEPLOYMENTS)
        return all(crs[n].get("status", {}).get("ready") == "True" for n in names)

    took = await wait_for(all_ready, "every LLMDeployment Ready", within=900)
    ready_at = time.monotonic()
    print(f"all Ready {took:.1f} s after the statuses were reported", flush=True)
    print(f"API calls per CR, create to Ready: {calls_per_cr(api, started, ready_at, set(names))}")
    rss, peak = operator.memory_mib()
    print(f"operator memory after create: RSS {rss:.0f} MiB, peak {peak:.0f} MiB", flush=True)

    await asyncio.sleep(5)
    steady = await change_latencies(api, names[:sample], 9, rate)
    print(f"change -> ScaledObject patched, {rate:g}/s: {percentiles(steady)}", flush=True)
    burst = await change_latencies(api, names, 10, None)
    print(f"change -> ScaledObject patched, all {len(names)} at once: {percentiles(burst)}")
    rss, peak = operator.memory_mib()
    print(f"operator memory: RSS {rss:.0f} MiB, peak {peak:.0f} MiB", flush=True)

    operator.stop()
    await asyncio.sleep(1)
    restarted = time.monotonic()
    operator.start()
    job_lists: dict[str, float] = {}
    seen = len(api.log)

    def every_cr_passed() -> bool:
        nonlocal seen
        for at, method, path, cr in api.log[seen:]:
            if method == "GET" and path.endswith("/jobs") and cr:
                job_lists.setdefault(cr, at)
        seen = len(api.log)
        return len(job_lists) >= len(names)

    await wait_for(every_cr_passed, "a pass over every CR after restart", within=900)
    first = min(at for at, *_ in api.log if at > restarted)
    last = max(job_lists.values())
    print(
        f"full resync after restart: {last - first:.1f} s from the first API call "
        f"({last - restarted:.1f} s from process start)"
    )
    await asyncio.sleep(2)
    print(f"API calls per CR in that pass: {calls_per_cr(api, restarted, last + 2, set(names))}")
    rss, peak = operator.memory_mib()
    print(f"operator memory after resync: RSS {rss:.0f} MiB, peak {peak:.0f} MiB", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--objects", type=int, default=1000)
    parser.add_argument("--sample", type=int, default=200, help="CRs changed one by one")
    parser.add_argument("--rate", type=float, default=10.0, help="changes a second (sample)")
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(bench(args.objects, min(args.sample, args.objects), args.rate))


if __name__ == "__main__":
    main()
