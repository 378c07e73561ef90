"""`llmops`: run the serving graph locally, and manage the platform."""

from __future__ import annotations

import signal
from contextlib import ExitStack
from pathlib import Path
from typing import Annotated

import typer
import yaml
from pydantic import ValidationError
from rich.console import Console

from llmops_cli import cluster, placement
from llmops_cli.adapters import adapters_app
from llmops_cli.keys import KEYS_FILE_ENV, default_keys_file
from llmops_cli.keys import app as keys_app
from llmops_cli.monitoring import MonitoringError, find_prometheus, run_prometheus
from llmops_cli.ports import busy_ports, duplicate_ports
from llmops_cli.scale import DEFAULT_SERVE_API_PORT, scale_command
from llmops_cli.usage import usage_command
from llmops_contract import GraphConfig, ModelSourceError, default_graph_config

app = typer.Typer(
    help="llmops: Kubernetes-native LLM serving. `llmops up` runs the whole serving path on "
    "this machine, on embedded default models, with no cluster and no GPU.",
    no_args_is_help=True,
    add_completion=False,
)
console = Console(stderr=True)
app.add_typer(keys_app, name="keys")
app.add_typer(adapters_app, name="adapters")
app.command("render")(cluster.render_command)
app.command("crd")(cluster.crd_command)
app.command("operator")(cluster.operator_command)
app.command("fetch")(cluster.fetch_command)
app.command("usage")(usage_command)
app.command("scale")(scale_command)


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


def _examples(url: str, config: GraphConfig, key: str) -> str:
    llm = config.default_llm
    encoder = config.encoder.name if config.encoder else None
    curl = (
        f"curl -s {url}/v1/chat/completions -H 'Content-Type: application/json' \\\n"
        f"  -H 'Authorization: Bearer {key}' \\\n"
        f'  -d \'{{"model": "{llm}", "max_tokens": 64, "messages": [{{"role": "user", '
        f'"content": "What is the capital of France?"}}]}}\''
    )
    python = (
        "from openai import OpenAI\n"
        f'client = OpenAI(base_url="{url}/v1", api_key="{key}")\n'
        f'reply = client.chat.completions.create(model="{llm}", max_tokens=64, messages=[{{"role": '
        f'"user", "content": "What is the capital of France?"}}])\n'
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
    port: Annotated[
        int, typer.Option(help="Port of the OpenAI-compatible API (the gateway).")
    ] = 8000,
    graph_port: Annotated[
        int, typer.Option(help="Port of the serving graph's own ingress, behind the gateway.")
    ] = 8001,
    metrics_port: Annotated[int, typer.Option(help="Gateway Prometheus metrics port.")] = 9464,
    grpc_port: Annotated[int, typer.Option(help="Gateway gRPC port.")] = 50051,
    gateway: Annotated[
        bool,
        typer.Option(
            help="Put the gateway (API keys, limits) in front; --no-gateway serves "
            "the graph alone on --port."
        ),
    ] = True,
    keys_file: Annotated[
        Path | None,
        typer.Option(
            help=f"Gateway key file (default: ${KEYS_FILE_ENV} or the user config folder)."
        ),
    ] = None,
    monitoring: Annotated[
        bool,
        typer.Option(
            help="Also start a local Prometheus (the `prometheus` binary on PATH) scraping "
            "the gateway and Ray (Serve, vLLM engine, router, encoder metrics) and "
            "evaluating the platform's alert rules."
        ),
    ] = False,
    prometheus_port: Annotated[
        int, typer.Option(help="Port of the local Prometheus (with --monitoring).")
    ] = 9090,
    ray_metrics_port: Annotated[
        int, typer.Option(help="Port where Ray serves the graph's Prometheus metrics.")
    ] = 9465,
    serve_api_port: Annotated[
        int,
        typer.Option(
            help="Port of the Ray dashboard: Serve's REST API, which deploys the graph and "
            "takes `llmops scale`."
        ),
    ] = DEFAULT_SERVE_API_PORT,
    reserve_engine_cpus: Annotated[
        bool | None,
        typer.Option(
            "--reserve-engine-cpus/--no-reserve-engine-cpus",
            show_default=False,
            help="Keep the graph's other processes off the CPUs vLLM binds its compute "
            f"threads to (default: ${placement.RESERVE_ENGINE_CPUS_ENV}=1 turns it on, else off). "
            "Opt-in: its measured gain is within a 2-core machine's noise "
            "(docs/benchmarks.md).",
        ),
    ] = None,
) -> None:
    """Start Ray, the serving graph and the gateway locally; serve until Ctrl-C.

    Prints the API URL, a fresh API key (keys printed by earlier runs are revoked) and
    copy-pasteable curl and Python examples; with --monitoring, also the Prometheus URL.

    On one machine Ray's housekeeping runs 10 steps of niceness below the graph
    ($LLMOPS_HOUSEKEEPING_NICE, 0-19; 0 leaves it as Ray starts it); with
    --reserve-engine-cpus the graph's other processes also keep off the CPUs vLLM binds its
    compute threads to.
    """
    from llmops_cli.local_graph import run_local

    graph = load_graph_config(config)
    try:
        nice_steps = placement.housekeeping_nice()
        if reserve_engine_cpus is None:
            reserve_engine_cpus = placement.reserve_engine_cpus()
    except ValueError as exc:
        typer.echo(f"Error: {exc}", err=True)
        raise typer.Exit(2) from exc
    served = [llm.name for llm in graph.llms] + ([graph.encoder.name] if graph.encoder else [])
    console.print(f"[bold]llmops up[/bold]: serving {', '.join(served)}")
    status = console.status("starting Ray")

    def on_progress(line: str) -> None:
        console.print(f"  {line}")

    def on_status(line: str) -> None:
        status.update(f"loading models ({line})")

    if monitoring:
        try:
            find_prometheus()  # fail now, not after minutes of model loading
        except MonitoringError as exc:
            console.print(f"[red]{exc}[/red]")
            raise typer.Exit(2) from exc
    # Every port this run listens on, checked now rather than after minutes of model loading.
    ports = {"--port": port, "--ray-metrics-port": ray_metrics_port}
    ports["--serve-api-port"] = serve_api_port
    if gateway:
        ports |= {"--graph-port": graph_port, "--metrics-port": metrics_port}
        ports |= {"--grpc-port": grpc_port}
    if monitoring:
        ports["--prometheus-port"] = prometheus_port
    problems = duplicate_ports(ports) or busy_ports(host, ports)
    if problems:
        console.print(
            f"[red]cannot listen on {host}:[/red] "
            + "; ".join(problems)
            + ". Stop what holds them or choose other ports (see `llmops up --help`)."
        )
        raise typer.Exit(2)
    status.start()
    try:
        with ExitStack() as stack:
            running = stack.enter_context(
                run_local(
                    graph,
                    host,
                    graph_port if gateway else port,
                    progress=on_progress,
                    on_status=on_status,
                    metrics_port=ray_metrics_port,
                    housekeeping_nice=nice_steps,
                    reserve_engine_cpus=reserve_engine_cpus,
                    serve_api_port=serve_api_port,
                )
            )
            url, key = running.url, "unused"
            if gateway:
                from llmops_gateway.keys import FileKeyStore
                from llmops_gateway.local import issue_local_key, run_gateway

                status.update("starting the gateway")
                store = FileKeyStore(keys_file or default_keys_file())
                key = issue_local_key(store)
                url = stack.enter_context(
                    run_gateway(running.url, store.path, host, port, metrics_port, grpc_port)
                )
            prometheus = None
            if monitoring:
                status.update("starting Prometheus")
                scrape = {"ray": f"{host}:{ray_metrics_port}"}
                if gateway:
                    scrape["gateway"] = f"{host}:{metrics_port}"
                prometheus = stack.enter_context(run_prometheus(scrape, host, prometheus_port))
            status.stop()
            # Ctrl-C and SIGTERM both stop everything (also when started in the background);
            # set after ray.init, which installs handlers of its own.
            signal.signal(signal.SIGINT, signal.default_int_handler)
            signal.signal(signal.SIGTERM, signal.default_int_handler)
            # Plain output (never wrapped): users copy these lines.
            typer.echo(f"\nready at {url}")
            if gateway:
                typer.echo(f"API key (tenant 'local'; shown once): {key}")
                typer.echo(f"gRPC: {host}:{grpc_port} (protos/llmops/v1/gateway.proto)")
                typer.echo(f"metrics: http://{host}:{metrics_port}/metrics")
            typer.echo(f"graph metrics (Ray): http://{host}:{ray_metrics_port}/metrics")
            typer.echo(f"Serve API (llmops scale --serve-api): {running.serve_api}")
            if prometheus is not None:
                typer.echo(f"Prometheus: {prometheus.url} (more targets: {prometheus.targets_dir})")
                typer.echo(
                    f"  curl -s '{prometheus.url}/api/v1/query' --data-urlencode "
                    "'query=sum(rate(ray_vllm_generation_tokens_total[1m]))'"
                )
            typer.echo(f"Ray logs: {running.ray_logs}\n")
            typer.echo(_examples(url, graph, key))
            console.print("\nPress Ctrl-C to stop.")
            while True:
                signal.pause()
    except KeyboardInterrupt:
        console.print("stopped.")
    except ModelSourceError as exc:
        console.print(f"[red]model source error:[/red] {exc}")
        raise typer.Exit(2) from exc
    except RuntimeError as exc:
        console.print(f"[red]could not start:[/red] {exc}")
        raise typer.Exit(1) from exc
    finally:
        status.stop()


@app.command("gateway")
def gateway_command() -> None:
    """Run the gateway alone; settings come from LLMOPS_GATEWAY_* environment variables.

    The main ones: LLMOPS_GATEWAY_DEFAULT_BACKEND (graph URL), LLMOPS_GATEWAY_BACKENDS (JSON
    model -> URL), LLMOPS_GATEWAY_DISCOVER_BACKENDS (true: route to the graphs LLMDeployments
    report, read from the Kubernetes API), LLMOPS_GATEWAY_KEYS_FILE, LLMOPS_GATEWAY_REDIS_URL
    (limits shared by replicas; unset keeps them in memory), LLMOPS_GATEWAY_REDIS_FAILURE_MODE
    (open|closed),
    LLMOPS_GATEWAY_PORT, LLMOPS_GATEWAY_METRICS_PORT, LLMOPS_GATEWAY_DRAIN_TIMEOUT_S,
    LLMOPS_GATEWAY_USAGE_RETENTION_DAYS (usage records kept in Redis), LLMOPS_GATEWAY_USAGE_FILE
    (without Redis; default usage.jsonl beside the key file).
    """
    from llmops_gateway.server import main as gateway_main

    gateway_main()


@app.command("config")
def show_config() -> None:
    """Print the default graph config as YAML, a starting point for `llmops up --config`."""
    typer.echo(yaml.safe_dump(default_graph_config().model_dump(mode="json"), sort_keys=False))


def main() -> None:
    """Entry point of the `llmops` command."""
    app()
