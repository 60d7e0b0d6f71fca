"""Building the Serve application from a :class:`ServiceConfig`.

``build_app`` is also an application builder for Ray's own tooling::

    # serve.yaml
    applications:
      - name: vlmguard
        route_prefix: /
        import_path: vlmguard.workers.app:build_app
        args: {models: [{model: tiny, num_replicas: 2}]}

    serve run serve.yaml      # or: serve deploy serve.yaml against a running cluster
"""
from __future__ import annotations

import os
from typing import Any

from ray.serve import Application
from ray.serve.config import RequestRouterConfig

from vlmguard.registry import PLUGINS_ENV
from vlmguard.workers.config import ModelConfig, ServiceConfig, parse_config
from vlmguard.workers.deployment import ModelApi, ModelWorker
from vlmguard.workers.ingress import Ingress
from vlmguard.workers.response_store_deployment import ResponseStoreReplica
from vlmguard.workers.routing import ImageAffinityRouter


def cluster_gpus() -> float:
    """GPUs of the connected Ray cluster (0 when not connected)."""
    import ray

    return float(ray.cluster_resources().get("GPU", 0.0)) if ray.is_initialized() else 0.0


def deployment_name(model: ModelConfig, index: int) -> str:
    safe = "".join(c if c.isalnum() else "_" for c in model.served_name)[:40]
    return f"ModelWorker_{index}_{safe}"


def with_plugins(actor_options: dict[str, Any]) -> dict[str, Any]:
    """A deployment's actor options, with the plug-in method modules this process names (``$VLMGUARD_PLUGINS``,
    vlmguard/registry.py) in its replicas' environment too, so that they take the same methods (each module must be
    importable there; installed plug-ins' entry points are found without it)."""
    listed = os.environ.get(PLUGINS_ENV, "").strip()
    if not listed:
        return actor_options
    return {**actor_options, "runtime_env": {"env_vars": {PLUGINS_ENV: listed}}}


# Requests the HTTP API of a model-ingress replica takes besides generations (health, models, metrics).
_API_HEADROOM = 8


def response_store(service: ServiceConfig) -> Application | None:
    """The store deployment of the service's Responses, when its API processes share one (``responses_shared``)."""
    if not service.responses_shared:
        return None
    return ResponseStoreReplica.bind(int(service.responses_store_mb * 2**20), service.responses_store_path,
                                     int(service.conversations_store_mb * 2**20))


def model_deployment(model: ModelConfig, index: int, service: ServiceConfig | None = None) -> Application:
    """The model's deployment; with ``service`` it is also the app's HTTP ingress (``ingress: model``)."""
    actor_options: dict[str, Any] = {"num_cpus": model.num_cpus}
    gpus = model.gpus_per_replica(cluster_gpus())
    if gpus:
        actor_options["num_gpus"] = gpus
    common = dict(name=deployment_name(model, index), num_replicas=model.num_replicas,
                  ray_actor_options=with_plugins(actor_options), health_check_period_s=10, health_check_timeout_s=60,
                  graceful_shutdown_timeout_s=5)
    if service is None:
        if model.routes_by_image:
            common["request_router_config"] = RequestRouterConfig(
                request_router_class=ImageAffinityRouter,
                request_router_kwargs={"spill_queue": model.routing_spill_queue})
        return ModelWorker.options(max_ongoing_requests=model.replica_concurrency,
                                   max_queued_requests=model.max_queued_requests, **common).bind(model.model_dump())
    # The replica's own API admits model.admission_limit generations (503 beyond, see ReplicaBackend); the
    # proxy may hand it that many plus the headroom, and holds the rest until a slot frees.
    return ModelApi.options(max_ongoing_requests=(model.admission_limit or 4096) + _API_HEADROOM,
                            max_queued_requests=-1,
                            **common).bind(model.model_dump(), service.model_dump(), response_store(service))


def build_app(args: dict[str, Any] | ServiceConfig | None = None) -> Application:
    """The whole app: the model replicas serving the API themselves (one model), or one deployment per model
    behind a FastAPI ingress deployment."""
    config = args if isinstance(args, ServiceConfig) else parse_config(dict(args or {}), "application args")
    if config.ingress_in_model:  # the Serve proxy routes its HTTP requests unread: power of two choices
        return model_deployment(config.models[0].model_copy(update={"routing": "power_of_two"}), 0, config)
    handles = {m.served_name: model_deployment(m, i) for i, m in enumerate(config.models)}
    return Ingress.options(
        num_replicas=config.ingress_replicas,
        ray_actor_options=with_plugins({"num_cpus": 0}),
        max_ongoing_requests=config.ingress_max_ongoing_requests,
    ).bind(config.model_dump(), handles, response_store(config))


__all__ = ["build_app", "model_deployment", "deployment_name", "response_store"]
