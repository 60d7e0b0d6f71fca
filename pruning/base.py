"""The Pruner interface. A pruner decides which visual tokens survive, at one of two hook points:

- vision side (``side = "vision"``, e.g. FlowCut): ``prune_images`` replaces the adapter's image encoding
  and returns, per batch row, the kept visual features and their indices into the full visual token set;
- LLM side (``side = "llm"``, e.g. FastV, AdaptInfer): during prefill the engine runs the decoder layer by
  layer; before each layer it asks ``before_layer`` for an attention-score slice (the engine's cheap score
  facility records it from that layer's own q/k, under SDPA or FlashAttention), after the layer it asks
  ``after_layer`` for a keep mask over the current sequence. Layers after a cut see (and cache) only the
  kept tokens; earlier layers keep their full cache.

Budgets: an int is the number of visual tokens kept per image row, a float in (0, 1] the kept fraction.
``position_mode`` says whether kept tokens keep their original RoPE positions (``original``) or are
renumbered as if the input were physically shorter: ``compact`` after a vision-side cut, ``renumber`` after
each LLM-side cut (the layers after it see contiguous positions and decode from their own next position;
1-D RoPE only). The engine asks ``renumbers_llm_cuts(family)`` whether the LLM-side cuts renumber (default:
``position_mode == "renumber"``; FlowCut's ``compact`` renumbers its stage-L cut on LLaVA-NeXT too).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch
from pydantic import BaseModel

from vlmguard.attention import ScoreRequest
from vlmguard.errors import InvalidInput
from vlmguard.sequence import Seq
from vlmguard.spec import MethodParams


class NoParams(MethodParams):
    """A method without parameters (any key is refused)."""


@dataclass
class PruneContext:
    """What a pruner may look at during one generate() call."""

    adapter: Any  # vlmguard.models.base.ModelAdapter
    batch: Any  # vlmguard.models.base.EncodedBatch (all rows, all branches)
    main_rows: list[int]  # rows that belong to the main branch (one per request)
    n_visual: list[int]  # visual tokens per row before pruning
    text_len: list[int] = field(default_factory=list)  # text tokens per row
    state: dict[str, Any] = field(default_factory=dict)  # per-call scratch space for the pruner
    # method diagnostics for the results; report["per_row"][row] holds entries for that request only
    report: dict[str, Any] = field(default_factory=dict)
    # how errors name each request (its place in the caller's list); None: its main row
    positions: list[int] | None = None
    # report keys whose values hold an entry per row: "rows" (a list by row) or "layers" ({layer: list by row})
    row_keyed: dict[str, str] = field(default_factory=dict)
    # the engine's image encoding (``ModelAdapter.image_features`` on a batch, the prefix cache's tower output where
    # it holds the images); None: the adapter's own
    encode: Callable[[Any], list] | None = None

    def image_features(self, batch: Any = None) -> list[torch.Tensor | None]:
        """Projected visual tokens per row of ``batch`` (default: this context's), unpruned: what a vision-side
        pruner starts from when it does not run the tower itself."""
        batch = self.batch if batch is None else batch
        return (self.encode or self.adapter.image_features)(batch)

    def request_report(self, row: int) -> dict[str, Any]:
        """The report as the request of main row ``row`` sees it: its own rows' entries of the row-keyed values
        (its main row, then its branch rows, as alone) and its ``per_row`` entries, never another request's."""
        own = list(range(row, len(self.n_visual), len(self.main_rows) or 1))
        out: dict[str, Any] = {}
        for key, value in self.report.items():
            if key == "per_row":
                continue
            kind = self.row_keyed.get(key)
            if kind == "rows":
                value = [value[i] for i in own]
            elif kind == "layers":
                value = {layer: [rows[i] for i in own] for layer, rows in value.items()}
            out[key] = value
        return {**out, **self.report.get("per_row", {}).get(row, {})}

    def request_name(self, row: int) -> int:
        """The request a row belongs to, as errors name it (branch rows follow the main rows, request by request
        within each branch)."""
        i = row % len(self.main_rows) if self.main_rows else row
        return i if self.positions is None else self.positions[i]


def merge_report(into: dict[str, Any], part: dict[str, Any]) -> None:
    """Add a report made on some of a batch's rows (``part``: a vision-side pruner's, on the rows the prefix cache
    did not hold) to the batch's: each row's entries are set beside what the row has (the engine's
    ``vision_work``), and so is any other key."""
    for key, value in part.items():
        if key != "per_row":
            into[key] = value
            continue
        per_row = into.setdefault("per_row", {})
        for row, entries in value.items():
            per_row.setdefault(row, {}).update(entries)


# Families whose positions are 1-D RoPE ids, the only ones ``LayerRunner.prefill(renumber=True)`` can renumber
# (Qwen2-VL's 3-D M-RoPE positions are kept).
RENUMBER_FAMILIES = ("llava", "llava_next")


class Pruner:
    name: ClassVar[str] = "base"
    Params: ClassVar[type[BaseModel]] = NoParams
    side: ClassVar[str] = "none"  # "none" | "vision" | "llm" | "both"
    default_budget: ClassVar[int | float | None] = None  # used when a request gives none (None: a budget is needed)
    position_mode: ClassVar[str] = "original"  # "original" | "compact" (vision side) | "renumber" (LLM side)

    def __init__(self, params: BaseModel, budget: int | float | None):
        self.params = params
        self.budget = budget

    # ---- budgets -------------------------------------------------------------------------
    def keep_count(self, n_visual: int) -> int:
        """Visual tokens to keep for a row with ``n_visual`` tokens (clear errors for bad budgets)."""
        b = self.budget
        if b is None:
            return n_visual
        if isinstance(b, bool) or not isinstance(b, (int, float)):
            raise InvalidInput(f"budget must be a number of visual tokens or a ratio in (0, 1], got {b!r}",
                               param="budget")
        if isinstance(b, float):
            if not 0.0 < b <= 1.0:
                raise InvalidInput(f"budget ratio must be in (0, 1], got {b}", param="budget")
            return max(1, int(round(n_visual * b)))
        if b < 1:
            raise InvalidInput(f"budget must keep at least 1 visual token, got {b}", param="budget")
        if b > n_visual:
            raise InvalidInput(f"budget {b} exceeds the {n_visual} visual tokens of the image", param="budget")
        return int(b)

    def check_budget(self, ctx: PruneContext) -> None:
        """Every row's budget against its visual tokens; an error names the request it cannot serve."""
        for r, n in enumerate(ctx.n_visual):
            if n:
                try:
                    self.keep_count(n)
                except InvalidInput as e:
                    raise InvalidInput(f"request {ctx.request_name(r)}: {e}", param=e.param) from None

    # ---- vision side ---------------------------------------------------------------------
    def prune_images(self, ctx: PruneContext) -> tuple[list[torch.Tensor | None], list[torch.Tensor | None]]:
        raise NotImplementedError

    def vision_cache_key(self) -> tuple | None:
        """A key under which the engine's prefix cache may keep what ``prune_images`` made of a row's images and
        give it back for the same images later (neither the tower nor the pruner runs again), or None (default:
        never). A pruner opts in only where, under these settings, a row's output (its kept tokens and indices)
        depends on that row's images alone, never on its text or on the other rows of the batch, and its report
        entries for the row lie in ``report["per_row"][row]``; the key then holds every setting that output depends
        on (the cache belongs to one engine, so one model)."""
        return None

    def _settings_key(self) -> tuple:
        """The method, its budget and every parameter: a ``vision_cache_key`` for a pruner whose output depends on
        nothing else."""
        return (self.name, type(self.budget).__name__, self.budget, self.params.model_dump_json())

    # ---- LLM side ------------------------------------------------------------------------
    def llm_stage(self, family: str) -> bool:
        """Whether this pruner acts inside the LLM's prefill on a model of ``family`` (its layer hooks run);
        default: its ``side`` says so."""
        return self.side in ("llm", "both")

    def renumbers_llm_cuts(self, family: str) -> bool:
        """Whether this pruner's LLM-side cuts renumber the kept tokens contiguously for the following layers
        (``LayerRunner.prefill(renumber=True)``: each layer group then decodes from its own next position) on a
        model of ``family``. Default: ``position_mode == "renumber"`` (a pruner offering that mode refuses
        families outside ``RENUMBER_FAMILIES``, as AdaptInfer does)."""
        return self.position_mode == "renumber"

    def before_layer(self, ctx: PruneContext, layer_idx: int, seq: Seq) -> ScoreRequest | None:
        return None

    def after_layer(self, ctx: PruneContext, layer_idx: int, seq: Seq,
                    scores: ScoreRequest | None) -> torch.Tensor | None:
        return None

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "budget": self.budget, "params": self.params.model_dump()}


def topk_keep_mask(seq: Seq, row_scores: torch.Tensor, keep: list[int]) -> torch.Tensor:
    """Keep mask: all text tokens plus, per row, the ``keep[r]`` visual tokens with the highest score.

    row_scores: (B, L) scores over current positions (only visual positions are compared).
    Ties are broken by position (earlier first), so the choice is deterministic.
    """
    vis = seq.visual_mask()
    mask = ~vis & seq.valid
    for r in range(seq.batch_size):
        idx = vis[r].nonzero().squeeze(1)
        k = min(keep[r], idx.numel())
        if k <= 0 or idx.numel() == 0:
            continue
        s = row_scores[r, idx].float()
        # stable descending sort: break ties by position
        order = torch.argsort(-s, stable=True)[:k]
        mask[r, idx[order]] = True
    return mask
