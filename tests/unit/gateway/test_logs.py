"""Log redaction: keys and bearer tokens never reach a log line."""

from __future__ import annotations

import io
import json
import logging

import pytest
import structlog

from llmops_gateway.keys import new_key
from llmops_gateway.logs import configure_logging, events, redact


def test_keys_and_bearer_tokens_are_masked_everywhere() -> None:
    key_id, key = new_key()
    masked = redact({"msg": f"got {key}", "nested": [f"Authorization: Bearer {key}"], "n": 3})
    assert key not in json.dumps(masked)
    assert masked["msg"] == f"got llmops_{key_id}_***"
    assert masked["nested"] == ["Authorization: Bearer ***"]
    assert masked["n"] == 3
    assert redact("Bearer sk-other-vendor-token") == "Bearer ***"


def test_configured_logging_redacts_stdlib_records(monkeypatch: pytest.MonkeyPatch) -> None:
    stream = io.StringIO()
    monkeypatch.setattr("sys.stderr", stream)
    configure_logging("json")
    _, key = new_key()
    logging.getLogger("anything").warning("rejected %s", key, extra={"header": f"Bearer {key}"})
    line = json.loads(stream.getvalue().strip().splitlines()[-1])
    assert key not in stream.getvalue()
    assert line["level"] == "warning"
    assert line["header"] == "Bearer ***"
    logging.getLogger().handlers.clear()


def test_kopf_records_keep_the_object_reference_not_the_settings(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stream = io.StringIO()
    monkeypatch.setattr("sys.stderr", stream)
    configure_logging("json")
    ref = {
        "apiVersion": "llmops.dev/v1alpha1",
        "kind": "LLMDeployment",
        "namespace": "ml",
        "name": "tiny",
        "uid": "u-1",
    }
    extra = {"settings": object(), "k8s_skip": False, "k8s_ref": ref}
    logging.getLogger("llmops.kopf-like").info("created Service/tiny", extra=extra)
    line = json.loads(stream.getvalue().strip().splitlines()[-1])
    assert line["object"] == "LLMDeployment/ml/tiny"
    assert not {"settings", "k8s_skip", "k8s_ref"} & set(line)
    logging.getLogger().handlers.clear()


def test_gateway_events_are_json_lines_with_context_redaction_and_level(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The gateway's own events (structlog's native path, `events`) are the same JSON lines as
    standard-library records: named, levelled, timestamped, carrying the request's context
    variables, redacted; below the configured level nothing is written."""
    stream = io.StringIO()
    monkeypatch.setattr("sys.stderr", stream)
    configure_logging("json")
    key_id, key = new_key()
    structlog.contextvars.bind_contextvars(request_id="req-1")
    try:
        events("llmops.gateway.audit").warning(
            "api key refused", key_id=key_id, detail=[f"Bearer {key}"], raw=f"got {key}"
        )
    finally:
        structlog.contextvars.unbind_contextvars("request_id")
    line = json.loads(stream.getvalue().strip().splitlines()[-1])
    assert key not in stream.getvalue()
    assert line["event"] == "api key refused"
    assert line["logger"] == "llmops.gateway.audit"
    assert line["level"] == "warning"
    assert line["request_id"] == "req-1"
    assert line["detail"] == ["Bearer ***"]
    assert line["raw"] == f"got llmops_{key_id}_***"
    assert line["timestamp"].endswith("Z")

    quiet = io.StringIO()
    monkeypatch.setattr("sys.stderr", quiet)
    configure_logging("json", level=logging.WARNING)
    events("llmops.gateway").info("request settled", tenant="t")
    events("llmops.gateway").warning("kept", tenant="t")
    assert [json.loads(x)["event"] for x in quiet.getvalue().splitlines()] == ["kept"]
    logging.getLogger().handlers.clear()
