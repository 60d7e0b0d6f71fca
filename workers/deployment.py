"""The Ray Serve model deployment: one :class:`EngineWorker` per replica, with dynamic batching.

Two deployments share :class:`ModelReplica`: ``ModelWorker`` is called through handles by the separate
FastAPI ingress (``ingress.py``); ``ModelApi`` is the same replica serving the HTTP API itself
(``ServiceConfig.ingress``: ``model``), so a request crosses the Serve proxy and this replica only.

Concurrent ``generate`` calls on a replica are batched in a worker thread, so the replica's event loop stays
free to accept requests and answer health checks: by an :class:`InflightBatcher` (default; requests join the
running batch between decode steps, ``inflight.py``) or an :class:`EngineBatcher` (``batching.mode: whole``:
the next batch is formed when the engine is free; see ``batcher.py`` for why not ``@serve.batch``).
Streaming calls join the in-flight batch too when their decoder can join, else they run alone (one request
per engine call); either way they stop generating when the client goes away.
"""
from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator

from ray import serve

from vlmguard.workers.api import Overloaded, create_api
from vlmguard.workers.batcher import EngineBatcher
from vlmguard.workers.config import ModelConfig, ServiceConfig
from vlmguard.workers.engine_worker import EngineWorker, WorkItem, answer_alone, stream_alone
from vlmguard.workers.inflight import InflightBatcher
from vlmguard.workers.response_store import api_responses



def replica_device(device: str) -> str:
    """The device a replica loads its engine on. Ray shows a replica only the GPUs it reserved
    (``CUDA_VISIBLE_DEVICES``), numbered from 0 there: ``cuda:N`` past them (``cuda:1`` on a one-GPU replica, the
    machine's numbering) names a GPU the replica cannot see, so the replica runs on the GPU Ray gave it."""
    if not device.startswith("cuda:"):
        return device
    import torch

    try:
        index = int(device.split(":", 1)[1])
    except ValueError:
        return device  # Engine.load says what is wrong with it
    if torch.cuda.is_available() and index >= torch.cuda.device_count():
        return "cuda"
    return device


class ModelReplica:
    def __init__(self, config: dict[str, Any]):
        cfg = ModelConfig(**config)
        self.config = cfg
        threads = cfg.torch_threads or max(1, int(cfg.num_cpus))
        self.worker = EngineWorker(cfg.model, name=cfg.served_name, device=replica_device(cfg.device),
                                   dtype=cfg.dtype, attn_implementation=cfg.attn_implementation,
                                   trust_remote_code=cfg.trust_remote_code, torch_threads=threads,
                                   share_prefixes=cfg.share_prefixes, prefix_cache_mb=cfg.prefix_cache_mb,
                                   quantization=cfg.quantization)
        b = cfg.batching
        self.batcher = (InflightBatcher(self.worker, b.max_batch_size, b.batch_wait_timeout_s) if b.mode == "inflight"
                        else EngineBatcher(self.worker.generate_many, b.max_batch_size, b.batch_wait_timeout_s,
                                           cancellable=True))  # a request whose caller left stops generating

    def info(self) -> dict[str, Any]:
        return {**self.worker.info(), "batching": self.config.batching.model_dump(),
                "routing": "image_affinity" if self.config.routes_by_image else "power_of_two"}

    def tokens(self, method: str, *args: Any) -> dict[str, Any]:
        """The worker's ``tokenize`` or ``detokenize`` (the API's /tokenize, /detokenize)."""
        return self.worker.tokens(method, *args)

    async def generate(self, item: WorkItem) -> dict[str, Any]:
        if self.config.batching.enabled:
            return await self.batcher.submit(item)
        return await answer_alone(self.worker, item)  # a request that times out or is dropped stops generating

    async def generate_batch(self, items: list[WorkItem]) -> list[dict[str, Any]]:
        """A caller-made batch (benchmark jobs): one engine call per distinct pruner and decoder."""
        return await asyncio.to_thread(self.worker.generate_many, items)

    async def stream(self, item: WorkItem) -> AsyncIterator[dict[str, Any]]:
        # a streaming request joins the in-flight batch when its decoder can join; else it runs alone
        if (self.config.batching.enabled and isinstance(self.batcher, InflightBatcher)
                and self.batcher.joins(item.spec)):
            async for ev in self.batcher.stream(item):
                yield ev
            return
        async for ev in stream_alone(self.worker, item):
            yield ev

    def check_health(self) -> None:
        if self.worker.engine is None:
            raise RuntimeError("engine not loaded")


ModelWorker = serve.deployment(name="ModelWorker")(ModelReplica)


class ReplicaBackend:
    """The API's backend inside a model replica: calls the replica's own (batched) methods.

    Admission control happens here, so an over-full replica answers the API's own 503 + Retry-After:
    at most ``ModelConfig.admission_limit`` generation requests wait or run at once.
    """

    def __init__(self, replica: "ModelApiReplica"):
        self.replica = replica
        self.limit = replica.config.admission_limit
        self.inflight = 0

    def model_names(self) -> list[str]:
        return [self.replica.config.served_name]

    async def info(self, model: str) -> dict[str, Any]:
        return self.replica.info()

    async def tokens(self, model: str, method: str, *args: Any) -> dict[str, Any]:
        return await asyncio.to_thread(self.replica.tokens, method, *args)  # off the event loop: a long text

    def _admit(self) -> None:
        if self.limit is not None and self.inflight >= self.limit:
            raise Overloaded(f"server overloaded: model {self.replica.config.served_name!r} has {self.inflight} "
                             "requests in flight; retry later", retry_after_s=1.0)
        self.inflight += 1

    async def generate(self, model: str, item: WorkItem) -> dict[str, Any]:
        self._admit()
        try:
            return await self.replica.generate(item)
        finally:
            self.inflight -= 1

    async def stream(self, model: str, item: WorkItem) -> AsyncIterator[dict[str, Any]]:
        self._admit()
        try:
            async for ev in self.replica.stream(item):
                yield ev
        finally:
            self.inflight -= 1


class ModelApiReplica(ModelReplica):
    """A model replica that is also the app's FastAPI ingress (one model per app)."""

    def __init__(self, config: dict[str, Any], service: dict[str, Any], responses: Any = None):
        super().__init__(config)
        self.service = ServiceConfig(**service)
        self.responses = api_responses(self.service, responses)  # (a handle: the store deployment)

    def __serve_build_asgi_app__(self):
        return create_api(ReplicaBackend(self), self.service, responses=self.responses)


ModelApi = serve.deployment(name="ModelWorker")(serve.ingress()(ModelApiReplica))
