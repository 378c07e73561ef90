"""Checks that the ports a local command will listen on are free, before it starts anything."""

from __future__ import annotations

import socket


def busy_ports(host: str, ports: dict[str, int]) -> list[str]:
    """The entries of ``ports`` (option name -> port) that cannot be bound on ``host`` now.

    Binds the way the servers will (SO_REUSEADDR, so a port held only by connections in
    TIME_WAIT counts as free), then lets go at once. Port 0 means "any" and is never busy.

    Returns:
        One line per busy port, e.g. ``"--port 8000 (Address already in use)"``.
    """
    busy = []
    for option, port in ports.items():
        if port == 0:
            continue
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((host, port))
            except OSError as exc:
                busy.append(f"{option} {port} ({exc.strerror})")
    return busy


def duplicate_ports(ports: dict[str, int]) -> list[str]:
    """Options of ``ports`` that name the same (non-zero) port as an earlier one."""
    seen: dict[int, str] = {}
    clashes = []
    for option, port in ports.items():
        if port and port in seen:
            clashes.append(f"{option} {port} (also {seen[port]})")
        seen.setdefault(port, option)
    return clashes
