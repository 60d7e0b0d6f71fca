"""Plain decoding: the model's own next-token distribution, picked greedily or sampled.

``greedy`` (alias ``none``) and ``sample`` differ only in the default token selection; temperature,
top-p, top-k and seed are GenerationSpec fields shared by every decoder.
"""
from __future__ import annotations

from vlmguard.decoding.base import Decoder
from vlmguard.decoding.registry import DECODERS


@DECODERS.register("greedy", "none")
class Greedy(Decoder):
    joinable = True
    merged_combine = True


@DECODERS.register("sample")
class Sample(Decoder):
    joinable = True
    merged_combine = True
