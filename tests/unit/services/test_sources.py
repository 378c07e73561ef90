"""Model sources: parsing, local folders, the embedded defaults and hf:// failures."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx2
import pytest
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
)

from llmops_services.sources import (
    HF_ATTEMPTS,
    REPORT_LIMIT_BYTES,
    ModelSourceError,
    ResolvedSource,
    default_cache_dir,
    embedded_file,
    fetch_source,
    loader_report,
    parse_source,
    resolve_source,
)


@pytest.mark.parametrize(
    ("uri", "scheme", "location", "revision"),
    [
        ("embedded://smollm2-135m-instruct", "embedded", "smollm2-135m-instruct", None),
        ("hf://org/name", "hf", "org/name", None),
        ("hf://org/name@v1.0", "hf", "org/name", "v1.0"),
        ("s3://my-bucket/models/llama/", "s3", "my-bucket/models/llama", None),
        ("file:///models/x", "local", "/models/x", None),
        ("/models/x", "local", "/models/x", None),
        ("relative/x", "local", "relative/x", None),
    ],
)
def test_parse_source(uri: str, scheme: str, location: str, revision: str | None) -> None:
    parsed = parse_source(uri)
    assert (parsed.scheme, parsed.location, parsed.revision) == (scheme, location, revision)


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("", "empty"),
        ("embedded://gpt-5", "unknown embedded model 'gpt-5'; known: embedded://"),
        ("hf://just-a-name", "hf://org/name"),
        ("hf://org/", "hf://org/name"),
        ("s3://bucket", "s3://bucket/folder"),
        ("s3://Bad_Bucket/model", "s3://bucket/folder"),
        ("pvc://models/llama", "PersistentVolumeClaim"),
        ("gs://bucket/key", "unsupported model source scheme 'gs'"),
    ],
)
def test_parse_errors_say_what_to_fix(uri: str, message: str) -> None:
    with pytest.raises(ModelSourceError, match=message):
        parse_source(uri)


def test_local_folder_must_exist(tmp_path: Path) -> None:
    with pytest.raises(ModelSourceError, match="does not exist"):
        resolve_source(str(tmp_path / "missing"))


def test_local_folder_needs_config_json(tmp_path: Path) -> None:
    with pytest.raises(ModelSourceError, match=r"no config\.json"):
        resolve_source(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["X"]}))
    assert resolve_source(f"file://{tmp_path}") == tmp_path


def test_cache_dir_follows_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMOPS_MODEL_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path
    monkeypatch.delenv("LLMOPS_MODEL_CACHE")
    assert default_cache_dir().parts[-2:] == ("llmops", "models")


def test_embedded_encoder_resolves_to_the_packaged_folder() -> None:
    folder = resolve_source("embedded://all-minilm-l6-v2")
    assert folder == embedded_file("all-minilm-l6-v2")
    assert (folder / "config.json").is_file()
    assert (folder / "model.safetensors").is_file()


@pytest.mark.slow
def test_embedded_gguf_is_converted_once_and_reused() -> None:
    lines: list[str] = []
    folder = resolve_source("embedded://smollm2-135m-instruct", progress=lines.append)
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert "quantization_config" not in config
    assert (folder / "model.safetensors").stat().st_size > 100_000_000
    assert (folder / "tokenizer.json").is_file()
    assert (folder / ".complete").is_file()
    started = time.monotonic()
    again: list[str] = []
    assert resolve_source("embedded://smollm2-135m-instruct", progress=again.append) == folder
    assert again == []
    assert time.monotonic() - started < 1.0


def test_hf_offline_fails_fast_with_a_clear_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelSourceError, match="HF_HUB_OFFLINE is set"):
        resolve_source("hf://HuggingFaceTB/SmolLM2-135M-Instruct", cache_dir=tmp_path)


def test_hf_unreachable_hub_fails_with_a_clear_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """huggingface_hub reads HF_ENDPOINT and HF_HUB_OFFLINE once, at import (constants.py), so
    this test sets what it read; a refused connection is retried, then reported."""
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    # A closed loopback port stands in for a hub that cannot be reached.
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    sleeps: list[float] = []
    monkeypatch.setattr(time, "sleep", sleeps.append)
    with pytest.raises(
        ModelSourceError,
        match=f"could not download hf://org/model from the Hugging Face Hub after {HF_ATTEMPTS} "
        r"attempts \(LocalEntryNotFoundError: .*ConnectError",
    ):
        resolve_source("hf://org/model", cache_dir=tmp_path)
    assert len(sleeps) == HF_ATTEMPTS - 1


def test_hf_uses_the_cache_without_the_network(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker (HF_HUB_OFFLINE=1) finds a repo the loader downloaded with HF_ALLOW_PATTERNS.

    The cache is laid out as huggingface_hub 2.x leaves it after a filtered snapshot_download:
    the snapshot holds the allowed files only, while ``trees/<commit>.json`` (written with the
    library's own ``_tree_cache.write_tree_cache``) lists the whole repo, README.md and
    .gitattributes included. ``_snapshot_download.py``'s ``_raise_if_incomplete_snapshot``
    refuses that snapshot unless the cache check passes the same allow_patterns.
    """
    from huggingface_hub._tree_cache import TreeCacheEntry, write_tree_cache

    commit = "a" * 40
    storage = tmp_path / "hf" / "models--org--cached"
    snapshot = storage / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (snapshot / "model.safetensors").write_bytes(b"weights")
    (storage / "refs").mkdir()
    (storage / "refs" / "main").write_text(commit)
    listing = ["README.md", ".gitattributes", "config.json", "model.safetensors"]
    write_tree_cache(
        str(storage), commit, {name: TreeCacheEntry(size=1, blob_id="0" * 40) for name in listing}
    )
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_source("hf://org/cached", cache_dir=tmp_path) == snapshot
    (snapshot / "model.safetensors").unlink()
    with pytest.raises(ModelSourceError, match="not in the model cache"):
        resolve_source("hf://org/cached", cache_dir=tmp_path)


def test_fetch_source_reports_the_commit_of_hf_sources_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """huggingface_hub keeps a commit in ``snapshots/<commit>``, the folder ``refs/main`` names
    (``_snapshot_download.py``); the commit is read from it, not from the revision asked for."""
    commit = "c" * 40
    storage = tmp_path / "hf" / "models--org--pinned"
    (storage / "snapshots" / commit).mkdir(parents=True)
    (storage / "refs").mkdir()
    (storage / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert fetch_source("hf://org/pinned", cache_dir=tmp_path).revision == commit
    assert fetch_source("embedded://all-minilm-l6-v2").revision is None


def test_loader_report_lists_every_source() -> None:
    resolved = {
        "hf://org/a": ResolvedSource(Path("/cache/hf/a"), "a" * 40),
        "embedded://x": ResolvedSource(Path("/pkg/x")),
    }
    assert json.loads(loader_report(resolved)) == {
        "sources": {
            "hf://org/a": {"revision": "a" * 40, "path": "/cache/hf/a"},
            "embedded://x": {"revision": None, "path": "/pkg/x"},
        }
    }


def test_loader_report_fits_a_termination_message() -> None:
    """The node truncates a termination message over 4096 bytes (k8s.io/api core/v1 types.go,
    Container.TerminationMessagePath)."""
    deep = Path("/cache/" + "d" * 200)
    resolved = {f"hf://org/m{i}": ResolvedSource(deep / str(i), f"{i:040x}") for i in range(30)}
    resolved.update({f"/models/{i}": ResolvedSource(deep / str(i)) for i in range(5)})
    report = json.loads(loader_report(resolved))
    assert report["truncated"] is True
    assert report["sources"] == {
        s: {"revision": r.revision} for s, r in resolved.items() if r.revision
    }

    many = {f"hf://org/model-{i}": ResolvedSource(deep, f"{i:040x}") for i in range(200)}
    text = loader_report(many)
    assert len(text.encode()) <= REPORT_LIMIT_BYTES
    kept = json.loads(text)["sources"]
    assert 40 < len(kept) < 200
    assert list(kept) == list(many)[: len(kept)]
    assert all(kept[s]["revision"] == many[s].revision for s in kept)


HUB = "https://huggingface.co"
INFO = f"{HUB}/api/models/org/model/revision/main"
TREE = f"{HUB}/api/models/org/model/tree/{'f' * 40}"
FILE = f"{HUB}/org/model/resolve/{'f' * 40}/model.safetensors"


def _http_error(
    status: int, method: str, url: str, kind: type[HfHubHTTPError] = HfHubHTTPError
) -> HfHubHTTPError:
    response = httpx2.Response(status, request=httpx2.Request(method, url))
    return kind(f"{status} for {url}", response=response)


def _lookup_failed(cause: Exception) -> Exception:
    """What snapshot_download raises when its repo lookup failed and nothing is cached."""
    error = LocalEntryNotFoundError("An error happened while trying to locate the files")
    error.__cause__ = cause
    return error


def _transport(kind: type[httpx2.TransportError], method: str, url: str) -> Exception:
    return kind("connection trouble", request=httpx2.Request(method, url))


@pytest.mark.parametrize(
    ("failure", "retried_by_us"),
    [
        # HfApi.model_info is one plain request: nothing retries it.
        pytest.param(lambda: _lookup_failed(_http_error(503, "GET", INFO)), True, id="info-503"),
        pytest.param(
            lambda: _transport(httpx2.RemoteProtocolError, "GET", INFO), True, id="info-dropped"
        ),
        pytest.param(
            lambda: _lookup_failed(_transport(httpx2.ConnectError, "GET", INFO)),
            True,
            id="info-refused",
        ),
        # http_get retries 408/429 and resumes after connect, timeout and protocol errors only.
        pytest.param(lambda: _http_error(502, "GET", FILE), True, id="get-502"),
        pytest.param(lambda: _transport(httpx2.ReadError, "GET", FILE), True, id="get-reset"),
        pytest.param(
            lambda: _transport(httpx2.RemoteProtocolError, "GET", FILE), False, id="get-dropped"
        ),
        pytest.param(lambda: _http_error(429, "GET", FILE), False, id="get-429"),
        # A file's HEAD is retried with backoff for statuses, connect errors and timeouts.
        pytest.param(lambda: _lookup_failed(_http_error(503, "HEAD", FILE)), False, id="head-503"),
        pytest.param(
            lambda: _lookup_failed(_transport(httpx2.ConnectTimeout, "HEAD", FILE)),
            False,
            id="head-timeout",
        ),
        pytest.param(
            lambda: _transport(httpx2.RemoteProtocolError, "HEAD", FILE), True, id="head-dropped"
        ),
        # The tree listing goes through http_backoff.
        pytest.param(lambda: _lookup_failed(_http_error(503, "GET", TREE)), False, id="tree-503"),
        # Not transient at all.
        pytest.param(lambda: _http_error(401, "HEAD", FILE, GatedRepoError), False, id="gated-401"),
        pytest.param(lambda: _http_error(404, "GET", INFO), False, id="info-404"),
        pytest.param(lambda: OSError(28, "No space left on device"), False, id="disk-full"),
    ],
)
def test_hf_download_retries_what_huggingface_hub_did_not(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    failure: Callable[[], Exception],
    retried_by_us: bool,
) -> None:
    """Which failures huggingface_hub 2.x retries itself was read from the installed library:
    utils/_http.py (http_backoff, _DEFAULT_RETRY_ON_STATUS_CODES), utils/_pagination.py (the
    tree listing), file_download.py (a file's HEAD retried after a fast first try; http_get),
    hf_api.py (model_info: one request). The loader retries the others, and only those."""
    import huggingface_hub

    calls: list[dict[str, Any]] = []
    sleeps: list[float] = []

    def snapshot_download(repo_id: str, **kwargs: Any) -> str:
        calls.append(kwargs)
        if kwargs.get("local_files_only"):
            raise LocalEntryNotFoundError("not cached")
        if len(calls) == 2:
            raise failure()
        return str(tmp_path / "snapshots" / ("e" * 40))

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(time, "sleep", sleeps.append)
    lines: list[str] = []
    if retried_by_us:
        resolved = fetch_source("hf://org/model", cache_dir=tmp_path, progress=lines.append)
        assert resolved.revision == "e" * 40
        assert sleeps == [1.0]
        assert any("retrying in 1 s (attempt 2 of 5)" in line for line in lines)
    else:
        with pytest.raises(ModelSourceError, match="hf://org/model"):
            resolve_source("hf://org/model", cache_dir=tmp_path, progress=lines.append)
        assert sleeps == []
    assert len(calls) == (3 if retried_by_us else 2)


def test_hf_download_gives_up_after_a_few_capped_tries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub

    sleeps: list[float] = []
    downloads: list[str] = []

    def snapshot_download(repo_id: str, **kwargs: Any) -> str:
        if kwargs.get("local_files_only"):
            raise LocalEntryNotFoundError("not cached")
        downloads.append(repo_id)
        raise _lookup_failed(_http_error(503, "GET", INFO))

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(time, "sleep", sleeps.append)
    with pytest.raises(ModelSourceError, match=f"after {HF_ATTEMPTS} attempts"):
        resolve_source("hf://org/model", cache_dir=tmp_path)
    assert len(downloads) == HF_ATTEMPTS
    assert sleeps == [1.0, 2.0, 4.0, 8.0]
