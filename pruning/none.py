"""No pruning: every visual token reaches every layer."""
from __future__ import annotations

from vlmguard.pruning.base import Pruner
from vlmguard.pruning.registry import PRUNERS


@PRUNERS.register("none")
class NoPruning(Pruner):
    side = "none"

    def keep_count(self, n_visual: int) -> int:
        return n_visual
