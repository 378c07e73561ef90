"""Names two deployables must spell alike: each is defined here once and imported everywhere.

A rename on one side only breaks the other silently (replica overrides that miss, queries that
match nothing, a gateway that finds no LLMDeployment), so tests/unit/test_contract.py fails
when one of these values is typed out again anywhere else in the source tree.
"""

from __future__ import annotations

import re

GROUP = "llmops.dev"
"""API group of the LLMDeployment custom resource (the operator serves it, the gateway reads
it for discovery)."""
VERSION = "v1alpha1"
KIND = "LLMDeployment"
PLURAL = "llmdeployments"
API_VERSION = f"{GROUP}/{VERSION}"

APP_NAME = "llmops"
"""The Serve application of the graph: `llmops up` runs it under this name, the operator
renders it into a RayService's serveConfigV2 and reads its status back."""
GRAPH_IMPORT_PATH = "llmops_services.app:build_app"
"""The Serve application builder a serveConfigV2 names (``import_path``); it takes the graph
config as its ``args``."""
ROUTER_DEPLOYMENT = "router"
"""The graph's ingress deployment."""
ENCODER_DEPLOYMENT = "encoder"
"""The embedding model's deployment."""
LLM_DEPLOYMENT_PREFIX = "llm-"
"""Every LLM's Serve deployment is named this prefix plus its model name (see
`llm_deployment_name`); Prometheus queries and the local CPU placement match on it."""

MODEL_KIND = "LLMModel"
MODEL_PLURAL = "llmmodels"
"""One LLMModel per model of an LLMDeployment (same group and version): that model's scale
target. Its /scale subresource is what KEDA and `kubectl scale` write for the model alone; the
operator carries its replica count to the model's Serve deployment and worker group."""

HELD_REQUESTS_METRIC = "llmops_gateway_held_requests"
"""Gauge, label ``model``: requests the gateway holds for a model that has no serving replica
(scaled to zero, or starting). The operator's per-model KEDA trigger activates on it, so the
held request itself wakes the model."""

SCALED_TO_ZERO_CODE = "model_scaled_to_zero"
"""The OpenAI error ``code`` of the router's 503 for a model with no running replica (scaled to
zero, or its first replica still starting). The gateway holds such a request, with its quota
reserved, and relays it once the model serves, instead of passing the 503 on."""

TOKENIZER_PATH = "/llmops/models/{model}/tokenizer.json"
"""Where the graph's router serves a model's ``tokenizer.json`` (the file the engine loads), so
the gateway counts prompt tokens with the model's own tokenizer."""

AUTO_MODEL = "auto"
"""The model name that asks for semantic routing."""

REQUEST_ID_HEADER = "x-request-id"
"""The request id the gateway sets and the graph's router echoes (and logs)."""
ROUTED_MODEL_HEADER = "x-llmops-routed-model"
"""The model the router picked for ``auto``."""


def llm_deployment_name(model: str) -> str:
    """The Serve deployment name of the LLM serving ``model``."""
    return LLM_DEPLOYMENT_PREFIX + re.sub(r"[^a-z0-9-]", "-", model)
