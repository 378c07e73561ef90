"""The router's view of which models have a running replica (llmops_services/replicas.py).

The details have the shape of the Serve controller's ``get_serve_instance_details`` (Ray's
``ServeInstanceDetails``: applications -> deployments -> ``target_num_replicas`` and
``replicas[].state``), which ``serve.status()`` and the dashboard's GET read too.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from llmops_contract import SCALED_TO_ZERO_CODE
from llmops_services.replicas import ModelReplicas, ReplicaStates, scaled_to_zero
from llmops_services.router import _error_response


def _details(running: int, starting: int, target: int) -> dict[str, Any]:
    replicas = [{"replica_id": f"r{i}", "state": "RUNNING"} for i in range(running)]
    replicas += [{"replica_id": f"s{i}", "state": "STARTING"} for i in range(starting)]
    return {
        "applications": {
            "llmops": {
                "deployments": {
                    "llm-cold": {"target_num_replicas": target, "replicas": replicas},
                    "llm-warm": {
                        "target_num_replicas": 1,
                        "replicas": [{"replica_id": "w", "state": "RUNNING"}],
                    },
                }
            },
            "other": {"deployments": {"llm-cold": {"target_num_replicas": 5, "replicas": []}}},
        }
    }


def test_states_follow_the_controller_and_refresh_in_the_background() -> None:
    answers = [_details(0, 0, 0), _details(0, 1, 1), _details(1, 0, 1)]
    calls = 0

    async def fetch() -> dict[str, Any]:
        nonlocal calls
        calls += 1
        return answers[min(calls, len(answers)) - 1]

    async def run() -> list[ModelReplicas | None]:
        states = ReplicaStates(
            "llmops", {"cold": "llm-cold", "warm": "llm-warm"}, fetch, interval_s=0.05
        )
        seen = [await states.get("cold"), await states.get("warm"), await states.get("gone")]
        for wanted in (ModelReplicas(0, 1), ModelReplicas(1, 1)):
            for _ in range(500):  # refreshed every 0.05 s: well within 5 s
                state = await states.get("cold")
                if state == wanted:
                    break
                await asyncio.sleep(0.01)
            seen.append(state)
        return seen

    seen = asyncio.run(asyncio.wait_for(run(), 10))
    assert seen == [
        ModelReplicas(running=0, target=0),
        ModelReplicas(running=1, target=1),
        None,
        ModelReplicas(running=0, target=1),  # scaled up, its replica still starting
        ModelReplicas(running=1, target=1),
    ]


def test_unknown_while_the_controller_does_not_answer() -> None:
    async def fetch() -> dict[str, Any]:
        raise ConnectionError("controller restarting")

    async def run() -> ModelReplicas | None:
        states = ReplicaStates("llmops", {"cold": "llm-cold"}, fetch, interval_s=0.05)
        return await states.get("cold")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("llmops_services.replicas.FIRST_READ_TIMEOUT_S", 0.2)
        assert asyncio.run(run()) is None


def test_the_scaled_to_zero_answer_is_a_503_the_gateway_holds() -> None:
    response = _error_response(scaled_to_zero("cold"), "req-1")
    assert response.status_code == 503
    assert int(response.headers["Retry-After"]) >= 1
    body = response.body.decode()
    assert SCALED_TO_ZERO_CODE in body
    assert '"type":"server_error"' in body.replace(" ", "")


def test_the_router_refuses_a_model_without_running_replicas_or_at_target_zero() -> None:
    from types import SimpleNamespace

    from llmops_services.errors import ServingError
    from llmops_services.router import Router

    states = {
        "running": ModelReplicas(running=1, target=1),
        "starting": ModelReplicas(running=0, target=1),
        "at-zero": ModelReplicas(running=0, target=0),
        "draining": ModelReplicas(running=1, target=0),  # scaled to 0, its replica stopping
    }

    class Fake:
        async def get(self, model: str) -> ModelReplicas | None:
            return states.get(model)

    router = SimpleNamespace(replicas=Fake())

    async def outcome(model: str) -> str | None:
        try:
            await Router._check_serving(router, model)  # type: ignore[arg-type]
        except ServingError as error:
            return error.code
        return None

    assert asyncio.run(outcome("running")) is None
    assert asyncio.run(outcome("unknown")) is None  # no states: the handle decides, as before
    for model in ("starting", "at-zero", "draining"):
        assert asyncio.run(outcome(model)) == SCALED_TO_ZERO_CODE, model
