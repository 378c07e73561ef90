"""A local Prometheus for `llmops up --monitoring`: scrapes the gateway and Ray, runs the rules.

Uses the `prometheus` binary on PATH (Debian/Ubuntu: `apt-get install prometheus`). Series get
the labels a cluster's PodMonitors would give them (namespace, llmops_deployment), so the
shipped dashboards' and rules' queries work unchanged against it. More targets can be added
while it runs: drop a file_sd file (JSON or YAML list of {targets, labels}) into the targets
folder it prints.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import yaml

from llmops_cli.ports import busy_ports
from llmops_gateway.local import stop_process, wait_http_ready

LOCAL_NAMESPACE = "local"
LOCAL_DEPLOYMENT = "local"
SCRAPE_INTERVAL_S = 5
# The alert and recording rules the chart ships, when running from a source checkout.
RULES = Path(__file__).resolve().parents[2] / "deploy" / "rules" / "platform.yaml"


class MonitoringError(RuntimeError):
    """Prometheus could not be found or started; the message says what to do."""


@dataclass(frozen=True)
class LocalPrometheus:
    """A running local Prometheus."""

    url: str
    targets_dir: Path
    """Drop file_sd target files here to scrape more processes."""


def find_prometheus() -> str:
    """The prometheus binary.

    Raises:
        MonitoringError: none on PATH; says how to install it.
    """
    found = shutil.which("prometheus")
    if found is None:
        raise MonitoringError(
            "--monitoring needs the `prometheus` binary on PATH: on Debian/Ubuntu "
            "`sudo apt-get install prometheus`, or download it from prometheus.io"
        )
    return found


def prometheus_config(scrape: dict[str, str], targets_dir: Path, rules: Path | None) -> str:
    """Prometheus configuration: one job per ``scrape`` entry (job -> host:port), plus the
    file_sd targets in ``targets_dir``, all labelled like the in-cluster series."""
    labels = {"namespace": LOCAL_NAMESPACE, "llmops_deployment": LOCAL_DEPLOYMENT}
    jobs: list[dict[str, object]] = [
        {"job_name": job, "static_configs": [{"targets": [target], "labels": labels}]}
        for job, target in scrape.items()
    ]
    jobs.append(
        {
            "job_name": "extra",
            "file_sd_configs": [
                {
                    "files": [str(targets_dir / "*.json"), str(targets_dir / "*.yaml")],
                    "refresh_interval": "5s",
                }
            ],
        }
    )
    config: dict[str, object] = {
        "global": {
            "scrape_interval": f"{SCRAPE_INTERVAL_S}s",
            "evaluation_interval": f"{SCRAPE_INTERVAL_S}s",
        },
        "scrape_configs": jobs,
    }
    if rules is not None:
        config["rule_files"] = [str(rules)]
    return yaml.safe_dump(config, sort_keys=False)


@contextmanager
def run_prometheus(
    scrape: dict[str, str],
    host: str = "127.0.0.1",
    port: int = 9090,
    timeout_s: float = 30.0,
) -> Iterator[LocalPrometheus]:
    """Starts Prometheus scraping ``scrape`` (job -> host:port); stops it and deletes its data
    afterwards.

    Raises:
        MonitoringError: no binary, or it exited or did not get ready within ``timeout_s``.
    """
    binary = find_prometheus()
    # Another server there would answer our readiness check.
    busy = busy_ports(host, {"--prometheus-port": port})
    if busy:
        raise MonitoringError(
            f"cannot listen on {host}: {busy[0]}; choose another --prometheus-port"
        )
    with tempfile.TemporaryDirectory(prefix="llmops-prometheus-") as tmp:
        folder = Path(tmp)
        targets_dir = folder / "targets"
        targets_dir.mkdir()
        config = folder / "prometheus.yml"
        config.write_text(
            prometheus_config(scrape, targets_dir, RULES if RULES.is_file() else None)
        )
        log_path = folder / "prometheus.log"
        log = log_path.open("wb")
        process = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={folder / 'data'}",
                f"--web.listen-address={host}:{port}",
                "--web.enable-lifecycle",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        url = f"http://{host}:{port}"
        try:
            wait_http_ready(
                process,
                f"{url}/-/ready",
                "prometheus",
                timeout_s,
                detail=lambda: ":\n" + log_path.read_text(errors="replace")[-1500:],
                error=MonitoringError,
            )
            yield LocalPrometheus(url=url, targets_dir=targets_dir)
        finally:
            stop_process(process, timeout_s=10)
            log.close()
