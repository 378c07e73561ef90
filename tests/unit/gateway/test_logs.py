"""Log redaction: keys and bearer tokens never reach a log line."""

from __future__ import annotations

import io
import json
import logging

import pytest

from llmops_gateway.keys import new_key
from llmops_gateway.logs import configure_logging, redact


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
