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

AUTO_MODEL = "auto"
"""The model name that asks for semantic routing."""

REQUEST_ID_HEADER = "x-request-id"
"""The request id the gateway sets and the graph's router echoes (and logs)."""
ROUTED_MODEL_HEADER = "x-llmops-routed-model"
"""The model the router picked for ``auto``."""


def llm_deployment_name(model: str) -> str:
    """The Serve deployment name of the LLM serving ``model``."""
    return LLM_DEPLOYMENT_PREFIX + re.sub(r"[^a-z0-9-]", "-", model)
