"""The Decoder interface: the policy of the decode loop.

A decoder declares extra *branches* (image-free, distorted image, another instruction, an irrelevant-token
view ...). The engine runs every branch as its own rows of one batch — one forward per step for all
branches of all requests, each row with its own KV cache entries, prefixes never recomputed — and hands the
decoder the next-token logits of every branch. ``combine`` turns them into the final scores the sampler
picks from. ``setup`` runs before prefill and may do pre-passes through ``ctx.probe_forward`` (e.g. VISTA's
steering vector, IAVA's token selection) and install activation hooks (PyTorch forward hooks on the
model's modules, removed in ``teardown``). ``hidden_layers`` asks the engine for the main branch's
residual stream at those layers on every step (e.g. VISTA's self-logits augmentation); ``head_input`` may
turn them into extra rows for the lm_head, which the engine runs with the step's own rows (one read of its
weights) and hands back as ``StepInputs.head``.
"""
from __future__ import annotations

import contextlib
import functools
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterator

import torch
from pydantic import BaseModel

from vlmguard.models.base import Prompt
from vlmguard.spec import MethodParams


class NoParams(MethodParams):
    """A method without parameters (any key is refused)."""


@dataclass
class Branch:
    """One extra view of a request.

    prompt: what this branch's rows encode (text and images; e.g. images=[] for an image-free branch).
    visual_transform: optional function (features (V, D), row) -> features applied to this branch's
        projected visual tokens (e.g. replacing selected tokens).
    pixel_transform: optional function (pixel values of one image, the image's index in the prompt) -> new
        pixel values, applied to the processor's output for this branch's images (e.g. VCD's noise where the
        processor resizes or crops in ways a pixel-space edit would not survive).
    prune: whether this branch's visual tokens follow the main branch's pruning (see docs/composition).
    cache: whether the engine's prefix cache keeps this branch's rows as it keeps a request's (their image prefix or
        whole prompt, and, as the request finishes, with the answer): worth it where the rows are the same from one
        request to the next about the same image (VCD's noise is seeded by the image, M3ID's view has no image), so
        a chat's next turn or another question takes them; not where they depend on the question (IAVA's masked
        image) or begin as the request's own rows do (LQCD's queries take the request's entries). Every branch's
        rows are looked up either way (the full comparison decides what is taken).
    """

    name: str
    prompt: Prompt
    visual_transform: Callable[[torch.Tensor], torch.Tensor] | None = None
    prune: bool = True
    pixel_transform: Callable[[torch.Tensor, int], torch.Tensor] | None = None
    cache: bool = False


@dataclass
class StepInputs:
    """What ``combine`` sees at one decode step for B requests."""

    logits: dict[str, torch.Tensor]  # branch name -> (B, V) float32 next-token logits; "main" always there
    hidden: dict[int, torch.Tensor]  # layer index -> (B, D) main-branch residual after that layer
    step: int  # 0 for the token right after the prompt
    # (B, V) float32 logits of the rows ``Decoder.head_input`` made from ``hidden`` at this step, computed
    # with the main logits; None when the engine did not (the first step, a step after requests joined)
    head: torch.Tensor | None = None
    # for a decoder with ``penalises_combined``: applies each request's repetition penalties (its
    # GenerationSpec's presence / frequency / repetition penalty, on the tokens it generated) to (B, V) logits of
    # these B requests; None when none of them sets one
    penalise: Callable[[torch.Tensor], torch.Tensor] | None = None


@dataclass
class Combined:
    """Final scores (B, V) the sampler picks from (-inf = excluded), plus what to report per token."""

    scores: torch.Tensor
    main_logprobs: torch.Tensor
    contrast_logprobs: torch.Tensor | None = None
    # the plain distribution a row falls back to where the method leaves it nothing to choose (``min_new_tokens``
    # holding back end-of-sequence, the only token its plausible set kept); None: ``main_logprobs``. A decoder
    # whose expert is not the main row (LQCD on a leading query: the main row is the amateur) sets it.
    fallback_logprobs: torch.Tensor | None = None


@dataclass
class DecodeContext:
    """Handed to ``setup``: the adapter, the main prompts, and a probe for pre-passes."""

    adapter: Any
    prompts: list[Prompt]
    probe_forward: Callable[..., Any]  # engine.probe_forward(prompts, layers=..., score_layers=..., ...)
    sampling: bool
    state: dict[str, Any] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)
    # keys of ``report`` whose value holds one entry per request, in ``prompts`` order: a result shows its own
    # request's entry only (``request_report``), never the others' of its batch (their prompt texts, say)
    per_request: set[str] = field(default_factory=set)
    # Request index of each current main row, in row order (branch row k*len(active)+j belongs to
    # request active[j]). The engine keeps it current as finished requests leave the batch, so per-request
    # state (coefficients) can be mapped to rows in ``combine``. Forward hooks use ``owned_rows(ctx)``.
    active: list[int] = field(default_factory=list)
    # Whether the requests' own prefill may come from a pre-pass (no pruning, no prefill hooks): a decoder that
    # then runs ``probe_forward(..., keep_prefill=True)`` on ``prompts`` (its first rows, in order) hands the
    # result's "prefill" to ``main_prefill``, and the engine decodes the main rows from that cache instead of
    # prefilling them again (IAVA's query pre-pass, iava.md step 1).
    reuse_main_prefill: bool = False
    main_prefill: Any = None

    def add_report(self, shared: dict[str, Any] | None = None, **per_request: list[Any]) -> None:
        """Add report entries: ``shared`` ones describe the whole group, each keyword one list with an entry per
        request (see ``per_request``)."""
        for key, values in per_request.items():
            if len(values) != len(self.prompts):
                raise ValueError(f"report entry {key!r} has {len(values)} entries for {len(self.prompts)} requests")
        self.report.update(shared or {})
        self.report.update(per_request)
        self.per_request.update(per_request)

    def request_report(self, local: int) -> dict[str, Any]:
        """The report as request ``local`` (its index in ``prompts``) sees it: the shared entries, and of each
        per-request entry a one-entry list, its own, as the request alone would show."""
        return {k: [v[local]] if k in self.per_request else v for k, v in self.report.items()}


_FORWARD = threading.local()


@dataclass
class OwnedRows:
    """The rows of the running forward that belong to one decoder context: ``rows`` their positions in the
    forward's batch (None: every row, in order), ``requests`` the context's request index of each."""

    rows: torch.Tensor | None
    requests: torch.Tensor


@contextlib.contextmanager
def forward_owners(owners: dict[int, OwnedRows]) -> Iterator[None]:
    """Declare, for the forward passes run inside the block on this thread, which rows belong to which
    decoder context (keyed by ``id(ctx)``). The engine does this around a cohort's prefill and around every
    decode step (several cohorts share one forward after in-flight joins); any other forward (pre-pass
    probes, a joining batch's prefill as seen by the running batch's hooks) owns no rows of theirs."""
    prev = getattr(_FORWARD, "owners", None)
    _FORWARD.owners = owners
    try:
        yield
    finally:
        _FORWARD.owners = prev


def owned_rows(ctx: DecodeContext) -> OwnedRows | None:
    """The rows of the running forward that belong to ``ctx`` (None: none of them; a hook then leaves the
    forward alone)."""
    owners = getattr(_FORWARD, "owners", None)
    return None if owners is None else owners.get(id(ctx))


class Decoder:
    name: ClassVar[str] = "base"
    Params: ClassVar[type[BaseModel]] = NoParams
    hidden_layers: tuple[int, ...] = ()
    # In-flight batching (``DecodeBatch.absorb``): requests may join a running batch between steps when the
    # decoder keeps its per-request state in the instance, read through ``ctx.active`` in ``combine`` (and
    # through ``owned_rows`` in forward hooks, see ``row_hooks``): each joined group of requests keeps its
    # own decoder instance, branches (one block of rows per group) and step index, and ``combine`` runs
    # once per group on that group's rows (and hidden states). Every built-in decoder is joinable.
    joinable: ClassVar[bool] = False
    # True when the decoder's forward hooks act per request (e.g. VISTA's steering): the engine then declares
    # the rows each decoder context owns in every forward (``forward_owners``), and hooks read them with
    # ``owned_rows(ctx)``, so one forward can carry several joined groups (or a joiner's prefill can run
    # while a batch's hooks are installed) and each hook touches only its own requests' rows.
    row_hooks: ClassVar[bool] = False
    # True when ``combine`` is a function of the logits alone (no per-request state, no step index): one
    # call then serves the rows of every joined group.
    merged_combine: ClassVar[bool] = False
    # True when ``combine`` mixes in logits the model's rows do not carry (VISTA's window read-out): the engine
    # then leaves the rows' logits as they are and hands ``combine`` ``StepInputs.penalise`` to apply the
    # requests' repetition penalties to the mixture, as a logits processor after the model would; otherwise it
    # penalises every row (main and branches) before ``combine``
    penalises_combined: ClassVar[bool] = False

    def __init__(self, params: BaseModel):
        self.params = params

    def setup(self, ctx: DecodeContext) -> None:
        """Before prefill: pre-passes, hooks."""

    @property
    def prefill_hidden_layers(self) -> tuple[int, ...]:
        """Layers whose last-position residual the main prefill records for ``after_prefill`` (default:
        ``hidden_layers``, what the first ``combine`` needs)."""
        return self.hidden_layers

    def after_prefill(self, ctx: DecodeContext, hidden: dict[int, torch.Tensor]) -> None:
        """After the main prefill, before the first token is chosen: ``hidden`` maps each of
        ``prefill_hidden_layers`` to the main rows' residual at the last prompt position (B, D). E.g. VISTA's
        ``vsv_decode_only`` takes its P+ states from here and installs its hooks only now."""

    def branches(self, ctx: DecodeContext, index: int, prompt: Prompt) -> list[Branch]:
        """Extra branches for request ``index`` (every request must get the same branch names)."""
        return []

    def head_input(self, hidden: dict[int, torch.Tensor]) -> torch.Tensor | None:
        """Extra lm_head rows (B, D) from the main rows' ``hidden`` states (``hidden_layers``), whose logits
        ``combine`` then finds in ``StepInputs.head``; None for none. The lm_head reads its weights once for
        these and the step's own rows (it is a weight-bound GEMV at batch 1). ``combine`` must still work
        when ``head`` is None, from ``hidden``: the engine fuses only where it can."""
        return None

    def combine(self, step: StepInputs) -> Combined:
        main = torch.log_softmax(step.logits["main"].float(), dim=-1)
        return Combined(scores=main, main_logprobs=main)

    def teardown(self, ctx: DecodeContext) -> None:
        """After generation (also on errors): remove hooks."""

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "params": self.params.model_dump()}


def plausibility_mask(main_logprobs: torch.Tensor, beta: float) -> torch.Tensor:
    """Adaptive plausibility constraint: keep tokens with p_main >= beta * max p_main. (B, V) bool."""
    if beta <= 0:
        return torch.ones_like(main_logprobs, dtype=torch.bool)
    cutoff = main_logprobs.max(dim=-1, keepdim=True).values + torch.log(torch.tensor(beta))
    return main_logprobs >= cutoff


@functools.lru_cache(maxsize=512)
def values_on(values: tuple, dtype: torch.dtype, device: torch.device | None) -> torch.Tensor:
    """``torch.tensor(values)`` on ``device``, made once per distinct (values, dtype, device), so a decode step
    whose rows did not change copies no list to the GPU (each copy a host sync). Read-only: callers share it."""
    return torch.tensor(values, dtype=dtype, device=device)
