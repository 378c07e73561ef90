"""The loader (`llmops fetch`) against a local Hugging Face Hub, and workers reading its cache.

The hub is tests/fakes/hf_hub.py: it serves the embedded MiniLM folder, README.md and
.gitattributes included, with the endpoints and headers huggingface_hub 2.x's
snapshot_download uses. huggingface_hub reads HF_ENDPOINT and HF_HUB_OFFLINE when it is
imported, so the loader and the worker-side load each run in a subprocess of their own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from llmops_services.sources import embedded_file
from tests.fakes.hf_hub import FakeHub, HubRepo

TOKEN = "hf_fake_token_for_the_gated_repo"
LLMOPS = Path(sys.executable).with_name("llmops")
RUN_TIMEOUT_S = 120

WORKER_LOAD = """
import sys
from pathlib import Path
from llmops_services.sources import ModelSourceError, resolve_source
try:
    print(resolve_source(sys.argv[1], Path(sys.argv[2])))
except ModelSourceError as exc:
    sys.exit(f"error: {exc}")
"""
"""What a worker does before vLLM or the encoder loads a model (services/llmops_services/llm.py,
encoder.py): resolve the source in the cache the loader filled."""


@pytest.fixture
def hub() -> Iterator[FakeHub]:
    folder = embedded_file("all-minilm-l6-v2")
    repos = {"acme/minilm": HubRepo(folder), "acme/gated": HubRepo(folder, token=TOKEN)}
    with FakeHub(repos) as running:
        yield running


def _env(hub: FakeHub, home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE_"))}
    env.update(
        HF_ENDPOINT=hub.url,
        HF_HOME=str(home),
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        NO_PROXY="127.0.0.1",
        **extra,
    )
    return env


def fetch(hub: FakeHub, tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """Runs the loader as the loader Job does: `llmops fetch --cache-dir ... SOURCES`."""
    return subprocess.run(
        [str(LLMOPS), "fetch", "--cache-dir", str(tmp_path / "cache"), *args],
        env=_env(hub, tmp_path / "hf-home", **env),
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
        check=False,
    )


def worker_load(hub: FakeHub, tmp_path: Path, source: str) -> subprocess.CompletedProcess[str]:
    """Resolves a source as a worker pod does: HF_HUB_OFFLINE=1 (operator render.py)."""
    return subprocess.run(
        [sys.executable, "-c", WORKER_LOAD, source, str(tmp_path / "cache")],
        env=_env(hub, tmp_path / "hf-home", HF_HUB_OFFLINE="1"),
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
        check=False,
    )


def test_loader_downloads_and_offline_workers_find_the_files(hub: FakeHub, tmp_path: Path) -> None:
    """Issue item 7: a worker with HF_HUB_OFFLINE=1 loads what the loader downloaded.

    huggingface_hub's ``_snapshot_download.py`` checks an offline snapshot against the cached
    repo listing; README.md and .gitattributes are listed but never downloaded. The loader
    reports the commit each hf:// source resolved to (``--report``).
    """
    report = tmp_path / "report.json"
    loaded = fetch(
        hub, tmp_path, "--report", str(report), "hf://acme/minilm", "embedded://all-minilm-l6-v2"
    )

    assert loaded.returncode == 0, loaded.stderr
    commit = hub.repos["acme/minilm"].sha
    snapshot = tmp_path / "cache" / "hf" / "models--acme--minilm" / "snapshots" / commit
    assert f"hf://acme/minilm: {snapshot} (revision {commit})" in loaded.stdout
    served = embedded_file("all-minilm-l6-v2")
    for name in ("config.json", "model.safetensors", "tokenizer.json", "1_Pooling/config.json"):
        assert (snapshot / name).read_bytes() == (served / name).read_bytes()
    assert not (snapshot / "README.md").exists()
    assert json.loads(report.read_text()) == {
        "sources": {
            "hf://acme/minilm": {"revision": commit, "path": str(snapshot)},
            "embedded://all-minilm-l6-v2": {"revision": None, "path": str(served)},
        }
    }
    asked_before = len(hub.requests)

    worker = worker_load(hub, tmp_path, "hf://acme/minilm")

    assert worker.returncode == 0, worker.stderr
    assert worker.stdout.strip() == str(snapshot)
    assert len(hub.requests) == asked_before

    again = fetch(hub, tmp_path, "--report", str(report), "hf://acme/minilm")
    assert again.returncode == 0, again.stderr
    assert json.loads(report.read_text())["sources"]["hf://acme/minilm"]["revision"] == commit


def test_gated_repo_needs_the_token_and_says_where_it_comes_from(
    hub: FakeHub, tmp_path: Path
) -> None:
    """Issue item 8: the Hub answers 401 GatedRepo without a token (utils/_http.py)."""
    refused = fetch(hub, tmp_path, "hf://acme/gated")
    assert refused.returncode != 0
    assert "gated" in refused.stderr
    assert "HF_TOKEN is not set" in refused.stderr
    assert "spec.cache.credentialsSecret" in refused.stderr

    wrong = fetch(hub, tmp_path, "hf://acme/gated", HF_TOKEN="hf_someone_else")
    assert wrong.returncode != 0
    assert "HTTP 403" in wrong.stderr
    assert "the token in HF_TOKEN has no access" in wrong.stderr

    loaded = fetch(hub, tmp_path, "hf://acme/gated", HF_TOKEN=TOKEN)
    assert loaded.returncode == 0, loaded.stderr
    assert hub.requested("HEAD", "/acme/gated/resolve/")[-1].authorization == f"Bearer {TOKEN}"
    worker = worker_load(hub, tmp_path, "hf://acme/gated")
    assert worker.returncode == 0, worker.stderr
    assert (Path(worker.stdout.strip()) / "model.safetensors").is_file()


@pytest.mark.parametrize(
    ("fault", "status"),
    [
        pytest.param("GET /api/models/acme/minilm/revision/main", 503, id="lookup-503"),
        pytest.param("GET /api/models/acme/minilm/revision/main", None, id="lookup-dropped"),
        pytest.param("GET /acme/minilm/resolve/", 503, id="file-503"),
    ],
)
def test_transient_hub_errors_are_retried(
    hub: FakeHub, tmp_path: Path, fault: str, status: int | None
) -> None:
    """huggingface_hub 2.x makes the repo lookup once (hf_api.py model_info) and does not retry
    a file GET that answers 5xx (file_download.py http_get): the loader tries again."""
    hub.fail(fault, status)
    loaded = fetch(hub, tmp_path, "hf://acme/minilm")
    assert loaded.returncode == 0, loaded.stderr
    assert "retrying in 1 s (attempt 2 of 5)" in loaded.stdout
    assert len(hub.requested("GET", "/api/models/acme/minilm/revision/main")) == 2
    worker = worker_load(hub, tmp_path, "hf://acme/minilm")
    assert worker.returncode == 0, worker.stderr


def test_errors_huggingface_hub_retries_are_not_retried_again(hub: FakeHub, tmp_path: Path) -> None:
    """The tree listing goes through http_backoff (utils/_pagination.py): one retry, the
    library's, and no second snapshot_download around it."""
    hub.fail("GET /api/models/acme/minilm/tree/", 503)
    loaded = fetch(hub, tmp_path, "hf://acme/minilm")
    assert loaded.returncode == 0, loaded.stderr
    assert "retrying" not in loaded.stdout
    assert len(hub.requested("GET", "/api/models/acme/minilm/tree/")) == 2
    assert len(hub.requested("GET", "/api/models/acme/minilm/revision/main")) == 1
