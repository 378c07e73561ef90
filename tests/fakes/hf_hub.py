"""A local Hugging Face Hub: the endpoints huggingface_hub's snapshot_download calls.

Point the library at it with ``HF_ENDPOINT=<FakeHub.url>`` (read when huggingface_hub is
imported, so set it before, or in a subprocess). What it reproduces, read from the installed
huggingface_hub 2.x:

- ``hf_api.py`` ``HfApi.model_info``: ``GET /api/models/{repo}[/revision/{rev}]`` answers the
  commit ``sha`` and the ``siblings``; snapshot_download takes the commit from it.
- ``hf_api.py`` ``HfApi.list_repo_tree`` (``utils/_pagination.py``): ``GET
  /api/models/{repo}/tree/{rev}?recursive=true`` answers the listing, with ``oid`` (git blob
  id), ``size`` and ``lfs`` for LFS files; ``_tree_cache.py`` stores it as
  ``trees/<commit>.json``, the listing an offline cache check compares the snapshot with.
- ``file_download.py`` ``get_hf_file_metadata`` and ``http_get``: ``HEAD``/``GET
  /{repo}/resolve/{rev}/{file}`` answer ``X-Repo-Commit``, ``ETag`` (the git blob id) and
  ``Content-Length``; an LFS file answers 302 to a CDN on another origin with
  ``X-Linked-Etag`` (its sha256) and ``X-Linked-Size``, which the library reads from the
  redirect itself, and the CDN download goes without the Authorization header
  (``utils/_http.py`` ``_httpx2_follow_hub_redirects_with_backoff``, ``_is_same_or_hub_host``).
- ``utils/_http.py`` ``hf_raise_for_status``: errors carry ``X-Error-Code`` and
  ``X-Error-Message`` (RepoNotFound, RevisionNotFound, EntryNotFound, GatedRepo). A gated repo
  lists its files to anyone, as the Hub does, and answers its files with 401 GatedRepo
  without a token, 403 GatedRepo with a token that has no access.

``FakeHub.fail`` makes the next matching requests answer a status (503) or close the
connection unanswered, to test retries; ``FakeHub.requests`` records what was asked.

Files are served from a folder: every file in it is in the listing, and the ones the folder's
.gitattributes marks ``filter=lfs`` are LFS files.
"""

from __future__ import annotations

import fnmatch
import functools
import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any, Literal
from urllib.parse import parse_qs, quote, unquote, urlsplit

LFS_POINTER = "version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n"


@dataclass(frozen=True)
class HubFile:
    """One file of a repository, with the ids the Hub reports for it."""

    path: str
    local: Path
    size: int
    blob_id: str
    """The git blob id: of the content, or of the LFS pointer for an LFS file."""
    sha256: str | None
    """The LFS object id; None for a file kept in git."""
    pointer_size: int | None


@dataclass
class HubRepo:
    """A model repository served from a folder.

    Args:
        folder: Its files (a Hugging Face model folder, README.md and .gitattributes included).
        token: When set, the repo is gated: files need ``Authorization: Bearer <token>``.
    """

    folder: Path
    token: str | None = None
    files: dict[str, HubFile] = field(init=False)
    sha: str = field(init=False)
    """The commit every revision of the repo resolves to."""

    def __post_init__(self) -> None:
        lfs_patterns = _lfs_patterns(self.folder)
        self.files = {}
        for local in sorted(p for p in self.folder.rglob("*") if p.is_file()):
            path = local.relative_to(self.folder).as_posix()
            lfs = any(fnmatch.fnmatch(local.name, pattern) for pattern in lfs_patterns)
            self.files[path] = _hub_file(path, local, lfs)
        commit = hashlib.sha1(usedforsecurity=False)
        for hub_file in self.files.values():
            commit.update(f"{hub_file.path}\0{hub_file.blob_id}\n".encode())
        self.sha = commit.hexdigest()

    def folders(self) -> list[str]:
        """Every folder that holds a file, as tree paths."""
        parents = {p.rsplit("/", 1)[0] for p in self.files if "/" in p}
        return sorted(
            {"/".join(p.split("/")[: i + 1]) for p in parents for i in range(p.count("/") + 1)}
        )


def _lfs_patterns(folder: Path) -> list[str]:
    attributes = folder / ".gitattributes"
    if not attributes.is_file():
        return []
    return [
        line.split()[0]
        for line in attributes.read_text().splitlines()
        if "filter=lfs" in line.split()[1:]
    ]


def _hub_file(path: str, local: Path, lfs: bool) -> HubFile:
    size, sha256, content_blob = _digests(local, local.stat().st_size, local.stat().st_mtime_ns)
    if not lfs:
        return HubFile(path, local, size, content_blob, None, None)
    pointer = LFS_POINTER.format(sha256=sha256, size=size).encode()
    pointer_blob = hashlib.sha1(b"blob %d\0" % len(pointer) + pointer, usedforsecurity=False)
    return HubFile(path, local, size, pointer_blob.hexdigest(), sha256, len(pointer))


@functools.cache
def _digests(local: Path, size: int, _mtime_ns: int) -> tuple[int, str, str]:
    """(size, sha256, git blob id) of a file; cached, the embedded weights are 90 MB."""
    sha256 = hashlib.sha256()
    blob = hashlib.sha1(b"blob %d\0" % size, usedforsecurity=False)
    with local.open("rb") as f:
        while chunk := f.read(1 << 20):
            sha256.update(chunk)
            blob.update(chunk)
    return size, sha256.hexdigest(), blob.hexdigest()


@dataclass(frozen=True)
class Request:
    """A request the hub or its CDN received."""

    server: Literal["hub", "cdn"]
    method: str
    path: str
    authorization: str | None


@dataclass
class _Fault:
    match: str
    status: int | None
    times: int


class FakeHub:
    """A Hugging Face Hub on 127.0.0.1, with a CDN for LFS files on a second port.

    Use as a context manager; ``url`` is what HF_ENDPOINT should be.
    """

    def __init__(self, repos: dict[str, HubRepo]) -> None:
        self.repos = repos
        self.requests: list[Request] = []
        self._faults: list[_Fault] = []
        self._lock = threading.Lock()
        self._blobs = {f.sha256: f for r in repos.values() for f in r.files.values() if f.sha256}
        self._hub = self._server("hub")
        self._cdn = self._server("cdn")
        self._threads = [
            threading.Thread(
                target=s.serve_forever,
                kwargs={"poll_interval": 0.05},
                name=f"fake-hf-{s.role}",
                daemon=True,
            )
            for s in (self._hub, self._cdn)
        ]

    def _server(self, role: Literal["hub", "cdn"]) -> _Server:
        server = _Server(("127.0.0.1", 0), _Handler)
        server.hub = self
        server.role = role
        return server

    @property
    def url(self) -> str:
        """The hub's base URL (HF_ENDPOINT)."""
        return f"http://127.0.0.1:{self._hub.server_address[1]}"

    @property
    def cdn_url(self) -> str:
        """Where LFS files are redirected to: another origin, as the Hub's CDN is."""
        return f"http://127.0.0.1:{self._cdn.server_address[1]}"

    def __enter__(self) -> FakeHub:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for server in (self._hub, self._cdn):
            server.shutdown()
            server.server_close()
        for thread in self._threads:
            thread.join(timeout=5)

    def fail(self, match: str, status: int | None = 503, times: int = 1) -> None:
        """Makes the next ``times`` requests whose ``"METHOD path"`` contains ``match`` fail.

        Args:
            match: A substring of e.g. ``"GET /api/models/acme/minilm/revision/main"``.
            status: The status to answer; None closes the connection without an answer.
            times: How many matching requests fail.
        """
        with self._lock:
            self._faults.append(_Fault(match, status, times))

    def requested(self, method: str, path_part: str) -> list[Request]:
        """The recorded requests with this method whose path contains ``path_part``."""
        with self._lock:
            return [r for r in self.requests if r.method == method and path_part in r.path]

    def _record(self, request: Request) -> _Fault | None:
        with self._lock:
            self.requests.append(request)
            line = f"{request.method} {request.path}"
            for fault in self._faults:
                if fault.times > 0 and fault.match in line:
                    fault.times -= 1
                    return fault
        return None


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    hub: FakeHub
    role: Literal["hub", "cdn"]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the hub records requests in FakeHub.requests instead."""

    def do_GET(self) -> None:
        self._dispatch()

    def do_HEAD(self) -> None:
        self._dispatch()

    def _dispatch(self) -> None:
        hub = self.server.hub
        url = urlsplit(self.path)
        path = unquote(url.path)
        fault = hub._record(
            Request(self.server.role, self.command, path, self.headers.get("Authorization"))
        )
        if fault is not None:
            if fault.status is None:
                self._drop()
            else:
                self._send(fault.status, b"upstream unavailable", {"Content-Type": "text/plain"})
            return
        if self.server.role == "cdn":
            self._cdn(path)
            return
        query = parse_qs(url.query)
        parts = path.strip("/").split("/")
        if parts[:2] == ["api", "models"] and len(parts) >= 4:
            repo_id = "/".join(parts[2:4])
            rest = parts[4:]
            if not rest or (len(rest) == 2 and rest[0] == "revision"):
                self._model_info(repo_id, rest[1] if rest else "main")
                return
            if len(rest) >= 2 and rest[0] == "tree":
                recursive = query.get("recursive", ["false"])[0].lower() == "true"
                self._tree(repo_id, rest[1], "/".join(rest[2:]), recursive)
                return
        if len(parts) >= 5 and parts[2] == "resolve":
            self._resolve("/".join(parts[:2]), parts[3], "/".join(parts[4:]))
            return
        self._error(404, "NotFound", "Sorry, we can't find the page you are looking for.")

    # --- the API -----------------------------------------------------------------------

    def _repo(self, repo_id: str, revision: str) -> HubRepo | None:
        repo = self.server.hub.repos.get(repo_id)
        if repo is None:
            # Anonymous callers get 401 for a missing repo: the Hub does not tell private from
            # missing (utils/_http.py maps both to RepositoryNotFoundError).
            status = 404 if self.headers.get("Authorization") else 401
            self._error(status, "RepoNotFound", "Repository not found")
            return None
        if revision not in ("main", repo.sha):
            self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
            return None
        return repo

    def _model_info(self, repo_id: str, revision: str) -> None:
        repo = self._repo(repo_id, revision)
        if repo is None:
            return
        self._json(
            {
                "_id": repo.sha[:24],
                "id": repo_id,
                "modelId": repo_id,
                "author": repo_id.split("/")[0],
                "sha": repo.sha,
                "lastModified": "2026-01-01T00:00:00.000Z",
                "createdAt": "2026-01-01T00:00:00.000Z",
                "private": False,
                "gated": "manual" if repo.token else False,
                "disabled": False,
                "downloads": 0,
                "likes": 0,
                "tags": [],
                "library_name": "sentence-transformers",
                "siblings": [{"rfilename": path} for path in repo.files],
            }
        )

    def _tree(self, repo_id: str, revision: str, under: str, recursive: bool) -> None:
        repo = self._repo(repo_id, revision)
        if repo is None:
            return
        prefix = f"{under}/" if under else ""

        def wanted(path: str) -> bool:
            if not path.startswith(prefix):
                return False
            return recursive or "/" not in path.removeprefix(prefix)

        entries: list[dict[str, Any]] = [
            {"type": "directory", "oid": hashlib.sha1(p.encode()).hexdigest(), "size": 0, "path": p}
            for p in repo.folders()
            if wanted(p)
        ]
        for hub_file in repo.files.values():
            if not wanted(hub_file.path):
                continue
            entry: dict[str, Any] = {
                "type": "file",
                "oid": hub_file.blob_id,
                "size": hub_file.size,
                "path": hub_file.path,
            }
            if hub_file.sha256 is not None:
                entry["lfs"] = {
                    "oid": hub_file.sha256,
                    "size": hub_file.size,
                    "pointerSize": hub_file.pointer_size,
                }
            entries.append(entry)
        self._json(entries)

    def _resolve(self, repo_id: str, revision: str, filename: str) -> None:
        repo = self._repo(repo_id, revision)
        if repo is None:
            return
        if repo.token is not None:
            given = self.headers.get("Authorization")
            if given is None:
                self._error(
                    401,
                    "GatedRepo",
                    f"Access to model {repo_id} is restricted. You must have access to it and "
                    "be authenticated to access it. Please log in.",
                )
                return
            if given != f"Bearer {repo.token}":
                self._error(
                    403,
                    "GatedRepo",
                    f"Access to model {repo_id} is restricted and you are not in the authorized "
                    f"list. Visit {self.server.hub.url}/{repo_id} to ask for access.",
                )
                return
        hub_file = repo.files.get(filename)
        commit = {"X-Repo-Commit": repo.sha}
        if hub_file is None:
            self._error(404, "EntryNotFound", "Entry not found", commit)
            return
        if hub_file.sha256 is not None:
            location = f"{self.server.hub.cdn_url}/{hub_file.sha256}?name={quote(filename)}"
            self._send(
                302,
                f"Found. Redirecting to {location}".encode(),
                {
                    **commit,
                    "Location": location,
                    "ETag": f'"{hub_file.blob_id}"',
                    "X-Linked-Etag": f'"{hub_file.sha256}"',
                    "X-Linked-Size": str(hub_file.size),
                    "Content-Type": "text/plain; charset=utf-8",
                },
            )
            return
        self._file(hub_file, {**commit, "ETag": f'"{hub_file.blob_id}"'})

    def _cdn(self, path: str) -> None:
        hub_file = self.server.hub._blobs.get(path.strip("/"))
        if hub_file is None:
            self._send(404, b"NoSuchKey", {"Content-Type": "text/plain"})
            return
        self._file(hub_file, {"ETag": f'"{hub_file.sha256}"'})

    # --- responses ---------------------------------------------------------------------

    def _file(self, hub_file: HubFile, headers: dict[str, str]) -> None:
        start = 0
        ranged = self.headers.get("Range", "")
        if ranged.startswith("bytes=") and ranged.endswith("-"):
            start = int(ranged.removeprefix("bytes=").removesuffix("-"))
        status = 206 if start else 200
        extra = {"Content-Range": f"bytes {start}-{hub_file.size - 1}/{hub_file.size}"}
        self.send_response(status)
        for name, value in {
            **headers,
            **(extra if start else {}),
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
            "Content-Length": str(hub_file.size - start),
        }.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command == "HEAD":
            return
        with hub_file.local.open("rb") as f:
            f.seek(start)
            while chunk := f.read(1 << 20):
                self.wfile.write(chunk)

    def _json(self, body: Any) -> None:
        self._send(200, json.dumps(body).encode(), {"Content-Type": "application/json"})

    def _error(
        self, status: int, code: str, message: str, headers: dict[str, str] | None = None
    ) -> None:
        self._send(
            status,
            json.dumps({"error": message}).encode(),
            {
                **(headers or {}),
                "Content-Type": "application/json",
                "X-Error-Code": code,
                "X-Error-Message": message,
            },
        )

    def _send(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _drop(self) -> None:
        """Closes the connection without an answer, as a failing load balancer can."""
        self.close_connection = True
