"""`llmops adapters`: add or remove a LoRA adapter of a model on a running graph.

A model's adapters travel in the Serve config as the user_config of its deployment and of the
router (`llmops_contract.graph.llm_user_config`, `router_user_config`), not in the application
args. Ray Serve hands a changed user_config to the running replicas' ``reconfigure`` and
restarts none of them (ray/serve/_private/config.py: ``user_config`` is of update type
NeedsActorReconfigure; version.py `requires_actor_restart` leaves it out), so this, like
`llmops scale`, reads the applied config back, changes those two entries only and PUTs it.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer
from pydantic import ValidationError

from llmops_cli.scale import (
    DEFAULT_SERVE_API_PORT,
    SERVE_API_ENV,
    ScaleError,
    applied_config,
    put_config,
)
from llmops_contract import ROUTER_DEPLOYMENT, llm_deployment_name, parse_source
from llmops_contract.graph import ADAPTERS_KEY, AdapterSpec

adapters_app = typer.Typer(
    help="Add or remove a model's LoRA adapters on a running `llmops up` graph, without "
    "restarting its engine.",
    no_args_is_help=True,
)


def _entry(deployments: list[dict[str, Any]], name: str) -> dict[str, Any]:
    entry = next((d for d in deployments if d.get("name") == name), None)
    if entry is None:
        entry = {"name": name}
        deployments.append(entry)
    return entry


def change_adapters(
    serve_api: str, model: str, add: AdapterSpec | None = None, remove: str | None = None
) -> None:
    """Adds an adapter to a model of a running graph, or removes one, restarting nothing.

    Args:
        serve_api: The Ray dashboard's URL, e.g. ``http://127.0.0.1:8265``.
        model: The base model's served name.
        add: The adapter to add.
        remove: The name of the adapter to remove.

    Raises:
        ScaleError: no graph there, no such model, a model whose engine runs without LoRA
            (enabling it changes the engine's args: restart `llmops up` with ``lora: true``),
            a name already served, or no such adapter to remove.
    """
    details, applied = applied_config(serve_api)
    spec = next(
        (llm for llm in applied.get("args", {}).get("llms", []) if llm["name"] == model), None
    )
    if spec is None:
        served = [llm["name"] for llm in applied.get("args", {}).get("llms", [])]
        raise ScaleError(f"the graph serves no model {model!r}; it serves {', '.join(served)}")
    if not spec.get("lora"):
        raise ScaleError(
            f"model {model!r} runs without LoRA: turning it on changes its engine's args and "
            "restarts it; set `lora: true` (or list the adapter) in the graph config and "
            "restart `llmops up`"
        )
    deployments: list[dict[str, Any]] = applied.setdefault("deployments", [])
    llm_entry = _entry(deployments, llm_deployment_name(model))
    router_entry = _entry(deployments, ROUTER_DEPLOYMENT)
    adapters: list[dict[str, Any]] = list(
        (llm_entry.get("user_config") or {}).get(ADAPTERS_KEY, [])
    )
    table: dict[str, str] = dict((router_entry.get("user_config") or {}).get(ADAPTERS_KEY, {}))
    if add is not None:
        taken = {llm["name"] for llm in applied["args"]["llms"]} | set(table)
        encoder = applied["args"].get("encoder")
        if encoder:
            taken.add(encoder["name"])
        if add.name in taken:
            raise ScaleError(f"the graph serves {add.name!r} already: names must be unique")
        adapters.append(add.model_dump(mode="json"))
        table[add.name] = model
    if remove is not None:
        if table.get(remove) != model:
            raise ScaleError(f"{remove!r} is no adapter of model {model!r}")
        adapters = [adapter for adapter in adapters if adapter["name"] != remove]
        del table[remove]
    llm_entry["user_config"] = {ADAPTERS_KEY: adapters}
    router_entry["user_config"] = {ADAPTERS_KEY: table}
    put_config(serve_api, details, applied)


def _local_source(source: str) -> str:
    """A local adapter folder as an absolute path (the replicas run in another folder),
    checked to hold a PEFT adapter as the replica checks it; other sources unchanged (the
    replica resolves them)."""
    from llmops_services.sources import ModelSourceError, resolve_source

    if parse_source(source).scheme != "local":
        return source
    try:
        return str(resolve_source(source, adapter=True))
    except ModelSourceError as exc:
        raise ScaleError(str(exc)) from exc


ServeApi = Annotated[
    str,
    typer.Option(
        envvar=SERVE_API_ENV,
        help="The running graph's Serve REST API (the Ray dashboard `llmops up` printed).",
    ),
]


@adapters_app.command("add")
def add_command(
    model: Annotated[str, typer.Argument(help="The base model's served name.")],
    name: Annotated[str, typer.Argument(help="The adapter's served name (unique).")],
    source: Annotated[
        str,
        typer.Argument(help="A PEFT adapter folder: a path, file:///path or hf://org/name."),
    ],
    serve_api: ServeApi = f"http://127.0.0.1:{DEFAULT_SERVE_API_PORT}",
) -> None:
    """Serve a new LoRA adapter of MODEL under NAME, without restarting its engine.

    The model's engine must run with LoRA (it has adapters, or `lora: true` in the graph
    config). Once Serve has applied it (seconds), the adapter is listed in /v1/models; it
    loads on its first request.
    Add it to the graph config too to keep it after a restart.
    """
    try:
        adapter = AdapterSpec(name=name, source=_local_source(source))
        change_adapters(serve_api, model, add=adapter)
    except ValidationError as exc:
        typer.echo(f"Error: {exc.errors()[0]['msg']}", err=True)
        raise typer.Exit(1) from exc
    except RuntimeError as exc:  # ScaleError, or the Serve API's refusal (Ray's client)
        typer.echo(f"Error: {exc}", err=True)
        raise typer.Exit(1) from exc
    typer.echo(f"{model}: adapter {name} added")


@adapters_app.command("remove")
def remove_command(
    model: Annotated[str, typer.Argument(help="The base model's served name.")],
    name: Annotated[str, typer.Argument(help="The adapter's served name.")],
    serve_api: ServeApi = f"http://127.0.0.1:{DEFAULT_SERVE_API_PORT}",
) -> None:
    """Stop serving the LoRA adapter NAME of MODEL, without restarting its engine.

    Requests for it answer 404 model_not_found from then on.
    """
    try:
        change_adapters(serve_api, model, remove=name)
    except RuntimeError as exc:
        typer.echo(f"Error: {exc}", err=True)
        raise typer.Exit(1) from exc
    typer.echo(f"{model}: adapter {name} removed")
