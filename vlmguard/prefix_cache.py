"""A prefix cache across prefills: a row whose system text and image an earlier prefill already computed takes
their keys and values instead of computing them again.

Shared prefixes (:mod:`vlmguard.prefix_sharing`) save the work rows of one prefill have in common; this saves the
work a prefill has in common with earlier ones: a chat's next turn about the same image, the next batch of
POPE's questions about an image, a user asking the dashboard a second question. An entry begins with a row's
*image prefix*, every token up to and including its last visual token (the system text, the user turn's opening,
the image), and holds those tokens, or the row's whole prompt (a conversation's history), exactly as the first
layer received them (embeddings, RoPE positions, visual indices) with their keys and values in every layer. Under
causal attention those are a function of the tokens up to each one alone, so a later row that begins with the same
tokens, value for value, decodes from the entry's first ones as from its own.

- **Lookup.** Each row's image prefix is hashed (a fixed sample of every token's embedding bits, its position and
  visual index, folded in order), and the row takes the entry under that hash that begins with the most of its
  tokens: at least its image prefix, at most all but its last token (its logits). Each entry keeps its tokens' own
  hashes (on the host), so the longest run of equal hashes chooses it and only that entry is compared in full,
  token by token (where two tokens hashed alike, every entry is): a lookup among many conversations about one image
  costs about one comparison and, on a GPU, one device sync for it, not one per entry. A conversation that branches
  takes the part it shares.
- **Store.** After a prefill, each row it computed keeps what no entry holds: its image prefix, or its whole prompt
  where at least ``min_tail`` (``MIN_TAIL``) tokens follow both its image prefix and what it took. When a request
  finishes, its prompt and the answer tokens it fed (every one it chose but the last, which was never fed) are kept
  too, from its row of the decode cache, where at least ``min_tail`` of them follow its image prefix
  (``store_answer``). So POPE's short questions keep one entry per image, while a chat's turn keeps its history
  and answer, and the next turn computes only its new question (and whatever of the answer its text does not give
  back token for token). An entry the new one begins with is dropped (a conversation holds one entry, its latest
  turn). An image prefix of fewer than ``MIN_TOKENS`` tokens is not kept alone, but a whole prompt after it is (a
  chat under a pruner that keeps a few visual tokens).
- **Prompts without an image.** A row with no visual token (a text-only chat, a conversation whose image comes later)
  is anchored by its first ``TEXT_ANCHOR`` tokens instead of an image prefix: it is looked up as above and takes
  the entry that begins with the most of its tokens, at least those (the system text's keys and values, another
  turn of its conversation), and it keeps only whole prompts and answers (the same ``min_tail`` past the anchor),
  never the anchor alone. A row with an image that no entry holds, whose first ``TEXT_ANCHOR`` tokens hold no visual
  token, is then looked up by those tokens too: the question an image came with takes the chat's turns before it.
  Not a row whose image prefix another row of its batch has (POPE's questions about one image): those share it
  among themselves, which the text before the image alone would cost them.
- **The tower's output.** The same budget keeps each stored row's visual tokens, looked up by the processor's output
  for its images (pixel values and every other per-image input; a fingerprint proposes, the full values decide), so
  the vision tower does not run again on an image it holds (``PrefixCache.features``). Under a vision-side
  pruner that opts in (``Pruner.vision_cache_key``: its output for a row depends on the row's images alone, e.g.
  FlowCut's stage V), what the pruner kept of them is kept under the pruner's key, with its indices and the
  pruner's report for the row, so neither the tower nor the pruner runs again (a chat's next turn with FlowCut).
- **Memory.** Least recently used entries (of every kind) go first once ``max_bytes`` would be exceeded; an entry
  larger than the whole budget is not kept.

Where it applies is where shared prefixes do (``LayerRunner.prefill(share_prefixes=True)``): no layer cuts tokens
(LLM-side pruning), no forward hook acts per request (VISTA's prefill). The cached keys were computed in another
batch, so a request's logits may differ from a fresh prefill's in the last bits of the floating point (as with any
change of batch); the tokens are the same in every test.
"""
from __future__ import annotations

import copy
import threading
from collections import Counter, OrderedDict
from dataclasses import dataclass, field

import torch

from vlmguard.models.base import PER_TOKEN_INPUTS
from vlmguard.prefix_sharing import PrefixPlan, plan_prefixes
from vlmguard.sequence import Seq

MIN_TOKENS = 16  # a shorter image prefix is not worth an entry of its own (a whole prompt after it is)
MIN_TAIL = 32  # fewer tokens past the image prefix (a single question) keep the image prefix alone
TEXT_ANCHOR = MIN_TOKENS  # a prompt without visual tokens is looked up by its first this many tokens
SAMPLED_DIMS = 8  # embedding values per token that enter the hash (the full comparison decides)
_P = (1 << 31) - 1  # a prime: every hash is taken modulo it, so no product overflows 64 bits


@dataclass
class CachedPrefix:
    """An image prefix, or a whole prompt (beginning with an image prefix, or without an image): the tokens as the
    first layer received them and their keys and values in every layer ((1, H, n, d) each)."""

    hidden: torch.Tensor  # (n, D)
    positions: torch.Tensor  # (n,) or (3, n)
    visual: torch.Tensor  # (n,)
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    # (n,) int64 on the host: each token's hash (_prefix_hashes), compared before the values
    tokens: torch.Tensor | None = None
    nbytes: int = 0
    hits: int = 0

    @property
    def length(self) -> int:
        return self.hidden.shape[0]

    def common_hashes(self, row_tokens: torch.Tensor) -> int:
        """How many of this entry's first tokens hash as the row's do (``row_tokens``: the row's token hashes from
        its first token on): at least as many as :meth:`common` finds, so the entry with the longest run is the only
        one worth comparing value for value."""
        if self.tokens is None:  # an entry made without hashes (by hand): only the values can say
            return min(self.length, row_tokens.shape[0])
        n = min(self.length, row_tokens.shape[0])
        differ = (self.tokens[:n] != row_tokens[:n]).nonzero()
        return n if differ.numel() == 0 else int(differ[0])

    def common(self, seq: Seq, row: int, start: int, limit: int) -> int:
        """How many of this entry's first tokens (at most ``limit``) the row of ``seq`` whose tokens begin at
        ``start`` has, value for value (embedding, position, visual index)."""
        n = max(0, min(self.length, limit, seq.length - start))
        part = slice(start, start + n)
        same = (seq.hidden[row, part] == self.hidden[:n]).all(dim=-1) & (seq.visual[row, part] == self.visual[:n])
        pos = seq.positions[..., row, part] == self.positions[..., :n]
        same &= pos.all(dim=0) if pos.dim() == 2 else pos
        differ = (~same).nonzero()
        return n if differ.numel() == 0 else int(differ[0])

    def head(self, n: int) -> "CachedPrefix":
        """The entry's first ``n`` tokens (views of its tensors): what a row that shares only those takes."""
        if n == self.length:
            return self
        return CachedPrefix(hidden=self.hidden[:n], positions=self.positions[..., :n], visual=self.visual[:n],
                            keys=[k[..., :n, :] for k in self.keys], values=[v[..., :n, :] for v in self.values],
                            tokens=None if self.tokens is None else self.tokens[:n])


@dataclass
class PromptTokens:
    """A request's prompt as the first layer received it (its valid tokens: embeddings, positions, visual indices)
    and the position its first generated token took: what ``PrefixCache.store_answer`` keeps with its answer."""

    hidden: torch.Tensor  # (n, D)
    positions: torch.Tensor  # (n,) or (3, n)
    visual: torch.Tensor  # (n,)
    next_position: torch.Tensor  # () or (3,)

    @property
    def length(self) -> int:
        return self.hidden.shape[0]

    @classmethod
    def of_row(cls, seq: Seq, row: int, next_positions: torch.Tensor) -> "PromptTokens":
        valid = seq.valid[row]
        return cls(hidden=seq.hidden[row, valid].clone(), positions=seq.positions[..., row, valid].clone(),
                   visual=seq.visual[row, valid].clone(), next_position=next_positions[..., row].clone())


@dataclass
class CachedFeatures:
    """One row's images as the processor gave them (per image: its pixel values and its other per-image inputs,
    e.g. LLaVA-NeXT's image size, Qwen2-VL's grid) and their projected visual tokens (V, D); or, under a
    vision-side pruner's key (``Pruner.vision_cache_key``), the tokens it kept (k, D), their visual indices (None:
    it kept them all) and its report entries for the row."""

    images: list[tuple[torch.Tensor, dict]]
    features: torch.Tensor
    kept: torch.Tensor | None = None
    report: dict = field(default_factory=dict)
    nbytes: int = 0
    hits: int = 0


@dataclass
class PrefixCacheStats:
    entries: int = 0  # image prefixes and whole prompts held
    bytes: int = 0  # both kinds of entry
    max_bytes: int = 0
    hits: int = 0  # rows that took a cached prefix
    misses: int = 0  # rows with an image prefix (or a text-only prompt's anchor) that no entry held
    stored: int = 0
    evicted: int = 0  # both kinds
    image_entries: int = 0  # images' visual tokens held (the vision tower's output)
    image_hits: int = 0  # rows whose images' visual tokens were taken, the tower not run on them
    pruned_entries: int = 0  # images' visual tokens as a vision-side pruner kept them
    pruned_hits: int = 0  # rows that took those, neither the tower nor the pruner run on their images


@dataclass
class PrefixCache:
    """Image prefixes of earlier prefills and their images' visual tokens, least recently used evicted first beyond
    ``max_bytes`` (the processor's pixel values kept for the comparison, on the host, count too)."""

    max_bytes: int
    # a row whose prompt goes on for at least this many tokens past its image prefix and past what it took from an
    # entry keeps its whole prompt (a conversation's history), not only its image prefix
    min_tail: int = MIN_TAIL
    # key -> its entries: a CachedPrefix under its prefix's hash, a CachedFeatures under ("images", view,
    # fingerprint) (view: None for the tower's output, else a vision-side pruner's key)
    _entries: OrderedDict = field(default_factory=OrderedDict)
    _bytes: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)
    stats: PrefixCacheStats = field(default_factory=PrefixCacheStats)

    def __post_init__(self) -> None:
        if not isinstance(self.max_bytes, int) or isinstance(self.max_bytes, bool) or self.max_bytes < 0:
            raise ValueError(f"max_bytes must be a non-negative int, got {self.max_bytes!r}")
        self.stats.max_bytes = self.max_bytes

    # ---- lookup ----------------------------------------------------------------------------
    def lookup(self, seq: Seq) -> "CacheLookup":
        """For each row of ``seq`` (left-padded, its valid tokens contiguous): what it takes from the cache, the
        first tokens of the entry that begins with the most of the row's (at least its anchor: its image prefix, or a
        row without visual tokens its first ``TEXT_ANCHOR``; None: no entry, or the row is too short for an anchor),
        the row's anchor length (0: none) and that anchor's hash (None: none)."""
        lengths, hashes, tokens, text = _prefix_hashes(seq)
        counts = seq.valid.sum(dim=1).tolist()
        found: list[CachedPrefix | None] = [None] * seq.batch_size
        text_anchors: list[tuple | None] | None = None  # made for the first row with an image that misses
        # rows whose image prefix another row of the batch has share it among themselves (plan_prefill), which an
        # entry of their text before the image alone would cost them
        alone = {h for h, k in Counter(hashes).items() if k == 1}
        with self._lock:
            for r, (n, h) in enumerate(zip(lengths, hashes)):
                if h is None:
                    continue
                # the row keeps at least its last token for its own logits
                entry, most = self._best(h, seq, r, seq.length - counts[r], n, counts[r] - 1, tokens)
                if entry is None and not text[r] and h in alone:  # its text before the image, kept by a chat
                    text_anchors = text_anchors or _text_anchor_hashes(seq, tokens, text)
                    if text_anchors[r] is not None:
                        entry, most = self._best(text_anchors[r], seq, r, seq.length - counts[r], TEXT_ANCHOR,
                                                 counts[r] - 1, tokens)
                if entry is not None:
                    entry.hits += 1
                    self.stats.hits += 1
                    found[r] = entry.head(most)
                else:
                    self.stats.misses += 1
        return CacheLookup(found=found, lengths=lengths, hashes=hashes, tokens=tokens, text=text)

    def _best(self, h: tuple, seq: Seq, row: int, start: int, n: int, limit: int,
              tokens: torch.Tensor | None) -> tuple[CachedPrefix | None, int]:
        """The entry under ``h`` that begins with the most of the row's tokens, at least its ``n``-token image
        prefix and at most ``limit`` of them, and how many (None, 0: none). With the rows' token hashes
        (``tokens``, (B, L)), the entries' hashes choose and the one chosen is compared value for value: a run of
        equal hashes is never shorter than the run of equal tokens, so only two tokens hashing alike (then every
        entry is compared in full) could make another entry the longest."""
        entries = [e for e in self._entries.get(h, ()) if e.length >= n]

        def longest(run) -> tuple[CachedPrefix | None, int]:  # the entry with the longest run (>= n), and its run
            best, most = None, 0
            for entry in entries:
                m = run(entry)
                if m >= n and m > most:
                    best, most = entry, m
            return best, most

        def full(entry: CachedPrefix) -> int:
            return entry.common(seq, row, start, limit)

        if tokens is None:
            best, most = longest(full)
        else:
            row_tokens = tokens[row, start:start + limit]
            best, most = longest(lambda entry: entry.common_hashes(row_tokens))
            if best is not None and best.common(seq, row, start, most) < most:  # two tokens hashed alike
                best, most = longest(full)
        if best is not None:
            self._entries.move_to_end(h)
        return best, most

    # ---- store -----------------------------------------------------------------------------
    def store(self, seq: Seq, lookup: "CacheLookup", cache, key_valid: list[torch.Tensor],
              rows: list[int] | None = None) -> None:
        """Keep what the rows of ``rows`` (default all) computed and no entry holds, from the finished prefill:
        ``seq`` is its input, ``cache`` its KV cache and ``key_valid`` each layer's (B, S) valid key slots there (a
        row's first valid slots are its first tokens). A row keeps its image prefix, or its whole prompt where at
        least ``min_tail`` of its tokens follow both its image prefix and what it took (a conversation's history:
        the next turn takes all of it); a row without visual tokens keeps only the latter. An entry the new one
        begins with, token for token, is dropped."""
        counts = seq.valid.sum(dim=1).tolist()
        tokens = lookup.tokens if lookup.tokens is not None else _prefix_hashes(seq)[2]
        text = lookup.text or [False] * seq.batch_size
        with self._lock:
            for r in range(seq.batch_size) if rows is None else rows:
                n, h = lookup.lengths[r], lookup.hashes[r]
                if h is None:
                    continue
                took = 0 if lookup.found[r] is None else lookup.found[r].length
                if counts[r] - max(took, n) >= self.min_tail:
                    n = counts[r]
                elif n < MIN_TOKENS or text[r]:
                    continue
                if n <= took:
                    continue
                self._keep(h, seq, r, seq.length - counts[r], n, cache, key_valid, tokens)
            self._count()

    def may_keep_answer(self, seq: Seq, row: int, max_new_tokens: int) -> bool:
        """Whether an answer of up to ``max_new_tokens`` could make the prompt of ``seq``'s row an entry of its own
        (``min_tail`` tokens past its image prefix, or past the first ``TEXT_ANCHOR`` of a prompt without visual
        tokens): a request that cannot need not hold a copy of its prompt (``PromptTokens``) until it ends."""
        prompt_visual = seq.visual[row, seq.valid[row]]
        visual = (prompt_visual >= 0).nonzero()
        anchor = int(visual[-1]) + 1 if visual.numel() else TEXT_ANCHOR
        return prompt_visual.shape[0] - anchor + max_new_tokens - 1 >= self.min_tail

    def store_answer(self, prompt: "PromptTokens", answer: list[int], adapter, cache, key_valid: list[torch.Tensor],
                     row: int) -> None:
        """Keep a finished request's prompt and the answer tokens it fed (all but the last it chose) where at least
        ``min_tail`` of them follow its image prefix (or its first ``TEXT_ANCHOR`` tokens, without an image), from
        its decode state: ``cache`` holds its keys and values at row ``row`` and ``key_valid`` each layer's (B, S)
        valid slots (its first ones are its prompt's, then the answer's). A chat's next turn, which begins with them,
        computes only its new question."""
        if not answer:
            return
        device = prompt.hidden.device
        ids = torch.tensor(answer, dtype=torch.long, device=device)
        answer_positions = prompt.next_position[..., None] + torch.arange(len(answer), device=device)
        seq = Seq(hidden=torch.cat([prompt.hidden, adapter.embed_tokens(ids).to(prompt.hidden.dtype)])[None],
                  valid=torch.ones(1, prompt.length + len(answer), dtype=torch.bool, device=device),
                  positions=torch.cat([prompt.positions, answer_positions], dim=-1)[..., None, :],
                  visual=torch.cat([prompt.visual, torch.full_like(ids, -1)])[None])
        (n,), (h,), tokens, _ = _prefix_hashes(seq)
        total = seq.length
        if h is None or total - n < self.min_tail or int(key_valid[0][row].sum()) < total:
            return
        with self._lock:
            self._keep(h, seq, 0, 0, total, cache, key_valid, tokens, cache_row=row)
            self._count()

    def _keep(self, h: tuple, seq: Seq, r: int, start: int, n: int, cache, key_valid: list[torch.Tensor],
              tokens: torch.Tensor, cache_row: int | None = None) -> None:
        """Keep the first ``n`` tokens of row ``r`` of ``seq`` (beginning at ``start``; ``tokens``: the rows' token
        hashes), their keys and values the first ``n`` valid slots of ``cache``'s row ``cache_row`` (default
        ``r``), unless an entry holds them; the entries they begin with are dropped. Under the lock."""
        if self._best(h, seq, r, start, n, n, tokens)[1] >= n:  # an earlier row (of this prefill) kept them
            return
        row_tokens = tokens[r, start:start + n]
        for old in [e for e in self._entries.get(h, ()) if e.length <= n and e.common_hashes(row_tokens) == e.length
                    and e.common(seq, r, start, e.length) == e.length]:
            self._drop(h, old)
        c = r if cache_row is None else cache_row
        part = slice(start, start + n)
        keys, values = [], []
        slots: dict[int, torch.Tensor | slice] = {}  # the row's first n valid slots, once per validity tensor
        for i, layer in enumerate(cache.layers):
            valid = key_valid[i]
            if id(valid) not in slots:
                slots[id(valid)] = _first_slots(valid[c], n)
            at = slots[id(valid)]
            if isinstance(at, slice):  # one run of slots (a plain prefill): a copy of it
                keys.append(layer.keys[c:c + 1, ..., at, :].clone())
                values.append(layer.values[c:c + 1, ..., at, :].clone())
            else:
                keys.append(layer.keys[c:c + 1].index_select(-2, at))
                values.append(layer.values[c:c + 1].index_select(-2, at))
        entry = CachedPrefix(hidden=seq.hidden[r, part].clone(), positions=seq.positions[..., r, part].clone(),
                             visual=seq.visual[r, part].clone(), keys=keys, values=values,
                             tokens=row_tokens.clone())
        entry.nbytes = sum(t.numel() * t.element_size()
                           for t in (entry.hidden, entry.positions, entry.visual, *keys, *values))
        if self._add(h, entry):
            self.stats.stored += 1

    # ---- the vision tower's output --------------------------------------------------------------
    def features(self, adapter, batch, skip=(), view: tuple | None = None) -> dict[int, CachedFeatures]:
        """Rows of the processor's ``batch`` (not in ``skip``) whose images an entry holds -> that entry (the same
        pixel values and per-image inputs, compared in full): the tower's output, or with ``view`` (a vision-side
        pruner's ``vision_cache_key``) what that pruner made of them."""
        found: dict[int, CachedFeatures] = {}
        with self._lock:
            for row, images in _row_images(adapter, batch).items():
                if row in skip:
                    continue
                entry = self._find_images(images, view)
                if entry is not None:
                    entry.hits += 1
                    if view is None:
                        self.stats.image_hits += 1
                    else:
                        self.stats.pruned_hits += 1
                    found[row] = entry
        return found

    def store_features(self, adapter, batch, features: list[torch.Tensor | None], rows, view: tuple | None = None,
                       kept: list[torch.Tensor | None] | None = None, reports: dict[int, dict] | None = None) -> None:
        """Keep the visual tokens of these rows of ``batch`` (``features``: per row, as ``image_features`` gave);
        with ``view``, a vision-side pruner's: per row its kept tokens, ``kept`` their indices and ``reports`` its
        report entries."""
        with self._lock:
            per_row = _row_images(adapter, batch)
            for row in rows:
                if row not in per_row or features[row] is None or self._find_images(per_row[row], view) is not None:
                    continue
                images = [(pixels.clone(), {k: v.clone() if torch.is_tensor(v) else v for k, v in extra.items()})
                          for pixels, extra in per_row[row]]
                index = None if kept is None or kept[row] is None else kept[row].clone()
                entry = CachedFeatures(images=images, features=features[row].clone(), kept=index,
                                       report=copy.deepcopy((reports or {}).get(row, {})))
                tensors = (entry.features, index) if index is not None else (entry.features,)
                entry.nbytes = sum(t.numel() * t.element_size() for t in tensors) + sum(
                    t.numel() * t.element_size() for pixels, extra in images
                    for t in (pixels, *(v for v in extra.values() if torch.is_tensor(v))))
                self._add(("images", view, _images_key(per_row[row])), entry)
            self._count()

    def _find_images(self, images: list[tuple[torch.Tensor, dict]], view: tuple | None) -> CachedFeatures | None:
        key = ("images", view, _images_key(images))
        for entry in self._entries.get(key, ()):
            if _same_images(entry.images, images):
                self._entries.move_to_end(key)
                return entry
        return None

    def _add(self, key, entry) -> bool:
        if entry.nbytes > self.max_bytes:
            return False
        while self._bytes + entry.nbytes > self.max_bytes:
            self._evict_oldest()
        self._entries.setdefault(key, []).append(entry)
        self._entries.move_to_end(key)
        self._bytes += entry.nbytes
        return True

    def _count(self) -> None:
        counts = {"prefix": 0, "image": 0, "pruned": 0}
        for key, bucket in self._entries.items():
            kind = "prefix" if key[0] != "images" else "image" if key[1] is None else "pruned"
            counts[kind] += len(bucket)
        self.stats.entries, self.stats.image_entries, self.stats.pruned_entries = counts.values()
        self.stats.bytes = self._bytes

    def _evict_oldest(self) -> None:
        h, bucket = next(iter(self._entries.items()))
        self._drop(h, bucket[0])
        self.stats.evicted += 1

    def _drop(self, key, entry) -> None:
        bucket = self._entries[key]
        bucket.pop(next(i for i, e in enumerate(bucket) if e is entry))  # by identity: entries hold tensors
        if not bucket:
            del self._entries[key]
        self._bytes -= entry.nbytes

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0
            self._count()

    def __len__(self) -> int:
        """Entries of both kinds."""
        return sum(len(v) for v in self._entries.values())


def _first_slots(valid: torch.Tensor, n: int) -> torch.Tensor | slice:
    """The first ``n`` True slots of a (S,) validity row: a slice where they are one run, else their indices."""
    at = valid.nonzero().flatten()[:n]
    first, last = int(at[0]), int(at[-1])
    return slice(first, last + 1) if last - first + 1 == n else at


def _row_images(adapter, batch) -> dict[int, list[tuple[torch.Tensor, dict]]]:
    """Per row of a processor's batch that has images: per image, its pixel values (``ModelAdapter.image_pixels``)
    and its other per-image inputs (an input with one entry per image of the batch: LLaVA-NeXT's image sizes,
    Qwen2-VL's grid), what the vision tower's output for it depends on."""
    n = len(batch.rows_with_images)
    if not n:
        return {}
    pixels = adapter.image_pixels(batch)
    per_image = {k: v for k, v in batch.vision_inputs.items() if k != "pixel_values" and k not in PER_TOKEN_INPUTS and (
        (torch.is_tensor(v) and v.dim() and v.shape[0] == n) or (isinstance(v, (list, tuple)) and len(v) == n))}
    out: dict[int, list[tuple[torch.Tensor, dict]]] = {}
    for j, row in enumerate(batch.rows_with_images):
        out.setdefault(row, []).append((pixels[j], {k: v[j] for k, v in per_image.items()}))
    return out


def _images_key(images: list[tuple[torch.Tensor, dict]]) -> tuple:
    """A cheap fingerprint of a row's images (the full comparison decides)."""
    return tuple((tuple(p.shape), float(p.float().sum()), float(p.flatten()[::251].float().sum()))
                 for p, _ in images)


def _same_images(a: list[tuple[torch.Tensor, dict]], b: list[tuple[torch.Tensor, dict]]) -> bool:
    def same(x, y) -> bool:
        if torch.is_tensor(x) or torch.is_tensor(y):
            return torch.is_tensor(x) and torch.is_tensor(y) and x.shape == y.shape and torch.equal(x, y.to(x.device))
        return x == y

    return len(a) == len(b) and all(
        same(pa, pb) and ea.keys() == eb.keys() and all(same(ea[k], eb[k]) for k in ea)
        for (pa, ea), (pb, eb) in zip(a, b))


@dataclass
class CacheLookup:
    """One prefill's rows against the cache: the entry each takes (None: none), and each row's anchor length (its
    image prefix's, or ``TEXT_ANCHOR`` for a row without visual tokens; 0: none) and hash (None: none), its tokens'
    hashes (on the host) and whether it has no visual tokens: what :meth:`PrefixCache.store` keeps afterwards."""

    found: list[CachedPrefix | None]
    lengths: list[int]
    hashes: list[tuple[int, int, int] | None]
    tokens: torch.Tensor | None = None  # (B, L) int64: each token's hash (None: no row has an anchor)
    text: list[bool] | None = None  # per row: anchored by its first tokens, not an image prefix (None: no row)

    def rows(self, rows: list[int], length: int) -> "CacheLookup":
        """The lookup of these rows alone, prefilled as a batch ``length`` tokens wide (left-padded: each row's
        tokens stay the last of its row, so its token hashes are the last ``length`` columns)."""
        return CacheLookup(found=[self.found[r] for r in rows], lengths=[self.lengths[r] for r in rows],
                           hashes=[self.hashes[r] for r in rows],
                           tokens=None if self.tokens is None else self.tokens[rows, self.tokens.shape[1] - length:],
                           text=None if self.text is None else [self.text[r] for r in rows])


def plan_prefill(seq: Seq, cache: PrefixCache | None, look: CacheLookup | None = None
                 ) -> tuple[PrefixPlan | None, CacheLookup | None]:
    """The prefill plan of ``seq`` under ``cache``: rows whose anchor (image prefix) an entry holds take what it shares
    with them (``PrefixCache.lookup``), the others share prefixes among themselves where that pays
    (:func:`vlmguard.prefix_sharing.plan_prefixes`); None: one plain pass. Also the cache lookup (None without a
    cache), for storing the new prefixes afterwards. ``look``: the cache's lookup of ``seq``, already made."""
    if cache is None:
        return plan_prefixes(seq), None
    look = cache.lookup(seq) if look is None else look
    if not any(e is not None for e in look.found):
        return plan_prefixes(seq), look
    b = seq.batch_size
    plan = PrefixPlan(leaders=[], group=[-1] * b, length=[], cached=list(look.found))
    miss = [r for r, e in enumerate(look.found) if e is None]
    if len(miss) >= 2:
        rows = seq.rows(torch.tensor(miss, dtype=torch.long, device=seq.valid.device))
        sub = plan_prefixes(rows.select(rows.valid)[0])  # re-left-padded to the longest of these rows
        if sub is not None:
            plan.leaders = [miss[k] for k in sub.leaders]
            plan.length = list(sub.length)
            for k, r in enumerate(miss):
                plan.group[r] = sub.group[k]
    return plan, look


def image_prefixes(seq: Seq) -> tuple[list[int], list[tuple[int, int, int] | None]]:
    """Per row of ``seq``: the length of its image prefix (its tokens up to and including its last visual token;
    0 without visual tokens) and a hash of that prefix's tokens (None where 0)."""
    lengths, hashes, _, text = _prefix_hashes(seq)
    return ([0 if t else n for n, t in zip(lengths, text)] if text else lengths,
            [None if t else h for h, t in zip(hashes, text)] if text else hashes)


def _prefix_hashes(seq: Seq) -> tuple[list[int], list[tuple[int, int, int] | None], torch.Tensor | None,
                                      list[bool] | None]:
    """Per row of ``seq``: the length of its anchor (its image prefix; in a row without visual tokens but more than
    ``TEXT_ANCHOR``, its first ``TEXT_ANCHOR``; else 0) and a hash of the anchor's tokens (None where 0); the (B, L)
    hashes of every token; and per row whether its anchor is text (the last two None where no row has an anchor).
    A token's hash is two independent 31-bit hashes of its sampled embedding values, position and visual index in
    one int64 (``first * _P + second``), which the anchor hashes weight by place."""
    b, length, dim = seq.hidden.shape
    device = seq.valid.device
    counts = seq.valid.sum(dim=1)
    start = length - counts
    cols = torch.arange(length, device=device)[None]
    is_visual = (seq.visual >= 0) & seq.valid
    last = torch.where(is_visual, cols, torch.full_like(cols, -1)).max(dim=1).values
    text = (last < 0) & (counts > TEXT_ANCHOR)
    n = torch.where(last >= 0, last - start + 1, torch.where(text, TEXT_ANCHOR, 0))
    lengths = n.tolist()
    if not any(lengths):
        return lengths, [None] * b, None, None
    dims = torch.randperm(dim, generator=torch.Generator(device="cpu").manual_seed(1))[:SAMPLED_DIMS].to(device)
    bits = seq.hidden.index_select(-1, dims).float().view(torch.int32).long() & 0xFFFFFFFF  # (B, L, S)
    pos = seq.positions.permute(1, 2, 0) if seq.mrope else seq.positions[..., None]
    ints = torch.cat([bits, pos.long() & 0xFFFFFFFF, (seq.visual.long() + 1)[..., None]], dim=-1)
    gen = torch.Generator(device="cpu").manual_seed(2)
    hashes, tokens = [], torch.zeros(b, length, dtype=torch.long, device=device)
    for salt in range(2):  # two independent 31-bit hashes
        w = torch.randint(1, 1 << 26, (ints.shape[-1],), generator=gen).to(device)
        token = (ints * w).sum(dim=-1) % _P  # (B, L)
        tokens = tokens * _P + token
        place = (cols - start[:, None]).clamp(min=0)
        hashes.append(_anchor_hash(token, place, (cols >= start[:, None]) & (cols < (start + n)[:, None]), salt))
    # the token hashes go to the host once: choosing among many entries then syncs no device (one D2H copy of (B, L))
    return (lengths, [None if k == 0 else (k, a, c) for k, a, c in zip(lengths, *hashes)], tokens.cpu(),
            text.tolist())


def _anchor_hash(token: torch.Tensor, place: torch.Tensor, inside: torch.Tensor, salt: int) -> list[int]:
    """Per row: one of an anchor's two hashes, its tokens' hashes of that salt (``token``, (B, L)) weighted by their
    place in the row (counted from the row's first token) and summed over the anchor's columns (``inside``)."""
    weight = (place * 2654435761 + 97 + salt * 1013904223) % _P
    return (((token * weight) % _P) * inside).sum(dim=1).tolist()


def _text_anchor_hashes(seq: Seq, tokens: torch.Tensor, text: list[bool]) -> list[tuple[int, int, int] | None]:
    """Per row with visual tokens none of which is among its first ``TEXT_ANCHOR`` (a chat whose image came with a
    later question, an image after a long system text): the hash those first tokens have as the anchor of a row
    without visual tokens, under which such a row's prompt (the chat's turns before the image) was kept; None for
    the other rows. ``tokens``: the rows' token hashes (host), as :func:`_prefix_hashes` made them."""
    length = tokens.shape[1]
    counts = seq.valid.sum(dim=1).cpu()
    start = length - counts
    cols = torch.arange(length)[None]
    inside = (cols >= start[:, None]) & (cols < (start + TEXT_ANCHOR)[:, None])
    visual = ((seq.visual >= 0) & seq.valid).cpu()
    rows = [not t and n > TEXT_ANCHOR and not bool((visual[r] & inside[r]).any())
            for r, (t, n) in enumerate(zip(text, counts.tolist()))]
    if not any(rows):
        return [None] * len(rows)
    place = (cols - start[:, None]).clamp(min=0)
    # each token's hash is (first salt's) * _P + (second salt's), each below _P
    first, second = (_anchor_hash(part, place, inside, salt) for salt, part in enumerate((tokens // _P, tokens % _P)))
    return [(TEXT_ANCHOR, a, c) if ok else None for ok, a, c in zip(rows, first, second)]
