"""Random baseline: keep a seeded uniform sample of each image's visual tokens before the LLM.

The sample of a row depends only on ``seed`` and the row's visual token count (one generator per row),
so a batch gives the same indices as running each request alone. Kept tokens stay in raster order.
"""
from __future__ import annotations

from typing import Literal

import torch


from vlmguard.pruning.base import PruneContext, Pruner
from vlmguard.pruning.registry import PRUNERS
from vlmguard.spec import GeneratorSeed, MethodParams


class RandomParams(MethodParams):
    seed: GeneratorSeed = 0
    # "compact": kept tokens get contiguous positions, as if the input were physically shorter (as FlowCut);
    # "original": they keep their original RoPE positions.
    position_mode: Literal["compact", "original"] = "compact"


@PRUNERS.register("random")
class RandomPruner(Pruner):
    name = "random"
    Params = RandomParams
    side = "vision"

    def __init__(self, params: RandomParams, budget):
        super().__init__(params, budget)
        self.position_mode = params.position_mode

    def sample(self, n_visual: int) -> torch.Tensor:
        """Sorted kept indices for a row with ``n_visual`` visual tokens."""
        k = self.keep_count(n_visual)
        g = torch.Generator().manual_seed(self.params.seed)
        return torch.randperm(n_visual, generator=g)[:k].sort().values

    def prune_images(self, ctx: PruneContext):
        feats = ctx.image_features()
        out_feats: list[torch.Tensor | None] = []
        kept: list[torch.Tensor | None] = []
        for f in feats:
            if f is None:
                out_feats.append(None)
                kept.append(None)
                continue
            idx = self.sample(f.shape[0])
            out_feats.append(f[idx.to(f.device)])
            kept.append(idx)
        return out_feats, kept
