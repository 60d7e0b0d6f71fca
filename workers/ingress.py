"""The Ray Serve ingress: the FastAPI app of ``api.py`` backed by handles to the model deployments."""
from __future__ import annotations

from typing import Any, AsyncIterator

from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from vlmguard.workers.api import Overloaded, create_api
from vlmguard.workers.config import ServiceConfig
from vlmguard.workers.engine_worker import WorkItem
from vlmguard.workers.response_store import api_responses
from vlmguard.workers.routing import request_routing_key


class RayBackend:
    """Routes work to model deployments. Serve picks the replica: by the request's first image (without one, its
    conversation's opening) where the model's ``routing`` is ``image_affinity`` (``routing.py``; the key is set here,
    once), else by power of two choices."""

    def __init__(self, handles: dict[str, DeploymentHandle]):
        self.handles = handles
        self._info: dict[str, dict[str, Any]] = {}

    def model_names(self) -> list[str]:
        return list(self.handles)

    async def info(self, model: str) -> dict[str, Any]:
        info = await self.handles[model].info.remote()
        self._info[model] = info
        return info

    async def tokens(self, model: str, method: str, *args: Any) -> dict[str, Any]:
        return await self.handles[model].tokens.remote(method, *args)

    async def generate(self, model: str, item: WorkItem) -> dict[str, Any]:
        item.routing_key = request_routing_key(item)
        try:
            return await self.handles[model].generate.remote(item)
        except BackPressureError as e:
            raise Overloaded(f"server overloaded: model {model!r} has too many queued requests; retry later "
                             f"({e})", retry_after_s=1.0) from None

    async def stream(self, model: str, item: WorkItem) -> AsyncIterator[dict[str, Any]]:
        item.routing_key = request_routing_key(item)
        gen = self.handles[model].options(stream=True).stream.remote(item)
        try:
            async for ev in gen:
                yield ev
        except BackPressureError as e:
            raise Overloaded(f"server overloaded: model {model!r} has too many queued requests; retry later "
                             f"({e})", retry_after_s=1.0) from None
        finally:
            gen.cancel()


@serve.deployment(name="Ingress")
@serve.ingress()
class Ingress:
    def __init__(self, config: dict[str, Any], handles: dict[str, DeploymentHandle],
                 responses: DeploymentHandle | None = None):
        self.config = ServiceConfig(**config)
        self.backend = RayBackend(handles)
        self.responses = api_responses(self.config, responses)

    def __serve_build_asgi_app__(self):
        return create_api(self.backend, self.config, responses=self.responses)
