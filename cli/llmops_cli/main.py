"""`llmops`: run the serving graph locally, and manage the platform."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Annotated

import typer
import yaml
from pydantic import ValidationError
from rich.console import Console

from llmops_cli.keys import app as keys_app
from llmops_services import GraphConfig, ModelSourceError, default_graph_config

app = typer.Typer(
    help="llmops: Kubernetes-native LLM serving. `llmops up` runs the whole serving path on "
    "this machine, on embedded default models, with no cluster and no GPU.",
    no_args_is_help=True,
    add_completion=False,
)
console = Console(stderr=True)
app.add_typer(keys_app, name="keys")


def load_graph_config(path: Path | None) -> GraphConfig:
    """Reads a graph config YAML file, or returns the embedded default graph.

    Raises:
        typer.BadParameter: the file is missing or invalid; the message says where.
    """
    if path is None:
        return default_graph_config()
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise typer.BadParameter(f"cannot read {path}: {exc}", param_hint="--config") from exc
    try:
        return GraphConfig.model_validate(data)
    except ValidationError as exc:
        lines = [
            f"{'.'.join(str(p) for p in err['loc']) or '(top level)'}: {err['msg']}"
            for err in exc.errors()
        ]
        raise typer.BadParameter(
            f"{path} is not a valid graph config:\n  " + "\n  ".join(lines),
            param_hint="--config",
        ) from exc


def _examples(url: str, config: GraphConfig) -> str:
    llm = config.default_llm
    encoder = config.encoder.name if config.encoder else None
    curl = (
        f"curl -s {url}/v1/chat/completions -H 'Content-Type: application/json' \\\n"
        f'  -d \'{{"model": "{llm}", "messages": [{{"role": "user", '
        f'"content": "What is the capital of France?"}}]}}\''
    )
    python = (
        "from openai import OpenAI\n"
        f'client = OpenAI(base_url="{url}/v1", api_key="unused")\n'
        f'reply = client.chat.completions.create(model="{llm}", messages=[{{"role": "user", '
        f'"content": "What is the capital of France?"}}])\n'
        "print(reply.choices[0].message.content)"
    )
    if encoder:
        python += (
            f'\nvector = client.embeddings.create(model="{encoder}", input="hello")'
            ".data[0].embedding"
        )
    return f"curl:\n{curl}\n\nPython:\n{python}"


@app.command()
def up(
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            "-c",
            help="Graph config YAML (see `llmops config`); default: the embedded models.",
            exists=True,
            dir_okay=False,
        ),
    ] = None,
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="HTTP port of the OpenAI-compatible API.")] = 8000,
) -> None:
    """Start Ray and the serving graph locally, wait until ready, serve until Ctrl-C."""
    from llmops_services.local import run_local

    graph = load_graph_config(config)
    served = [llm.name for llm in graph.llms] + ([graph.encoder.name] if graph.encoder else [])
    console.print(f"[bold]llmops up[/bold]: serving {', '.join(served)}")
    status = console.status("starting Ray")

    def on_progress(line: str) -> None:
        console.print(f"  {line}")

    def on_status(line: str) -> None:
        status.update(f"loading models ({line})")

    status.start()
    try:
        with run_local(graph, host, port, progress=on_progress, on_status=on_status) as running:
            status.stop()
            # Ctrl-C and SIGTERM both stop the graph (also when started in the background);
            # set after ray.init, which installs handlers of its own.
            signal.signal(signal.SIGINT, signal.default_int_handler)
            signal.signal(signal.SIGTERM, signal.default_int_handler)
            console.print(f"\n[green]ready[/green] at {running.url}")
            console.print(f"Ray logs: {running.ray_logs}\n")
            typer.echo(_examples(running.url, graph))
            console.print("\nPress Ctrl-C to stop.")
            while True:
                signal.pause()
    except KeyboardInterrupt:
        console.print("stopped.")
    except ModelSourceError as exc:
        console.print(f"[red]model source error:[/red] {exc}")
        raise typer.Exit(2) from exc
    finally:
        status.stop()


@app.command("config")
def show_config() -> None:
    """Print the default graph config as YAML, a starting point for `llmops up --config`."""
    typer.echo(yaml.safe_dump(default_graph_config().model_dump(mode="json"), sort_keys=False))


def main() -> None:
    """Entry point of the `llmops` command."""
    app()
