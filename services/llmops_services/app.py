"""Builds the Ray Serve application from a `GraphConfig`.

``build_app`` is also a Ray Serve application builder: a serveConfigV2 entry with
``import_path: llmops_services.app:build_app`` and the config under ``args`` deploys the same
graph on KubeRay that `llmops up` runs locally.
"""

from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve import Application

from llmops_contract import ENCODER_DEPLOYMENT, ROUTER_DEPLOYMENT
from llmops_contract.graph import llm_user_config, router_user_config
from llmops_services.config import GraphConfig
from llmops_services.encoder import EncoderDeployment
from llmops_services.llm import LLMDeployment, deployment_options
from llmops_services.router import Router


def build_app(args: GraphConfig | dict[str, Any]) -> Application:
    """Binds router, encoder and LLM deployments into one application.

    Args:
        args: The graph config, or its dict form (as Ray Serve passes serveConfigV2 args).

    Returns:
        The application; its ingress is the router.
    """
    config = args if isinstance(args, GraphConfig) else GraphConfig.model_validate(args)
    cache_dir = config.model_cache_dir
    llms = {}
    for spec in config.llms:
        # Adapters reach the replicas as user_config, which a Serve config's deployment
        # overrides replace without restarting them; a config given whole carries its own.
        deployment = serve.deployment(LLMDeployment).options(
            **deployment_options(spec), **_user_config(llm_user_config(spec))
        )
        llms[spec.name] = deployment.bind(spec.model_dump(mode="json"), cache_dir)
    encoder = None
    if config.encoder is not None:
        enc = config.encoder
        encoder = (
            serve.deployment(EncoderDeployment)
            .options(
                name=ENCODER_DEPLOYMENT,
                num_replicas=enc.replicas,
                ray_actor_options={"num_cpus": enc.resources.cpus, "num_gpus": enc.resources.gpus},
                max_ongoing_requests=enc.max_batch_size * 8,
            )
            .bind(enc.model_dump(mode="json"), cache_dir)
        )
    router = config.router
    routed: Application = (
        serve.deployment(Router)
        .options(
            name=ROUTER_DEPLOYMENT,
            num_replicas=router.replicas,
            max_ongoing_requests=router.max_ongoing_requests,
            ray_actor_options={"num_cpus": 0.5},
            **_user_config(router_user_config(config)),
        )
        .bind(config.model_dump(mode="json"), llms, encoder)
    )
    return routed


def _user_config(user_config: dict[str, Any] | None) -> dict[str, Any]:
    """The ``user_config`` deployment option, left unset where there is none."""
    return {} if user_config is None else {"user_config": user_config}
