"""Drives the language model layer by layer: prefill (with LLM-side pruning hooks) and cached decode.

The engine owns the decode loop instead of calling ``generate()`` because pruning changes the sequence
between layers and contrastive decoders need several branches per step. The model's own modules do all
the math (decoder layers, rotary embedding, norm, lm_head); this module only routes tensors, builds
attention masks and keeps per-layer bookkeeping:

- ``layer_valid[i]``: which cached key slots of layer i are real (padding / pruned tokens are absent or
  masked). Layers before a pruning cut cache the full sequence, layers after it only the kept tokens.
- positions: decode continues from each row's last prompt position + 1 (original RoPE positions, or
  M-RoPE text positions for Qwen2-VL), whatever was pruned. When a pruner renumbers at its cuts
  (``prefill(renumber=True)``, AdaptInfer's ``position_mode="renumber"``), the kept tokens get contiguous
  positions for the following layers and each layer group decodes from *its own* next position
  (``layer_next_positions``).
"""
from __future__ import annotations

import inspect
from contextlib import nullcontext
from dataclasses import dataclass, field
from itertools import groupby
from typing import Callable

import torch
from transformers import DynamicCache

from vlmguard.attention import ScoreRequest, score_probe
from vlmguard.kv_cache import GrowingCache
from vlmguard.prefill_groups import length_groups
from vlmguard.prefix_cache import CachedPrefix, CacheLookup, PrefixCache, plan_prefill
from vlmguard.prefix_sharing import PrefixPlan, split
from vlmguard.sequence import Seq, additive_mask, causal_allowed, compact_positions, stack_rows

# A prefill hook: (layer_idx, seq) -> ScoreRequest | None before the layer; after the layer
# (layer_idx, seq, request) -> keep mask (B, L) | None.
BeforeHook = Callable[[int, Seq], ScoreRequest | None]
AfterHook = Callable[[int, Seq, ScoreRequest | None], torch.Tensor | None]
# Extra lm_head rows a decoder needs at a decode step, from the captured hidden states (see decode_step).
HeadInput = Callable[[dict[int, torch.Tensor]], torch.Tensor | None]


def _cache_keyword(layer: torch.nn.Module) -> str:
    """The keyword a decoder layer takes its KV cache by: ``cache`` in recent transformers 5.x (5.24
    deprecates ``past_key_values``, to be removed in 5.40), ``past_key_values`` in earlier ones."""
    params = inspect.signature(layer.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


@dataclass
class DecodeState:
    cache: DynamicCache
    layer_valid: list[torch.Tensor]  # per layer (B, S_i) bool
    next_positions: torch.Tensor  # (B,) or (3, B): layer 0's, and every layer's unless layer_next_positions
    # per layer, only when layer groups number differently (renumbering cuts): one tensor object per group,
    # as layer_valid; None = every layer decodes at next_positions
    layer_next_positions: list[torch.Tensor] | None = None
    visual_per_layer: list[torch.Tensor] = field(default_factory=list)  # per layer (B,) visual tokens fed
    # the prefill's final sequence without its hidden states (``_layout``): which visual tokens each row kept. Only
    # a fresh prefill's rows have one (merge drops it), so a batch that never drains pins no prefill's tensors.
    final_seq: Seq | None = None
    hidden_dtype: torch.dtype | None = None  # the prefill's residual stream's: decode embeds its tokens in it
    # per row, the prompt tokens another row computed for it (a shared prefix); None: none shared
    shared_tokens: list[int] | None = None
    # per row, the prompt tokens it took from the prefix cache (vlmguard.prefix_cache); None: none
    cached_tokens: list[int] | None = None


class LayerRunner:
    def __init__(self, adapter, flash: bool = False, eager: bool = False):
        self.adapter = adapter
        self.flash = flash
        self.eager = eager  # eager attention applies no causal rule of its own: its prefill mask is always given
        self._cache_kw = _cache_keyword(adapter.layers[0])

    # ---- masks ---------------------------------------------------------------------------
    def _prefill_mask(self, seq: Seq) -> torch.Tensor | None:
        if self.flash:
            return None if bool(seq.valid.all()) else seq.valid.long()
        if not self.eager and bool(seq.valid.all()):
            return None  # lets SDPA use its causal fast path
        return additive_mask(causal_allowed(seq.valid, seq.valid), seq.hidden.dtype)

    def _decode_masks(self, key_valid: list[torch.Tensor], dtype: torch.dtype) -> list[torch.Tensor | None]:
        """The decode step's mask of each distinct key-validity tensor (None where every key is valid). One host
        sync for all of them, before any layer is queued: a check per layer group inside the layer loop would
        make a GPU drain the layers already queued before the next group could be launched."""
        whole = torch.stack([v.all() for v in key_valid]).tolist()
        return [None if ok else self._decode_mask(v, dtype) for v, ok in zip(key_valid, whole)]

    def _decode_mask(self, key_valid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if self.flash:
            return key_valid.long()
        return additive_mask(key_valid[:, None, :], dtype)

    # ---- prefill -------------------------------------------------------------------------
    @torch.no_grad()
    def prefill(
        self,
        seq: Seq,
        before: BeforeHook | None = None,
        after: AfterHook | None = None,
        hidden_layers: tuple[int, ...] = (),
        all_hidden: bool = False,
        renumber: bool = False,
        share_prefixes: bool = False,
        prefix_cache: PrefixCache | None = None,
        store_rows: list[int] | None = None,
    ) -> tuple[torch.Tensor, DecodeState, dict[int, torch.Tensor]]:
        """Run all layers on ``seq``. Returns last-position logits (B, V), the decode state and the
        residual stream of the last position after each layer in ``hidden_layers`` (B, D).

        ``renumber``: after each cut the kept tokens of a row get contiguous positions (0..n-1 over its
        valid tokens, 1-D RoPE only), what a physically shorter input gets; each layer then decodes from its
        own next position (the official LLaVA code of AdaptInfer). Otherwise they keep their positions.

        ``share_prefixes``: rows that begin with the same tokens compute them once (:mod:`vlmguard.prefix_sharing`)
        where that saves enough; only without hooks (no layer cuts tokens) and without ``all_hidden``. Under
        FlashAttention-2 the second pass gives the kernel the 2-D key mask, whose last columns un-pad the queries.

        ``prefix_cache`` (with ``share_prefixes``): rows whose image prefix an earlier prefill computed take its keys
        and values (:mod:`vlmguard.prefix_cache`), and the image prefixes of ``store_rows`` (default all) that it did
        not hold are kept for later prefills. Under the same conditions, rows whose work differs greatly are
        prefilled in separate passes (:mod:`vlmguard.prefill_groups`)."""
        if share_prefixes and before is None and after is None and not all_hidden:
            lookup = prefix_cache.lookup(seq) if prefix_cache is not None else None
            return self._prefill_planned(seq, lookup, hidden_layers, prefix_cache, store_rows)
        return self._run_layers(seq, before, after, hidden_layers, all_hidden, renumber)

    @torch.no_grad()
    def final_hidden(self, seq: Seq) -> torch.Tensor:
        """The final norm's output at every position of ``seq`` (B, L, D), what the lm_head reads to score each
        position's next token (prompt log-probabilities, vlmguard/prompt_logprobs.py): every layer over the whole
        sequence, no cut; the cache it fills is dropped."""
        ad = self.adapter
        h, cache, mask = seq.hidden, GrowingCache(), self._prefill_mask(seq)
        rope = ad.rotary(h, seq.positions)
        for layer in ad.layers:
            h = layer(h, attention_mask=mask, position_embeddings=rope, **{self._cache_kw: cache}, use_cache=True)
        return ad.norm(h)

    def _run_layers(self, seq: Seq, before: BeforeHook | None, after: AfterHook | None,
                    hidden_layers: tuple[int, ...], all_hidden: bool, renumber: bool,
                    ) -> tuple[torch.Tensor, DecodeState, dict[int, torch.Tensor]]:
        """One pass of every layer over ``seq``, with the hooks' cuts (:meth:`prefill` without shared prefixes)."""
        ad = self.adapter
        cache = GrowingCache()  # a DynamicCache that appends in place (no per-step re-concatenation)
        layer_valid: list[torch.Tensor] = []
        layer_next: list[torch.Tensor] = []  # per layer, one object per stage group (renumber only)
        visual_fed: list[torch.Tensor] = []
        captured: dict[int, torch.Tensor] = {}
        h = seq.hidden
        mask = self._prefill_mask(seq)
        rope = ad.rotary(h, seq.positions)
        next_pos = first_next = seq.last_positions() + 1
        renumbered = False
        for i, layer in enumerate(ad.layers):
            seq = seq.with_hidden(h)
            req = before(i, seq) if before else None
            layer_valid.append(seq.valid)
            layer_next.append(next_pos)
            visual_fed.append(seq.visual_counts())
            with score_probe(ad.attention_module(i), req) if req is not None else nullcontext():
                h = layer(h, attention_mask=mask, position_embeddings=rope, **{self._cache_kw: cache}, use_cache=True)
            if all_hidden or i in hidden_layers:
                # the last position's copy, not a view: a view would keep the layer's whole (B, L, D) output alive
                captured[i] = h[:, -1].clone() if not all_hidden else h
            keep = after(i, seq.with_hidden(h), req) if after else None
            if keep is not None and i + 1 < len(ad.layers):
                seq, _ = seq.with_hidden(h).select(keep)
                if renumber:
                    seq = compact_positions(seq)
                    next_pos = seq.last_positions() + 1
                    renumbered = True
                h = seq.hidden
                mask = self._prefill_mask(seq)
                rope = ad.rotary(h, seq.positions)
        seq = seq.with_hidden(h)
        logits = ad.logits(ad.norm(h[:, -1:]))[:, 0]
        state = DecodeState(cache=cache, layer_valid=layer_valid,
                            next_positions=first_next if renumbered else seq.last_positions() + 1,
                            layer_next_positions=layer_next if renumbered else None,
                            visual_per_layer=visual_fed, final_seq=_layout(seq), hidden_dtype=h.dtype)
        return logits, state, captured

    def _prefill_planned(self, seq: Seq, lookup: CacheLookup | None, hidden_layers: tuple[int, ...],
                         prefix_cache: PrefixCache | None, store_rows: list[int] | None,
                         ) -> tuple[torch.Tensor, DecodeState, dict[int, torch.Tensor]]:
        """:meth:`prefill` of rows that may share prefixes and take cached ones (``lookup``: the prefix cache's
        lookup of ``seq``, None without a cache): in groups of similar work where that saves enough
        (:func:`vlmguard.prefill_groups.length_groups`), else in one shared or plain pass."""
        plan, lookup = plan_prefill(seq, prefix_cache, lookup)
        groups = length_groups(seq.valid.sum(dim=1).tolist(), plan)
        if groups is not None:
            return self._prefill_groups(seq, groups, lookup, hidden_layers, prefix_cache, store_rows)
        if plan is not None:
            return self.prefill_shared(seq, plan, hidden_layers, prefix_cache=prefix_cache, lookup=lookup,
                                       store_rows=store_rows)[:3]
        logits, state, captured = self._run_layers(seq, None, None, hidden_layers, False, False)
        if lookup is not None:
            prefix_cache.store(seq, lookup, state.cache, state.layer_valid, store_rows)
        return logits, state, captured

    def _prefill_groups(self, seq: Seq, groups: list[list[int]], lookup: CacheLookup | None,
                        hidden_layers: tuple[int, ...], prefix_cache: PrefixCache | None,
                        store_rows: list[int] | None) -> tuple[torch.Tensor, DecodeState, dict[int, torch.Tensor]]:
        """Each group of rows of ``seq`` prefilled alone (re-left-padded to its own longest row), the states
        merged as one prefill's, its rows in ``seq``'s order."""
        parts = []
        for rows in groups:
            sub = seq.rows(torch.tensor(rows, dtype=torch.long, device=seq.valid.device))
            sub = sub.select(sub.valid)[0]
            mine = None if store_rows is None else [k for k, r in enumerate(rows) if r in store_rows]
            look = None if lookup is None else lookup.rows(rows, sub.length)
            parts.append(self._prefill_planned(sub, look, hidden_layers, prefix_cache, mine))
        logits = torch.cat([p[0] for p in parts])
        captured = {i: torch.cat([p[2][i] for p in parts]) for i in parts[0][2]}
        state = parts[0][1]
        for _, other, _ in parts[1:]:
            state = self._merge_prefills(state, other)
        order = [r for rows in groups for r in rows]
        if order != sorted(order):  # back to seq's rows
            back = [order.index(r) for r in range(len(order))]
            index = torch.tensor(back, dtype=torch.long, device=logits.device)
            self.reorder(state, back)
            logits, captured = logits[index], {i: h[index] for i, h in captured.items()}
            state.final_seq = state.final_seq.rows(index)
            state.visual_per_layer = [v[index] for v in state.visual_per_layer]
            state.shared_tokens = None if state.shared_tokens is None else [state.shared_tokens[r] for r in back]
            state.cached_tokens = None if state.cached_tokens is None else [state.cached_tokens[r] for r in back]
        return logits, state, captured

    def _merge_prefills(self, a: DecodeState, b: DecodeState) -> DecodeState:
        """:meth:`merge` of two fresh prefills' states, with what a fresh prefill's state also reports (its layout,
        visual tokens per layer, shared and cached tokens per row)."""
        merged = self.merge(a, b)
        merged.final_seq = stack_rows([a.final_seq, b.final_seq])
        merged.visual_per_layer = [torch.cat([x, y]) for x, y in zip(a.visual_per_layer, b.visual_per_layer)]
        na, nb = a.next_positions.shape[-1], b.next_positions.shape[-1]
        for name in ("shared_tokens", "cached_tokens"):
            x, y = getattr(a, name), getattr(b, name)
            if x is not None or y is not None:
                setattr(merged, name, (x or [0] * na) + (y or [0] * nb))
        return merged

    @torch.no_grad()
    def prefill_shared(self, seq: Seq, plan: PrefixPlan, hidden_layers: tuple[int, ...] = (),
                       score_layers: tuple[int, ...] = (), per_head: bool = False,
                       prefix_cache: PrefixCache | None = None, lookup: CacheLookup | None = None,
                       store_rows: list[int] | None = None,
                       ) -> tuple[torch.Tensor, DecodeState, dict[int, torch.Tensor], dict[int, torch.Tensor]]:
        """:meth:`prefill` in two passes: the groups' shared prefixes, one row each, then every row's remainder
        on a cache that starts with its prefix (its group's, or the one it takes from the prefix cache, ``plan.cached``;
        a row with neither has an empty one). A row's keys are its prefix's slots, then its own (each part
        left-padded: masked slots between them), the layout decoding continues from (``final_seq``). With
        ``prefix_cache`` and its ``lookup``, the image prefixes of ``store_rows`` (default all) it lacked are kept.

        Also returns, for each layer of ``score_layers``, the last position's attention probabilities over that
        layout's keys ((B, H, 1, K) with ``per_head``, else (B, 1, K)), as the score facility records them."""
        ad = self.adapter
        prefix, rest = split(seq, plan)
        computed = None
        if prefix is not None:
            computed = GrowingCache()
            h = prefix.hidden
            mask, rope = self._prefill_mask(prefix), ad.rotary(h, prefix.positions)
            for layer in ad.layers:
                h = layer(h, attention_mask=mask, position_embeddings=rope, **{self._cache_kw: computed},
                          use_cache=True)
        # the prefixes: the computed ones (rows 0..G-1), each cache entry taken (one row each), an empty one
        entries: dict[int, int] = {}
        taken = []
        for e in plan.cached or ():
            if e is not None and id(e) not in entries:
                entries[id(e)] = len(taken)
                taken.append(e)
        n_lead = len(plan.leaders)
        cached = plan.cached or [None] * seq.batch_size
        source = [g if g >= 0 else (n_lead + entries[id(e)] if e is not None else n_lead + len(taken))
                  for g, e in zip(plan.group, cached)]
        parts = ([_layout(prefix)] if prefix is not None else []) + [_entry_layout(e) for e in taken]
        empty = Seq(hidden=seq.hidden.new_empty((1, 0, 0)), valid=seq.valid.new_zeros((1, 0)),
                    positions=seq.positions.new_zeros((*seq.positions.shape[:-2], 1, 0)),
                    visual=seq.visual.new_zeros((1, 0)))
        pool = stack_rows(parts + [empty])
        width = pool.length
        index = torch.tensor(source, dtype=torch.long, device=seq.valid.device)
        prefix_valid = pool.valid[index]
        # (source, rows) of each run of consecutive rows with one source
        runs = [(src, len(list(rows))) for src, rows in groupby(source)]
        shared = GrowingCache()
        for i in range(len(ad.layers)):
            # each run's prefix (one row, broadcast over the run), written once into the layer's buffer
            blocks = [_prefix_block(computed, taken, i, src, n_lead, rows) for src, rows in runs]
            keys, values = [k for k, _ in blocks], [v for _, v in blocks]
            if hasattr(shared, "fill_layer"):  # room for the remainders, written once
                shared.fill_layer(i, keys, values, width, room=width + rest.length)
            else:  # another cache class (a test's reference DynamicCache)
                shared.update(_left_padded(keys, width), _left_padded(values, width), i)
        del computed
        key_valid = torch.cat([prefix_valid, rest.valid], dim=1)
        if self.flash:  # un-padded through the key mask; flash's causal rule aligns each row's own tokens last
            mask = key_valid.long()
        else:
            allowed = torch.cat([prefix_valid[:, None, :].expand(-1, rest.length, -1),
                                 causal_allowed(rest.valid, rest.valid)], dim=2)
            mask = additive_mask(allowed, rest.hidden.dtype)
        h = rest.hidden
        rope = ad.rotary(h, rest.positions)
        captured: dict[int, torch.Tensor] = {}
        scores: dict[int, torch.Tensor] = {}
        last = torch.full((h.shape[0], 1), rest.length - 1, dtype=torch.long, device=h.device)
        for i, layer in enumerate(ad.layers):
            req = (ScoreRequest(query_index=last, key_mask=key_valid, query_pos=last + width, per_head=per_head)
                   if i in score_layers else None)
            with score_probe(ad.attention_module(i), req) if req is not None else nullcontext():
                h = layer(h, attention_mask=mask, position_embeddings=rope, **{self._cache_kw: shared}, use_cache=True)
            if req is not None:
                scores[i] = req.probs
            if i in hidden_layers:
                captured[i] = h[:, -1].clone()
        logits = ad.logits(ad.norm(h[:, -1:]))[:, 0]
        layout = Seq(hidden=h.new_empty((h.shape[0], key_valid.shape[1], 0)), valid=key_valid,
                     positions=torch.cat([pool.positions[..., index, :], rest.positions], dim=-1),
                     visual=torch.cat([pool.visual[index], rest.visual], dim=1))
        n_layers = len(ad.layers)
        state = DecodeState(cache=shared, layer_valid=[key_valid] * n_layers,
                            next_positions=rest.last_positions() + 1,
                            visual_per_layer=[layout.visual_counts()] * n_layers, final_seq=layout,
                            hidden_dtype=h.dtype, shared_tokens=plan.shared_tokens(),
                            cached_tokens=plan.cached_tokens())
        if prefix_cache is not None and lookup is not None:
            prefix_cache.store(seq, lookup, shared, state.layer_valid, store_rows)
        return logits, state, captured, scores

    # ---- decode --------------------------------------------------------------------------
    @torch.no_grad()
    def decode_step(self, tokens: torch.Tensor, state: DecodeState, hidden_layers: tuple[int, ...] = (),
                    head_input: HeadInput | None = None,
                    ) -> tuple[torch.Tensor, dict[int, torch.Tensor], torch.Tensor | None]:
        """One token per row -> next logits (B, V). Updates the cache and masks in place.

        ``head_input`` maps the captured hidden states to extra rows (R, D) for the lm_head (or None): they
        go through it in one call with the step's own rows, so its weights are read once (at batch 1 the
        lm_head is a weight-bound GEMV). Returns the logits, the captured states and the extra rows' logits
        (R, V) float32, None without extra rows."""
        ad = self.adapter
        h = ad.embed_tokens(tokens[:, None]).to(state.hidden_dtype if state.hidden_dtype is not None
                                                 else ad.model.dtype)
        layer_pos = state.layer_next_positions or [state.next_positions] * len(ad.layers)
        ropes: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # once per distinct position group
        for pos in layer_pos:
            if id(pos) not in ropes:
                ropes[id(pos)] = ad.rotary(h, pos[..., None])  # (B, 1) or (3, B, 1)
        captured: dict[int, torch.Tensor] = {}
        ones = torch.ones(tokens.shape[0], 1, dtype=torch.bool, device=tokens.device)
        new_valid: dict[int, torch.Tensor] = {}  # once per distinct key-validity tensor (stage grouping)
        for v in state.layer_valid:
            if id(v) not in new_valid:
                new_valid[id(v)] = torch.cat([v, ones], dim=1)
        masks = dict(zip(new_valid, self._decode_masks(list(new_valid.values()), h.dtype)))
        for i, layer in enumerate(ad.layers):
            key = id(state.layer_valid[i])
            h = layer(h, attention_mask=masks[key], position_embeddings=ropes[id(layer_pos[i])],
                      **{self._cache_kw: state.cache}, use_cache=True)
            if i in hidden_layers:
                captured[i] = h[:, -1]
        # share the same tensor object across layers that shared it before (stage grouping)
        state.layer_valid = [new_valid[id(v)] for v in state.layer_valid]
        state.next_positions = state.next_positions + 1
        if state.layer_next_positions is not None:
            state.layer_next_positions = _per_group(state.layer_next_positions, lambda p: p + 1)
        extra = head_input(captured) if head_input is not None else None
        if extra is None:
            return ad.logits(ad.norm(h))[:, 0], captured, None
        out = ad.logits(torch.cat([ad.norm(h)[:, 0], extra.to(h.dtype)]))
        b = tokens.shape[0]
        return out[:b], captured, out[b:]

    @staticmethod
    def merge(a: DecodeState, b: DecodeState) -> DecodeState:
        """One state for the rows of ``a`` then ``b`` (in-flight batching).

        Per layer, the shorter side is left-padded with masked slots (``layer_valid`` False), so every row
        attends to exactly its own keys; positions stay per row. Layers that shared a validity tensor in
        both states (one pruning stage) share the merged one. Each layer's cache is written once, straight
        into the appendable buffer: ``b``'s rows go into the spare rows of ``a``'s (``GrowingLayer.add_rows``,
        so ``a``'s cache becomes the merged one), or the layer moves to a new buffer when it has no room; a cache
        of another kind is written into a new ``GrowingCache``."""
        in_place = isinstance(a.cache, GrowingCache)
        cache = a.cache if in_place else GrowingCache()
        merged_valid: dict[tuple[int, int], torch.Tensor] = {}
        layer_valid = []
        for i, (va, vb) in enumerate(zip(a.layer_valid, b.layer_valid)):
            la, lb = a.cache.layers[i], b.cache.layers[i]
            length = max(va.shape[1], vb.shape[1])
            key = (id(va), id(vb))
            if key not in merged_valid:
                merged_valid[key] = torch.cat([_left_pad(va, length), _left_pad(vb, length)])
            layer_valid.append(merged_valid[key])
            if in_place:
                la.add_rows(lb.keys, lb.values)
            else:
                cache.fill_layer(i, [la.keys, lb.keys], [la.values, lb.values], length)
        positions = torch.cat([a.next_positions, b.next_positions], dim=-1)
        layer_next = None
        if a.layer_next_positions is not None or b.layer_next_positions is not None:
            n = len(layer_valid)
            pa = a.layer_next_positions or [a.next_positions] * n
            pb = b.layer_next_positions or [b.next_positions] * n
            merged_pos: dict[tuple[int, int], torch.Tensor] = {}
            layer_next = []
            for x, y in zip(pa, pb):  # layers that shared a position group on both sides share the merged one
                if (id(x), id(y)) not in merged_pos:
                    merged_pos[(id(x), id(y))] = torch.cat([x, y], dim=-1)
                layer_next.append(merged_pos[(id(x), id(y))])
        return DecodeState(cache=cache, layer_valid=layer_valid, next_positions=positions,
                           layer_next_positions=layer_next, visual_per_layer=[], hidden_dtype=a.hidden_dtype)

    def reorder(self, state: DecodeState, rows: list[int]) -> None:
        """Keep only the rows ``rows`` (e.g. drop finished requests from the batch: ascending rows move down
        inside the cache's buffers, ``GrowingLayer.keep_rows``).

        Key slots that no remaining row attends to (the left padding of a row that was merged in next to a
        longer one, or of the rows that were shorter than a finished one) are cut off the front of every
        layer. Without this, a batch that requests keep joining never drains, and its cache (and every
        step's attention) would grow by one slot per step for as long as the service is busy."""
        index = torch.tensor(rows, dtype=torch.long, device=state.next_positions.device)
        if isinstance(state.cache, GrowingCache):
            state.cache.keep_rows(rows, index)
        else:
            state.cache.batch_select_indices(index)
        groups: dict[int, tuple[torch.Tensor, int]] = {}
        layer_valid = []
        for i, v in enumerate(state.layer_valid):
            if id(v) not in groups:
                kept = v[index]
                start = _leading_unused(kept)
                groups[id(v)] = (kept[:, start:], start)
            kept, start = groups[id(v)]
            if start:
                layer = state.cache.layers[i]
                layer.keys, layer.values = layer.keys[..., start:, :], layer.values[..., start:, :]
            layer_valid.append(kept)
        state.layer_valid = layer_valid
        state.next_positions = state.next_positions[..., index]
        if state.layer_next_positions is not None:
            state.layer_next_positions = _per_group(state.layer_next_positions, lambda p: p[..., index])


def _layout(seq: Seq) -> Seq:
    """``seq`` without its hidden states (an empty (B, L, 0) tensor of their dtype keeps its shape and dtype): the
    visual indices, validity and positions of each row, all that is read of it once the prefill is done. The
    (B, L, D) residual stream would otherwise stay alive as long as the decode state."""
    b, length = seq.hidden.shape[:2]
    return seq.with_hidden(seq.hidden.new_empty((b, length, 0)))


def _entry_layout(entry: CachedPrefix) -> Seq:
    """A prefix cache entry as one row of a layout (no hidden states)."""
    n = entry.length
    return Seq(hidden=entry.hidden.new_empty((1, n, 0)), valid=torch.ones((1, n), dtype=torch.bool,
                                                                          device=entry.visual.device),
               positions=entry.positions[..., None, :], visual=entry.visual[None])


def _prefix_block(computed, taken: list[CachedPrefix], layer: int, source: int, n_lead: int, rows: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The keys and values (rows, H, S, D) of one prefix for ``rows`` rows (a broadcast view, not a copy): a computed
    prefix (``source`` < ``n_lead``), a cache entry, or the empty prefix (S = 0)."""
    if source < n_lead:
        lay = computed.layers[layer]
        k, v = lay.keys[source:source + 1], lay.values[source:source + 1]
    elif source < n_lead + len(taken):
        entry = taken[source - n_lead]
        k, v = entry.keys[layer], entry.values[layer]
    else:
        ref = (computed.layers[layer].keys if computed is not None else taken[0].keys[layer])
        k = v = ref.new_empty((1, *ref.shape[1:-2], 0, ref.shape[-1]))
    return k.expand(rows, *k.shape[1:]), v.expand(rows, *v.shape[1:])


def _left_padded(blocks: list[torch.Tensor], width: int) -> torch.Tensor:
    """Row blocks (b_i, H, S_i, D), each left-padded with zeros to ``width`` slots, as one tensor."""
    return torch.cat([torch.nn.functional.pad(x, (0, 0, width - x.shape[-2], 0)) for x in blocks])


def _per_group(tensors: list[torch.Tensor], fn: Callable[[torch.Tensor], torch.Tensor]) -> list[torch.Tensor]:
    """``fn`` applied once per distinct tensor object; layers that shared one share the result."""
    done: dict[int, torch.Tensor] = {}
    for t in tensors:
        if id(t) not in done:
            done[id(t)] = fn(t)
    return [done[id(t)] for t in tensors]


def _leading_unused(valid: torch.Tensor) -> int:
    """How many leading key slots of ``valid`` (B, S) are invalid for every row."""
    used = valid.any(dim=0)
    return int(used.int().argmax()) if bool(used.any()) else 0


def _left_pad(valid: torch.Tensor, length: int) -> torch.Tensor:
    """Pad a (rows, slots) validity mask on the left to ``length`` slots with False (masked)."""
    missing = length - valid.shape[1]
    if missing <= 0:
        return valid
    return torch.cat([valid.new_zeros(valid.shape[0], missing), valid], dim=1)
