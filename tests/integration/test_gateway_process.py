"""The gateway process as an operator runs it: `python -m llmops_gateway`, stopped with Ctrl-C."""

from __future__ import annotations

import signal
from pathlib import Path

import httpx

from tests.integration.gateway_fixtures import gateway, stub_upstream


def test_ctrl_c_drains_and_exits_0_without_a_traceback(tmp_path: Path) -> None:
    """uvicorn handles SIGINT by draining, then raises the signal again once it is done
    (uvicorn/server.py, ``capture_signals``): a KeyboardInterrupt traceback after a clean
    shutdown, and exit status 1, unless the gateway expects it."""
    with stub_upstream() as upstream, gateway(tmp_path, default_backend=upstream) as gw:
        assert httpx.get(f"{gw.url}/v1/models").status_code == 401  # serving
        gw.process.send_signal(signal.SIGINT)
        status = gw.process.wait(timeout=15)
    output = gw.log.read_text()
    assert status == 0, output
    assert "Traceback" not in output
    assert "KeyboardInterrupt" not in output
