"""Commands for the Kubernetes side: `render`, `crd`, `operator` and `fetch`."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any, Literal

import typer
import yaml
from pydantic import ValidationError


def _load_manifests(path: str) -> list[dict[str, Any]]:
    text = sys.stdin.read() if path == "-" else Path(path).read_text()
    try:
        docs = [doc for doc in yaml.safe_load_all(text) if doc]
    except yaml.YAMLError as exc:
        raise typer.BadParameter(f"{path} is not valid YAML: {exc}") from exc
    if not docs:
        raise typer.BadParameter(f"{path} holds no manifest")
    return [
        d for doc in docs for d in (doc.get("items", []) if doc.get("kind") == "List" else [doc])
    ]


def render_command(
    file: Annotated[
        str, typer.Option("--file", "-f", help="LLMDeployment manifest(s); - reads stdin.")
    ],
    output: Annotated[
        Literal["yaml", "json"], typer.Option("--output", "-o", help="yaml or json.")
    ] = "yaml",
) -> None:
    """Print exactly the objects the operator would apply for an LLMDeployment.

    Same renderer as the operator, with its default images (LLMOPS_OPERATOR_WORKER_IMAGE,
    LLMOPS_OPERATOR_LOADER_IMAGE, LLMOPS_OPERATOR_PROMETHEUS_URL apply here too). Owner
    references are included when the manifest carries metadata.uid, as one read back from
    the cluster does (kubectl get llmd NAME -o yaml | llmops render -f -).
    """
    from llmops_operator.render import RenderDefaults, RenderError, render
    from llmops_operator.settings import OperatorSettings

    defaults = RenderDefaults.from_settings(OperatorSettings())
    objects: list[dict[str, Any]] = []
    for manifest in _load_manifests(file):
        try:
            objects.extend(render(manifest, defaults))
        except RenderError as exc:
            name = (manifest.get("metadata") or {}).get("name", "?")
            typer.echo(f"error: LLMDeployment {name}: {exc}", err=True)
            raise typer.Exit(2) from exc
    if output == "json":
        typer.echo(json.dumps({"apiVersion": "v1", "kind": "List", "items": objects}, indent=2))
    else:
        typer.echo(yaml.safe_dump_all(objects, sort_keys=False), nl=False)


def crd_command(
    write: Annotated[
        Path | None,
        typer.Option("--write", help="Write each CRD into this folder instead of printing them."),
    ] = None,
) -> None:
    """Print the project's CustomResourceDefinitions (LLMDeployment, and LLMModel: one per
    model, its scale target), generated from the operator's models, as one YAML stream."""
    from llmops_operator.crd import crd_files

    files = crd_files()
    if write is None:
        typer.echo("---\n".join(files.values()), nl=False)
        return
    write.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (write / name).write_text(text)
        typer.echo(f"wrote {write / name}")


def operator_command() -> None:
    """Run the operator; settings come from LLMOPS_OPERATOR_* environment variables.

    The main ones: LLMOPS_OPERATOR_NAMESPACES (JSON list; empty watches the cluster),
    LLMOPS_OPERATOR_STANDALONE (no peering), LLMOPS_OPERATOR_PEERING_NAME,
    LLMOPS_OPERATOR_WORKER_IMAGE, LLMOPS_OPERATOR_PROMETHEUS_URL, LLMOPS_OPERATOR_METRICS_PORT,
    LLMOPS_OPERATOR_HEALTH_PORT. Credentials: the pod's service account, else ~/.kube/config.
    """
    from llmops_gateway.logs import configure_logging
    from llmops_operator.main import run_operator
    from llmops_operator.settings import OperatorSettings

    try:
        settings = OperatorSettings()
    except ValidationError as exc:
        typer.echo(f"error: invalid LLMOPS_OPERATOR_* settings:\n{exc}", err=True)
        raise typer.Exit(2) from exc
    configure_logging(settings.log_format)
    run_operator(settings)


def fetch_command(
    sources: Annotated[
        list[str] | None,
        typer.Argument(help="Model sources: hf://, s3://, embedded://, paths."),
    ] = None,
    adapters: Annotated[
        list[str] | None,
        typer.Option(
            "--adapter",
            help="A LoRA adapter's source (hf://, s3://, a path), checked for "
            "adapter_config.json instead of a model's config.json; repeatable.",
        ),
    ] = None,
    *,
    cache_dir: Annotated[
        Path, typer.Option("--cache-dir", help="The model cache folder (the cache volume).")
    ],
    marker: Annotated[
        Path | None,
        typer.Option("--marker", help="File written once every source is cached."),
    ] = None,
    report: Annotated[
        Path | None,
        typer.Option(
            "--report",
            help="JSON written once every source is cached: "
            '{"sources": {SOURCE: {"revision": COMMIT, "path": FOLDER}}}; revision is the '
            "commit of an hf:// source, null for others. Kept under 4 KiB (a pod's "
            "termination message).",
        ),
    ] = None,
) -> None:
    """Download or convert models into a model cache (what the loader Job runs).

    Each source is made available once; a source already in the cache is reused. Workers
    mount the same folder read-only and wait for the marker file. Transient Hugging Face Hub
    errors are retried with backoff. A gated hf:// model needs HF_TOKEN.
    """
    from llmops_contract import ModelSourceError
    from llmops_services.sources import ResolvedSource, fetch_source, loader_report

    wanted = [(source, False) for source in sources or []]
    wanted += [(source, True) for source in adapters or []]
    if not wanted:
        typer.echo("error: name at least one source (or --adapter SOURCE)", err=True)
        raise typer.Exit(2)
    resolved: dict[str, ResolvedSource] = {}
    for source, adapter in wanted:
        try:
            resolved[source] = fetch_source(source, cache_dir, progress=typer.echo, adapter=adapter)
        except ModelSourceError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(1) from exc
        found = resolved[source]
        pinned = f" (revision {found.revision})" if found.revision else ""
        typer.echo(f"{source}: {found.folder}{pinned}")
    if report is not None:
        report.parent.mkdir(parents=True, exist_ok=True)
        report.write_text(loader_report(resolved))
        typer.echo(f"report: {report}")
    if marker is not None:
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text("\n".join(resolved) + "\n")
        typer.echo(f"cache ready: {marker}")
