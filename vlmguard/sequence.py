"""A batch of token sequences as the LLM sees them during prefill, with the bookkeeping pruning needs.

Rows are left-padded. Besides hidden states, every position carries its RoPE position (1-D, or 3-D for
Qwen2-VL's M-RoPE), a validity flag (False = padding) and its visual index (-1 for text tokens, else the
index of the visual token within its request's image, in raster order). Pruning is `select(keep)`: each
row keeps the marked positions in order, rows are re-left-padded to the longest survivor.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch


@dataclass
class Seq:
    hidden: torch.Tensor  # (B, L, D)
    valid: torch.Tensor  # (B, L) bool
    positions: torch.Tensor  # (B, L) long, or (3, B, L) for M-RoPE
    visual: torch.Tensor  # (B, L) long, -1 = text

    @property
    def batch_size(self) -> int:
        return self.hidden.shape[0]

    @property
    def length(self) -> int:
        return self.hidden.shape[1]

    @property
    def mrope(self) -> bool:
        return self.positions.dim() == 3

    def visual_mask(self) -> torch.Tensor:
        return (self.visual >= 0) & self.valid

    def visual_counts(self) -> torch.Tensor:
        return self.visual_mask().sum(dim=1)

    def with_hidden(self, hidden: torch.Tensor) -> "Seq":
        return replace(self, hidden=hidden)

    def rows(self, index: torch.Tensor | slice) -> "Seq":
        """These rows (a LongTensor of row indices, or a slice), every column kept."""
        return Seq(hidden=self.hidden[index], valid=self.valid[index], positions=self.positions[..., index, :],
                   visual=self.visual[index])

    def last_positions(self) -> torch.Tensor:
        """RoPE position of each row's last token: (B,) or (3, B)."""
        return self.positions[..., -1]

    def select(self, keep: torch.Tensor) -> tuple["Seq", torch.Tensor]:
        """Keep the marked positions of each row (padding is always dropped), re-left-pad.

        Returns the new Seq and the gather index (B, L') into the old length (pads point at 0).
        """
        keep = keep & self.valid
        counts = keep.sum(dim=1)
        new_len = int(counts.max().item()) if counts.numel() else 0
        b = self.batch_size
        device = self.hidden.device
        # Stable ordering: kept positions first in original order, sorted by (not kept, position).
        order_key = (~keep).long() * (self.length + 1) + torch.arange(self.length, device=device)[None]
        order = order_key.argsort(dim=1)[:, :new_len]  # kept positions, in order, then junk
        # Right-align: row r's kept tokens occupy the last counts[r] slots.
        shift = new_len - counts  # (B,)
        slot = torch.arange(new_len, device=device)[None].expand(b, -1)
        src_slot = slot - shift[:, None]
        valid = src_slot >= 0
        src_slot = src_slot.clamp(min=0)
        index = torch.gather(order, 1, src_slot)
        index = torch.where(valid, index, torch.zeros_like(index))
        hidden = torch.gather(self.hidden, 1, index[..., None].expand(-1, -1, self.hidden.shape[-1]))
        hidden = hidden * valid[..., None].to(hidden.dtype)
        if self.mrope:
            positions = torch.gather(self.positions, 2, index[None].expand(3, -1, -1))
        else:
            positions = torch.gather(self.positions, 1, index)
        positions = positions.masked_fill(~valid if not self.mrope else ~valid[None].expand(3, -1, -1), 0)
        visual = torch.gather(self.visual, 1, index).masked_fill(~valid, -1)
        return Seq(hidden=hidden, valid=valid, positions=positions, visual=visual), index


def stack_rows(seqs: list[Seq], length: int | None = None) -> Seq:
    """The rows of ``seqs`` in order, each left-padded to ``length`` (default: the longest) with padding (invalid,
    position 0, visual -1, zero hidden states)."""
    length = max(s.length for s in seqs) if length is None else length

    def pad(x: torch.Tensor, value, dim: int) -> torch.Tensor:
        missing = length - x.shape[dim]
        if missing <= 0:
            return x
        shape = list(x.shape)
        shape[dim] = missing
        return torch.cat([x.new_full(shape, value), x], dim=dim)

    return Seq(hidden=torch.cat([pad(s.hidden, 0, 1) for s in seqs]),
               valid=torch.cat([pad(s.valid, False, 1) for s in seqs]),
               positions=torch.cat([pad(s.positions, 0, -1) for s in seqs], dim=-2),
               visual=torch.cat([pad(s.visual, -1, 1) for s in seqs]))


def compact_positions(seq: Seq) -> Seq:
    """Renumber 1-D positions contiguously over valid tokens (what a physically shorter input gets)."""
    if seq.mrope:
        return seq
    pos = seq.valid.long().cumsum(dim=1) - 1
    pos = pos.clamp(min=0).masked_fill(~seq.valid, 0)
    return replace(seq, positions=pos)


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """bool (B, Q, K) -> additive (B, 1, Q, K) with 0 where allowed and the dtype's min elsewhere."""
    neg = torch.finfo(dtype).min
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, neg)
    return mask[:, None]


def causal_allowed(valid_q: torch.Tensor, valid_k: torch.Tensor) -> torch.Tensor:
    """Prefill (no cache): query i sees key j <= i, both valid. Padded query rows see themselves only."""
    q_len, k_len = valid_q.shape[1], valid_k.shape[1]
    causal = torch.ones(q_len, k_len, dtype=torch.bool, device=valid_q.device).tril(k_len - q_len)
    allowed = causal[None] & valid_k[:, None, :]
    # Keep fully-masked (padding) query rows finite: let them attend to themselves.
    eye = torch.eye(q_len, k_len, dtype=torch.bool, device=valid_q.device)[None]
    return allowed | (eye & ~valid_q[:, :, None])
