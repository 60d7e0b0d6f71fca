"""The lm_head on few CPU rows (vlmguard/models/lm_head.py): the transposed product gives nn.Linear's logits to
float rounding, the layout is chosen once by timing both on the model's own weight, and many rows, a GPU tensor or
a module that is no nn.Linear keep the module's own call."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from vlmguard.models.lm_head import SMALL_ROWS, HeadLayout, transposed_product


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [1, 2, 5])
def test_the_transposed_product_is_the_linear_layers(rows, bias):
    torch.manual_seed(0)
    head = nn.Linear(64, 1000, bias=bias)
    x = torch.randn(rows, 64)
    out = transposed_product(head, x)
    assert out.shape == (rows, 1000) and out.is_contiguous()
    torch.testing.assert_close(out, head(x), rtol=1e-5, atol=1e-5)


def test_the_layout_is_timed_once_and_kept():
    torch.manual_seed(0)
    head = nn.Linear(64, 1000, bias=False)
    layout = HeadLayout()
    with torch.no_grad():
        out = layout(head, torch.randn(2, 1, 64))  # a decode step's (B, 1, D)
    assert out.shape == (2, 1, 1000) and layout.transposed is not None
    assert set(layout.timings_ms) == {"linear", "transposed"} and all(t > 0 for t in layout.timings_ms.values())
    decided = layout.transposed
    layout.timings_ms = {}
    with torch.no_grad():
        for rows in (1, 3, SMALL_ROWS):
            x = torch.randn(rows, 64)
            torch.testing.assert_close(layout(head, x), head(x), rtol=1e-5, atol=1e-5)
    assert layout.transposed is decided and layout.timings_ms == {}  # not timed again


def test_many_rows_and_other_modules_keep_their_own_call():
    torch.manual_seed(0)
    head = nn.Linear(64, 1000, bias=False)
    layout = HeadLayout()
    layout.transposed = True
    x = torch.randn(SMALL_ROWS + 1, 64)
    with torch.no_grad():
        assert torch.equal(layout(head, x), head(x))  # the module's own product, bit for bit
        other = nn.Sequential(head)
        assert torch.equal(layout(other, x[:2]), other(x[:2]))
    assert layout.timings_ms == {}


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_either_layout_gives_the_same_answers(family):
    """The engine's decode with the transposed product forced, and with nn.Linear's: the same tokens and, to
    float rounding, the same log-probabilities (greedy, and VCD's two rows)."""
    from test_prefix_cache import engine, images
    from vlmguard.engine import Request
    from vlmguard.spec import GenerationSpec

    eng = engine(family)
    requests = [Request("Describe the picture.", [images(family)[0]])]
    results = {}
    try:
        for transposed in (False, True):
            eng.adapter.head_layout.transposed = transposed
            for decoding in ("greedy", "vcd"):
                spec = GenerationSpec(decoding=decoding, max_new_tokens=8, min_new_tokens=8, logprobs=2)
                (results[transposed, decoding],) = eng.generate(requests, spec)
    finally:
        eng.adapter.head_layout.transposed = None
    for decoding in ("greedy", "vcd"):
        a, b = results[False, decoding], results[True, decoding]
        assert a.token_ids == b.token_ids
        assert [x.logprob for x in b.logprobs] == pytest.approx([x.logprob for x in a.logprobs], abs=1e-4)
