"""Model sources: parsing, local folders, the embedded defaults and hf:// failures."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from llmops_services.sources import (
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
        ("s3://bucket/key", "unsupported model source scheme 's3'"),
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
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    # A closed loopback port stands in for a hub that cannot be reached.
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    started = time.monotonic()
    with pytest.raises(ModelSourceError, match="could not download hf://org/model"):
        resolve_source("hf://org/model", cache_dir=tmp_path)
    assert time.monotonic() - started < 60


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
