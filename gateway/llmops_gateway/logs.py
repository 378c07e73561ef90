"""Logging for the gateway: structlog, configured once in `main()`, stdlib routed through it.

Every record passes a redaction processor that masks API keys and bearer tokens wherever they
appear, at every level; the request id set per request rides along from a context variable.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any, Literal

import structlog

KEY_PATTERN = re.compile(r"llmops_([0-9a-f]{12})_[A-Za-z0-9_\-]+")
BEARER_PATTERN = re.compile(r"(?i)(bearer\s+)[^\s\"',]+")


ANY_SECRET = re.compile(r"llmops_[0-9a-f]{12}_|bearer\s", re.IGNORECASE)


def _mask(text: str) -> str:
    # One scan finds nothing in almost every string; only then are two substitutions run.
    if ANY_SECRET.search(text) is None:
        return text
    text = KEY_PATTERN.sub(r"llmops_\1_***", text)
    return BEARER_PATTERN.sub(r"\1***", text)


def redact(value: Any) -> Any:
    """Masks keys and bearer tokens inside strings, lists and dicts."""
    if isinstance(value, str):
        return _mask(value)
    if isinstance(value, dict):
        return {k: redact(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(redact(v) for v in value)
    return value


def redact_secrets(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """structlog processor: redacts every field of every event."""
    for key, value in list(event_dict.items()):
        event_dict[key] = redact(value)
    return event_dict


def compact_kopf_extras(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """structlog processor: Kopf attaches its whole settings object and an object reference to
    each record; keep the reference as ``object`` (kind/namespace/name), drop the rest."""
    event_dict.pop("settings", None)
    event_dict.pop("k8s_skip", None)
    ref = event_dict.pop("k8s_ref", None)
    if isinstance(ref, dict):
        parts = (ref.get("kind"), ref.get("namespace"), ref.get("name"))
        event_dict["object"] = "/".join(p for p in parts if p)
    return event_dict


def configure_logging(
    output: Literal["json", "console"] = "json", level: int = logging.INFO
) -> None:
    """Configures structlog and routes the standard library's loggers through it."""
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.stdlib.ExtraAdder(),
        compact_kopf_extras,
    ]
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if output == "json"
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            redact_secrets,
            structlog.processors.format_exc_info,
            renderer,
        ],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
