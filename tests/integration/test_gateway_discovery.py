"""The gateway routes to the graphs LLMDeployments report, read from a (fake) API server.

The gateway reads them with kubernetes_asyncio: list, then watch from the listed
resourceVersion; a watch that expired (410 Gone) is answered by a new list.
"""

from __future__ import annotations

import asyncio
import copy
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest
from kmock._internal import rendering

from llmops_gateway.keys import FileKeyStore, Tenant
from tests.fakes.kube_api import KubeAPI
from tests.integration.gateway_fixtures import Gateway, gateway, stub_upstream
from tests.integration.operator_fixtures import create, example, llmd_path, patch


class WatchingKubeAPI(KubeAPI):
    """tests/fakes/kube_api.py's KubeAPI (whose watch cache answers a watch from a compacted
    resourceVersion with a 410 ``Expired`` ERROR event), plus `stall`: open watches stop
    delivering changes, as a connection that died silently does, so a test can make changes
    that only a new list can reveal. `expire` ends every open watch and compacts, as an API
    server restart after an etcd compaction does (k8s.io/apiserver/pkg/storage/cacher).
    """

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.stalled = False
        self.expired_watches = 0

    def stall(self) -> None:
        self.stalled = True

    async def expire(self) -> None:
        self.stalled = False
        await self.watch_cache.expire()

    async def _stalling(self, request: rendering.Request) -> AsyncIterator[Any]:
        async for event in super()._serve_watch(request):
            kind = event.get("type") if isinstance(event, dict) else None
            if kind == "ERROR" and event["object"].get("code") == 410:
                self.expired_watches += 1
            if self.stalled and kind in ("ADDED", "MODIFIED", "DELETED"):
                continue
            yield event

    def _serve_watch(self, request: rendering.Request) -> Any:
        return self._stalling(request)


pytestmark = [pytest.mark.kmock(cls=WatchingKubeAPI), pytest.mark.timeout(120)]

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


def kubeconfig(api: KubeAPI, folder: Path) -> Path:
    """A kubeconfig whose current context is the fake API server."""
    path = folder / "kubeconfig"
    cluster = {"name": "fake", "cluster": {"server": str(api.url)}}
    context = {"name": "fake", "context": {"cluster": "fake", "user": "me"}}
    path.write_text(
        json.dumps(
            {
                **{"apiVersion": "v1", "kind": "Config", "current-context": "fake"},
                **{"clusters": [cluster], "contexts": [context]},
                "users": [{"name": "me", "user": {"token": "not-checked"}}],
            }
        )
    )
    return path


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


def watches(api: KubeAPI) -> list[rendering.Request]:
    return [r for r in api._requests if r.params.get("watch") and r.resource is not None]


def lists(api: KubeAPI) -> list[rendering.Request]:
    return [
        r
        for r in api._requests
        if r.resource is not None
        and r.resource.plural == "llmdeployments"
        and str(r.method).upper().endswith("GET")
        and not r.params.get("watch")
        and r.name is None
    ]


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


async def test_an_adapter_is_listed_with_its_base_model_as_parent(
    kmock: KubeAPI, graph: str, key: tuple[Path, str], tmp_path: Path
) -> None:
    """spec.models[].adapters: each adapter routes by its own name and is listed with its base
    model as ``parent``, as vLLM lists LoRA modules (vllm/entrypoints/openai/models/serving.py)
    and the graph's router does."""
    obj = manifest("one", ["alpha"])
    obj["spec"]["models"][0]["adapters"] = [{"name": "beta", "source": "hf://org/beta-lora"}]
    await create(kmock, obj)
    await report(kmock, "one", graph, {"alpha": "Ready"})
    keys, secret = key
    with ExitStack() as stack:
        gw = start(stack, tmp_path, kmock, keys)
        headers = {"authorization": f"Bearer {secret}"}
        async with httpx.AsyncClient(base_url=gw.url, headers=headers, timeout=10) as client:

            async def listed() -> bool:
                response = await client.get("/v1/models")
                return response.status_code == 200 and len(response.json()["data"]) == 2

            await until(listed, "the deployment's model and adapter listed")
            listing = (await client.get("/v1/models")).json()["data"]
            assert {m["id"]: m.get("parent") for m in listing} == {"alpha": None, "beta": "alpha"}
            one = (await client.get("/v1/models/beta")).json()
            assert one["parent"] == "alpha"


async def test_only_the_configured_namespaces_are_read(
    kmock: KubeAPI,
    graph: str,
    key: tuple[Path, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without kube_api_url (and outside a pod) the gateway reads $KUBECONFIG, credentials
    included, through kubernetes_asyncio's loader."""
    await create(kmock, manifest("mine", ["alpha"]))
    await create(kmock, manifest("theirs", ["gamma"], namespace=OTHER))
    await report(kmock, "mine", graph, {"alpha": "Ready"})
    await report(kmock, "theirs", graph, {"gamma": "Ready"}, namespace=OTHER)
    keys, secret = key
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig(kmock, tmp_path)))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with ExitStack() as stack:
        gw = stack.enter_context(
            gateway(tmp_path, keys_file=keys, discover_backends=True, discover_namespaces=[TEAM])
        )
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
        assert all(r.headers.get("Authorization") == "Bearer not-checked" for r in lists(kmock)), (
            "the kubeconfig's token was not sent"
        )


async def test_an_expired_watch_is_answered_by_a_new_list(
    kmock: WatchingKubeAPI, graph: str, key: tuple[Path, str], tmp_path: Path
) -> None:
    """A watch from a compacted resourceVersion gets 410 Gone (the API server's watch cache,
    k8s.io/apiserver/pkg/storage/cacher): changes made while no watch delivered them reach
    the gateway only through a new list, as client-go's reflector relists."""
    await create(kmock, manifest("one", ["alpha"]))
    await report(kmock, "one", graph, {"alpha": "Ready"})
    keys, secret = key
    with ExitStack() as stack:
        gw = start(stack, tmp_path, kmock, keys, discover_namespaces=[TEAM])
        headers = {"authorization": f"Bearer {secret}"}
        async with httpx.AsyncClient(base_url=gw.url, headers=headers, timeout=10) as client:

            async def models() -> list[str]:
                listing = (await client.get("/v1/models")).json()
                return sorted(m["id"] for m in listing["data"])

            async def watching() -> bool:
                return bool(watches(kmock)) and await models() == ["alpha"]

            await until(watching, "alpha listed and a watch open")
            assert len(lists(kmock)) == 1
            (first,) = watches(kmock)
            assert first.params["allowWatchBookmarks"].lower() == "true"
            assert int(first.params["timeoutSeconds"]) > 0
            listed_at = int(first.params["resourceVersion"])

            kmock.stall()  # what happens now never reaches the open watch
            async with kmock.delete(llmd_path("one", TEAM)) as response:
                assert response.status == 200
            await create(kmock, manifest("two", ["beta"]))
            await report(kmock, "two", graph, {"beta": "Ready"})
            await asyncio.sleep(0.5)
            assert await models() == ["alpha"]  # stale: only a list can tell now
            await kmock.expire()

            async def relisted() -> bool:
                return await models() == ["beta"]

            await until(relisted, "the change seen after the watch expired")

            async def rewatching() -> bool:
                since = [int(r.params["resourceVersion"]) for r in watches(kmock)]
                return len(since) >= 3 and since[-1] > listed_at

            await until(rewatching, "a watch from the new list's version")
        assert kmock.expired_watches >= 1, "the gateway never watched from the old version"
        assert len(lists(kmock)) == 2, "a 410 must be answered by one new list"
        resumed = [int(r.params["resourceVersion"]) for r in watches(kmock)]
        assert resumed[0] == listed_at
        assert resumed[1] == listed_at  # expired: 410, then the list


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
