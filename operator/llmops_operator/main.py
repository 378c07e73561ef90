"""Runs the operator: `llmops operator` calls `run_operator` with settings from the env."""

from __future__ import annotations

import asyncio
import signal

import kopf
from prometheus_client import start_http_server

from llmops_operator.handlers import Context, LoginFn, build_registry, default_login, kopf_settings
from llmops_operator.metrics import OperatorMetrics
from llmops_operator.settings import OperatorSettings


async def operate(
    settings: OperatorSettings,
    *,
    login: LoginFn = default_login,
    stop_flag: asyncio.Event | None = None,
    metrics: OperatorMetrics | None = None,
) -> None:
    """Runs Kopf with the operator's handlers until ``stop_flag`` is set (or a signal)."""
    context = Context(settings=settings, metrics=metrics or OperatorMetrics.create())
    liveness = f"http://0.0.0.0:{settings.health_port}/healthz" if settings.health_port else None
    await kopf.operator(
        registry=build_registry(settings, login),
        settings=kopf_settings(settings),
        clusterwide=not settings.namespaces,
        namespaces=settings.namespaces,
        liveness_endpoint=liveness,
        stop_flag=stop_flag,
        memo=context,
    )


def run_operator(settings: OperatorSettings) -> None:
    """Starts the metrics endpoint and the operator; returns when it stops (SIGTERM/SIGINT)."""
    metrics = OperatorMetrics.create()
    if settings.metrics_port:
        start_http_server(settings.metrics_port, registry=metrics.registry)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await operate(settings, stop_flag=stop, metrics=metrics)

    asyncio.run(main())
