"""The platform's Grafana dashboards, as code (Grafana's own grafana-foundation-sdk).

    .venv/bin/python deploy/dashboards/generate.py

writes one JSON file per dashboard next to this file and the same bytes into the Helm chart
(charts/llmops/files/dashboards), which ships them as ConfigMaps for Grafana's sidecar. A test
fails when the committed JSON differs from what this file generates.

Every panel queries the Prometheus chosen in the ``datasource`` variable (no hard-coded
datasource); ``namespace``, ``deployment`` and ``model`` variables filter the series.
Label conventions are those of llmops_operator.queries: Ray and vLLM series carry
``llmops_deployment`` (from the PodMonitor); DCGM series name the GPU's pod in
``exported_namespace`` and ``exported_pod`` on the GPU Operator's scrape (``namespace`` and
``pod`` on one that honours the exporter's labels), and GPU panels match KubeRay's worker pod
names with the trigger query's pattern.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from grafana_foundation_sdk.builders import dashboard, prometheus, stat, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.dashboard import DataSourceRef, VariableRefresh

from llmops_contract import HELD_REQUESTS_METRIC
from llmops_operator.queries import worker_pods

HERE = Path(__file__).parent
CHART_COPY = HERE.parents[1] / "charts" / "llmops" / "files" / "dashboards"
DATASOURCE = DataSourceRef(type_val="prometheus", uid="${datasource}")
NS = 'namespace=~"$namespace"'
DEP = f'{NS}, llmops_deployment=~"$deployment"'
LLM = f'{DEP}, model_name=~"$model"'
WORKER_PODS = worker_pods("$deployment")
OWNED = f'{NS}, deployment=~"$deployment"'  # the operator's per-deployment gauges
MODEL_OWNED = f'{OWNED}, model=~"$model"'  # the operator's per-model gauges
# The gateway's per-model series carry no namespace of the graph (the gateway runs elsewhere).
HELD = 'model=~"$model"'

Panel = timeseries.Panel | stat.Panel


def rate(metric: str, selector: str) -> str:
    return f"rate({metric}{{{selector}}}[$__rate_interval])"


def query(expr: str, legend: str = "") -> prometheus.Dataquery:
    target = prometheus.Dataquery().expr(expr).datasource(DATASOURCE)
    return target.legend_format(legend) if legend else target


def graph(title: str, unit: str, *targets: prometheus.Dataquery, width: int = 12) -> Panel:
    panel = timeseries.Panel().title(title).unit(unit).datasource(DATASOURCE).height(8)
    for target in targets:
        panel = panel.with_target(target)
    return panel.span(width)


def single(title: str, unit: str, target: prometheus.Dataquery, width: int = 6) -> Panel:
    return (
        stat.Panel()
        .title(title)
        .unit(unit)
        .datasource(DATASOURCE)
        .with_target(target)
        .height(4)
        .span(width)
    )


def quantiles(metric: str, selector: str, by: str) -> list[prometheus.Dataquery]:
    return [
        query(
            f"histogram_quantile({q}, sum by ({by}, le) (rate({metric}_bucket{{{selector}}}"
            "[$__rate_interval])))",
            f"p{int(q * 100)} {{{{{by}}}}}",
        )
        for q in (0.5, 0.95, 0.99)
    ]


def variable(name: str, label: str, source: str) -> dashboard.QueryVariable:
    return (
        dashboard.QueryVariable(name)
        .label(label)
        .query(source)
        .datasource(DATASOURCE)
        .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
        .multi(True)
        .include_all(True)
        .all_value(".*")
    )


def board(
    uid: str, title: str, panels: list[Panel], *, models: bool = False
) -> dashboard.Dashboard:
    built = (
        dashboard.Dashboard(title)
        .uid(uid)
        .tags(["llmops"])
        .refresh("30s")
        .time("now-1h", "now")
        .with_variable(
            dashboard.DatasourceVariable("datasource").label("Prometheus").type("prometheus")
        )
        .with_variable(variable("namespace", "Namespace", "label_values(up, namespace)"))
        .with_variable(
            variable(
                "deployment",
                "LLMDeployment",
                f"label_values(ray_vllm_num_requests_running{{{NS}}}, llmops_deployment)",
            )
        )
    )
    if models:
        built = built.with_variable(
            variable(
                "model",
                "Model",
                f"label_values(ray_vllm_num_requests_running{{{DEP}}}, model_name)",
            )
        )
    for panel in panels:
        built = built.with_panel(panel)
    return built


def overview() -> dashboard.Dashboard:
    return board(
        "llmops-overview",
        "llmops / Platform overview",
        [
            single(
                "Gateway requests/s",
                "reqps",
                query(f"sum(rate(llmops_gateway_requests_total{{{NS}}}[$__rate_interval]))"),
            ),
            single(
                "Gateway 5xx ratio",
                "percentunit",
                query(
                    # `or vector(0)`: no 5xx at all is a ratio of 0, not "No data".
                    "(sum(" + rate("llmops_gateway_requests_total", f'{NS}, status=~"5.."') + ")"
                    " or vector(0))"
                    f" / sum(rate(llmops_gateway_requests_total{{{NS}}}[$__rate_interval]))"
                ),
            ),
            single(
                "Tokens/s generated",
                "short",
                query(f"sum(rate(ray_vllm_generation_tokens_total{{{DEP}}}[$__rate_interval]))"),
            ),
            single(
                "LLMDeployments Ready",
                "short",
                query('sum(llmops_operator_deployments{state="Ready"})'),
            ),
            graph(
                "Requests waiting in vLLM",
                "short",
                query(
                    f"sum by (llmops_deployment) (ray_vllm_num_requests_waiting{{{DEP}}})",
                    "{{llmops_deployment}}",
                ),
            ),
            graph(
                "KV-cache usage",
                "percentunit",
                query(
                    f"max by (llmops_deployment) (ray_vllm_kv_cache_usage_perc{{{DEP}}})",
                    "{{llmops_deployment}}",
                ),
            ),
        ],
    )


def serving() -> dashboard.Dashboard:
    return board(
        "llmops-model-serving",
        "llmops / Model serving",
        [
            graph(
                "Time to first token",
                "s",
                *quantiles("ray_vllm_time_to_first_token_seconds", LLM, "model_name"),
            ),
            graph(
                "Time per output token",
                "s",
                *quantiles("ray_vllm_request_time_per_output_token_seconds", LLM, "model_name"),
            ),
            graph(
                "Tokens/s",
                "short",
                query(
                    f"sum by (model_name) ({rate('ray_vllm_generation_tokens_total', LLM)})",
                    "generated {{model_name}}",
                ),
                query(
                    f"sum by (model_name) ({rate('ray_vllm_prompt_tokens_total', LLM)})",
                    "prompt {{model_name}}",
                ),
            ),
            graph(
                "Requests running and waiting",
                "short",
                query(
                    f"sum by (model_name) (ray_vllm_num_requests_running{{{LLM}}})",
                    "running {{model_name}}",
                ),
                query(
                    f"sum by (model_name) (ray_vllm_num_requests_waiting{{{LLM}}})",
                    "waiting {{model_name}}",
                ),
            ),
            graph(
                "KV-cache usage",
                "percentunit",
                query(
                    f"max by (model_name) (ray_vllm_kv_cache_usage_perc{{{LLM}}})", "{{model_name}}"
                ),
            ),
            graph(
                "Prefix-cache hit rate",
                "percentunit",
                query(
                    f"sum by (model_name) ({rate('ray_vllm_prefix_cache_hits_total', LLM)})"
                    f" / sum by (model_name) ({rate('ray_vllm_prefix_cache_queries_total', LLM)})",
                    "{{model_name}}",
                ),
            ),
            graph(
                "Routing decisions/s",
                "reqps",
                query(
                    f"sum by (policy, target) ({rate('ray_llmops_router_decisions_total', DEP)})",
                    "{{policy}} -> {{target}}",
                ),
            ),
            graph(
                "Semantic route score (auto)",
                "percentunit",
                *quantiles("ray_llmops_router_semantic_similarity_ratio", DEP, "target"),
            ),
            graph(
                "Encoder batch size",
                "short",
                *quantiles("ray_llmops_encoder_batch_texts", DEP, "llmops_deployment"),
            ),
            graph(
                "Encoder tokens/s and batch time",
                "short",
                query(
                    "sum by (llmops_deployment) "
                    f"({rate('ray_llmops_encoder_input_tokens_total', DEP)})",
                    "tokens/s {{llmops_deployment}}",
                ),
                query(
                    "sum by (llmops_deployment) "
                    f"({rate('ray_llmops_encoder_batch_duration_seconds_sum', DEP)})"
                    " / sum by (llmops_deployment) "
                    f"({rate('ray_llmops_encoder_batch_duration_seconds_count', DEP)})",
                    "mean batch seconds {{llmops_deployment}}",
                ),
            ),
            graph(
                "Replicas vs desired",
                "short",
                query(
                    f"sum by (deployment) (llmops_operator_ready_replicas{{{OWNED}}})",
                    "ready {{deployment}}",
                ),
                query(
                    f"sum by (deployment) (llmops_operator_desired_replicas{{{OWNED}}})",
                    "desired {{deployment}}",
                ),
                width=24,
            ),
            # Each model scales on its own (its LLMModel); kube-state-metrics cannot see custom
            # resources, so the operator exports the counts.
            graph(
                "Replicas per model (desired / ready)",
                "short",
                query(
                    "sum by (deployment, model) "
                    f'(llmops_operator_model_replicas{{{MODEL_OWNED}, state="desired"}})',
                    "desired {{deployment}}/{{model}}",
                ),
                query(
                    "sum by (deployment, model) "
                    f'(llmops_operator_model_replicas{{{MODEL_OWNED}, state="ready"}})',
                    "ready {{deployment}}/{{model}}",
                ),
            ),
            single(
                "Models scaled to zero",
                "short",
                query(
                    "count(sum by (namespace, deployment, model) "
                    f'(llmops_operator_model_replicas{{{MODEL_OWNED}, state="desired"}}) == 0)'
                    " or vector(0)"
                ),
                width=12,
            ),
            graph(
                "Requests held for a model at zero (gateway)",
                "short",
                query(f"sum by (model) ({HELD_REQUESTS_METRIC}{{{HELD}}})", "{{model}}"),
            ),
            graph(
                "Hold time until served or expired (gateway)",
                "s",
                *quantiles("llmops_gateway_hold_seconds", HELD, "outcome"),
            ),
        ],
        models=True,
    )


def dcgm(metric: str) -> str:
    """A DCGM metric of the selected deployments' GPU workers, the GPU's pod in exported_pod.

    The second branch reads a scrape with honorLabels true and copies its pod label over.
    """
    exported = f'{metric}{{exported_namespace=~"$namespace", exported_pod=~"{WORKER_PODS}"}}'
    honored = f'{metric}{{{NS}, pod=~"{WORKER_PODS}"}}'
    return f'({exported} or label_replace({honored}, "exported_pod", "$1", "pod", "(.+)"))'


def gpus() -> dashboard.Dashboard:
    def by_pod(expr: str) -> prometheus.Dataquery:
        return query(f"max by (exported_pod, gpu) ({expr})", "{{exported_pod}} GPU {{gpu}}")

    used, free = dcgm("DCGM_FI_DEV_FB_USED"), dcgm("DCGM_FI_DEV_FB_FREE")
    return board(
        "llmops-gpus",
        "llmops / GPUs",
        [
            graph("GPU utilisation", "percent", by_pod(dcgm("DCGM_FI_DEV_GPU_UTIL"))),
            graph("GPU memory used", "percentunit", by_pod(f"{used} / ({used} + {free})")),
            graph("Power", "watt", by_pod(dcgm("DCGM_FI_DEV_POWER_USAGE"))),
            graph("Temperature", "celsius", by_pod(dcgm("DCGM_FI_DEV_GPU_TEMP"))),
            graph("Last XID error", "none", by_pod(dcgm("DCGM_FI_DEV_XID_ERRORS")), width=24),
        ],
    )


def gateway() -> dashboard.Dashboard:
    window = "[$__rate_interval]"
    return board(
        "llmops-gateway",
        "llmops / Gateway and tenants",
        [
            graph(
                "Requests/s by status",
                "reqps",
                query(
                    f"sum by (status) (rate(llmops_gateway_requests_total{{{NS}}}{window}))",
                    "{{status}}",
                ),
            ),
            graph(
                "Request latency",
                "s",
                *quantiles("llmops_gateway_request_duration_seconds", NS, "endpoint"),
            ),
            graph(
                "429s by reason",
                "reqps",
                query(
                    "sum by (tenant, reason) ("
                    + rate("llmops_gateway_rate_limit_rejections_total", NS)
                    + ")",
                    "{{tenant}} {{reason}}",
                ),
            ),
            graph(
                "Tokens/s by tenant",
                "short",
                query(
                    f"sum by (tenant, direction) ({rate('llmops_gateway_tokens_total', NS)})",
                    "{{tenant}} {{direction}}",
                ),
            ),
            graph(
                "Token budget burn (tokens in 24 h)",
                "short",
                query(
                    f"sum by (tenant) (increase(llmops_gateway_tokens_total{{{NS}}}[24h]))",
                    "{{tenant}}",
                ),
            ),
            graph(
                "In flight",
                "short",
                query(f"sum(llmops_gateway_in_flight_requests{{{NS}}})", "requests"),
                query(f"sum(llmops_gateway_open_streams{{{NS}}})", "streams"),
            ),
        ],
    )


USAGE = f'{NS}, tenant=~"$tenant", model=~"$model"'
"""The usage dashboard's filter: the gateway's series carry ``tenant`` and ``model``."""
PRICES = {
    "input_price": "Price per 1M input tokens",
    "output_price": "Price per 1M output tokens",
    "gpu_hour_price": "Price per GPU-hour",
}


def _token_cost(window: str) -> str:
    """Tokens of ``window`` (a range selector) priced per million, by tenant and model."""
    prompt = f'{USAGE}, direction="prompt"'
    completion = f'{USAGE}, direction="completion"'
    return (
        f"(sum by (tenant, model) ({window}(llmops_gateway_tokens_total{{{prompt}}}{{w}}))"
        " * $input_price"
        f" + sum by (tenant, model) ({window}(llmops_gateway_tokens_total{{{completion}}}{{w}}))"
        " * $output_price) / 1e6"
    )


def _cost(window: str, span: str, per_hour: bool) -> str:
    """Cost by tenant and model: tokens at the token prices, GPU time at the GPU-hour price.

    Models without GPU-seconds series (no GPU models) add 0 GPU cost: `or` fills them in, so
    the sum keeps every tenant and model that used tokens.
    """
    tokens = _token_cost(window).replace("{w}", span)
    gpu = (
        f"sum by (tenant, model) ({window}(llmops_gateway_gpu_seconds_total{{{USAGE}}}{span}))"
        " * $gpu_hour_price / 3600"
    )
    scale = " * 3600" if per_hour else ""
    return f"(({tokens}) + ({gpu} or ({tokens}) * 0)){scale}"


def usage() -> dashboard.Dashboard:
    """Usage and cost per tenant and model, from the gateway's counters.

    Costs are estimates at the prices set in the dashboard's variables (one price for the
    models selected: filter by model for per-model prices); `llmops usage` computes billing
    from the durable records, with a price per model.
    """
    window = "[$__rate_interval]"
    built = board(
        "llmops-usage",
        "llmops / Usage and cost",
        [
            single(
                "Tokens in 24 h",
                "short",
                query(f"sum(increase(llmops_gateway_tokens_total{{{USAGE}}}[24h]))"),
            ),
            single(
                "GPU-hours in 24 h",
                "short",
                query(f"sum(increase(llmops_gateway_gpu_seconds_total{{{USAGE}}}[24h])) / 3600"),
            ),
            single(
                "Requests in 24 h",
                "short",
                query(f"sum(increase(llmops_gateway_requests_total{{{USAGE}}}[24h]))"),
            ),
            single(
                "Estimated cost in 24 h",
                "currencyUSD",
                query(f"sum({_cost('increase', '[24h]', per_hour=False)})"),
            ),
            graph(
                "Tokens/s by tenant and model",
                "short",
                query(
                    f"sum by (tenant, model, direction) "
                    f"({rate('llmops_gateway_tokens_total', USAGE)})",
                    "{{tenant}} {{model}} {{direction}}",
                ),
            ),
            graph(
                "Requests/s by tenant and model",
                "reqps",
                query(
                    f"sum by (tenant, model) ({rate('llmops_gateway_requests_total', USAGE)})",
                    "{{tenant}} {{model}}",
                ),
            ),
            graph(
                "GPUs in use by tenant and model (GPU-seconds/s)",
                "short",
                query(
                    f"sum by (tenant, model) ({rate('llmops_gateway_gpu_seconds_total', USAGE)})",
                    "{{tenant}} {{model}}",
                ),
            ),
            graph(
                "Estimated cost per hour by tenant and model",
                "currencyUSD",
                query(_cost("rate", window, per_hour=True), "{{tenant}} {{model}}"),
            ),
            graph(
                "Tokens in 24 h by tenant and model",
                "short",
                query(
                    "sum by (tenant, model) "
                    f"(increase(llmops_gateway_tokens_total{{{USAGE}}}[24h]))",
                    "{{tenant}} {{model}}",
                ),
            ),
            graph(
                "Estimated cost in 24 h by tenant and model",
                "currencyUSD",
                query(_cost("increase", "[24h]", per_hour=False), "{{tenant}} {{model}}"),
            ),
        ],
    )
    built = built.with_variable(
        variable("tenant", "Tenant", f"label_values(llmops_gateway_tokens_total{{{NS}}}, tenant)")
    ).with_variable(
        variable("model", "Model", f"label_values(llmops_gateway_tokens_total{{{NS}}}, model)")
    )
    for name, label in PRICES.items():
        built = built.with_variable(
            dashboard.TextBoxVariable(name)
            .label(label)
            .default_value("0")
            .description(f"{label}, for the estimated costs (llmops usage bills per model).")
        )
    return built


def operator() -> dashboard.Dashboard:
    window = "[$__rate_interval]"
    return board(
        "llmops-operator",
        "llmops / Operator",
        [
            graph(
                "Reconciles/s",
                "ops",
                query(
                    f"sum by (trigger, result) (rate(llmops_operator_reconciles_total{window}))",
                    "{{trigger}} {{result}}",
                ),
            ),
            graph(
                "Reconcile errors/s",
                "ops",
                query(
                    f"sum by (reason) (rate(llmops_operator_reconcile_errors_total{window}))",
                    "{{reason}}",
                ),
            ),
            graph(
                "Reconcile duration",
                "s",
                *quantiles("llmops_operator_reconcile_duration_seconds", "", "trigger"),
            ),
            graph(
                "LLMDeployments by state",
                "short",
                query("sum by (state) (llmops_operator_deployments)", "{{state}}"),
            ),
            graph(
                "Child changes/s",
                "ops",
                query(
                    f"sum by (kind, action) (rate(llmops_operator_child_changes_total{window}))",
                    "{{kind}} {{action}}",
                ),
                width=24,
            ),
        ],
    )


DASHBOARDS: dict[str, Callable[[], dashboard.Dashboard]] = {
    "overview": overview,
    "model-serving": serving,
    "gpus": gpus,
    "gateway": gateway,
    "usage": usage,
    "operator": operator,
}


def render() -> dict[str, str]:
    """File name -> dashboard JSON text."""
    encoder = JSONEncoder(sort_keys=True, indent=2)
    files = {}
    for name, build in DASHBOARDS.items():
        model = json.loads(encoder.encode(build().build()))
        for number, panel in enumerate(model.get("panels", []), start=1):
            panel["id"] = number
            for index, target in enumerate(panel.get("targets", [])):
                target["refId"] = chr(ord("A") + index)
        files[f"llmops-{name}.json"] = json.dumps(model, indent=2, sort_keys=True) + "\n"
    return files


def main() -> None:
    CHART_COPY.mkdir(parents=True, exist_ok=True)
    for name, text in render().items():
        for folder in (HERE, CHART_COPY):
            (folder / name).write_text(text)
        print(f"wrote {name}")


if __name__ == "__main__":
    main()
