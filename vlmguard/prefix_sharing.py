"""Shared prefixes in a prefill batch: rows that begin with the same tokens compute those tokens once.

Two rows share a prefix when their first tokens, as the LLM receives them, are the same: the same input
embeddings (image features included), the same RoPE positions and the same visual indices. Under causal
attention the keys and values of those tokens are then the same in every layer, so they are computed for one
row of the group and copied to the others, which run only their own remainder (``LayerRunner.prefill``). In
a POPE batch the six questions about one image share the system text and the image; LQCD's query variants
(lqcd.md 6, "shared-prefix option") and the requests of a chat choice share everything up to their question.

Found by comparing the rows themselves, so nothing about templates or images is assumed: an id per token (from a
fixed sample of its embedding's values, its position and visual index) proposes the common prefixes, and the
chosen plan's prefixes are then compared in full (embeddings, positions, visual indices): where one differs,
nothing is shared. A prefill uses a plan only where it saves a real share of the work (``MIN_SAVING``), and
never where layers cut tokens (LLM-side pruning) or where forward hooks act per request (VISTA's steering):
there a row's prefix depends on more than its own tokens.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from vlmguard.sequence import Seq

MIN_TOKENS = 8  # a shorter common prefix is not worth a second pass over the layers
MIN_SAVING = 0.2  # share of the batch's token slots that sharing must save
FINGERPRINT_DIMS = 4  # embedding values per token that propose a match (the full comparison decides)
COMPARE_ELEMENTS = 1 << 24
MAX_WIDTHS = 24  # remainder widths a plan is made for


@dataclass
class PrefixPlan:
    """``leaders``: the rows whose prefixes are computed; ``group[r]``: the index in ``leaders`` of the leader of
    row r (a leader is its own), or -1 where the row's prefix is ``cached[r]`` or it has none; ``length[g]``: the
    leading tokens every row of group g shares with its leader (each row keeps at least its last token for its own
    pass, whose output is the row's logits); ``cached``: per row, the :mod:`vlmguard.prefix_cache` entry whose keys
    and values it takes (None: none; the whole list None: no cache)."""

    leaders: list[int]
    group: list[int]
    length: list[int]
    cached: list | None = None

    def prefix_lengths(self) -> list[int]:
        """Per row, the leading tokens it does not run in its own pass (its group's prefix, or its cached one)."""
        cached = self.cached or [None] * len(self.group)
        return [self.length[g] if g >= 0 else (0 if e is None else e.length) for g, e in zip(self.group, cached)]

    def shared_tokens(self) -> list[int]:
        """Per row, the tokens its leader computes for it (0 for a leader and outside any group)."""
        return [0 if g < 0 or self.leaders[g] == r else self.length[g] for r, g in enumerate(self.group)]

    def cached_tokens(self) -> list[int]:
        """Per row, the tokens it takes from the prefix cache."""
        return [0 if e is None else e.length for e in (self.cached or [None] * len(self.group))]

    def saved_tokens(self) -> int:
        """Tokens the plan does not compute, against a prefill of every row whole."""
        return sum(self.shared_tokens())


def _sampled_dims(dim: int, device: torch.device) -> torch.Tensor:
    """The embedding dimensions whose values stand for a token (a fixed sample of ``FINGERPRINT_DIMS``)."""
    return torch.randperm(dim, generator=torch.Generator(device="cpu").manual_seed(0))[:FINGERPRINT_DIMS].to(device)


def _token_ids(seq: Seq) -> tuple[torch.Tensor, list[int], list[int]]:
    """Every token as an integer, (B, L) from each row's first valid token on (-1 past its last): equal tokens get
    equal ids, from the bits of a fixed sample of the embedding's values, its RoPE position and visual index
    (different tokens may share an id: the plan's rows are checked in full); and each row's first valid column and
    valid-token count."""
    b, length, dim = seq.hidden.shape
    dims = _sampled_dims(dim, seq.hidden.device)
    counts = seq.valid.sum(dim=1)
    start = length - counts
    cols = (torch.arange(length, device=seq.valid.device)[None] + start[:, None]).clamp(max=length - 1)
    inside = torch.arange(length, device=seq.valid.device)[None] < counts[:, None]
    values = torch.gather(seq.hidden.index_select(-1, dims).float(), 1, cols[..., None].expand(-1, -1, dims.numel()))
    pos = seq.positions.permute(1, 2, 0) if seq.mrope else seq.positions[..., None]
    ints = torch.cat([pos, seq.visual[..., None]], dim=-1)
    ints = torch.gather(ints, 1, cols[..., None].expand(-1, -1, ints.shape[-1]))
    # one column of 32-bit values per feature (a float's bits), folded into ids two at a time by 1-D uniques
    columns = list(values.view(torch.int32)[inside].long().unbind(-1)) + list(ints[inside].unbind(-1))
    ids = torch.unique(columns[0], return_inverse=True)[1]
    for col in columns[1:]:
        ids = torch.unique(ids * (1 << 32) + (col & 0xFFFFFFFF), return_inverse=True)[1]
    out = torch.full((b, length), -1, dtype=torch.long, device=seq.valid.device)
    out[inside] = ids
    return out, start.tolist(), counts.tolist()


def _shares(ids: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """(B, B): how many leading tokens row r could take from row l, their common prefix with each keeping its last
    token to itself, in blocks of rows that keep the (rows, B, L) comparison near ``COMPARE_ELEMENTS``."""
    b = ids.shape[0]
    step = max(1, COMPARE_ELEMENTS // max(1, ids.numel()))
    parts = []
    for i in range(0, b, step):
        same = (ids[i:i + step, None] == ids[None]) & (ids[i:i + step, None] >= 0)
        parts.append(same.long().cumprod(dim=-1).sum(dim=-1))
    own = torch.tensor(counts, device=ids.device) - 1
    return torch.minimum(torch.cat(parts), torch.minimum(own[:, None], own[None]))


def _may_share(seq: Seq, counts: torch.Tensor, m: int) -> bool:
    """Whether two rows may share their first ``m`` tokens: then their m-th tokens are alike (the same sample of
    embedding values, position and visual index). A plan is searched for only where some row shares ``min_saving``
    of the batch's width with another; where no two rows agree there (a batch of requests about different images),
    that takes one gather. (A plan could also gain from short rows alone, whose padding it drops; not sought.)"""
    if m <= 0:
        return True
    rows = (counts >= m).nonzero().flatten()
    if rows.numel() < 2:
        return False
    cols = seq.length - counts[rows] + m - 1  # each row's m-th token
    dims = _sampled_dims(seq.hidden.shape[-1], seq.hidden.device)
    token = torch.cat([seq.hidden[rows, cols][:, dims].double(),
                       seq.positions[..., rows, cols].reshape(-1, rows.numel()).T.double(),
                       seq.visual[rows, cols][:, None].double()], dim=1)
    same = (token[:, None] == token[None]).all(dim=-1)
    return bool(same.sum() > rows.numel())  # more than each row with itself


def _same_prefix(seq: Seq, a: int, b: int, start: list[int], n: int) -> bool:
    sa, sb = slice(start[a], start[a] + n), slice(start[b], start[b] + n)
    return (torch.equal(seq.hidden[a, sa], seq.hidden[b, sb]) and torch.equal(seq.visual[a, sa], seq.visual[b, sb])
            and torch.equal(seq.positions[..., a, sa], seq.positions[..., b, sb]))


def plan_prefixes(seq: Seq, min_tokens: int = MIN_TOKENS, min_saving: float = MIN_SAVING) -> PrefixPlan | None:
    """Groups of rows of ``seq`` (left-padded, every row's valid tokens contiguous) that share a prefix, or None
    when sharing would save less than ``min_saving`` of the token slots of a prefill row by row (padding counts:
    it costs what a token costs)."""
    b = seq.batch_size
    if b < 2:
        return None
    valid = seq.valid
    counts_t = valid.sum(dim=1)
    contiguous = valid == (torch.arange(seq.length, device=valid.device)[None] >= (seq.length - counts_t)[:, None])
    if not bool(contiguous.all()):
        return None
    if not _may_share(seq, counts_t, math.ceil(min_saving * seq.length)):
        return None
    ids, start, counts = _token_ids(seq)
    shares = _shares(ids, counts)
    # every row taking the most it shares with another still shares too little: no plan to search for
    best = shares.fill_diagonal_(0).max(dim=1).values
    if float(best.sum()) < min_saving * b * seq.length:
        return None
    share = shares.tolist()
    # Both passes run left-padded batches: the prefixes at the longest prefix, every row's remainder at the longest
    # remainder, and padding costs what a token costs. So a plan is made for each width a remainder may have (what
    # a row leaves over after a match), rows joining a group only where every remainder in it stays within that
    # width, and the plan with the fewest token slots wins: POPE's questions group by image, not by the system
    # text that every row begins with.
    matches = {x for row in share for x in row if x >= min_tokens}
    widths = sorted({n - x for n in set(counts) for x in matches if n > x} | {1})
    if len(widths) > MAX_WIDTHS:  # evenly spread over the sorted candidates, the smallest and largest kept
        widths = [widths[round(i * (len(widths) - 1) / (MAX_WIDTHS - 1))] for i in range(MAX_WIDTHS)]
    best_plan, best_cost = None, b * seq.length * (1 - min_saving)
    for width in widths:
        plan = _groups(share, counts, width, min_tokens)
        if len(plan.leaders) == b:
            continue
        rest = max(c - plan.length[g] for c, g in zip(counts, plan.group))
        cost = len(plan.leaders) * max(plan.length) + b * rest
        if cost <= best_cost:
            best_plan, best_cost = plan, cost
    if best_plan is None:
        return None
    # the ids only propose: every row's prefix must equal its leader's, value for value (else no sharing at all)
    for r, g in enumerate(best_plan.group):
        lead = best_plan.leaders[g]
        if lead != r and not _same_prefix(seq, r, lead, start, best_plan.length[g]):
            return None
    return best_plan


def _groups(share: list[list[int]], counts: list[int], width: int, min_tokens: int) -> PrefixPlan:
    """Rows in order join the group whose leader they share most with, where the group keeps every row's remainder
    within ``width`` tokens; else they lead a group of their own."""
    leaders: list[int] = []
    group: list[int] = []
    length: list[int] = []
    longest: list[int] = []  # the longest row of each group
    for r, n in enumerate(counts):
        best, best_len = -1, 0
        row = share[r]
        for g, lead in enumerate(leaders):
            s = min(row[lead], length[g])
            if s >= min_tokens and s > best_len and max(longest[g], n) - s <= width:
                best, best_len = g, s
        if best >= 0:
            group.append(best)
            length[best] = best_len
            longest[best] = max(longest[best], n)
        else:
            group.append(len(leaders))
            leaders.append(r)
            length.append(n - 1)
            longest.append(n)
    return PrefixPlan(leaders=leaders, group=group, length=length)


def split(seq: Seq, plan: PrefixPlan) -> tuple[Seq | None, Seq]:
    """(the leaders' shared prefixes, (G, Lp), None without leaders; every row's remainder, (B, Ls)), each
    re-left-padded."""
    counts = seq.valid.sum(dim=1)
    first = seq.length - counts  # each row's first valid column
    cols = torch.arange(seq.length, device=seq.valid.device)[None]
    shared = torch.tensor(plan.prefix_lengths(), device=seq.valid.device)
    own = seq.valid & (cols >= (first + shared)[:, None])
    rest, _ = seq.select(own)
    if not plan.leaders:
        return None, rest
    index = torch.tensor(plan.leaders, dtype=torch.long, device=seq.valid.device)
    lead = seq.rows(index)
    lead_len = torch.tensor(plan.length, device=seq.valid.device)
    lead_first = first[index]
    prefix, _ = lead.select(lead.valid & (cols < (lead_first + lead_len)[:, None]))
    return prefix, rest
