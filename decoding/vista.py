"""VISTA — Visual Information Steering with Token-logit Augmentation (Li et al., ICML 2025;
``shared/methods/vista.md``; follows the reference code where paper and code differ).

- VSV (visual steering vector): in ``setup``, one batched pre-pass over P+ (the prompt with its image) and
  P- (the same prompt with the image placeholders removed) records the last-position residual after every
  decoder layer; v_l = h_l(P+) - h_l(P-). During prefill and decoding a forward hook on every steered
  layer's MLP rotates its output x toward v_l, keeping its norm:
      g = 1 + max(0, cos(x, -v_l)),  x' = |x| * normalize(x/|x| + lambda * g * v_l/|v_l|)
- SLA (self-logits augmentation): the decode loop hands ``combine`` the main rows' residual stream after
  the window layers [L-1-w, L-2]; the final logits become
      z = (1 - alpha) * W N(h_last) + alpha * W mean_l h_l      (no final norm on the window, as the code)
  computed as (1 - alpha) * logits + alpha * lm_head(mean h_l), exact since lm_head is linear.
``vsv_decode_only`` (vista.md section 6, not the reference): the prompt is not steered, so the request's own
prefill is P+ (its states after every layer, recorded by the engine, ``after_prefill``) and only P- runs as a
pre-pass; the hooks go in after the prefill and steer the generated tokens. One full prefill fewer per
request; with a pruner, P+ is the pruned prefill (the reference's P+ is unpruned).
No extra branches: VISTA lives inside the forward pass, so any pruner and the sampler compose with it.
In-flight batching: the hooks steer only the rows the engine declares as this context's in the running
forward (``owned_rows``), each with its own request's vector, so joined groups share one forward and a
joiner's prefill or pre-pass is never steered by another group's hooks.
"""
from __future__ import annotations

from typing import Any

import torch
from pydantic import BaseModel, Field, model_validator

from vlmguard.decoding.base import Combined, DecodeContext, Decoder, OwnedRows, StepInputs, owned_rows
from vlmguard.decoding.contrast import log_probs
from vlmguard.decoding.registry import DECODERS
from vlmguard.decoding.views import image_free_prompt
from vlmguard.spec import MethodParams


class VISTAParams(MethodParams):
    vsv_lambda: float = Field(0.1, ge=0.0, le=1.0, description="steering strength (0 = VSV off)")
    sla_alpha: float = Field(0.3, ge=0.0, le=1.0, description="self-logits mixing weight (0 = SLA off)")
    sla_window: int | None = Field(None, ge=1, description="window size w (None: round(0.19 * layers))")
    sla_apply_final_norm: bool = Field(False, description="apply the final norm to window layers")
    vsv_layers: tuple[int, int] | None = Field(None, description="steer layers[start:end] (None: all)")
    simple_mode: bool = Field(False, description="fixed gain 1 instead of the adaptive gain")
    reference_pca_quirk: bool = Field(True, description="add 1.0 to v_0[0] as the reference code does")
    vsv_decode_only: bool = Field(False, description="not reference behaviour: steer generated tokens only; the "
                                  "request's own (unsteered) prefill serves as P+, one prefill fewer")


    @model_validator(mode="after")
    def _check_layers(self) -> "VISTAParams":
        if self.vsv_layers is not None:
            s, e = self.vsv_layers
            if s < 0 or e <= s:
                raise ValueError(f"vsv_layers must be (start, end) with 0 <= start < end, got {self.vsv_layers}")
        return self


def steer(x: torch.Tensor, v_unit: torch.Tensor, lam: float, simple: bool = False) -> torch.Tensor:
    """The VSV rotation of MLP outputs x (B, T, D) toward unit vectors v_unit (B, D); fp32 math.

    Runs in a hook on every steered layer of every decode step, where each tensor op costs more in dispatch
    than in arithmetic: dtype conversions that would be no-ops are skipped (same values, bit for bit)."""
    xf = x if x.dtype == torch.float32 else x.float()
    norm = xf.norm(dim=-1, keepdim=True)
    safe = norm.clamp(min=1e-12)
    xhat = xf / safe
    v = v_unit[:, None, :]
    if simple:
        gain = torch.ones_like(norm)
    else:
        gain = 1.0 + (-(xhat * v).sum(dim=-1, keepdim=True)).clamp(min=0.0)
    mixed = xhat + lam * gain * v
    out = norm * mixed / mixed.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    out = torch.where(norm > 0, out, xf)
    return out if out.dtype == x.dtype else out.to(x.dtype)


def sla_window(num_layers: int, w: int | None) -> tuple[int, ...]:
    """0-based window [L-1-w, L-2] (the w layers just below the last one)."""
    if w is None:
        w = max(1, round(0.19 * num_layers))
    w = min(w, num_layers - 1)
    return tuple(range(num_layers - 1 - w, num_layers - 1))


@DECODERS.register("vista")
class VISTA(Decoder):
    name = "vista"
    Params = VISTAParams
    joinable = True  # per-request vectors in the instance; hooks steer the rows they own (see module doc)
    row_hooks = True
    penalises_combined = True  # penalties act on z, as on the reference's logits (z is the model's output there)

    def __init__(self, params: BaseModel):
        super().__init__(params)
        self.hidden_layers = ()
        self._handles: list[Any] = []
        self._rows_cache: tuple | None = None  # (OwnedRows, device, its rows' vectors, rows steered)
        self._neg: dict[int, torch.Tensor] | None = None  # vsv_decode_only: P- states until the prefill's P+

    @property
    def prefill_hidden_layers(self) -> tuple[int, ...]:
        if self._neg is None:
            return self.hidden_layers
        return tuple(range(self.ctx.adapter.num_layers))  # P+ comes from the main prefill

    # ---- setup: steering vectors + hooks -------------------------------------------------------
    def setup(self, ctx: DecodeContext) -> None:
        self.ctx = ctx
        p = self.params
        ad = ctx.adapter
        n_layers = ad.num_layers
        self.hidden_layers = sla_window(n_layers, p.sla_window) if p.sla_alpha > 0 else ()
        s, e = p.vsv_layers if p.vsv_layers is not None else (0, n_layers)
        if e > n_layers:
            from vlmguard.errors import InvalidInput

            raise InvalidInput(f"vista: vsv_layers end {e} exceeds the model's {n_layers} layers")
        self.steered = list(range(s, e))
        n = len(ctx.prompts)
        self.has_image = [bool(pr.images) for pr in ctx.prompts]
        ctx.add_report({"sla_layers": list(self.hidden_layers), "vsv_layers": [s, e]},
                       applied=[p.vsv_lambda > 0 and h for h in self.has_image])
        if p.vsv_lambda <= 0 or not any(self.has_image):
            return
        with_img = [i for i in range(n) if self.has_image[i]]
        pos = [] if p.vsv_decode_only else [ctx.prompts[i] for i in with_img]
        neg = [image_free_prompt(ad, ctx.prompts[i]) for i in with_img]
        hid = ctx.probe_forward(pos + neg, hidden_layers=tuple(range(n_layers)))["hidden"]
        k = len(pos)
        if p.vsv_decode_only:  # P+ is the main prefill: vectors and hooks after it (after_prefill)
            self._neg = hid
            return
        self._steer_with({layer: hid[layer][:k] for layer in range(n_layers)},
                         {layer: hid[layer][k:] for layer in range(n_layers)})

    def after_prefill(self, ctx: DecodeContext, hidden: dict[int, torch.Tensor]) -> None:
        if self._neg is None:
            return
        with_img = [i for i in range(len(ctx.prompts)) if self.has_image[i]]
        neg, self._neg = self._neg, None
        self._steer_with({layer: h[with_img] for layer, h in hidden.items()}, neg)

    def _steer_with(self, pos: dict[int, torch.Tensor], neg: dict[int, torch.Tensor]) -> None:
        """v_l = h_l(P+) - h_l(P-) for the requests with an image (rows of ``pos`` / ``neg``), then the hooks."""
        ctx, p, ad = self.ctx, self.params, self.ctx.adapter
        n, n_layers = len(ctx.prompts), ad.num_layers
        with_img = [i for i in range(n) if self.has_image[i]]
        d = pos[0].shape[-1]
        dev = pos[0].device
        v = torch.zeros(n, n_layers, d, dtype=torch.float32, device=dev)
        for layer in range(n_layers):
            v[with_img, layer] = pos[layer].float() - neg[layer].float()
        if p.reference_pca_quirk:
            v[with_img, 0, 0] += 1.0
        norms = v.norm(dim=-1, keepdim=True)
        self.v_unit = torch.where(norms > 0, v / norms.clamp(min=1e-12), torch.zeros_like(v))
        self.row_on = torch.tensor(self.has_image, dtype=torch.bool, device=dev)
        ctx.add_report(vsv_norms=[[round(float(x), 4) for x in norms[i, :, 0]] for i in range(n)])
        try:
            for layer in self.steered:
                mlp = ad.layers[layer].mlp
                self._handles.append(mlp.register_forward_hook(self._make_hook(layer)))
        except Exception:
            self.teardown(ctx)
            raise

    def _rows_vectors(self, owned: OwnedRows, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The steering vectors of the forward's rows, every layer (R, L, D), and which rows are steered (R, 1,
        1; None when all are: every request has an image). Gathered once per forward, not once per layer: the
        same OwnedRows object serves all layers of one forward."""
        if self._rows_cache is None or self._rows_cache[0] is not owned or self._rows_cache[1] != device:
            req = owned.requests.to(self.v_unit.device)
            v = self.v_unit[req].to(device)
            on = None if all(self.has_image) else self.row_on[req].to(device)[:, None, None]
            self._rows_cache = (owned, device, v, on)
        return self._rows_cache[2], self._rows_cache[3]

    def _make_hook(self, layer: int):
        def hook(module, args, output):
            owned = owned_rows(self.ctx)
            if owned is None or not isinstance(output, torch.Tensor):
                return None  # not a forward of this context's requests
            v_rows, on = self._rows_vectors(owned, output.device)
            x = output if owned.rows is None else output[owned.rows]
            steered = steer(x, v_rows[:, layer], self.params.vsv_lambda, self.params.simple_mode)
            if on is not None:
                steered = torch.where(on, steered, x)
            return steered if owned.rows is None else output.index_copy(0, owned.rows, steered)

        return hook

    def teardown(self, ctx: DecodeContext) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._rows_cache = None
        self._neg = None

    # ---- per step: SLA --------------------------------------------------------------------------
    def head_input(self, hidden: dict[int, torch.Tensor]) -> torch.Tensor | None:
        """The SLA window's mean residual (B, D) in the lm_head's dtype (its logits: ``window_logits``)."""
        if self.params.sla_alpha <= 0 or not self.hidden_layers:
            return None
        ad = self.ctx.adapter
        hs = [hidden[i] for i in self.hidden_layers]
        if self.params.sla_apply_final_norm:
            hs = [ad.norm(h[:, None])[:, 0] for h in hs]
        mean = torch.stack([h.float() for h in hs], dim=0).mean(dim=0)
        return mean.to(ad.lm_head.weight.dtype)

    def window_logits(self, hidden: dict[int, torch.Tensor]) -> torch.Tensor:
        return self.ctx.adapter.logits(self.head_input(hidden))

    def combine(self, step: StepInputs) -> Combined:
        penalise = step.penalise or (lambda t: t)
        main = log_probs(penalise(step.logits["main"].float()))
        a = self.params.sla_alpha
        if a <= 0 or not self.hidden_layers:
            return Combined(scores=main, main_logprobs=main)
        # the engine usually ran the window through the lm_head with the main rows (one weight read)
        window = step.head if step.head is not None else self.window_logits(step.hidden)
        z = penalise((1.0 - a) * step.logits["main"].float() + a * window)
        return Combined(scores=torch.log_softmax(z, dim=-1), main_logprobs=main,
                        contrast_logprobs=log_probs(penalise(window.float())))
