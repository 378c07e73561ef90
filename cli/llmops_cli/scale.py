"""`llmops scale`: one model's replica count on a running graph, changed as KubeRay changes it.

On a cluster KubeRay writes a RayService's serveConfigV2 to the head's dashboard with
``PUT /api/serve/applications/`` (ray-operator/controllers/ray/utils/dashboardclient,
``UpdateDeployments``); the dashboard validates it with ``ServeDeploySchema``
(ray/dashboard/modules/serve/serve_head.py) and hands it to the Serve controller. `llmops up`
deploys its graph the same way, declaratively, so that here too a new config whose only change is
one deployment's ``autoscaling_config`` is a lightweight update of that deployment: the other
models' replicas keep running. The replica count is written as the operator writes it
(`llmops_operator.render.serve_replicas`), zero included.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from llmops_contract import (
    APP_NAME,
    GRAPH_IMPORT_PATH,
    ROUTER_DEPLOYMENT,
    GraphConfig,
    llm_deployment_name,
)
from llmops_contract.graph import llm_user_config, router_user_config, serve_args

SERVE_API_ENV = "RAY_DASHBOARD_ADDRESS"
"""Where Ray's own `serve` CLI looks for the dashboard; `llmops scale` reads it too."""
DEFAULT_SERVE_API_PORT = 8265
RUNNING = "RUNNING"


class ScaleError(RuntimeError):
    """The graph cannot be scaled as asked; the message says why."""


def serve_replicas(replicas: int) -> dict[str, Any]:
    """The ``autoscaling_config`` for a fixed replica count, as the operator renders it."""
    from llmops_operator.render import serve_replicas as rendered

    return rendered(replicas)


def serve_config(config: GraphConfig, host: str, port: int) -> dict[str, Any]:
    """The graph as a Serve config (``ServeDeploySchema``), as a RayService carries it.

    Each LLM's replica count, drain time and LoRA adapters are deployment overrides, not
    builder args (adapters as the user_config of the model's deployment and the router's,
    `llmops_contract.graph.serve_args`): a change to them leaves the args, and so every other
    deployment, untouched, and a changed user_config reaches the running replicas'
    ``reconfigure`` without restarting them.

    Args:
        config: The graph.
        host: Interface of Serve's HTTP proxy.
        port: Its port.
    """
    deployments: list[dict[str, Any]] = []
    for llm in config.llms:
        entry = {
            "name": llm.deployment_name,
            "autoscaling_config": serve_replicas(llm.replicas),
            "graceful_shutdown_timeout_s": llm.drain_seconds,
        }
        deployments.append(_with_user_config(entry, llm_user_config(llm)))
    router = router_user_config(config)
    if router is not None:
        deployments.append({"name": ROUTER_DEPLOYMENT, "user_config": router})
    return {
        "http_options": {"host": host, "port": port},
        "applications": [
            {
                "name": APP_NAME,
                "import_path": GRAPH_IMPORT_PATH,
                "route_prefix": "/",
                "args": serve_args(config),
                "deployments": deployments,
            }
        ],
    }


def _with_user_config(entry: dict[str, Any], user_config: dict[str, Any] | None) -> dict[str, Any]:
    return entry if user_config is None else {**entry, "user_config": user_config}


def _auth_headers() -> dict[str, str]:
    """Ray's token, from where Ray looks for it (``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH``,
    ``~/.ray/auth_token``). Ray's client sends it only when this process runs with
    ``RAY_AUTH_MODE=token``, but a local `ray.init()` turns authentication on whenever the
    file exists; a cluster without authentication ignores the header."""
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if not token:
        path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", Path.home() / ".ray" / "auth_token"))
        with contextlib.suppress(OSError):
            token = path.read_text().strip()
    return {"Authorization": f"Bearer {token}"} if token else {}


def _client(serve_api: str) -> Any:
    """Ray's own REST client for the Serve API (what `serve deploy` uses)."""
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

    try:
        return ServeSubmissionClient(serve_api, headers=_auth_headers())
    except ConnectionError as exc:
        raise ScaleError(f"no Ray dashboard answers at {serve_api}: {exc}") from exc


def deploy(serve_api: str, config: dict[str, Any], timeout_s: float = 60.0) -> None:
    """PUTs a Serve config, waiting up to ``timeout_s`` for the dashboard to answer first."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            client = _client(serve_api)
            break
        except ScaleError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    client.deploy_applications(config)


def running_replicas(serve_api: str, model: str) -> list[str]:
    """Ids of the model's replicas that Serve reports RUNNING."""
    app = _application(_client(serve_api).get_serve_details())
    deployment = app.get("deployments", {}).get(llm_deployment_name(model), {})
    return [r["replica_id"] for r in deployment.get("replicas", []) if r.get("state") == RUNNING]


def _application(details: dict[str, Any]) -> dict[str, Any]:
    app: dict[str, Any] | None = details.get("applications", {}).get(APP_NAME)
    if app is None:
        raise ScaleError(f"Serve runs no {APP_NAME!r} application")
    return app


def scale(serve_api: str, model: str, replicas: int) -> None:
    """Sets one model's replica count on a running graph.

    Reads the applied config back from Serve, changes that model's deployment entry only and
    PUTs the whole config again, as KubeRay does with a changed serveConfigV2.

    Args:
        serve_api: The Ray dashboard's URL, e.g. ``http://127.0.0.1:8265``.
        model: The served model name.
        replicas: The new count; 0 stops every replica of the model.

    Raises:
        ScaleError: no graph there, it was not deployed from a config, or no such model.
    """
    if replicas < 0:
        raise ScaleError(f"replicas must be 0 or more, not {replicas}")
    details, applied = applied_config(serve_api)
    name = llm_deployment_name(model)
    entry = next((d for d in applied.get("deployments", []) if d.get("name") == name), None)
    if entry is None:
        served = [llm["name"] for llm in applied.get("args", {}).get("llms", [])]
        raise ScaleError(f"the graph serves no model {model!r}; it serves {', '.join(served)}")
    entry.pop("num_replicas", None)
    entry["autoscaling_config"] = serve_replicas(replicas)
    put_config(serve_api, details, applied)


def applied_config(serve_api: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Serve's details and the graph application's config as it was applied.

    Raises:
        ScaleError: no graph there, or it was not deployed from a config.
    """
    details: dict[str, Any] = _client(serve_api).get_serve_details()
    app = _application(details)
    applied: dict[str, Any] | None = app.get("deployed_app_config")
    if applied is None:
        raise ScaleError(
            f"the {APP_NAME!r} application was not deployed from a Serve config "
            "(serve.run): restart it with this version of `llmops up`"
        )
    return details, applied


def put_config(serve_api: str, details: dict[str, Any], applied: dict[str, Any]) -> None:
    """PUTs the graph application's changed config back with every other application."""
    # Every application applied from a config goes back, as a RayService's serveConfigV2
    # holds them all: one left out would be deleted.
    applications = [
        other.get("deployed_app_config")
        for other_name, other in details.get("applications", {}).items()
        if other_name != APP_NAME and other.get("deployed_app_config") is not None
    ]
    http = details.get("http_options") or {}
    config: dict[str, Any] = {"applications": [applied, *applications]}
    if "host" in http and "port" in http:
        config["http_options"] = {"host": http["host"], "port": http["port"]}
    _client(serve_api).deploy_applications(config)


def wait_replicas(serve_api: str, model: str, replicas: int, timeout_s: float) -> list[str]:
    """Waits until exactly ``replicas`` of the model run and none is starting or stopping.

    Returns:
        The running replicas' ids.

    Raises:
        ScaleError: not within ``timeout_s``.
    """
    deadline = time.monotonic() + timeout_s
    name = llm_deployment_name(model)
    seen = "nothing"
    while True:
        app = _application(_client(serve_api).get_serve_details())
        deployment = app.get("deployments", {}).get(name, {})
        states = [r.get("state") for r in deployment.get("replicas", [])]
        if states.count(RUNNING) == replicas == len(states):
            return [r["replica_id"] for r in deployment["replicas"]]
        seen = ", ".join(sorted(str(s) for s in states)) or "no replica"
        if time.monotonic() > deadline:
            raise ScaleError(f"{model}: not {replicas} replicas after {timeout_s:.0f} s ({seen})")
        time.sleep(0.5)


def scale_command(
    model: Annotated[str, typer.Argument(help="The served model name.")],
    replicas: Annotated[int, typer.Argument(min=0, help="Replicas to run; 0 scales to zero.")],
    serve_api: Annotated[
        str,
        typer.Option(
            envvar=SERVE_API_ENV,
            help="The running graph's Serve REST API (the Ray dashboard `llmops up` printed).",
        ),
    ] = f"http://127.0.0.1:{DEFAULT_SERVE_API_PORT}",
    wait: Annotated[
        bool, typer.Option(help="Return once that many replicas run (they load the model).")
    ] = False,
    timeout: Annotated[float, typer.Option(help="Seconds --wait waits.")] = 900.0,
) -> None:
    """Set one model's replica count on a running `llmops up` graph, 0 included.

    The other models keep their replicas. A request for a model at 0 is answered 503 with
    Retry-After (the gateway holds it until the model serves or its hold deadline passes).
    """
    try:
        scale(serve_api, model, replicas)
        typer.echo(f"{model}: scaling to {replicas}")
        if wait:
            started = time.monotonic()
            wait_replicas(serve_api, model, replicas, timeout)
            typer.echo(f"{model}: {replicas} running after {time.monotonic() - started:.1f} s")
    except RuntimeError as exc:  # ScaleError, or the Serve API's refusal (Ray's client)
        typer.echo(f"Error: {exc}", err=True)
        raise typer.Exit(1) from exc
