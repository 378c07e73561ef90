"""`llmops up` refuses busy or clashing ports before it starts anything."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

from llmops_cli.ports import busy_ports, duplicate_ports
from tests.conftest import free_port


def test_busy_port_is_reported_and_a_free_one_is_not() -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        free = free_port()
        busy = busy_ports("127.0.0.1", {"--port": taken, "--grpc-port": free, "--any": 0})
    assert len(busy) == 1
    assert busy[0].startswith(f"--port {taken} (")


def test_duplicates_name_both_options() -> None:
    assert duplicate_ports({"--port": 8000, "--graph-port": 8000, "--grpc-port": 0}) == [
        "--graph-port 8000 (also --port)"
    ]
    assert duplicate_ports({"--port": 0, "--grpc-port": 0}) == []


def test_free_port_never_repeats() -> None:
    ports = [free_port() for _ in range(50)]
    assert len(set(ports)) == 50
    assert all(20000 <= port < 32768 for port in ports)


def test_up_refuses_a_busy_port_at_once() -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        started = time.monotonic()
        result = subprocess.run(
            [sys.executable, "-m", "llmops_cli", "up", "--grpc-port", str(taken)],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert result.returncode == 2, result.stderr
    assert f"--grpc-port {taken}" in result.stderr
    # It stops before Ray or any model loading starts.
    assert "starting Ray" not in result.stderr
    assert time.monotonic() - started < 60
