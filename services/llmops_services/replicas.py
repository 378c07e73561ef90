"""Which LLMs have a running replica now, as the Serve controller reports it, kept fresh in memory.

The router must not send a request to a model without a running replica: a deployment handle
waits, silently, until one runs, and for a deployment that autoscales from zero the waiting
request is itself the signal Serve's autoscaler starts a replica on, at once, bypassing
``upscale_delay_s`` (ray/serve/_private/router.py ``should_send_scaled_to_zero_optimized_push``;
ray/serve/autoscaling_policy.py ``_apply_default_params``). Whether a model runs is decided by
its scale target (KEDA on a cluster, `llmops scale` here), so the router answers 503 at once
instead, and the gateway holds the request.

The states come from the Serve controller's ``get_serve_instance_details`` (the call behind
``serve.status()`` and the dashboard's ``GET /api/serve/applications/``,
ray/serve/_private/controller.py), awaited about once a second off the request path: a
request reads memory only and never blocks the router's event loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from llmops_contract import SCALED_TO_ZERO_CODE
from llmops_services.errors import ServingError

logger = logging.getLogger(__name__)
REFRESH_INTERVAL_S = 1.0
STALE_AFTER_S = 10.0
"""States older than this are not trusted: requests go to the handle as without them."""
FIRST_READ_TIMEOUT_S = 3.0
RUNNING = "RUNNING"

Fetch = Callable[[], Awaitable[dict[str, Any]]]


@dataclass(frozen=True)
class ModelReplicas:
    """One model's replicas as Serve reports them."""

    running: int
    """Replicas in state RUNNING: those a handle sends requests to."""
    target: int
    """Replicas Serve is asked to run (0: scaled to zero)."""


def scaled_to_zero(model: str) -> ServingError:
    """The 503 for a model with no running replica (at zero, or its first replica starting):
    the code `llmops_contract.SCALED_TO_ZERO_CODE` tells the gateway to hold the request."""
    return ServingError(
        f"model {model!r} has no running replica (scaled to zero or starting); retry shortly",
        status=503,
        type="server_error",
        code=SCALED_TO_ZERO_CODE,
    )


async def serve_instance_details() -> dict[str, Any]:
    """The Serve controller's instance details (the dashboard's ``GET`` answer)."""
    import ray
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    controller = await asyncio.to_thread(
        ray.get_actor, SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE
    )
    details: dict[str, Any] = await controller.get_serve_instance_details.remote()
    return details


class ReplicaStates:
    """Each model's running and target replicas, refreshed in the background.

    Args:
        app_name: The Serve application the deployments belong to.
        deployments: Model name -> its Serve deployment's name.
        fetch: Returns the controller's instance details; the controller itself by default.
        interval_s: Time between two reads.
    """

    def __init__(
        self,
        app_name: str,
        deployments: dict[str, str],
        fetch: Fetch = serve_instance_details,
        interval_s: float = REFRESH_INTERVAL_S,
    ) -> None:
        self.app_name = app_name
        self.deployments = deployments
        self._fetch = fetch
        self._interval_s = interval_s
        self._states: dict[str, ModelReplicas] = {}
        self._read_at = -float("inf")
        self._first_read = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def _start(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._refresh_forever())

    async def get(self, model: str) -> ModelReplicas | None:
        """The model's replicas; None when unknown (not read yet, or the reads are stale).

        The first call starts the refreshing and waits (a few seconds at most) for one read.
        """
        self._start()
        if not self._first_read.is_set():
            try:
                await asyncio.wait_for(self._first_read.wait(), FIRST_READ_TIMEOUT_S)
            except TimeoutError:
                return None
        if time.monotonic() - self._read_at > STALE_AFTER_S:
            return None
        return self._states.get(model)

    async def refresh(self) -> None:
        """Reads the states once."""
        details = await self._fetch()
        app = details.get("applications", {}).get(self.app_name) or {}
        found = app.get("deployments", {})
        states = {}
        for model, name in self.deployments.items():
            deployment = found.get(name)
            if deployment is None:
                continue
            replicas = deployment.get("replicas", [])
            states[model] = ModelReplicas(
                running=sum(1 for r in replicas if r.get("state") == RUNNING),
                target=int(deployment.get("target_num_replicas", 0)),
            )
        self._states = states
        self._read_at = time.monotonic()
        self._first_read.set()

    async def _refresh_forever(self) -> None:
        while True:
            try:
                await self.refresh()
            except Exception as exc:  # the controller restarting: keep the last states a while
                logger.warning("cannot read replica states from Serve: %s", exc)
            await asyncio.sleep(self._interval_s)
