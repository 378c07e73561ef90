"""The gateway process: settings from the environment, REST on one port, metrics on another.

On SIGTERM the gateway drains: readiness turns false and new requests get 503 at once, while
requests and streams in flight may finish for up to ``drain_timeout_s``; then it exits.
"""

from __future__ import annotations

import contextlib
import gc
from types import FrameType

import uvicorn
import uvloop
from prometheus_client import start_http_server

from llmops_gateway.admission import Admission, MemoryAdmission, RedisAdmission
from llmops_gateway.core import GatewayCore
from llmops_gateway.keys import FileKeyStore, KeyFile
from llmops_gateway.logs import configure_logging
from llmops_gateway.metrics import GatewayMetrics
from llmops_gateway.redis_pipe import TlsOptions
from llmops_gateway.rest import create_app
from llmops_gateway.settings import GatewaySettings


class _EmptyStore:
    def load(self) -> KeyFile:
        return KeyFile()

    def version(self) -> object:
        return None


def build_core(settings: GatewaySettings) -> GatewayCore:
    """Wires settings into a core: key store, admission backend, metrics."""
    store = FileKeyStore(settings.keys_file) if settings.keys_file else _EmptyStore()
    admission: Admission = MemoryAdmission()
    if settings.redis_url:
        tls = TlsOptions(
            ca_file=settings.redis_tls_ca_file,
            cert_file=settings.redis_tls_cert_file,
            key_file=settings.redis_tls_key_file,
            server_name=settings.redis_tls_server_name,
        )
        admission = RedisAdmission(
            settings.redis_url,
            timeout_s=settings.redis_timeout_s,
            retry_interval_s=settings.redis_retry_interval_s,
            tls=tls,
        )
    return GatewayCore(settings, store, admission, GatewayMetrics.create())


class _DrainingServer(uvicorn.Server):
    """uvicorn that marks the core as draining before its graceful shutdown."""

    def __init__(self, config: uvicorn.Config, core: GatewayCore) -> None:
        super().__init__(config)
        self.core = core

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.core.draining = True
        super().handle_exit(sig, frame)


def serve(settings: GatewaySettings) -> None:
    """Runs the gateway until SIGTERM/SIGINT (then drains)."""
    core = build_core(settings)
    start_http_server(settings.metrics_port, addr=settings.host, registry=core.metrics.registry)
    config = uvicorn.Config(
        create_app(core),
        host=settings.host,
        port=settings.port,
        log_level="warning",
        access_log=False,
        # uvicorn would believe X-Forwarded-For from 127.0.0.1 by default; the abuse limits
        # read it themselves, from `trusted_proxies` only.
        proxy_headers=False,
        timeout_graceful_shutdown=int(settings.drain_timeout_s) or None,
        loop="uvloop",
    )
    # Start-up garbage is long-lived; freezing it keeps collections off the hot path.
    gc.collect()
    gc.freeze()
    uvloop.run(_DrainingServer(config, core).serve())


def main() -> None:
    """Entry point: ``python -m llmops_gateway``."""
    settings = GatewaySettings()
    configure_logging(settings.log_format)
    # uvicorn drains on Ctrl-C, then raises the SIGINT it handled again: the exit is clean.
    with contextlib.suppress(KeyboardInterrupt):
        serve(settings)
