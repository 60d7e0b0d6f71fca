"""Small scoring helpers shared by the pruning methods (selection, query rows, recomputed queries).

Everything here works on the engine's data structures (``Seq``, ``ScoreRequest`` results) and never asks
the model for attention matrices.
"""
from __future__ import annotations

import torch

from vlmguard.sequence import Seq


def top_sorted(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest entries of a 1-D score vector, ascending.

    Ties are broken by the lower index (stable descending sort), so the choice is deterministic on
    every device. Scores are compared in fp32.
    """
    k = max(0, min(int(k), scores.numel()))
    order = torch.argsort(-scores.float(), stable=True)[:k]
    return order.sort().values


def keep_mask_from_positions(seq: Seq, kept_positions: list[torch.Tensor | None]) -> torch.Tensor:
    """Keep mask (B, L): every valid text position plus, per row, the given visual positions.

    ``None`` for a row keeps all its visual tokens.
    """
    vis = seq.visual_mask()
    keep = ~vis & seq.valid
    for r, pos in enumerate(kept_positions):
        if pos is None:
            keep[r] |= vis[r]
        elif pos.numel():
            keep[r, pos.to(keep.device)] = True
    return keep


def last_query_rows(seq: Seq) -> torch.Tensor:
    """(B, 1) index of each row's last prompt token (rows are left-padded, so it is the last column)."""
    return torch.full((seq.batch_size, 1), seq.length - 1, dtype=torch.long, device=seq.hidden.device)


def text_after_vision(seq: Seq, row: int) -> torch.Tensor:
    """Positions of the valid non-visual tokens after the row's first visual token (AdaptInfer's text set).

    For one contiguous image block this is the question plus the answer prefix. Empty when the row has
    no visual token or nothing follows it.
    """
    vis = seq.visual_mask()[row]
    if not bool(vis.any()):
        return torch.zeros(0, dtype=torch.long, device=vis.device)
    first = int(vis.nonzero()[0, 0])
    pos = torch.arange(seq.length, device=vis.device)
    return ((pos > first) & ~vis & seq.valid[row]).nonzero().squeeze(1)


def pad_rows(rows: list[torch.Tensor], fill: int) -> torch.Tensor:
    """Stack 1-D index tensors of different lengths into (B, max_len), padding with ``fill``."""
    n = max((r.numel() for r in rows), default=0)
    n = max(n, 1)
    out = torch.full((len(rows), n), fill, dtype=torch.long)
    for i, r in enumerate(rows):
        if r.numel():
            out[i, : r.numel()] = r.cpu()
            out[i, r.numel():] = r[-1].cpu()
    return out


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def layer_queries(adapter, layer_idx: int, seq: Seq) -> torch.Tensor:
    """Post-RoPE queries (B, H, L, d) of decoder layer ``layer_idx`` for the layer input ``seq.hidden``.

    Recomputed from the layer's own modules (input norm, q_proj) and the model's rotary embedding at the
    true positions (1-D, or M-RoPE for Qwen2-VL, whose rotary module already interleaves the sections).
    Used where a method needs many query rows but only a reduction of them (FastV "all").
    """
    layer = adapter.layers[layer_idx]
    attn = adapter.attention_module(layer_idx)
    x = layer.input_layernorm(seq.hidden)
    b, n, _ = x.shape
    head_dim = getattr(attn, "head_dim", None) or adapter.text_config.hidden_size // adapter.text_config.num_attention_heads
    q = attn.q_proj(x).view(b, n, -1, head_dim).transpose(1, 2)
    cos, sin = adapter.rotary(seq.hidden, seq.positions)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + rotate_half(q) * sin


def column_mean_attention(query: torch.Tensor, key: torch.Tensor, valid: torch.Tensor, scaling: float,
                          chunk: int = 256) -> torch.Tensor:
    """Mean attention each key receives from all valid causal queries, averaged over heads: (B, L).

    query (B, H, L, d), key (B, H_kv, L, d), both post-RoPE, same positions (a prefill without cache).
    Computed in query chunks in fp32, so no (L x L) matrix per head is ever held in memory.
    """
    b, h, n, d = query.shape
    hkv = key.shape[1]
    k = key.float()
    if hkv != h:
        k = k.repeat_interleave(h // hkv, dim=1)
    total = torch.zeros(b, n, dtype=torch.float32, device=query.device)
    kpos = torch.arange(n, device=query.device)
    for start in range(0, n, chunk):
        q = query[:, :, start:start + chunk].float()
        qpos = kpos[start:start + chunk]
        logits = (q @ k.transpose(-1, -2)) * scaling  # (B, H, c, L)
        allowed = (kpos[None, :] <= qpos[:, None])[None] & valid[:, None, :]  # (B, c, L)
        logits = logits.masked_fill(~allowed[:, None], float("-inf"))
        probs = torch.nan_to_num(torch.softmax(logits, dim=-1), nan=0.0)
        qvalid = valid[:, start:start + chunk].float()  # (B, c)
        total += (probs.mean(dim=1) * qvalid[..., None]).sum(dim=1)
    return total / valid.float().sum(dim=1, keepdim=True).clamp(min=1.0)


def record_stage(ctx, key: str, layer_idx: int, seq: Seq, kept_positions: list[torch.Tensor | None]) -> None:
    """Note the visual indices each row kept at an LLM-side cut in ``ctx.report[key][layer]``.

    Rows left alone get None. Tests use this to replay a prefill with frozen selections.
    """
    rows = []
    for r, pos in enumerate(kept_positions):
        rows.append(None if pos is None else seq.visual[r, pos.to(seq.visual.device)].tolist())
    ctx.report.setdefault(key, {})[int(layer_idx)] = rows
    ctx.row_keyed[key] = "layers"


def report_visual_scores(ctx, row: int, n_visual: int, index: torch.Tensor, values: torch.Tensor) -> None:
    """Store a row's per-visual-token scores (raster order, 0 where a token got none) in the pruning report,
    for the dashboard's heatmap. ``index``: visual indices 0..n_visual-1; ``values``: their scores."""
    full = torch.zeros(n_visual)
    full[index.cpu()] = values.float().cpu()
    ctx.report.setdefault("per_row", {}).setdefault(row, {})["visual_scores"] = full.tolist()


def report_position_scores(ctx, seq: Seq, scores: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """``report_visual_scores`` for the main-branch rows of ``scores``: row -> (visual sequence positions,
    their scores)."""
    for r in ctx.main_rows:
        if r in scores and scores[r][0].numel():
            pos, values = scores[r]
            report_visual_scores(ctx, r, ctx.n_visual[r], seq.visual[r, pos], values)
