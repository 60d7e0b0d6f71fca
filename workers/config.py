"""Service configuration (pydantic), read from YAML.

One file format serves both ``vlmguard serve --config FILE`` and Ray's own ``serve run|deploy FILE``: a Ray
Serve config (``applications: [{import_path: vlmguard.workers.app:build_app, args: {...}}]``) whose
application ``args`` are a :class:`ServiceConfig`. A bare ``ServiceConfig`` mapping is accepted too.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from vlmguard.errors import InvalidInput
from vlmguard.models.quantization import CHOICES as QUANT_CHOICES


class BatchingConfig(BaseModel):
    """Dynamic batching of concurrent requests on one replica.

    ``mode: inflight`` (``inflight.InflightBatcher``): requests join the running batch between two decode
    steps, up to ``max_batch_size`` decoding at once; joiners wait up to ``batch_wait_timeout_s`` to share
    one prefill, and so do callers coming back to an idle engine under load (the batch emptied after answering
    several of them). Requests of every built-in decoder join (``Decoder.joinable``); a decoder that is not
    joinable runs as whole batches.
    ``mode: whole`` (``batcher.EngineBatcher``): the next batch is formed when the engine is free, everything
    queued up to ``max_batch_size``; under load (the previous batch held several requests) it also waits up
    to ``batch_wait_timeout_s`` for requests still on their way. In both, a lone request never waits."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    mode: Literal["inflight", "whole"] = "inflight"
    max_batch_size: int = Field(8, ge=1, le=256)
    batch_wait_timeout_s: float = Field(0.02, ge=0.0, le=10.0, allow_inf_nan=False)


# routing: image_affinity's default: requests more in an image's home's queue than in the shortest other before
# the others go first (workers/routing.py)
DEFAULT_ROUTING_SPILL_QUEUE = 2


class ModelConfig(BaseModel):
    """One served model: a deployment of ``num_replicas`` replicas, each holding one Engine."""

    model_config = ConfigDict(extra="forbid")

    name: Optional[str] = None  # the OpenAI ``model`` id; default: ``model``
    model: str = "tiny"  # tiny | local path | HF cache id | random:<family>
    device: str = "auto"
    dtype: str = "auto"
    attn_implementation: str = "auto"
    trust_remote_code: bool = False
    # the language model's linear layers quantized as they load (bitsandbytes; vlmguard/models/quantization.py)
    quantization: Literal[QUANT_CHOICES] = "none"  # type: ignore[valid-type]
    num_replicas: int = Field(1, ge=1)
    num_cpus: float = Field(1.0, ge=0.0)  # per replica
    # GPUs per replica; None: 1 when the replica runs on CUDA (device cuda[:N], or auto on a Ray cluster with
    # GPUs), else 0. Ray hides the GPUs from a replica that reserves none, so a CUDA replica needs > 0.
    num_gpus: Optional[float] = Field(None, ge=0.0)
    torch_threads: Optional[int] = Field(None, ge=1)  # default: max(1, num_cpus)
    max_ongoing_requests: int = Field(32, ge=1)  # per replica (>= max_batch_size to let batches fill)
    max_queued_requests: int = Field(64, ge=-1)  # per caller; beyond it callers get backpressure (-1: no limit)
    batching: BatchingConfig = Field(default_factory=BatchingConfig)
    max_new_tokens_limit: int = Field(1024, ge=1)  # hard cap on a request's max_new_tokens
    # rows of a prefill that begin alike compute that prefix once (Engine.share_prefixes; outputs unchanged)
    share_prefixes: bool = True
    # MiB of the replica's device memory that keep image prefixes (system text and image) of earlier prefills for
    # later requests about the same image: a chat's next turn, another question (Engine.enable_prefix_cache,
    # vlmguard/prefix_cache.py; with share_prefixes). 0: off
    prefix_cache_mb: float = Field(1024.0, ge=0.0)
    # Which replica takes a request (workers/routing.py). ``image_affinity``: the replica that has seen its first
    # image, so its prefix cache serves a chat's next turn, unless that replica's queue is ``routing_spill_queue``
    # requests longer than the shortest other; ``power_of_two``: Serve's default. ``auto``: image_affinity when
    # several replicas keep a prefix cache. The Serve proxy routes HTTP requests unread, so image affinity needs
    # the separate ingress (``ingress: auto`` picks it then).
    routing: Literal["auto", "image_affinity", "power_of_two"] = "auto"
    routing_spill_queue: int = Field(DEFAULT_ROUTING_SPILL_QUEUE, ge=1)

    @model_validator(mode="after")
    def _cuda_needs_a_gpu(self) -> "ModelConfig":
        if self.device.startswith("cuda") and self.num_gpus == 0:
            raise ValueError(f"device {self.device} needs num_gpus > 0 per replica (Ray hides the GPUs from a "
                             "replica that reserves none)")
        if self.quantization != "none" and self.model.startswith("random:"):  # (found here, not by a replica)
            raise ValueError(f"quantization applies to models loaded from files, not {self.model}")
        return self

    @property
    def served_name(self) -> str:
        return self.name or self.model

    def runs_on_cuda(self, cluster_gpus: float) -> bool:
        """Whether a replica runs on CUDA: device cuda[:N], or auto on a cluster with ``cluster_gpus`` >= 1."""
        return self.device.startswith("cuda") or (self.device == "auto" and cluster_gpus >= 1)

    def gpus_per_replica(self, cluster_gpus: float) -> float:
        """The replica's GPU reservation: ``num_gpus`` when set, else 1 for a CUDA replica, else 0."""
        if self.num_gpus is not None:
            return self.num_gpus
        return 1.0 if self.runs_on_cuda(cluster_gpus) else 0.0

    @property
    def routes_by_image(self) -> bool:
        """Whether its deployment's callers route requests by their first image (``routing``, resolved)."""
        if self.routing == "auto":
            return self.num_replicas > 1 and self.share_prefixes and self.prefix_cache_mb > 0
        return self.routing == "image_affinity"

    @property
    def replica_concurrency(self) -> int:
        """Requests a replica runs or collects into batches at once (at least one full batch)."""
        return max(self.max_ongoing_requests, self.batching.max_batch_size if self.batching.enabled else 1)

    @property
    def admission_limit(self) -> int | None:
        """Generations a model-ingress replica admits at once (running or queued); None: no limit."""
        return self.replica_concurrency + self.max_queued_requests if self.max_queued_requests >= 0 else None


def local_gpus() -> float:
    """CUDA GPUs this machine (this process) sees."""
    import torch

    return float(torch.cuda.device_count()) if torch.cuda.is_available() else 0.0


class ServiceConfig(BaseModel):
    """The whole application: models, HTTP limits, security and the ingress deployment."""

    model_config = ConfigDict(extra="forbid")

    models: list[ModelConfig] = Field(default_factory=lambda: [ModelConfig()], min_length=1)
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    route_prefix: str = "/"
    app_name: str = "vlmguard"
    # API keys: any of these (or of the comma-separated keys in env ``api_key_env``) is accepted as
    # ``Authorization: Bearer KEY`` or ``X-API-Key: KEY``. No keys: no auth.
    api_keys: list[str] = Field(default_factory=list)
    api_key_env: Optional[str] = "VLMGUARD_API_KEY"
    max_request_bytes: int = Field(32 * 1024 * 1024, ge=1024)
    max_images_per_request: int = Field(8, ge=0)
    # all of a request's images together (each is also capped at 25 MP, VLMGUARD_MAX_IMAGE_PIXELS): eight 25-MP
    # images that compress to a few hundred KB took ~2 GB to decode and preprocess
    max_request_pixels: int = Field(64_000_000, ge=1)
    request_timeout_s: float = Field(300.0, gt=0)  # 504 after it; a stream is timed to its first token only
    # http(s) image URLs are refused unless they start with one of these prefixes.
    image_url_allowlist: list[str] = Field(default_factory=list)
    image_fetch_timeout_s: float = Field(10.0, gt=0)
    # file:// image URLs are read below this folder (None: refused); for replicas on one machine or a shared disk
    allowed_local_media_path: Optional[str] = None
    # MiB of finished Responses (``store``) kept so that a request can continue one (``previous_response_id``) and
    # GET / DELETE /v1/responses/ID find it; least recently used first out; 0: none kept (workers/response_store.py).
    responses_store_mb: float = Field(64.0, ge=0, allow_inf_nan=False)
    # MiB of the Conversations API's conversations, an LRU of their own beside the responses' (so that responses, every
    # one stored unless a request says otherwise, never evict a conversation); 0: none kept (/v1/conversations is a
    # 400). Kept only where responses are (responses_store_mb > 0), in the same place (memory, or the same file).
    conversations_store_mb: float = Field(64.0, ge=0, allow_inf_nan=False)
    # Where they are kept. ``process``: by each process serving the HTTP API, on its own. ``shared``: by one store
    # deployment that every process of the API calls, so a follow-up may land on any replica. ``auto``: ``shared``
    # when the API runs in more than one process (``api_processes``), else ``process``.
    responses_store: Literal["auto", "process", "shared"] = "auto"
    # Seconds after which a queued or in-progress background response whose process stopped writing its heartbeat
    # (every second) is taken for lost with that process and failed (``server_lost``; workers/background_runs.py).
    background_lost_s: float = Field(30.0, gt=0, allow_inf_nan=False)
    # How many times a lost background response is answered again, from the start, by the process of the API that
    # finds it lost (one not streamed, and not adding to a conversation); 0: it is failed at once.
    background_retries: int = Field(1, ge=0, le=10)
    # A SQLite file to keep them in instead of memory: they outlive a restart of the service (the file is on the
    # machine of the process keeping them: the API's, or the store deployment's when shared).
    responses_store_path: Optional[str] = None
    # Where the HTTP API runs. ``separate``: a FastAPI ingress deployment routing to the model deployments
    # (proxy -> ingress -> model replica; needed to serve several models). ``model``: the model replica is
    # its own FastAPI ingress (proxy -> model replica: one process hop and one pickling of images and
    # results fewer). ``auto``: ``model`` when one model is served (and ingress_replicas is not set) and its
    # requests are not routed by image (``ModelConfig.routing``), else ``separate``.
    ingress: Literal["auto", "separate", "model"] = "auto"
    ingress_replicas: int = Field(1, ge=1)  # separate ingress only
    # Separate ingress only: a request whose model replica died or became unreachable before answering it (killed,
    # out of memory, its node lost) is sent again this many times, Serve picking a live replica; a stream that had
    # started too (what was sent is checked and skipped: a sampled request without a seed is given one). Then a
    # 503 ``replica_lost`` with Retry-After. 0: failed at once. (A request that kills replicas is tried again too.)
    replica_retries: int = Field(1, ge=0, le=5)
    # Ray Serve direct ingress (``RAY_SERVE_ENABLE_DIRECT_INGRESS=1``): every replica of the app's ingress
    # deployment also serves HTTP on a port of its own (``Service.direct_urls``), so a client or load
    # balancer can skip the Serve proxy; the proxy URL keeps working. A cluster-wide flag read when the
    # cluster starts: vlmguard sets it on clusters it starts; start a cluster you join with it set.
    direct_ingress: bool = False
    # Ray Serve's throughput-optimized mode (``RAY_SERVE_THROUGHPUT_OPTIMIZED=1``, Ray >= 2.55): the app's code runs
    # on the replica's own event loop (not a second loop in another thread), requests between deployments go over
    # gRPC, request logs are buffered and replica logs leave stderr (they stay in Ray's log files), and direct
    # ingress is on (so it implies ``direct_ingress``). Cluster-wide, read when the cluster starts, as above.
    throughput_optimized: bool = False
    ingress_max_ongoing_requests: int = Field(256, ge=1)  # separate ingress only

    @field_validator("models")
    @classmethod
    def _unique_names(cls, v: list[ModelConfig]) -> list[ModelConfig]:
        names = [m.served_name for m in v]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"duplicate model names: {', '.join(sorted(dup))} (set `name` to tell them apart)")
        return v

    @field_validator("responses_store_path")
    @classmethod
    def _a_file(cls, v: Optional[str]) -> Optional[str]:
        if v is not None and Path(v).expanduser().is_dir():
            raise ValueError(f"{v} is a folder; name a file in it")
        return v

    @model_validator(mode="after")
    def _prefix(self) -> "ServiceConfig":
        if not self.route_prefix.startswith("/"):
            raise ValueError("route_prefix must start with '/'")
        if self.ingress == "model" and len(self.models) > 1:
            raise ValueError("ingress: model serves one model; use ingress: separate (or auto) for several")
        if self.ingress == "model" and self.ingress_replicas != 1:
            raise ValueError("ingress_replicas applies to a separate ingress; with ingress: model the model's "
                             "num_replicas serve HTTP")
        if self.ingress == "model" and self.models[0].routing == "image_affinity":
            raise ValueError("routing: image_affinity needs a separate ingress (the Serve proxy routes HTTP requests "
                             "without reading their images); use ingress: separate or auto")
        if self.throughput_optimized:  # Ray's mode turns direct ingress on: the service must look for its URLs
            self.direct_ingress = True
        return self

    @property
    def ingress_in_model(self) -> bool:
        """True when the model replica serves the HTTP API itself (no separate ingress deployment)."""
        if self.ingress == "auto":
            return len(self.models) == 1 and self.ingress_replicas == 1 and not self.models[0].routes_by_image
        return self.ingress == "model"

    @property
    def api_processes(self) -> int:
        """The processes serving the HTTP API: the model's replicas when they serve it, else the ingress's."""
        return self.models[0].num_replicas if self.ingress_in_model else self.ingress_replicas

    @property
    def responses_shared(self) -> bool:
        """True when stored Responses are kept by one store deployment for every process of the API."""
        if self.responses_store_mb <= 0:
            return False
        return self.api_processes > 1 if self.responses_store == "auto" else self.responses_store == "shared"

    def resolved_api_keys(self) -> list[str]:
        keys = [k for k in self.api_keys if k]
        if self.api_key_env:
            keys += [k.strip() for k in os.environ.get(self.api_key_env, "").split(",") if k.strip()]
        return keys

    @property
    def default_model(self) -> str:
        return self.models[0].served_name


def parse_config(data: dict[str, Any], source: str = "config") -> ServiceConfig:
    """Accept a Serve config file (first vlmguard application) or a bare ServiceConfig mapping."""
    if not isinstance(data, dict):
        raise InvalidInput(f"{source}: expected a mapping at the top level")
    args: dict[str, Any] = data
    http: dict[str, Any] = {}
    if "applications" in data:
        apps = data.get("applications") or []
        if not isinstance(apps, list):
            raise InvalidInput(f"{source}: applications: expected a list of applications")
        ours = [a for a in apps if isinstance(a, dict) and str(a.get("import_path", "")).startswith("vlmguard.workers")]
        if not ours:
            raise InvalidInput(f"{source}: no application with import_path vlmguard.workers.app:build_app")
        app = ours[0]
        if not isinstance(app.get("args") or {}, dict):
            raise InvalidInput(f"{source}: the application's args: expected a mapping (a ServiceConfig)")
        args = dict(app.get("args") or {})
        args.setdefault("app_name", app.get("name", "vlmguard"))
        args.setdefault("route_prefix", app.get("route_prefix", "/"))
        http = data.get("http_options") or {}
        if not isinstance(http, dict):
            raise InvalidInput(f"{source}: http_options: expected a mapping")
        for key in ("host", "port"):
            if key in http:
                args.setdefault(key, http[key])
    try:
        return ServiceConfig(**args)
    except ValidationError as e:
        from vlmguard.spec import format_validation_error

        raise InvalidInput(format_validation_error(e, f"service config ({source})")) from None


def load_config(path: str | Path | None) -> ServiceConfig:
    if path is None:
        return ServiceConfig()
    from vlmguard.files import read_yaml

    p = Path(path)
    data = read_yaml(p, "service config") or {}
    return parse_config(data, str(p))
