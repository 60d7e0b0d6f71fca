"""The dashboard's links to the outside: the vlmguard service (HTTP client) and the Ray Jobs API.

Pages never build these themselves; they call :func:`service_client` / :func:`jobs_backend`, which return
the object stored in ``st.session_state`` under :data:`CLIENT_KEY` / :data:`JOBS_KEY` when there is one
(tests inject stubs there) and otherwise the real thing built from :class:`DashboardConfig`.
"""
from __future__ import annotations

import shlex
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, Iterator, Protocol, Sequence, TypeVar

from vlmguard.dashboard.config import DashboardConfig
from vlmguard.errors import VlmguardError

CLIENT_KEY = "vlmguard_client"
JOBS_KEY = "vlmguard_jobs"


# ---- the generation service -------------------------------------------------------------------------


class GenerationClient(Protocol):
    """What the dashboard's pages use of :class:`vlmguard.client.Client`."""

    def health(self) -> dict[str, Any]: ...

    def models(self) -> Any: ...

    def generate(self, prompt: str, images: Sequence[Any] = (), *, model: str | None = None, **spec: Any) -> Any: ...

    def generate_stream(self, prompt: str, images: Sequence[Any] = (), *, model: str | None = None,
                        **spec: Any) -> Iterator[Any]: ...

    def chat_stream(self, prompt: str | None = None, images: Sequence[Any] = (), *,
                    messages: list[dict[str, Any]] | None = None, model: str | None = None, **kwargs: Any
                    ) -> Iterator[Any]: ...

    def tokenize(self, text: str, *, model: str | None = None, add_special_tokens: bool = True) -> Any: ...

    def metrics(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class ModelFacts:
    """What the playground draws a model's results with, from the service's ``ModelCard``."""

    family: str | None = None
    grid_side: int | None = None  # visual tokens per side of an image's (base) grid; None: follows the image
    reference_aspect: str | None = None  # what image_aspect "reference" does here (pad | native); None: by family
    quantization: str | None = None  # how the weights were quantized as they loaded (none | bnb-int8 | bnb-nf4)

    @classmethod
    def from_card(cls, card: dict[str, Any]) -> "ModelFacts":
        return cls(card.get("family"), card.get("grid_side"), card.get("reference_image_aspect"),
                   card.get("quantization"))


def model_label(name: str, facts: ModelFacts | None) -> str:
    """A served model's name, with its weights' quantization when they are quantized (``llava [bnb-nf4]``): the
    label ``vlmguard report`` gives its runs (``report.model_label``)."""
    from vlmguard.bench.report import model_label as run_label

    return run_label({"model": name, "quantization": facts.quantization if facts is not None else None})


@dataclass
class ServiceStatus:
    ok: bool
    url: str
    models: list[str] = field(default_factory=list)
    message: str = ""
    facts: dict[str, ModelFacts] = field(default_factory=dict)  # per model, from its ModelCard
    refused_key: bool = False  # it answered, but 401/403: the API key is missing or wrong


def make_client(cfg: DashboardConfig, *, probe: bool = False) -> GenerationClient:
    from vlmguard.client import Client

    if probe:  # fail fast: the page must not hang when nothing listens
        return Client(cfg.service_url, cfg.api_key, timeout=3.0, max_retries=0)
    return Client(cfg.service_url, cfg.api_key, timeout=300.0, max_retries=2)


def probe_service(client: GenerationClient, url: str) -> ServiceStatus:
    """Is the service up, and which models does it serve? Never raises."""
    try:
        models = client.models()
        data = getattr(models, "data", models)
        cards = [m if isinstance(m, dict) else m.model_dump() for m in data]
        names = [c["id"] for c in cards]
    except Exception as e:  # noqa: BLE001 - any failure means "not reachable" to the page
        msg = getattr(e, "message", None) or str(e) or type(e).__name__
        return ServiceStatus(False, url, [], msg, refused_key=getattr(e, "status", None) in (401, 403))
    if not names:
        return ServiceStatus(False, url, [], "the service serves no model")
    return ServiceStatus(True, url, names, "", {c["id"]: ModelFacts.from_card(c) for c in cards})


PLAYGROUND_TOP_LOGPROBS = 3  # alternatives per generated token the playground shows


def spec_kwargs(pruning: str, budget: int | float | None, pruning_params: dict[str, Any], decoding: str,
                decoding_params: dict[str, Any], max_new_tokens: int, seed: int | None = None,
                selection: dict[str, Any] | None = None, image_aspect: str = "native") -> dict[str, Any]:
    """GenerationSpec fields for ``Client.generate`` (diagnostics and the top 3 log-probabilities on: the
    playground draws them); ``selection``: token selection and penalty fields (``selection_kwargs``);
    ``image_aspect`` only when not the processor's own."""
    spec: dict[str, Any] = {"pruning": pruning, "decoding": decoding, "max_new_tokens": int(max_new_tokens),
                            "diagnostics": True, "logprobs": PLAYGROUND_TOP_LOGPROBS}
    if pruning != "none":
        spec["budget"] = budget
        if pruning_params:
            spec["pruning_params"] = pruning_params
    if decoding_params:
        spec["decoding_params"] = decoding_params
    if seed is not None:
        spec["seed"] = int(seed)
    if image_aspect != "native":
        spec["image_aspect"] = image_aspect
    spec.update(selection or {})
    return spec


def selection_kwargs(temperature: float, seed: int, presence: float, frequency: float,
                     repetition: float, choices: Sequence[str] = (), guided: dict[str, Any] | None = None,
                     top_p: float = 1.0, min_p: float = 0.0) -> dict[str, Any]:
    """The GenerationSpec fields of the playground's token selection: temperature 0 is greedy (the seed, top-p and
    min-p then do nothing; each goes only when it is set); each penalty only when it is set; ``choices`` (the
    answer is one of them) and ``guided`` (the answer's format) only when given."""
    out: dict[str, Any] = {}
    if temperature > 0:
        out.update(do_sample=True, temperature=float(temperature), seed=int(seed))
        out.update({k: float(v) for k, v, off in (("top_p", top_p, 1.0), ("min_p", min_p, 0.0)) if v != off})
    for key, value, neutral in (("presence_penalty", presence, 0.0), ("frequency_penalty", frequency, 0.0),
                                ("repetition_penalty", repetition, 1.0)):
        if value != neutral:
            out[key] = float(value)
    if choices:
        out["choices"] = list(choices)
    if guided:
        out["guided"] = dict(guided)
    return out


BASELINE_SPEC = {"pruning": "none", "decoding": "greedy"}

# GenerationSpec fields whose OpenAI chat parameter has another name; the rest keep theirs (``Client.chat`` sends
# vlmguard's own, pruning / decoding / diagnostics / do_sample / image_aspect, in the request's vlmguard object)
_CHAT_NAMES = {"max_new_tokens": "max_tokens", "choices": "guided_choice"}


def chat_kwargs(spec: dict[str, Any]) -> dict[str, Any]:
    """``spec_kwargs``'s fields as ``Client.chat_stream`` keyword arguments: the same request through the
    OpenAI-compatible chat endpoint (without a temperature, as the native request, the decoder's own selection).
    The log-probabilities' count becomes ``logprobs`` + ``top_logprobs``; the usage (the prompt's tokens, those
    from the prefix cache) comes with the stream's last chunk."""
    out = {_CHAT_NAMES.get(k, k): v for k, v in spec.items() if k not in ("logprobs", "guided")}
    out.update(chat_format(spec.get("guided")))
    if spec.get("logprobs") is not None:
        out.update(logprobs=True, top_logprobs=int(spec["logprobs"]))
    out["stream_options"] = {"include_usage": True}
    return out


def chat_format(guided: dict[str, Any] | None) -> dict[str, Any]:
    """A spec's ``guided`` format as chat parameters: OpenAI's ``response_format`` for any JSON object, vLLM's
    ``guided_json`` / ``guided_regex`` / ``guided_grammar`` for the others, ``json_whitespace`` (a vlmguard option)
    where it is not the default."""
    if not guided:
        return {}
    out: dict[str, Any] = {}
    if guided.get("json_object"):
        out["response_format"] = {"type": "json_object"}
    for kind, name in (("json_schema", "guided_json"), ("regex", "guided_regex"), ("grammar", "guided_grammar")):
        if guided.get(kind) is not None:
            out[name] = guided[kind]
    if guided.get("whitespace", "flexible") != "flexible":
        out["json_whitespace"] = guided["whitespace"]
    return out


def failure_message(e: Exception, timeout: float, page: str) -> str:
    """What a failed request tells the page's user: the service's message, and for a timeout what to do about it
    (the client's own advice, a larger ``timeout=``, is for programmers)."""
    from vlmguard.client import APITimeoutError

    if isinstance(e, APITimeoutError):
        return (f"the service sent nothing for {timeout:g} s (the {page}'s limit): ask for fewer new tokens, or see "
                "whether the service is overloaded (its /metrics)")
    return getattr(e, "message", None) or str(e)


# ---- Ray Jobs -------------------------------------------------------------------------------------------


@dataclass
class JobRow:
    job_id: str
    status: str
    entrypoint: str = ""
    message: str = ""
    start_time: int | None = None  # ms since the epoch (Ray's convention)
    end_time: int | None = None
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def started(self) -> str:
        return _fmt_ms(self.start_time)

    @property
    def ended(self) -> str:
        return _fmt_ms(self.end_time)

    @property
    def bench_args(self) -> str:
        """The ``vlmguard bench`` arguments of a benchmark job (its entrypoint after the module name)."""
        parts = shlex.split(self.entrypoint) if self.entrypoint else []
        if "vlmguard.workers.bench_job" in parts:
            return shlex.join(parts[parts.index("vlmguard.workers.bench_job") + 1:])
        return self.entrypoint

    @property
    def db(self) -> str | None:
        parts = shlex.split(self.entrypoint) if self.entrypoint else []
        for i, p in enumerate(parts):
            if p == "--db" and i + 1 < len(parts):
                return parts[i + 1]
            if p.startswith("--db="):
                return p[5:]
        return None


def _fmt_ms(ms: int | None) -> str:
    if not ms:
        return ""
    return datetime.fromtimestamp(ms / 1000.0, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


class JobsBackend(Protocol):
    address: str

    def list_jobs(self) -> list[JobRow]: ...

    def submit(self, bench_argv: list[str]) -> str: ...

    def logs(self, job_id: str) -> str: ...

    def stop(self, job_id: str) -> bool: ...


JOBS_PROBE_TIMEOUT_S = 3.0
JOBS_CALL_TIMEOUT_S = 10.0  # one Jobs API call of the page: list the jobs, a job's logs, stop a job
# a submission waits up to workers.jobs.AGENT_WAIT_S (90 s) for a freshly started head node's job agent
JOBS_SUBMIT_TIMEOUT_S = 100.0
_T = TypeVar("_T")
_stuck_calls: dict[str, threading.Thread] = {}  # Jobs API address -> a call that ran out of time and still waits


class JobsApiTimeout(VlmguardError):
    """The Ray Jobs API did not answer a call in time."""


class JobsApiStuck(JobsApiTimeout):
    """A call not sent: an earlier call to the same Jobs API ran out of time and still waits for its answer."""


def probe_jobs_api(address: str, timeout: float = JOBS_PROBE_TIMEOUT_S) -> None:
    """VlmguardError unless something answers HTTP at ``address`` within ``timeout`` seconds (any status: a cluster
    with token auth answers 401 here). Ray's ``JobSubmissionClient`` sets no timeout, so an address that takes the
    connection and never answers (a stuck head node, a firewall that drops packets) held the page forever."""
    import httpx

    try:
        httpx.get(address.rstrip("/") + "/api/version", timeout=timeout)
    except httpx.HTTPError as e:
        raise VlmguardError(f"cannot reach the Ray Jobs API at {address} ({type(e).__name__}: "
                            f"{' '.join(str(e).split())[:200] or 'no answer'}, waited {timeout:g} s)") from None


def call_with_deadline(call: Callable[[], _T], address: str, what: str, timeout: float) -> _T:
    """``call()``, waited for at most ``timeout`` seconds, else :class:`JobsApiTimeout`. Ray's ``JobSubmissionClient``
    sets no timeout on its requests and has no setting for one, so a cluster that stops answering would hold the page
    forever: the call runs on a daemon thread, left to end on its own when it runs out of time. Until it ends, calls
    to the same address fail at once, so a page that refreshes every few seconds does not pile up waiting threads."""
    stuck = _stuck_calls.get(address)
    if stuck is not None and stuck.is_alive():
        raise JobsApiStuck(f"the Ray Jobs API at {address} is not answering: an earlier call ({stuck.name}) still "
                           "waits for it")
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = call()
        except BaseException as e:  # noqa: BLE001 - raised again in the caller's thread
            outcome["error"] = e

    worker = threading.Thread(target=run, name=what, daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        _stuck_calls[address] = worker
        raise JobsApiTimeout(f"the Ray Jobs API at {address} did not answer ({what}) within {timeout:g} s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


class RayJobsBackend:
    """Benchmark jobs through :mod:`vlmguard.workers.jobs` (Ray's ``JobSubmissionClient``), every call bounded by
    :func:`call_with_deadline`."""

    def __init__(self, address: str | None = None):
        from vlmguard.workers import jobs

        self._jobs = jobs
        self.address = jobs.jobs_address(address)
        self._client = None
        self.timeout = JOBS_CALL_TIMEOUT_S
        self.submit_timeout = JOBS_SUBMIT_TIMEOUT_S

    def _bounded(self, call: Callable[[], _T], what: str, timeout: float | None = None) -> _T:
        return call_with_deadline(call, self.address, what, self.timeout if timeout is None else timeout)

    def _c(self):
        if self._client is None:
            probe_jobs_api(self.address)  # fails in 3 s with a clearer message when nothing answers at all
            # raises VlmguardError when unreachable
            self._client = self._bounded(lambda: self._jobs.client(self.address), "connect")
        return self._client

    def list_jobs(self) -> list[JobRow]:
        client = self._c()
        rows = []
        for j in self._bounded(client.list_jobs, "list jobs"):
            rows.append(JobRow(
                job_id=j.submission_id or j.job_id or "?",
                status=str(getattr(j.status, "value", j.status)),
                entrypoint=j.entrypoint or "",
                message=j.message or "",
                start_time=j.start_time,
                end_time=j.end_time,
                metadata=dict(j.metadata or {}),
            ))
        return sorted(rows, key=lambda r: r.start_time or 0, reverse=True)

    def submit(self, bench_argv: list[str]) -> str:
        try:
            return self._bounded(lambda: self._jobs.submit_bench(bench_argv, address=self.address), "submit",
                                 self.submit_timeout)
        except JobsApiStuck:
            raise
        except JobsApiTimeout as e:  # the request may have reached the cluster before it stopped answering
            raise JobsApiTimeout(f"{e}; the job may have been submitted all the same: see the job list") from None

    def logs(self, job_id: str) -> str:
        return self._bounded(lambda: self._jobs.logs(job_id, self.address), f"logs of {job_id}")

    def stop(self, job_id: str) -> bool:
        return self._bounded(lambda: self._jobs.stop(job_id, self.address), f"stop {job_id}")


def bench_argv(benchmark: str, *, db: str, limit: int | None, splits: Sequence[str] = (), pruning: str = "none",
               budget: int | float | None = None, decoding: str = "greedy", decoding_params: dict[str, Any] | None = None,
               dataset: str = "synthcoco", model: str | None = None, batch_size: int | None = None,
               max_new_tokens: int | None = None) -> list[str]:
    """The argument list of ``vlmguard job submit bench ...`` for one sweep point."""
    argv = [benchmark, "--dataset", dataset, "--db", db]
    if benchmark != "chair":
        for s in splits:
            argv += ["--split", s]
    if limit:
        argv += ["--limit", str(int(limit))]
    if model:
        argv += ["--model", model]
    if pruning and pruning != "none":
        argv += ["--pruning", pruning]
        if budget is not None:
            argv += ["--budget", str(budget)]
    if decoding and decoding != "greedy":
        argv += ["--decoding", decoding]
    for k, v in (decoding_params or {}).items():
        argv += ["--decoding-param", f"{k}={v}"]
    if batch_size:
        argv += ["--batch-size", str(int(batch_size))]
    if max_new_tokens:
        argv += ["--max-new-tokens", str(int(max_new_tokens))]
    return argv
