"""The Ray Serve ingress: the FastAPI app of ``api.py`` backed by handles to the model deployments."""
from __future__ import annotations

import logging
from typing import Any, AsyncIterator

from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from vlmguard.workers.api import Overloaded, create_api
from vlmguard.workers.config import ServiceConfig
from vlmguard.workers.engine_worker import WorkItem, with_own_seed
from vlmguard.workers.metrics import ServiceMetrics
from vlmguard.workers.response_store import api_responses
from vlmguard.workers.routing import request_routing_key

log = logging.getLogger("vlmguard.workers")


def replica_lost(e: BaseException) -> bool:
    """The call failed because the replica serving it died or cannot be reached, not because of the request's
    own error (which comes back as the replica's answer, or as a task error caused by something else)."""
    return isinstance(e, RayActorError) or isinstance(getattr(e, "cause", None), RayActorError)


def _overloaded(model: str, e: BackPressureError) -> Overloaded:
    return Overloaded(f"server overloaded: model {model!r} has too many queued requests; retry later ({e})",
                      retry_after_s=1.0)


class RayBackend:
    """Routes work to model deployments. Serve picks the replica: by the request's first image (without one, its
    conversation's opening) where the model's ``routing`` is ``image_affinity`` (``routing.py``; the key is set here,
    once), else by power of two choices.

    A call whose replica was lost before it answered (a generation, a model card, a token count) is sent again,
    ``retries`` times (``ServiceConfig.replica_retries``), each resend counted in ``metrics``; a stream also after it
    started (:meth:`stream`)."""

    def __init__(self, handles: dict[str, DeploymentHandle], retries: int = 1, metrics: ServiceMetrics | None = None):
        self.handles = handles
        self.retries = retries
        self.metrics = metrics or ServiceMetrics()
        self._info: dict[str, dict[str, Any]] = {}

    def model_names(self) -> list[str]:
        return list(self.handles)

    async def info(self, model: str) -> dict[str, Any]:
        info = await self._resent(model, None, lambda: self.handles[model].info.remote())
        self._info[model] = info
        return info

    async def tokens(self, model: str, method: str, *args: Any) -> dict[str, Any]:
        return await self._resent(model, None, lambda: self.handles[model].tokens.remote(method, *args))

    async def _resent(self, model: str, item: WorkItem | None, call: Any) -> Any:
        """``await call()``, called again while the replica answering it is lost (:meth:`_again`)."""
        attempt = 0
        while True:
            try:
                return await call()
            except BackPressureError as e:
                raise _overloaded(model, e) from None
            except Exception as e:
                if not replica_lost(e):
                    raise
                self._again(model, item, e, attempt)
            attempt += 1

    def _again(self, model: str, item: WorkItem | None, e: Exception, attempt: int, sent: int = 0) -> None:
        """Count the resend of a call whose replica was lost (``e``, on its ``attempt``-th try from 0, after ``sent``
        tokens of a stream), or raise a 503 ``replica_lost`` when the retries are spent."""
        if attempt >= self.retries:
            tries = f" ({attempt + 1} tries)" if attempt else ""
            raise Overloaded(f"the replica of model {model!r} answering this request was lost before it "
                             f"answered{tries}: {type(e).__name__}; retry later", retry_after_s=1.0,
                             code="replica_lost") from None
        self.metrics.replica_resent()
        log.warning("request %s: the replica of model %r answering it was lost (%s) after %d tokens sent; sending "
                    "it again", item.request_id if item is not None else "(a model card or token call)", model,
                    type(e).__name__, sent)

    async def generate(self, model: str, item: WorkItem) -> dict[str, Any]:
        item.routing_key = request_routing_key(item)
        return await self._resent(model, item, lambda: self.handles[model].generate.remote(item))

    async def stream(self, model: str, item: WorkItem) -> AsyncIterator[dict[str, Any]]:
        """The model's events for ``item``. Where its replica is lost mid-answer, the request is sent again and the new
        answer's first tokens, checked against those already sent, are skipped: the client sees one stream. Its answer
        repeats itself: greedy, or sampled with its seed (one of its own where the request has none,
        :func:`with_own_seed`); a pruner's or decoder's own randomness is seeded too, and where batch-dependent
        rounding changes a token the stream ends with an error naming it (:func:`_check_replay`)."""
        item = with_own_seed(item)
        item.routing_key = request_routing_key(item)
        attempt, sent = 0, []  # (the token ids of the events sent)
        while True:
            gen = self.handles[model].options(stream=True).stream.remote(item)
            replayed, before = 0, len(sent)  # (events of this try repeating those sent, of the ``before`` sent)
            try:
                async for ev in gen:
                    if replayed < before and "error" not in ev:  # (an error the new answer ends with is sent)
                        _check_replay(ev, sent, replayed)
                        replayed += 1
                        continue
                    sent.append(ev.get("token_id"))
                    yield ev
                if replayed < before:
                    _check_replay(None, sent, replayed)
                return
            except BackPressureError as e:
                if sent:
                    raise
                raise _overloaded(model, e) from None
            except Exception as e:
                if not replica_lost(e) or (sent and attempt >= self.retries):
                    raise
                self._again(model, item, e, attempt, len(sent))
            finally:
                gen.cancel()
            attempt += 1


class ResumeDiverged(RuntimeError):
    """A stream sent again after its replica was lost did not repeat the tokens already sent."""


def _check_replay(ev: dict[str, Any] | None, sent: list[Any], k: int) -> None:
    """Raise unless the resent stream's event ``ev`` (None: its end) repeats the ``k``-th of those ``sent``."""
    if ev is None or ev.get("token_id") != sent[k] or (ev.get("done") and k + 1 < len(sent)):
        raise ResumeDiverged(f"the model's replica was lost after {len(sent)} tokens of this answer; sent again, "
                             f"the answer differed at token {k}, so it cannot go on")


@serve.deployment(name="Ingress")
@serve.ingress()
class Ingress:
    def __init__(self, config: dict[str, Any], handles: dict[str, DeploymentHandle],
                 responses: DeploymentHandle | None = None):
        self.config = ServiceConfig(**config)
        self.metrics = ServiceMetrics()
        self.backend = RayBackend(handles, self.config.replica_retries, self.metrics)
        self.responses = api_responses(self.config, responses)

    def __serve_build_asgi_app__(self):
        return create_api(self.backend, self.config, responses=self.responses, metrics=self.metrics)
