"""FlashAttention-2 on a CPU, for tests: a stand-in ``flash_attn`` package with the kernel's semantics, and an
environment in which transformers believes flash-attn is installed.

The engine's FlashAttention path (transformers' ``flash_attention_forward``: un-padding through the 2-D mask,
varlen calls with ``cu_seqlens``, Qwen2-VL's packed vision tower; our recording wrapper and the runner's
2-D masks) then runs end to end without a GPU. Only the kernels are replaced: ``flash_attn_func`` and
``flash_attn_varlen_func`` compute softmax(q k^T * scale) v per sequence in fp32, with flash-attn >= 2.1's
causal rule (aligned to the bottom right when the query is shorter than the keys) and grouped key/value
heads. ``calls`` counts their calls, so a test can tell that the flash path really ran.
"""
from __future__ import annotations

import sys
import types
from collections import Counter

import pytest
import torch

calls: Counter[str] = Counter()


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool) -> torch.Tensor:
    """One sequence: q (Sq, H, D), k / v (Sk, Hkv, D) -> (Sq, H, D)."""
    sq, h, _ = q.shape
    sk, hkv, _ = k.shape
    if hkv != h:
        k, v = k.repeat_interleave(h // hkv, dim=1), v.repeat_interleave(h // hkv, dim=1)
    s = torch.einsum("qhd,khd->hqk", q.float(), k.float()) * scale
    if causal:
        last_key = torch.arange(sq)[:, None] + (sk - sq)  # bottom-right alignment
        s = s.masked_fill(torch.arange(sk)[None, :] > last_key, float("-inf"))
    return torch.einsum("hqk,khd->qhd", torch.softmax(s, dim=-1), v.float()).to(q.dtype)


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    calls["func"] += 1
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    return torch.stack([_attend(q[b], k[b], v[b], scale, causal) for b in range(q.shape[0])])


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None):
    calls["varlen"] += 1
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    return torch.cat([_attend(q[cq[i]:cq[i + 1]], k[ck[i]:ck[i + 1]], v[ck[i]:ck[i + 1]], scale, causal)
                      for i in range(len(cq) - 1)])


def flash_attn_with_kvcache(*args, **kwargs):  # paged decoding: not used by the engine
    raise NotImplementedError


def _package() -> tuple[types.ModuleType, types.ModuleType]:
    from transformers.modeling_flash_attention_utils import _pad_input, _unpad_input

    pkg = types.ModuleType("flash_attn")
    pkg.__version__ = "2.8.3"
    pkg.flash_attn_func, pkg.flash_attn_varlen_func = flash_attn_func, flash_attn_varlen_func
    pkg.flash_attn_with_kvcache = flash_attn_with_kvcache
    padding = types.ModuleType("flash_attn.bert_padding")
    padding.pad_input, padding.unpad_input = _pad_input, _unpad_input
    pkg.bert_padding = padding
    return pkg, padding


def install(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """transformers and vlmguard see an installed flash-attn 2 whose kernels are the functions above (undone with
    ``monkeypatch``). Returns the kernels' call counter, cleared."""
    import transformers.integrations.flash_attention as fa_integration
    import transformers.modeling_flash_attention_utils as fa_utils
    from transformers import PreTrainedModel

    import vlmguard.attention as attention

    pkg, padding = _package()
    monkeypatch.setitem(sys.modules, "flash_attn", pkg)
    monkeypatch.setitem(sys.modules, "flash_attn.bert_padding", padding)
    available = lambda *a, **k: True  # noqa: E731
    monkeypatch.setattr(fa_utils, "is_flash_attn_2_available", available)
    monkeypatch.setitem(fa_utils.FLASH_ATTENTION_COMPATIBILITY_MATRIX[2], "general_availability_check", available)
    # transformers' lazily imported kernels: reloaded from the stand-in now, restored after the test
    for name in ("_loaded_implementation", "_flash_fn", "_flash_varlen_fn", "_flash_with_kvcache_fn", "_pad_fn",
                 "_unpad_fn", "_process_flash_kwargs_fn", "_process_with_kvcache_kwargs_fn"):
        monkeypatch.setattr(fa_utils, name, None, raising=False)
    monkeypatch.setattr(fa_integration, "_use_top_left_mask", False)
    # its device/dtype check (CUDA, half precision) is what a CPU cannot pass
    monkeypatch.setattr(PreTrainedModel, "_flash_attn_can_dispatch", lambda self, *a, **k: True)
    monkeypatch.setattr(attention, "flash_attention_available", lambda: True)
    monkeypatch.setattr(attention, "flash_capable", lambda device: True)  # the stand-in's kernels run on a CPU
    calls.clear()
    return calls
