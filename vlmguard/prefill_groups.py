"""Prefill passes by length: rows whose work differs greatly are prefilled in separate passes, not padded to one.

A prefill runs its rows as one left-padded batch, and a padding slot costs what a token costs. Where the rows'
lengths differ greatly, most of the pass can be padding: M3ID's image-free row (52 tokens of LLaVA-1.5's prompt)
beside its request's row (628) made a request's prefill cost two full rows; a chat turn that takes 840 tokens from
the prefix cache beside a row that takes nothing ran its 74 new tokens padded to the other row's 913. Such a batch
is cut into groups of rows with similar work, each prefilled alone (with its own shared prefixes and cached
entries), and the decode states are merged (``LayerRunner.merge``), as a request joining a running batch's is.

A row's *work* is what its own pass computes: its tokens less those it takes from a shared prefix or the prefix
cache (``PrefixPlan.prefix_lengths``). The cost of a set of rows, in token slots, is what the prefill's passes run:
its shared prefixes (one row per group, at the longest) and every row's remainder at the longest remainder. Rows
that share a prefix stay together. The rows are ordered by work and the one cut that costs least is taken where it
saves at least ``PASS_TOKENS`` slots (an extra pass reads every weight once more, our estimate of its cost in
token slots) and ``MIN_SAVING`` of the single pass (so a batch that differs a little stays one pass; the values
are ours); each group may be cut again. Outputs are those of one pass to float rounding (another batch
composition), as for any change of batch.
"""
from __future__ import annotations

from vlmguard.prefix_sharing import PrefixPlan

PASS_TOKENS = 64
MIN_SAVING = 0.25


def _cost(units: list[tuple[list[int], int]], work: list[int]) -> int:
    """Token slots of one prefill of these units (rows, shared prefix length): the shared prefixes' pass and the
    remainders' pass, each left-padded to its longest."""
    rows = [r for unit, _ in units for r in unit]
    prefixes = [n for _, n in units if n]
    return len(prefixes) * max(prefixes, default=0) + len(rows) * max(work[r] for r in rows)


def length_groups(counts: list[int], plan: PrefixPlan | None) -> list[list[int]] | None:
    """The rows of a prefill (``counts``: each row's tokens; ``plan``: its shared prefixes and cached entries, None:
    none) cut into two groups prefilled apart, each in ascending row order and the groups in the order of their
    first rows; None where one pass costs about as little."""
    b = len(counts)
    if b < 2:
        return None
    prefix = plan.prefix_lengths() if plan is not None else [0] * b
    work = [c - p for c, p in zip(counts, prefix)]
    groups: dict[int, list[int]] = {}
    units: list[tuple[list[int], int]] = []  # (rows, the shared prefix they compute once: 0 for none)
    for r in range(b):
        g = plan.group[r] if plan is not None else -1
        if g >= 0:
            groups.setdefault(g, []).append(r)
        else:
            units.append(([r], 0))
    units += [(rows, plan.length[g]) for g, rows in groups.items()]
    if len(units) < 2:
        return None
    units.sort(key=lambda u: -max(work[r] for r in u[0]))
    whole = _cost(units, work)
    best, cut = whole, 0
    for k in range(1, len(units)):
        cost = _cost(units[:k], work) + _cost(units[k:], work) + PASS_TOKENS
        if cost < best:
            best, cut = cost, k
    if not cut or whole - best < max(PASS_TOKENS, MIN_SAVING * whole):
        return None
    parts = [sorted(r for rows, _ in units[:cut] for r in rows), sorted(r for rows, _ in units[cut:] for r in rows)]
    return sorted(parts, key=lambda rows: rows[0])
