"""The Engine: one loaded LVLM serving batches of (images, prompt) requests with any pruner x decoder.

Flow of ``generate(requests, spec)``:
    resolve pruner + decoder -> decoder.setup (pre-passes, hooks) -> rows = requests x branches
    -> encode (processor, chat template, left padding) -> vision (adapter, or the vision-side pruner)
    -> prefill layer by layer (LLM-side pruner hooks) -> decode loop (one forward per step for every
    branch row; decoder.combine; sampler; stop rules; finished requests leave the batch)

Composition rule (pruner x decoder): the pruner decides on the main branch; with an LLM-side pruner,
branch rows that carry the same image tokens keep exactly the main row's visual indices ("shared");
with a vision-side pruner every image view (e.g. VCD's distorted image) is pruned on its own evidence
to the same budget. Branches without image tokens are untouched.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from vlmguard.attention import ScoreRequest, choose_attention, register_attention_functions
from vlmguard.decoding.base import Branch, DecodeContext, StepInputs
from vlmguard.errors import ContextTooLong, InvalidInput, ModelLoadError
from vlmguard.images import check_image
from vlmguard.models.base import EncodedBatch, ModelAdapter, Prompt
from vlmguard.models.families import adapter_for
from vlmguard.pruning.base import PruneContext
from vlmguard.results import GenerationResult, Request, StepDiagnostic, StreamEvent, Timings
from vlmguard.runner import LayerRunner
from vlmguard.sampling import Sampler
from vlmguard.sequence import Seq, compact_positions
from vlmguard.spec import GenerationSpec

MODEL_CLASSES = {
    "llava": "LlavaForConditionalGeneration",
    "llava_next": "LlavaNextForConditionalGeneration",
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
}


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def pick_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise InvalidInput(f"unknown dtype {dtype!r} (use auto, float32, bfloat16, float16)")
    return table[dtype]


class Engine:
    """One model + processor, ready to generate. Thread-compatible: one generate() at a time."""

    def __init__(self, model, processor, name: str = "model", attn_implementation: str | None = None):
        register_attention_functions()
        self.model = model.eval()
        self.processor = processor
        self.model_name = name
        self.revision: str | None = None  # weights fingerprint when loaded from a directory (Engine.load)
        impl = attn_implementation or getattr(model.config, "_attn_implementation", "sdpa")
        if not str(impl).startswith("vlmguard_"):
            impl = choose_attention(impl if impl in ("sdpa", "eager", "flash_attention_2") else "sdpa",
                                    model.device)
            model.set_attn_implementation(impl)
        self.attn_implementation = impl
        self.adapter: ModelAdapter = adapter_for(model, processor)
        self.runner = LayerRunner(self.adapter, flash=impl == "vlmguard_flash")

    # ---- loading ---------------------------------------------------------------------------
    @classmethod
    def load(cls, model: str = "tiny", *, device: str = "auto", dtype: str | torch.dtype = "auto",
             attn_implementation: str = "auto", trust_remote_code: bool = False) -> "Engine":
        import transformers
        from transformers import AutoConfig

        from vlmguard.models.image_text_processor import load_processor

        dev = pick_device(device)
        if model.startswith("random:"):  # tiny random-weight model of a family, for tests and demos
            from vlmguard.testing import FAMILIES

            family = model.split(":", 1)[1]
            if family not in FAMILIES:
                raise ModelLoadError(f"unknown family {family!r} in {model!r} (known: {', '.join(FAMILIES)})")
            m, proc = FAMILIES[family]()
            return cls(m.to(dev), proc, name=model, attn_implementation=None)
        from vlmguard.models.resolve import resolve_model_path, weights_fingerprint

        path = resolve_model_path(model)
        register_attention_functions()
        impl = choose_attention(attn_implementation, dev)
        try:
            config = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
            cls_name = MODEL_CLASSES.get(config.model_type)
            if cls_name is None:
                raise ModelLoadError(f"unsupported model type {config.model_type!r} at {path} "
                                     f"(supported: {', '.join(MODEL_CLASSES)})")
            model_cls = getattr(transformers, cls_name)
            m = model_cls.from_pretrained(path, dtype=pick_dtype(dtype, dev), attn_implementation=impl,
                                          local_files_only=True, trust_remote_code=trust_remote_code)
            processor = load_processor(path, trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"cannot load model from {path}: {e}") from None
        m.to(dev)
        engine = cls(m, processor, name=str(model), attn_implementation=impl)
        engine.revision = weights_fingerprint(path)
        return engine

    @property
    def family(self) -> str:
        return self.adapter.family

    @property
    def context_length(self) -> int:
        return self.adapter.context_length

    @property
    def device(self) -> torch.device:
        return self.model.device

    # ---- public API ------------------------------------------------------------------------
    def generate(self, requests: Sequence[Request], spec: GenerationSpec | None = None) -> list[GenerationResult]:
        results: list[GenerationResult | None] = [None] * len(requests)
        for ev in self.stream(requests, spec):
            if ev.done:
                results[ev.index] = ev.result
        return [r for r in results if r is not None]

    def stream(self, requests: Sequence[Request], spec: GenerationSpec | None = None) -> Iterator[StreamEvent]:
        spec = spec or GenerationSpec()
        if not requests:
            return
        yield from self._run(list(requests), spec)

    # ---- pre-passes for decoders -----------------------------------------------------------
    @torch.no_grad()
    def probe_forward(self, prompts: Sequence[Prompt], hidden_layers: Sequence[int] = (),
                      score_layers: Sequence[int] = (), query_rows=None, per_head: bool = False,
                      visual_transforms=None) -> dict[str, Any]:
        """Unpruned prefill of ``prompts`` recording what a decoder's setup needs.

        Returns {"hidden": {layer: (B, D) last-position residual}, "scores": {layer: probs},
        "seq": the input Seq (its ``visual`` column locates image tokens), "logits": (B, V)}.
        ``query_rows(seq) -> (B, Q) long`` picks the score rows (default: the last position).
        """
        batch = self.adapter.encode(prompts)
        feats = self.adapter.image_features(batch)
        if visual_transforms:
            feats = [f if f is None or visual_transforms[i] is None else visual_transforms[i](f)
                     for i, f in enumerate(feats)]
        seq = self.adapter.build_sequence(batch, feats, self.model.dtype, self.device)
        scores: dict[int, torch.Tensor] = {}
        wanted = set(score_layers)

        def before(i: int, s: Seq):
            if i not in wanted:
                return None
            rows = query_rows(s) if query_rows else torch.full((s.batch_size, 1), s.length - 1,
                                                                device=s.hidden.device)
            return ScoreRequest(query_index=rows, key_mask=s.valid, query_pos=rows, per_head=per_head)

        def after(i: int, s: Seq, req):
            if req is not None:
                scores[i] = req.probs
            return None

        logits, _, hidden = self.runner.prefill(seq, before=before, after=after,
                                                hidden_layers=tuple(hidden_layers))
        return {"hidden": hidden, "scores": scores, "seq": seq, "logits": logits}

    # ---- the loop --------------------------------------------------------------------------
    def _prompts(self, requests: list[Request]) -> list[Prompt]:
        out = []
        for i, r in enumerate(requests):
            if not isinstance(r.prompt, str):
                raise InvalidInput(f"request {i}: prompt must be a string")
            if not r.prompt.strip() and not r.images:
                raise InvalidInput(f"request {i}: empty prompt and no image")
            images = [check_image(img, f"request {i} image {j}") for j, img in enumerate(r.images)]
            out.append(Prompt(text=r.prompt, images=images, system=r.system, raw=r.raw_prompt))
        return out

    def _run(self, requests: list[Request], spec: GenerationSpec) -> Iterator[StreamEvent]:
        t0 = time.perf_counter()
        pruner, decoder = spec.resolve()
        adapter = self.adapter
        prompts = self._prompts(requests)
        n_req = len(requests)
        dctx = DecodeContext(adapter=adapter, prompts=prompts, probe_forward=self.probe_forward,
                             sampling=spec.sampling, active=list(range(n_req)))
        decoder.setup(dctx)
        try:
            t_setup = time.perf_counter() - t0
            branch_lists: list[list[Branch]] = [decoder.branches(dctx, i, p) for i, p in enumerate(prompts)]
            names = [b.name for b in branch_lists[0]] if branch_lists else []
            for i, bl in enumerate(branch_lists):
                if [b.name for b in bl] != names:
                    raise RuntimeError(f"decoder {decoder.name} returned different branches for request {i}")
            branch_names = ["main", *names]
            row_prompts = list(prompts) + [bl[k].prompt for k in range(len(names)) for bl in branch_lists]
            transforms = [None] * n_req + [bl[k].visual_transform for k in range(len(names)) for bl in branch_lists]
            shares = [True] * n_req + [bl[k].prune for k in range(len(names)) for bl in branch_lists]
            yield from self._generate_rows(requests, spec, pruner, decoder, dctx, branch_names, row_prompts,
                                           transforms, shares, t0, t_setup)
        finally:
            decoder.teardown(dctx)

    def _generate_rows(self, requests, spec, pruner, decoder, dctx, branch_names, row_prompts, transforms,
                       shares, t0, t_setup) -> Iterator[StreamEvent]:
        adapter, runner, tok = self.adapter, self.runner, self.adapter.tokenizer
        n_req, nb = len(requests), len(branch_names)
        batch: EncodedBatch = adapter.encode(row_prompts)
        prompt_len = batch.attention_mask.sum(dim=1).tolist()
        for i in range(n_req):
            if prompt_len[i] + spec.max_new_tokens > self.context_length:
                raise ContextTooLong(
                    f"request {i}: prompt ({prompt_len[i]} tokens incl. image) + max_new_tokens "
                    f"({spec.max_new_tokens}) exceeds the model's context of {self.context_length} tokens")
        n_visual = batch.image_token_mask.sum(dim=1).tolist()
        pctx = PruneContext(adapter=adapter, batch=batch, main_rows=list(range(n_req)), n_visual=n_visual,
                            text_len=[p - v for p, v in zip(prompt_len, n_visual)])
        pruner.check_budget(pctx)

        # -- vision
        t_vis = time.perf_counter()
        kept_vision: list[torch.Tensor | None] | None = None
        if pruner.side in ("vision", "both") and any(n_visual):
            feats, kept_vision = pruner.prune_images(pctx)
        else:
            feats = adapter.image_features(batch)
        if kept_vision is not None:  # scatter kept features into full-size slots, then drop the rest
            full = []
            for r, f in enumerate(feats):
                if f is None or kept_vision[r] is None:
                    full.append(f)
                    continue
                slot = torch.zeros(n_visual[r], f.shape[-1], dtype=f.dtype, device=f.device)
                slot[kept_vision[r].to(f.device)] = f
                full.append(slot)
            feats = full
        # branch transforms see full-size (V, D) features indexed by visual index (pruned slots are zeros)
        feats = [f if (f is None or transforms[r] is None) else transforms[r](f) for r, f in enumerate(feats)]
        seq = adapter.build_sequence(batch, feats, self.model.dtype, self.device)
        if kept_vision is not None:
            keep = ~seq.visual_mask() & seq.valid
            for r, k in enumerate(kept_vision):
                if k is None:
                    keep[r] |= seq.visual_mask()[r]
                    continue
                vis_pos = seq.visual_mask()[r].nonzero().squeeze(1)
                keep[r, vis_pos[k.to(vis_pos.device)]] = True
            seq, _ = seq.select(keep)
            if pruner.position_mode == "compact":
                seq = compact_positions(seq)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        vision_s = time.perf_counter() - t_vis

        # -- prefill
        def before(i: int, s: Seq):
            return pruner.before_layer(pctx, i, s)

        def after(i: int, s: Seq, req):
            keep = pruner.after_layer(pctx, i, s, req)
            if keep is None:
                return None
            keep = self._share_keep(keep, s, n_req, nb, shares)
            if pruner.position_mode == "compact":
                pctx.state["compact_after"] = True
            return keep

        t_pre = time.perf_counter()
        hidden_layers = tuple(decoder.hidden_layers)
        llm_side = pruner.side in ("llm", "both")
        logits, state, hidden = runner.prefill(seq, before=before if llm_side else None,
                                               after=after if llm_side else None, hidden_layers=hidden_layers)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        prefill_s = time.perf_counter() - t_pre
        hidden = {k: v[:n_req] for k, v in hidden.items()}  # main-branch rows only (StepInputs.hidden)

        visual_fed = torch.stack(state.visual_per_layer, dim=1).tolist()  # rows x layers
        final_visual = state.final_seq.visual
        kept_idx: list[list[int] | None] = []
        for r in range(n_req):
            if not n_visual[r]:
                kept_idx.append(None)
            else:  # the final sequence's visual indices: after vision-side and any LLM-side cut
                v = final_visual[r]
                kept_idx.append(sorted(v[v >= 0].tolist()))

        # -- decode loop
        sampler = Sampler(spec, n_req, self.device)
        eos = set(adapter.eos_token_ids)
        active = list(range(n_req))  # request indices still generating, in row order
        dctx.active = list(active)
        gen: list[list[int]] = [[] for _ in range(n_req)]
        steps: list[list[StepDiagnostic]] = [[] for _ in range(n_req)]
        sent_text = [""] * n_req
        per_tok: list[list[float]] = [[] for _ in range(n_req)]
        finish = ["length"] * n_req
        ttft = [0.0] * n_req
        decode_s = 0.0
        t_step = time.perf_counter()
        step = 0
        while active:
            na = len(active)
            per_branch = {name: logits[k * na:(k + 1) * na] for k, name in enumerate(branch_names)}
            combined = decoder.combine(StepInputs(logits=per_branch, hidden=hidden, step=step))
            tokens = sampler.select(combined.scores, rows=active)
            now = time.perf_counter()
            dt = now - t_step
            finished_rows: list[int] = []
            tok_list = tokens.tolist()
            main_top = per_branch["main"].argmax(dim=-1).tolist()
            if spec.diagnostics:
                idx = tokens[:, None]
                mp = combined.main_logprobs.gather(1, idx).exp().squeeze(1).tolist()
                cp = (combined.contrast_logprobs.gather(1, idx).exp().squeeze(1).tolist()
                      if combined.contrast_logprobs is not None else [None] * na)
                sc = combined.scores.gather(1, idx).squeeze(1).tolist()
            for j, req_i in enumerate(active):
                t = tok_list[j]
                if step == 0:
                    ttft[req_i] = now - t0
                per_tok[req_i].append(dt)
                if t in eos:
                    finish[req_i] = "stop"
                    finished_rows.append(j)
                    continue
                gen[req_i].append(t)
                if spec.diagnostics:
                    steps[req_i].append(StepDiagnostic(token_id=t, token=tok.convert_ids_to_tokens(t),
                                                       main_prob=mp[j], contrast_prob=cp[j], score=sc[j],
                                                       main_top_id=main_top[j]))
                text = tok.decode(gen[req_i], skip_special_tokens=True)
                stop_hit = next((s for s in spec.stop if s and s in text), None)
                if stop_hit is not None:
                    text = text[: text.index(stop_hit)]
                    finish[req_i] = "stop"
                    finished_rows.append(j)
                elif len(gen[req_i]) >= spec.max_new_tokens:
                    finished_rows.append(j)
                delta = text[len(sent_text[req_i]):] if text.startswith(sent_text[req_i]) else text
                if delta and (stop_hit is not None or not text.endswith("\ufffd")):
                    sent_text[req_i] = text
                    yield StreamEvent(index=req_i, token_id=t, text=delta)
            done_now = [active[j] for j in finished_rows]
            for req_i in done_now:
                final_text = tok.decode(gen[req_i], skip_special_tokens=True)
                stop_hit = next((s for s in spec.stop if s and s in final_text), None)
                if stop_hit is not None:
                    final_text = final_text[: final_text.index(stop_hit)]
                total = time.perf_counter() - t0
                res = GenerationResult(
                    text=final_text.strip(), token_ids=gen[req_i], finish_reason=finish[req_i],
                    prompt_tokens=int(prompt_len[req_i]), visual_tokens=int(n_visual[req_i]),
                    visual_tokens_kept=[int(x) for x in visual_fed[req_i]], kept_indices=kept_idx[req_i],
                    timings=Timings(vision_s=vision_s, prefill_s=prefill_s, decode_s=decode_s + dt, ttft_s=ttft[req_i],
                                    total_s=total, per_token_s=per_tok[req_i], setup_s=t_setup, batch_size=n_req),
                    steps=steps[req_i], pruning=self._pruning_report(pruner, pctx, req_i),
                    decoding={**decoder.describe(), **dctx.report}, request_id=requests[req_i].request_id)
                yield StreamEvent(index=req_i, token_id=None, text="", done=True, result=res)
            keep_j = [j for j in range(na) if j not in set(finished_rows)]
            if not keep_j:
                break
            if finished_rows:
                rows = torch.tensor([k * na + j for k in range(nb) for j in keep_j], device=self.device)
                runner.reorder(state, rows)
                tokens = tokens[keep_j]
                hidden = {k: v[keep_j] for k, v in hidden.items()}
                active = [active[j] for j in keep_j]
                dctx.active = list(active)
            t_dec = time.perf_counter()
            logits, hid = runner.decode_step(tokens.repeat(nb), state, hidden_layers=hidden_layers)
            hidden = {k: v[: len(active)] for k, v in hid.items()}
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            decode_s += time.perf_counter() - t_dec
            t_step = t_dec  # a token's time = its decode forward + combine + token selection
            step += 1

    @staticmethod
    def _pruning_report(pruner, pctx: PruneContext, row: int) -> dict[str, Any]:
        """The pruner's description and report; ``report["per_row"][row]`` entries go to that request only."""
        shared = {k: v for k, v in pctx.report.items() if k != "per_row"}
        return {**pruner.describe(), **shared, **pctx.report.get("per_row", {}).get(row, {})}

    @staticmethod
    def _share_keep(keep: torch.Tensor, seq: Seq, n_req: int, nb: int, shares: list[bool]) -> torch.Tensor:
        """Branch rows keep exactly their main row's visual indices (when they carry the same image)."""
        if nb == 1:
            return keep
        vis = seq.visual_mask()
        keep = keep.clone()
        for r in range(n_req, seq.batch_size):
            main = r % n_req
            if not shares[r]:
                keep[r] |= vis[r]
                continue
            if int(vis[r].sum()) != int(vis[main].sum()) or not bool(vis[r].any()):
                continue
            main_kept = seq.visual[main][keep[main] & vis[main]]
            row_keep = torch.isin(seq.visual[r], main_kept) & vis[r]
            keep[r] = (keep[r] & ~vis[r]) | row_keep
        return keep


def load_engine(model: str | Path = "tiny", **kwargs: Any) -> Engine:
    return Engine.load(str(model), **kwargs)
