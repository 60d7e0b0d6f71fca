"""The cheap attention-score facility.

Methods (FastV, AdaptInfer, FlowCut, IAVA, ...) need a *slice* of an attention map: a few query rows
against the keys of one layer. Asking the model for full attention matrices forces eager attention and
O(L^2) memory per head, so instead vlmguard registers its own attention functions with transformers'
public :class:`~transformers.AttentionInterface` (``vlmguard_sdpa``, ``vlmguard_eager``, and FlashAttention-2
under its own name, ``flash_attention_2``: see below). Each one computes the model's real attention output
with the wrapped kernel (SDPA / FlashAttention / eager) and, only when a method asked for it on that module
during the current forward, also computes

    softmax(q[rows] @ k^T * scaling + mask[rows])          # (B, H, Q, K) in fp32

from the very q and k the kernel saw (after RoPE, before GQA expansion is undone), plus optionally the
value vectors. That costs O(Q * K) per head instead of O(L^2), so FlashAttention stays usable.

Usage (inside a forward that the engine drives)::

    with score_probe(module, ScoreRequest(query_index, key_mask, query_pos)) as rec:
        layer(...)
    rec.probs   # (B, H, Q, K) or head-averaged (B, Q, K)

Why FlashAttention keeps its name: transformers treats every implementation name containing "flash" as a
FlashAttention kernel *of that name* (it checks the model's support, loads ``flash_attn`` for exactly
``flash_attention_2``, and takes any other such name for a kernel repository on the Hub, both when the
implementation is set and inside ``flash_attention_forward``, which passes the model's implementation name
on). So the recording wrapper replaces the ``flash_attention_2`` entry of the interface, around the original
function; without an active probe it only forwards the call.
"""
from __future__ import annotations

import contextlib
import functools
import sys
import threading
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch import nn

_LOCAL = threading.local()

# registered name -> the implementation it wraps (FlashAttention-2 is wrapped under its own name, module doc)
BASE_IMPLEMENTATIONS = {
    "vlmguard_sdpa": "sdpa",
    "flash_attention_2": "flash_attention_2",
    "vlmguard_eager": "eager",
}
FLASH = "flash_attention_2"
PROBING_IMPLEMENTATIONS = tuple(BASE_IMPLEMENTATIONS)  # what an Engine's model runs with
# transformers' own functions, taken before any of ours replaces one of them
_ORIGINAL: dict[str, Callable] = {}


@dataclass
class ScoreRequest:
    """Which slice of the attention map to record for one attention module.

    query_index: (B, Q) long — positions (in the current forward's query axis) whose rows are wanted.
    key_mask:    (B, K) bool — which keys are real (False for padding); K = all keys incl. the cache.
    query_pos:   (B, Q) long — each wanted query's position on the key axis, for the causal rule
                 (key j is visible to the query iff j <= query_pos). None: no causal restriction
                 (bidirectional encoders such as the vision tower).
    per_head:    keep heads separate (B, H, Q, K); else average over heads (B, Q, K).
    want_values: also record the value vectors (B, H_kv, K, d).
    query_mean:  instead of rows, one query per sequence: the mean of all its queries (FlowCut's "global
                 token" for towers without a CLS token), over all its keys, no mask. Each sequence the
                 module attends over (a batch row, or each ``cu_seq_lens`` segment of a packed varlen call;
                 Qwen2-VL's tower without FlashAttention calls the function once per image) appends
                 (probs (1 or B, H, 1, K), values or None) to ``parts``, in call order.
    """

    query_index: torch.Tensor | None
    key_mask: torch.Tensor | None = None
    query_pos: torch.Tensor | None = None
    per_head: bool = True
    want_values: bool = False
    want_keys: bool = False
    query_mean: bool = False
    # filled by the attention function
    probs: torch.Tensor | None = None
    values: torch.Tensor | None = None
    keys: torch.Tensor | None = None
    parts: list[tuple[torch.Tensor, torch.Tensor | None]] = field(default_factory=list)
    calls: int = field(default=0)

    def __post_init__(self) -> None:
        if self.query_mean and (self.query_index is not None or self.key_mask is not None
                                or self.query_pos is not None or not self.per_head or self.want_keys):
            raise ValueError("a query_mean request records every head over all keys: it takes no query rows, "
                             "key mask, causal positions, head averaging or keys")


def _active() -> dict[int, ScoreRequest]:
    d = getattr(_LOCAL, "requests", None)
    if d is None:
        d = _LOCAL.requests = {}
    return d


@contextlib.contextmanager
def score_probe(module: nn.Module, request: ScoreRequest) -> Iterator[ScoreRequest]:
    """Record the requested score slice of ``module`` (an attention module) during the block."""
    reqs = _active()
    key = id(module)
    if key in reqs:
        raise RuntimeError("a score probe is already active on this attention module")
    reqs[key] = request
    try:
        yield request
    finally:
        reqs.pop(key, None)


def compute_score_slice(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    scaling: float,
    req: ScoreRequest,
) -> torch.Tensor:
    """softmax(q[rows] k^T * scaling) restricted by req's masks, in fp32. query (B,H,L,d), key (B,Hkv,K,d)."""
    b, h, _, d = query.shape
    hkv, k_len = key.shape[1], key.shape[2]
    idx = req.query_index.to(query.device)
    q_sel = torch.gather(query, 2, idx[:, None, :, None].expand(b, h, idx.shape[1], d)).float()
    k = key.float()
    if hkv != h:  # GQA: group query heads onto their kv head without materialising repeated keys
        q_sel = q_sel.view(b, hkv, h // hkv, idx.shape[1], d)
        logits = torch.einsum("bgrqd,bgkd->bgrqk", q_sel, k).reshape(b, h, idx.shape[1], k_len)
    else:
        logits = q_sel @ k.transpose(-1, -2)
    logits = logits * scaling
    if req.key_mask is None and req.query_pos is None:  # nothing masked: no row can be empty
        return torch.softmax(logits, dim=-1)
    allowed = torch.ones(b, idx.shape[1], k_len, dtype=torch.bool, device=query.device)
    if req.key_mask is not None:
        allowed &= req.key_mask.to(query.device)[:, None, -k_len:]
    if req.query_pos is not None:
        kpos = torch.arange(k_len, device=query.device)
        allowed &= kpos[None, None, :] <= req.query_pos.to(query.device)[:, :, None]
    logits = logits.masked_fill(~allowed[:, None], float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.nan_to_num(probs, nan=0.0)


def record_mean_query(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float,
                      req: ScoreRequest, cu_seq_lens: torch.Tensor | None) -> None:
    """``query_mean`` requests: per sequence, softmax(mean(q) k^T * scaling) in fp32 (and the values)."""
    if cu_seq_lens is None:
        seqs = [(query, key, value)]
    else:  # a packed varlen call (B = 1): one sequence per segment
        lengths = (cu_seq_lens[1:] - cu_seq_lens[:-1]).tolist()
        seqs = list(zip(*(torch.split(t, lengths, dim=2) for t in (query, key, value))))
    for q, k, v in seqs:
        if k.shape[1] != q.shape[1]:
            raise ValueError("query_mean needs as many key heads as query heads (the vision towers it serves)")
        q_mean = q.float().mean(dim=2, keepdim=True)
        probs = torch.softmax((q_mean @ k.float().transpose(-1, -2)) * scaling, dim=-1)
        req.parts.append((probs, v.detach() if req.want_values else None))


@functools.lru_cache(maxsize=None)
def model_eager_attention(attention_cls: type) -> Callable:
    """The eager attention function of the model an attention module belongs to: each transformers model file
    defines its own ``eager_attention_forward`` (CLIP's has no key/value head groups, Llama's repeats them)."""
    fn = getattr(sys.modules.get(attention_cls.__module__), "eager_attention_forward", None)
    if fn is None:
        from transformers.models.llama.modeling_llama import eager_attention_forward as fn
    return fn


def _make_attention(base_name: str) -> Callable:
    def attention(module, query, key, value, attention_mask, *args, **kwargs):
        base = model_eager_attention(type(module)) if base_name == "eager" else _ORIGINAL[base_name]
        reqs = getattr(_LOCAL, "requests", None)
        req = reqs.get(id(module)) if reqs else None
        if req is not None:
            scaling = kwargs.get("scaling")
            if scaling is None:
                scaling = getattr(module, "scaling", query.shape[-1] ** -0.5)
            if req.query_mean:
                record_mean_query(query, key, value, scaling, req, kwargs.get("cu_seq_lens_q"))
            else:
                probs = compute_score_slice(module, query, key, scaling, req)
                req.probs = probs if req.per_head else probs.mean(dim=1)
                if req.want_values:
                    req.values = value.detach()
                if req.want_keys:
                    req.keys = key.detach()
            req.calls += 1
        return base(module, query, key, value, attention_mask, *args, **kwargs)

    attention.__name__ = f"vlmguard_{base_name}_attention"
    attention.vlmguard_probe = True  # type: ignore[attr-defined]
    return attention


def register_attention_functions() -> None:
    """Register vlmguard's recording wrappers with transformers' public interfaces (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    for base in ("sdpa", FLASH):
        current = ALL_ATTENTION_FUNCTIONS[base]
        if not getattr(current, "vlmguard_probe", False):  # ours already: the original is kept from before
            _ORIGINAL[base] = current
    for name, base in BASE_IMPLEMENTATIONS.items():
        if not getattr(ALL_ATTENTION_FUNCTIONS.get(name), "vlmguard_probe", False):
            AttentionInterface.register(name, _make_attention(base))
        if name not in ALL_MASK_ATTENTION_FUNCTIONS:
            mask_base = base if base in ALL_MASK_ATTENTION_FUNCTIONS else "sdpa"
            AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[mask_base])


def flash_attention_available() -> bool:
    try:
        import flash_attn  # noqa: F401
    except Exception:
        return False
    return torch.cuda.is_available()


def flash_capable(device: torch.device) -> bool:
    """Whether FlashAttention-2's kernels run on ``device``: a CUDA GPU, Ampere or newer (compute capability 8.0+).
    On a T4 or V100 flash-attn imports, and its first call fails ("FlashAttention only supports Ampere GPUs or
    newer"); on the CPU it has no kernels at all."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(device)[0] >= 8


def choose_attention(requested: str, device: torch.device, dtype: torch.dtype | None = None) -> str:
    """Map a user choice (auto/sdpa/flash_attention_2/eager) to a registered vlmguard implementation.

    ``auto`` takes FlashAttention-2 on CUDA when flash-attn is installed, the GPU runs its kernels (Ampere+) and
    the weights are in half precision (``dtype`` None: not known yet), else SDPA. FlashAttention's kernels run in
    float16 / bfloat16 only, so asking for it with float32 weights on CUDA (or on an older GPU) is refused here
    rather than in the first forward."""
    from vlmguard.errors import InvalidInput

    half = dtype is None or dtype in (torch.float16, torch.bfloat16)
    requested = (requested or "auto").lower()
    if requested == "auto":
        flash = device.type == "cuda" and half and flash_attention_available() and flash_capable(device)
        requested = "flash_attention_2" if flash else "sdpa"
    table = {"sdpa": "vlmguard_sdpa", "flash_attention_2": FLASH, "flash": FLASH, "eager": "vlmguard_eager"}
    if requested not in table:
        raise InvalidInput(f"unknown attention implementation {requested!r} (use auto, sdpa, flash_attention_2, eager)")
    if table[requested] == FLASH:
        if not flash_attention_available():
            raise InvalidInput("flash_attention_2 needs CUDA and the flash-attn package (pip install 'vlmguard[gpu]')")
        if not flash_capable(device):
            if device.type != "cuda":
                raise InvalidInput(f"flash_attention_2 runs on CUDA GPUs only, not on {device.type}: use --attn sdpa")
            major, minor = torch.cuda.get_device_capability(device)
            raise InvalidInput(f"flash_attention_2 needs an Ampere or newer GPU (compute capability 8.0+), this one is "
                               f"{major}.{minor}: use --attn sdpa")
        if device.type == "cuda" and not half:
            raise InvalidInput(f"flash_attention_2 runs in float16 or bfloat16, not {str(dtype).replace('torch.', '')}: "
                               "use --dtype bfloat16 (or auto), or --attn sdpa")
    return table[requested]
