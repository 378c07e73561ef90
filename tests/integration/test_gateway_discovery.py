"""The gateway routes to the graphs LLMDeployments report, read from a (fake) API server."""

from __future__ import annotations

import asyncio
import copy
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest

from llmops_gateway.keys import FileKeyStore, Tenant
from tests.fakes.kube_api import KubeAPI
from tests.integration.gateway_fixtures import Gateway, gateway, stub_upstream
from tests.integration.operator_fixtures import create, example, llmd_path, patch

pytestmark = [pytest.mark.kmock(cls=KubeAPI), pytest.mark.timeout(120)]

TEAM, OTHER = "team-a", "team-b"


def manifest(name: str, models: list[str], namespace: str = TEAM) -> dict[str, Any]:
    obj = example("tiny-cpu")
    obj["metadata"] = {"name": name, "namespace": namespace}
    template = obj["spec"]["models"][0]
    obj["spec"]["models"] = [{**copy.deepcopy(template), "name": m} for m in models]
    return obj


async def report(
    api: KubeAPI, name: str, url: str, states: dict[str, str], namespace: str = TEAM
) -> None:
    """Writes the status the operator reports."""
    models = [{"name": m, "state": s} for m, s in states.items()]
    await patch(
        api,
        llmd_path(name, namespace) + "/status",
        {"status": {"endpoints": {"http": url}, "models": models}},
    )


async def until(check: Callable[[], Awaitable[bool]], what: str, timeout_s: float = 15) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout_s} s: {what}")
        await asyncio.sleep(0.1)


@pytest.fixture
def graph() -> Iterator[str]:
    """A stand-in for a deployment's graph ingress, serving the models the tests name."""
    with stub_upstream(models=("alpha", "beta", "gamma")) as url:
        yield url


@pytest.fixture
def key(tmp_path: Path) -> tuple[Path, str]:
    store = FileKeyStore(tmp_path / "keys.json")
    return store.path, store.create(Tenant(name="team"))[1]


def start(stack: ExitStack, folder: Path, api: KubeAPI, keys: Path, **settings: Any) -> Gateway:
    return stack.enter_context(
        gateway(
            folder,
            keys_file=keys,
            discover_backends=True,
            kube_api_url=str(api.url),
            **settings,
        )
    )


async def test_models_follow_the_deployments_status(
    kmock: KubeAPI, graph: str, key: tuple[Path, str], tmp_path: Path
) -> None:
    await create(kmock, manifest("one", ["alpha"]))
    await create(kmock, manifest("two", ["beta"]))
    await report(kmock, "one", graph, {"alpha": "Ready"})
    await report(kmock, "two", graph, {"beta": "Loading"})
    keys, secret = key
    headers = {"authorization": f"Bearer {secret}"}
    with ExitStack() as stack:
        gw = start(stack, tmp_path, kmock, keys)
        async with httpx.AsyncClient(base_url=gw.url, headers=headers, timeout=10) as client:

            async def ready() -> bool:
                return (await client.get("/readyz")).status_code == 200

            await until(ready, "the gateway listed the LLMDeployments")

            async def models() -> list[str]:
                listing = (await client.get("/v1/models")).json()
                return sorted(m["id"] for m in listing["data"])

            assert await models() == ["alpha"]

            async def chat(model: str) -> httpx.Response:
                body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
                return await client.post("/v1/chat/completions", json=body)

            answer = await chat("alpha")
            assert answer.status_code == 200, answer.text
            assert answer.json()["model"] == "alpha"
            loading = await chat("beta")
            assert loading.status_code == 503
            assert loading.headers["retry-after"] == "10"
            assert "not ready yet (Loading in team-a/two)" in loading.json()["error"]["message"]
            assert (await chat("nothing")).status_code == 404

            # The operator reports beta ready: it is routed without touching the gateway.
            await report(kmock, "two", graph, {"beta": "Ready"})

            async def beta_answers() -> bool:
                return (await chat("beta")).status_code == 200

            await until(beta_answers, "beta routed once Ready")
            assert await models() == ["alpha", "beta"]

            # A deleted deployment takes its models with it.
            async with kmock.delete(llmd_path("one", TEAM)) as response:
                assert response.status == 200

            async def alpha_gone() -> bool:
                return (await chat("alpha")).status_code == 404

            await until(alpha_gone, "alpha unrouted after its deployment was deleted")


async def test_only_the_configured_namespaces_are_read(
    kmock: KubeAPI, graph: str, key: tuple[Path, str], tmp_path: Path
) -> None:
    await create(kmock, manifest("mine", ["alpha"]))
    await create(kmock, manifest("theirs", ["gamma"], namespace=OTHER))
    await report(kmock, "mine", graph, {"alpha": "Ready"})
    await report(kmock, "theirs", graph, {"gamma": "Ready"}, namespace=OTHER)
    keys, secret = key
    with ExitStack() as stack:
        gw = start(stack, tmp_path, kmock, keys, discover_namespaces=[TEAM])
        headers = {"authorization": f"Bearer {secret}"}
        async with httpx.AsyncClient(base_url=gw.url, headers=headers, timeout=10) as client:

            async def listed() -> bool:
                response = await client.get("/v1/models")
                return [m["id"] for m in response.json()["data"]] == ["alpha"]

            await until(listed, "only team-a's model listed")
        asked = [
            r.namespace
            for r in kmock._requests
            if r.resource is not None
            and r.resource.plural == "llmdeployments"
            and str(r.method).upper().endswith("GET")
        ]
        assert asked, "the gateway never asked the API server"
        assert set(asked) == {TEAM}, asked


async def test_an_unreachable_api_server_keeps_the_gateway_unready(
    key: tuple[Path, str], tmp_path: Path
) -> None:
    keys, _ = key
    with ExitStack() as stack:
        gw = stack.enter_context(
            gateway(
                tmp_path, keys_file=keys, discover_backends=True, kube_api_url="http://127.0.0.1:9"
            )
        )
        async with httpx.AsyncClient(base_url=gw.url, timeout=10) as client:
            await asyncio.sleep(1.0)
            response = await client.get("/readyz")
            assert response.status_code == 503
            assert response.json() == {"status": "discovering backends"}
            assert (await client.get("/healthz")).status_code == 200
    assert "cannot read LLMDeployments" in gw.log.read_text()
