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

import copy
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator, Sequence, Union

import torch

from vlmguard.attention import (FLASH, PROBING_IMPLEMENTATIONS, ScoreRequest, choose_attention,
                                register_attention_functions)
from vlmguard.choices import choice_paths
from vlmguard.decode_batch import Cohort, DecodeBatch, LiveRequest
from vlmguard.decoding.base import Branch, DecodeContext, OwnedRows, forward_owners
from vlmguard.errors import (ContextTooLong, InvalidInput, ModelLoadError, NonFiniteLogits, first_line,
                             non_finite_cause)
from vlmguard.guided import compile_format
from vlmguard.images import check_image, pad_to_square
from vlmguard.malloc_tuning import tune_malloc
from vlmguard.models.base import EncodedBatch, ModelAdapter, Prompt
from vlmguard.models.families import adapter_for
from vlmguard.prefix_cache import PrefixCache, PromptTokens, plan_prefill
from vlmguard.prompt_logprobs import row_prompt_logprobs
from vlmguard.pruning.base import PruneContext, merge_report
from vlmguard.results import GenerationResult, Request, StreamEvent
from vlmguard.runner import DecodeState, LayerRunner
from vlmguard.sampling import RowSampler
from vlmguard.sequence import Seq, compact_positions, stack_rows
from vlmguard.spec import GenerationSpec
from vlmguard.token_text import token_pieces

# A call's spec: None (the defaults), one for every request, or one per request (``request_specs``)
SpecArg = Union[GenerationSpec, Sequence[GenerationSpec], None]

MODEL_CLASSES = {
    "llava": "LlavaForConditionalGeneration",
    "llava_next": "LlavaNextForConditionalGeneration",
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
}


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise InvalidInput(f"unknown device {device!r} (use auto, cpu, cuda or cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InvalidInput(f"device {device!r}: CUDA is not available on this machine")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise InvalidInput(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if dev.type not in ("cpu", "cuda"):
        raise InvalidInput(f"device {device!r}: vlmguard runs on cpu or cuda")
    return dev


def _request_list(requests: Any) -> list[Request]:
    """The engine takes a list (any iterable) of Requests; a lone Request or a string is a usage error."""
    if isinstance(requests, (Request, str, bytes)) or not hasattr(requests, "__iter__"):
        raise InvalidInput(f"requests must be a list of Request objects, got {type(requests).__name__}")
    return list(requests)


def transform_pixels(adapter: ModelAdapter, batch: EncodedBatch, pixel_fns: Sequence[Any]) -> None:
    """Apply each row's ``Branch.pixel_transform`` (None: leave alone) to its images' processed pixel values,
    in place, before any vision work (the vision-side pruners read the same tensor)."""
    index_in_row: dict[int, int] = {}
    for view, row in zip(adapter.image_pixels(batch), batch.rows_with_images):
        j = index_in_row.get(row, 0)
        index_in_row[row] = j + 1
        if pixel_fns[row] is not None:
            view.copy_(pixel_fns[row](view, j))


def same_images(adapter: ModelAdapter, batch: EncodedBatch) -> dict[int, int]:
    """Rows whose processed images equal an earlier row's (row -> the first such row): their image features are
    computed once (``ModelAdapter.image_features``). A decoder's branch rows with the request's own image (LQCD,
    IAVA, M3ID's ``mask``), or a pre-pass's rows of one image under two instructions; not VCD's noised copy,
    whose pixels differ. Rows are matched by a cheap fingerprint of their pixels, then compared exactly."""
    if len(set(batch.rows_with_images)) < 2:
        return {}
    per_row: dict[int, list[torch.Tensor]] = {}
    for row, view in zip(batch.rows_with_images, adapter.image_pixels(batch)):
        per_row.setdefault(row, []).append(view)
    keys = {row: tuple((tuple(v.shape), float(v.float().sum()), float(v.flatten()[::251].float().sum())) for v in views)
            for row, views in per_row.items()}
    first: dict[tuple, list[int]] = {}
    out: dict[int, int] = {}
    for row in sorted(per_row):
        src = next((r for r in first.get(keys[row], []) if all(torch.equal(a, b)
                                                                for a, b in zip(per_row[row], per_row[r]))), None)
        if src is None:
            first.setdefault(keys[row], []).append(row)
        else:
            out[row] = src
    return out


def pick_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if device.type == "cuda":  # bf16 where the GPU computes it natively (Ampere+); a T4 or V100 emulates it
            return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
        return torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise InvalidInput(f"unknown dtype {dtype!r} (use auto, float32, bfloat16, float16)")
    return table[dtype]


def _config_problem(e: BaseException) -> str:
    """One line for a config error: transformers' validation errors put the field on the first line ("Validation
    error for field 'hidden_size':") and what is wrong with it on the next."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return " ".join(lines[:2]) if len(lines) > 1 and lines[0].endswith(":") else first_line(e)


def check_loaded_weights(path: Path, info: dict[str, Any]) -> None:
    """transformers fills the tensors a checkpoint lacks, or has in another shape than its config.json says, with
    random values and only logs it (hidden by the CLI): a model that would answer with noise is a load error
    naming the tensor."""
    mismatched = sorted(info.get("mismatched_keys") or [], key=lambda k: k[0])
    missing = sorted(info.get("missing_keys") or [])
    if mismatched:
        key, saved, wanted = mismatched[0][:3]
        more = f" (and {len(mismatched) - 1} more)" if len(mismatched) > 1 else ""
        raise ModelLoadError(f"model at {path}: weight {key} has shape {list(saved)} in the checkpoint but "
                             f"{list(wanted)} by its config.json{more}; are the config and the weights of one model?")
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise ModelLoadError(f"model at {path}: the checkpoint has no weight {missing[0]}{more} (they would be "
                             "random); an incomplete checkpoint, or the weights of another model?")


class Engine:
    """One model + processor, ready to generate. Thread-compatible: one generate() at a time."""

    def __init__(self, model, processor, name: str = "model", attn_implementation: str | None = None):
        register_attention_functions()
        self.model = model.eval()
        self.processor = processor
        self.model_name = name
        self.revision: str | None = None  # weights fingerprint when loaded from a directory (Engine.load)
        self.quantization = "none"  # how Engine.load quantized the weights (vlmguard/models/quantization.py)
        impl = attn_implementation or getattr(model.config, "_attn_implementation", "sdpa")
        if impl not in PROBING_IMPLEMENTATIONS:
            impl = choose_attention(impl if impl in ("sdpa", "eager", "flash_attention_2") else "sdpa",
                                    model.device, model.dtype)
        if getattr(model.config, "_attn_implementation", None) != impl:
            model.set_attn_implementation(impl)
        self.attn_implementation = impl
        self.adapter: ModelAdapter = adapter_for(model, processor)
        self.runner = LayerRunner(self.adapter, flash=impl == FLASH, eager=impl == "vlmguard_eager")
        # rows of a prefill that begin with the same tokens (POPE's questions about one image, LQCD's query
        # variants) compute them once (vlmguard/prefix_sharing.py); outputs are those of a prefill row by row
        self.share_prefixes = True
        # a decoder's pre-pass over the requests' own prompts hands their cache to decoding (IAVA's query rows,
        # ``DecodeContext.main_prefill``) instead of a second prefill of those rows; outputs unchanged
        self.reuse_probe_prefill = True
        # image prefixes (system text and image) of earlier prefills, taken by later rows that begin with the same
        # ones (vlmguard/prefix_cache.py; with share_prefixes); None: off (``enable_prefix_cache``)
        self.prefix_cache: PrefixCache | None = None
        # CPU: keep freed activation memory mapped (see vlmguard/malloc_tuning.py)
        self.malloc_tuned = tune_malloc() if model.device.type == "cpu" else False

    # ---- loading ---------------------------------------------------------------------------
    @classmethod
    def load(cls, model: str | os.PathLike = "tiny", *, device: str = "auto", dtype: str | torch.dtype = "auto",
             attn_implementation: str = "auto", trust_remote_code: bool = False,
             quantization: str = "none") -> "Engine":
        """``quantization``: ``none``, ``bnb-int8`` or ``bnb-nf4``, the language model's linear layers quantized
        as they load (``vlmguard/models/quantization.py``)."""
        import transformers
        from transformers import AutoConfig

        from vlmguard.models import quantization as quant
        from vlmguard.models.image_text_processor import load_processor

        model = str(model)  # a name, an HF id or a local directory (str or path)
        quant.check_name(quantization)
        dev = pick_device(device)
        if model.startswith("random:"):  # tiny random-weight model of a family, for tests and demos
            if quantization != quant.NONE:
                raise InvalidInput(f"quantization applies to models loaded from files, not {model}",
                                   param="quantization")
            from vlmguard.testing import random_family

            m, proc = random_family(model)()
            m = m.to(dev, pick_dtype(dtype, dev))
            return cls(m, proc, name=model, attn_implementation=choose_attention(attn_implementation, dev, m.dtype))
        from vlmguard.models.resolve import resolve_model_path, weights_fingerprint

        path = resolve_model_path(model)
        register_attention_functions()
        impl = choose_attention(attn_implementation, dev, pick_dtype(dtype, dev))
        try:
            config = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
        except Exception as e:  # a value transformers' config classes refuse (their validation errors vary in type)
            raise ModelLoadError(f"model at {path}: config.json is not a valid model config: {_config_problem(e)}") \
                from None
        try:
            cls_name = MODEL_CLASSES.get(config.model_type)
            if cls_name is None:
                raise ModelLoadError(f"unsupported model type {config.model_type!r} at {path} "
                                     f"(supported: {', '.join(MODEL_CLASSES)})")
            # the processor first: a missing tokenizer, image processor or chat template is reported in a
            # second, not after the weights (gigabytes) have been read
            processor = load_processor(path, trust_remote_code=trust_remote_code)
            model_cls = getattr(transformers, cls_name)
            saved = quant.checkpoint_quantization(config)
            qkw = quant.load_kwargs(quantization, model_type=config.model_type, compute_dtype=pick_dtype(dtype, dev),
                                    device=dev, saved=saved)
            # mismatched shapes are reported by check_loaded_weights (naming the tensor), not raised by transformers
            m, info = model_cls.from_pretrained(path, dtype=pick_dtype(dtype, dev), attn_implementation=impl,
                                                local_files_only=True, trust_remote_code=trust_remote_code,
                                                ignore_mismatched_sizes=True, output_loading_info=True, **qkw)
        except (OSError, ValueError, ImportError) as e:  # ImportError: a saved quantization's missing package
            raise ModelLoadError(f"cannot load model from {path}: {first_line(e)}") from None
        check_loaded_weights(path, info)
        if not qkw:  # a quantized model is placed as it loads (device_map)
            m.to(dev)
        else:
            quant.check_cpu_layout(m)
        engine = cls(m, processor, name=str(model), attn_implementation=impl)
        engine.revision = weights_fingerprint(path)
        engine.quantization = saved or quantization
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
    def generate(self, requests: Sequence[Request], spec: SpecArg = None) -> list[GenerationResult]:
        """One result per request. ``spec``: one for all, or one per request (see :func:`request_specs`)."""
        requests = _request_list(requests)
        results: list[GenerationResult | None] = [None] * len(requests)
        for ev in self.stream(requests, spec):
            if ev.done:
                results[ev.index] = ev.result
        return [r for r in results if r is not None]

    def stream(self, requests: Sequence[Request], spec: SpecArg = None) -> Iterator[StreamEvent]:
        """The events of generating ``requests`` (one spec, or one per request). Bad requests lists and specs
        raise here, when it is called; the rest when the first event is asked for."""
        requests = _request_list(requests)
        request_specs(spec, len(requests))
        if not requests:
            return iter(())
        return self._run(requests, spec)

    def enable_prefix_cache(self, max_mb: float) -> PrefixCache | None:
        """Keep the image prefixes (system text and image) of prefills in up to ``max_mb`` MiB of the model's
        device memory, for later rows that begin with the same ones (vlmguard/prefix_cache.py); 0 turns it off
        (and frees what it held). Returns the cache (None when off)."""
        if isinstance(max_mb, bool) or not isinstance(max_mb, (int, float)) or not max_mb >= 0:
            raise InvalidInput(f"prefix cache size must be a number of MiB >= 0, got {max_mb!r}")
        self.prefix_cache = PrefixCache(max_bytes=int(max_mb * 2**20)) if max_mb > 0 else None
        return self.prefix_cache

    # ---- pre-passes for decoders -----------------------------------------------------------
    @torch.no_grad()
    def probe_forward(self, prompts: Sequence[Prompt], hidden_layers: Sequence[int] = (),
                      score_layers: Sequence[int] = (), query_rows=None, per_head: bool = False,
                      visual_transforms=None, keep_prefill: bool = False) -> dict[str, Any]:
        """Unpruned prefill of ``prompts`` recording what a decoder's setup needs.

        Returns {"hidden": {layer: (B, D) last-position residual}, "scores": {layer: probs},
        "seq": the input Seq (its ``visual`` column locates image tokens), "logits": (B, V)}.
        ``query_rows(seq) -> (B, Q) long`` picks the score rows (default: the last position).

        With the default rows, rows that begin alike share that prefix (``share_prefixes``, as a request's prefill
        does: IAVA's query and generic-instruction rows share their image); "seq" is then the shared layout (the
        prefix's slots, then each row's own; no hidden states), on whose key axis the scores are.

        ``keep_prefill``: also return "prefill", a :class:`ProbePrefill` (the KV cache, logits, encoding and image
        features of every row) that a decoder whose first rows are its requests' own prompts hands the engine as
        ``DecodeContext.main_prefill``, so that those rows are not prefilled again."""
        if keep_prefill and visual_transforms:
            raise ValueError("keep_prefill: a pre-pass whose visual tokens are transformed is no request's prefill")
        batch = self.adapter.encode(prompts)
        feats = self._image_features(batch)
        raw_feats = feats
        if visual_transforms:
            feats = [f if f is None or visual_transforms[i] is None else visual_transforms[i](f)
                     for i, f in enumerate(feats)]
        seq = self.adapter.build_sequence(batch, feats, self.model.dtype, self.device)
        fed = seq.valid.sum(dim=1).tolist()

        def kept(out: dict[str, Any], state: DecodeState) -> dict[str, Any]:
            if keep_prefill:
                out["prefill"] = ProbePrefill(batch=batch, features=raw_feats, logits=out["logits"], state=state,
                                              fed=fed, seq=seq)
            return out

        plan, lookup = (plan_prefill(seq, self.prefix_cache) if self.share_prefixes and query_rows is None
                        else (None, None))
        if plan is not None:
            logits, state, hidden, scores = self.runner.prefill_shared(
                seq, plan, tuple(hidden_layers), tuple(score_layers), per_head, prefix_cache=self.prefix_cache,
                lookup=lookup)
            return kept({"hidden": hidden, "scores": scores, "seq": state.final_seq, "logits": logits}, state)
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

        logits, state, hidden = self.runner.prefill(seq, before=before, after=after,
                                                    hidden_layers=tuple(hidden_layers))
        if lookup is not None:
            self.prefix_cache.store(seq, lookup, state.cache, state.layer_valid)
        return kept({"hidden": hidden, "scores": scores, "seq": seq, "logits": logits}, state)

    # ---- the loop --------------------------------------------------------------------------
    def _prompts(self, requests: list[Request], positions: Sequence[int] | None = None,
                 specs: Sequence[GenerationSpec] | None = None) -> list[Prompt]:
        """The requests checked and made model prompts, their images padded to a square where their spec's
        ``image_aspect`` says so; errors name each request by ``positions`` (default: its place in ``requests``)."""
        out = []
        placeholder = self.adapter.image_placeholder
        for k, r in enumerate(requests):
            i = k if positions is None else positions[k]
            if not isinstance(r, Request):
                raise InvalidInput(f"request {i}: expected a Request, got {type(r).__name__}")
            if not isinstance(r.prompt, str):
                raise InvalidInput(f"request {i}: prompt must be a string")
            if not isinstance(r.images, (list, tuple)):
                raise InvalidInput(f"request {i}: images must be a list of images, got {type(r.images).__name__}")
            if r.system is not None and not isinstance(r.system, str):
                raise InvalidInput(f"request {i}: system must be a string")
            if not isinstance(r.raw_prompt, bool):
                raise InvalidInput(f"request {i}: raw_prompt must be true or false")
            if r.prompt_token_ids is not None:
                out.append(self._token_prompt(r, i))
                continue
            if not r.prompt.strip() and not r.images:
                raise InvalidInput(f"request {i}: empty prompt and no image", param="prompt")
            for field, text in (("prompt", r.prompt), ("system", r.system)):
                check_text(text, f"request {i}: {field}", None if r.raw_prompt else placeholder)
            if r.raw_prompt and placeholder and r.prompt.count(placeholder) != len(r.images):
                raise InvalidInput(f"request {i}: the prompt holds the model's image placeholder {placeholder!r} "
                                   f"{r.prompt.count(placeholder)} time(s) for {len(r.images)} image(s): a prompt "
                                   "the model reads as it is (no chat template) holds it once per image",
                                   param="prompt")
            images = [check_image(img, f"request {i} image {j}") for j, img in enumerate(r.images)]
            if images and specs is not None and self.adapter.image_aspect(specs[k].image_aspect) == "pad":
                images = [pad_to_square(img, self.adapter.pad_colour()) for img in images]
            out.append(Prompt(text=r.prompt, images=images, system=r.system, raw=r.raw_prompt))
        return out

    def _token_prompt(self, r: Request, i: int) -> Prompt:
        """A request whose prompt is token ids, checked (ids of the model's vocabulary, no image) and made a prompt
        fed exactly those ids; its text is theirs decoded (special tokens kept), for decoders that read words."""
        ids = r.prompt_token_ids
        if (not isinstance(ids, (list, tuple)) or not ids
                or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids)):
            raise InvalidInput(f"request {i}: prompt_token_ids must be a non-empty list of token ids", param="prompt")
        vocab = int(self.adapter.embed_tokens.num_embeddings)
        beyond = [t for t in ids if not 0 <= t < vocab]
        if beyond:
            raise InvalidInput(f"request {i}: the prompt's token id {beyond[0]} is not in the model's vocabulary "
                               f"(ids 0-{vocab - 1})", param="prompt")
        if r.images:
            raise InvalidInput(f"request {i}: a prompt of token ids takes no image (send its text with the image "
                               "placeholders, raw_prompt=True)", param="images")
        placeholders = set(self.adapter.image_placeholder_ids)
        if placeholders & set(ids):
            raise InvalidInput(f"request {i}: the prompt's token ids hold the model's image placeholder id "
                               f"{sorted(placeholders & set(ids))[0]}, and a prompt of token ids has no image",
                               param="prompt")
        return Prompt(text=self.adapter.tokenizer.decode(list(ids)), raw=True, token_ids=list(ids))

    def _run(self, requests: list[Request], spec: SpecArg) -> Iterator[StreamEvent]:
        batch = self.start_batch(requests, spec)
        try:
            while batch.active:
                yield from batch.advance()
        finally:
            batch.close()

    @torch.no_grad()  # the vision tower and projector too (they are run outside the runner's no_grad)
    def start_batch(self, requests: Sequence[Request], spec: SpecArg = None,
                    indices: Sequence[int] | None = None) -> DecodeBatch:
        """Set up the decoder and prefill ``requests``: a :class:`DecodeBatch` ready to ``advance()`` token by
        token (the caller must ``close()`` it). ``spec``: one for all, or one per request (see
        :func:`request_specs`). ``indices``: the ``StreamEvent.index`` of each request (default 0..n-1). Raises
        on bad input before anything is generated."""
        requests = list(requests)
        if not requests:
            raise InvalidInput("no requests")
        spec, specs = request_specs(spec, len(requests))
        if indices is not None and (isinstance(indices, (str, bytes)) or not isinstance(indices, Sequence)):
            raise InvalidInput(f"indices must be a list of ints, one per request, got {type(indices).__name__}")
        indices = list(range(len(requests))) if indices is None else list(indices)
        if len(indices) != len(requests):
            raise InvalidInput(f"{len(indices)} indices for {len(requests)} requests")
        if not all(isinstance(k, int) and not isinstance(k, bool) for k in indices):
            raise InvalidInput("indices must be ints (each request's StreamEvent.index)")
        if len(set(indices)) != len(indices):
            raise InvalidInput("indices must be distinct: the events of two requests would share an index")
        batch = self._start(requests, specs, indices, list(range(len(requests))))
        try:
            self._score_prompts(batch)
        except BaseException:
            batch.close()
            raise
        return batch

    def _score_prompts(self, batch: DecodeBatch) -> None:
        """The prompt log-probabilities of the batch's requests whose spec asks for them (``prompt_logprobs``,
        vlmguard/prompt_logprobs.py): one pass over their prompts (each prompt once: the copies of a request share
        its entries), on each ``LiveRequest``; the pass's time counts to their prefill."""
        lives = [lv for lv in batch.lives if lv.spec.prompt_logprobs is not None]
        if not lives:
            return
        t0 = time.perf_counter()
        source = _copies([lv.request for lv in lives], [lv.spec for lv in lives])
        firsts = sorted(set(source))
        prompts = self._prompts([lives[i].request for i in firsts], specs=[lives[i].spec for i in firsts])
        enc = self.adapter.encode(prompts)
        seq = self.adapter.build_sequence(enc, self._image_features(enc), self.model.dtype, self.device)
        hidden = self.runner.final_hidden(seq)
        pieces = token_pieces(self.adapter.tokenizer)
        k = max(lv.spec.prompt_logprobs for lv in lives)
        entries = {i: row_prompt_logprobs(self.adapter.logits, hidden, enc.input_ids[r], seq, r, k, pieces)
                   for r, i in enumerate(firsts)}
        dt = time.perf_counter() - t0
        for lv, i in zip(lives, source):
            lv.prompt_logprobs = [e if len(e.top) <= lv.spec.prompt_logprobs
                                  else replace(e, top=e.top[:lv.spec.prompt_logprobs]) for e in entries[i]]
            lv.prefill_s += dt

    def _start(self, requests: list[Request], specs: list[GenerationSpec], indices: list[int],
               positions: list[int]) -> DecodeBatch:
        """``start_batch`` on checked arguments; ``positions``: how errors name each request (its place in the
        caller's list)."""
        t0 = time.perf_counter()
        pruner, decoder = specs[0].resolve()
        prompts = self._prompts(requests, positions, specs)
        self._check_token_settings(specs, positions)
        if decoder.merged_combine and not decoder.row_hooks:  # no per-request decoder state: copies share a prefill
            source = _copies(requests, specs)
            if len(set(source)) < len(requests):
                return self._start_copies(requests, specs, indices, positions, source)
        adapter = self.adapter
        n_req = len(requests)
        dctx = DecodeContext(adapter=adapter, prompts=prompts, probe_forward=self.probe_forward,
                             sampling=any(s.sampling for s in specs), active=list(range(n_req)),
                             reuse_main_prefill=(self.reuse_probe_prefill and pruner.side == "none"
                                                 and not decoder.row_hooks and not decoder.prefill_hidden_layers))
        decoder.setup(dctx)
        try:
            if self.device.type == "cuda":  # the set-up's pre-passes finish inside setup_s
                torch.cuda.synchronize(self.device)
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
            pixel_fns = [None] * n_req + [bl[k].pixel_transform for k in range(len(names)) for bl in branch_lists]
            # the rows the prefix cache keeps: the requests' own and those of branches that ask for it (row
            # (k + 1) * n_req + i: request i's branch k)
            store_rows = list(range(n_req)) + [(k + 1) * n_req + i for k in range(len(names))
                                               for i, bl in enumerate(branch_lists) if bl[k].cache]
            return self._prefill_rows(requests, indices, specs, pruner, decoder, dctx, branch_names, row_prompts,
                                      transforms, shares, t0, t_setup, pixel_fns, positions, store_rows)
        except BaseException:
            decoder.teardown(dctx)
            raise

    def prompt_ids(self, request: Request, spec: GenerationSpec | None = None,
                   adapter: ModelAdapter | None = None) -> list[int]:
        """The token ids ``request``'s prompt is fed (chat template, every image's visual tokens; the images fitted
        as ``spec.image_aspect`` says), encoded by ``adapter`` (default: the engine's; a server passes a copy with
        its own processor to encode beside generation). No model work."""
        prompts = self._prompts([request], specs=[spec or GenerationSpec()])
        return (adapter or self.adapter).encode(prompts).input_ids[0].tolist()

    def _check_token_settings(self, specs: list[GenerationSpec], positions: list[int]) -> None:
        """Each request's ``logit_bias`` and ``stop_token_ids`` name ids of the model's vocabulary, its ``choices``
        have tokens and can end (vlmguard/choices.py), and its ``guided`` format compiles for this tokenizer
        (vlmguard/guided.py)."""
        width = self.adapter.logits_width
        for i, s in zip(positions, specs):
            for name, ids in (("logit_bias", s.logit_bias), ("stop_token_ids", s.stop_token_ids)):
                beyond = [t for t in ids if t >= width]
                if beyond:
                    raise InvalidInput(f"request {i}: {name} names token id {beyond[0]}, past the model's vocabulary "
                                       f"(ids 0-{width - 1})", param=name)
            if s.choices:
                if not self.adapter.eos_token_ids:
                    raise InvalidInput(f"request {i}: choices need an end-of-sequence token, and this model has none",
                                       param="choices")
                try:
                    paths = choice_paths(self.adapter.tokenizer, tuple(s.choices))
                except InvalidInput as e:
                    raise InvalidInput(f"request {i}: {e}", param="choices") from None
                beyond = [t for p in paths for t in p if t >= width]
                if beyond:
                    raise InvalidInput(f"request {i}: a choice's token {beyond[0]} is past the model's output "
                                       f"vocabulary (ids 0-{width - 1})", param="choices")
            if s.guided is not None:
                if not self.adapter.eos_token_ids:
                    raise InvalidInput(f"request {i}: a guided format needs an end-of-sequence token, and this model "
                                       "has none", param="guided")
                try:  # compiled once per format and tokenizer; each answer's matcher is a copy (DecodeBatch)
                    compile_format(self.adapter.tokenizer, width, sorted(self.adapter.eos_token_ids), s.guided)
                except InvalidInput as e:
                    raise InvalidInput(f"request {i}: {e}", param=e.param) from None

    def _prefill_rows(self, requests, indices, specs, pruner, decoder, dctx, branch_names, row_prompts,
                      transforms, shares, t0, t_setup, pixel_fns=None, positions=None, store_rows=None) -> DecodeBatch:
        adapter, runner = self.adapter, self.runner
        n_req, nb = len(requests), len(branch_names)
        store_rows = list(range(n_req)) if store_rows is None else store_rows
        pixel_fns = pixel_fns or [None] * len(row_prompts)
        # the decoder's pre-pass prefilled the main rows (``DecodeContext.reuse_main_prefill``): only the branch
        # rows are prefilled here
        pre: ProbePrefill | None = dctx.main_prefill if dctx.reuse_main_prefill else None
        dctx.main_prefill = None  # the batch owns its cache from here
        first = n_req if pre is not None else 0
        batch: EncodedBatch | None = adapter.encode(row_prompts[first:]) if first < len(row_prompts) else None
        if batch is not None and any(pixel_fns[first:]):
            transform_pixels(adapter, batch, pixel_fns[first:])
        prompt_len = batch.attention_mask.sum(dim=1).tolist() if batch is not None else []
        n_visual = batch.image_token_mask.sum(dim=1).tolist() if batch is not None else []
        if pre is not None:
            prompt_len = pre.batch.attention_mask[:n_req].sum(dim=1).tolist() + prompt_len
            n_visual = pre.batch.image_token_mask[:n_req].sum(dim=1).tolist() + n_visual
        for i in range(n_req):
            if prompt_len[i] + specs[i].max_new_tokens > self.context_length:
                raise ContextTooLong(
                    f"request {i if positions is None else positions[i]}: prompt ({prompt_len[i]} tokens incl. image) "
                    f"+ max_new_tokens ({specs[i].max_new_tokens}) exceeds the model's context of "
                    f"{self.context_length} tokens", param="prompt")
        # the batch whose first n_req rows are the main rows (the pre-pass's, when it prefilled them)
        pctx = PruneContext(adapter=adapter, batch=batch if pre is None else pre.batch, main_rows=list(range(n_req)),
                            n_visual=n_visual, text_len=[p - v for p, v in zip(prompt_len, n_visual)],
                            positions=None if positions is None else list(positions))
        pruner.check_budget(pctx)
        if any(n_visual):
            self._report_vision_work(pctx, adapter.vision_work(pctx.batch))
        if pre is None:
            logits, state, hidden, rows, vision_s, prefill_s, prompts_kept = self._forward_rows(
                batch, pctx, pruner, decoder, dctx, transforms, shares, n_req, nb,
                [s.max_new_tokens for s in specs], store_rows)
        else:  # the pre-pass prefilled the main rows: their prompts as it fed them, for their answers' entries
            prompts_kept = (self._answer_prompts(pre.seq, pre.state.next_positions, range(n_req), n_req,
                                                 [s.max_new_tokens for s in specs])
                            if self.share_prefixes and pre.seq is not None else [{} for _ in range(n_req)])
            logits, state, hidden, rows, vision_s, prefill_s = self._forward_after_probe(
                pre, batch, row_prompts, transforms, pixel_fns, n_req, store_rows)
        fed, visual_fed, shared, final_visual, cached = rows
        broken = (~torch.isfinite(logits[:n_req]).all(dim=-1)).nonzero().flatten().tolist()
        if broken:
            raise NonFiniteLogits(
                f"the model's logits are NaN or infinite for request(s) {', '.join(str(indices[r]) for r in broken)} "
                + non_finite_cause(self.model.dtype))
        hidden = {k: v[:n_req] for k, v in hidden.items()}  # main-branch rows only (StepInputs.hidden)
        decoder.after_prefill(dctx, hidden)
        hidden = {k: hidden[k] for k in decoder.hidden_layers}

        now = time.perf_counter()
        cohort = Cohort(decoder, dctx, branch_names=list(branch_names))
        lives = []
        for r in range(n_req):
            kept = None
            if n_visual[r]:  # the final sequence's visual indices: after vision-side and any LLM-side cut
                v = final_visual[r]
                kept = sorted(v[v >= 0].tolist())
            lives.append(LiveRequest(
                index=indices[r], local=r, request=requests[r], t0=t0, t_mark=now, setup_s=t_setup,
                vision_s=vision_s, prefill_s=prefill_s, prompt_len=int(prompt_len[r]), n_visual=int(n_visual[r]),
                visual_fed=[int(x) for x in visual_fed[r]], kept=kept, pruning=self._pruning_report(pruner, pctx, r),
                batch_size=n_req, prefill_batch=n_req, sampler=RowSampler.for_spec(specs[r]), cohort=cohort,
                spec=specs[r], prefill_tokens=sum(fed[r::n_req]), prefill_shared=sum(shared[r::n_req]),
                prefill_cached=sum(cached[r::n_req]), prompt_cached=cached[r], prompts=prompts_kept[r]))
        return DecodeBatch(runner=runner, tokenizer=adapter.tokenizer, eos=set(adapter.eos_token_ids), spec=specs[0],
                           cohort=cohort, state=state, logits=logits,
                           hidden=hidden, lives=lives, device=self.device, prefix_cache=self.prefix_cache)

    def _image_features(self, batch: EncodedBatch, keep=None) -> list[torch.Tensor | None]:
        """``ModelAdapter.image_features`` of ``batch``, the tower run once per distinct image (``same_images``) and
        not at all on images whose visual tokens the prefix cache holds; the rows ``keep`` (default all) computed
        are then kept there."""
        same = same_images(self.adapter, batch)
        cache = self.prefix_cache
        if cache is None or not batch.rows_with_images:
            return self.adapter.image_features(batch, same)
        known = {row: entry.features for row, entry in cache.features(self.adapter, batch, skip=same).items()}
        feats = self.adapter.image_features(batch, same, known=known)
        rows = range(batch.input_ids.shape[0]) if keep is None else keep
        cache.store_features(self.adapter, batch, feats, [r for r in rows if r not in known and r not in same])
        return feats

    def _pruned_images(self, pctx: PruneContext, pruner, keep) -> tuple[list, list]:
        """``pruner.prune_images`` of ``pctx``'s rows. Its tower pass runs once per distinct image and takes the
        prefix cache's tower output where it holds the images (``PruneContext.encode``). A pruner with a
        ``vision_cache_key`` cuts each distinct row of images once: a row whose images equal an earlier row's
        (``same_images``: a decoder's rows with the request's image, POPE's questions about one image) takes that
        row's cut, and one whose images the cache holds under the key takes what the pruner made of them before;
        the rest are pruned as one batch and those of ``keep`` kept. Report entries go with each cut."""
        cache, adapter, batch = self.prefix_cache, self.adapter, pctx.batch
        pctx.encode = lambda b: self._image_features(b, keep=keep)
        view = pruner.vision_cache_key()
        if view is None:
            return pruner.prune_images(pctx)
        same = same_images(adapter, batch)
        known = {} if cache is None else cache.features(adapter, batch, skip=same, view=view)
        rest = adapter.without_images(batch, set(same) | set(known)) if same or known else batch
        if rest is None:  # vision inputs it cannot cut: every row pruned
            same, known, rest = {}, {}, batch
        n_rows = len(pctx.n_visual)
        feats, kept = [None] * n_rows, [None] * n_rows
        reports: dict[int, dict] = {}
        if rest.rows_with_images:
            part = replace(pctx, batch=rest, report={},
                           n_visual=[0 if r in same or r in known else n for r, n in enumerate(pctx.n_visual)])
            feats, kept = pruner.prune_images(part)
            merge_report(pctx.report, {k: v for k, v in part.report.items() if k != "per_row"})
            reports = part.report.get("per_row", {})
            if cache is not None:  # a row the pruner left whole took the tower's output, kept as such
                cut = [r for r in keep if r not in same and r not in known and kept[r] is not None]
                cache.store_features(adapter, batch, feats, cut, view=view, kept=kept, reports=reports)
        for r, entry in known.items():
            feats[r], kept[r], reports[r] = entry.features, entry.kept, entry.report
        for r, src in same.items():
            feats[r], kept[r] = feats[src], kept[src]
            if src in reports:
                reports[r] = reports[src]
        merge_report(pctx.report, {"per_row": {r: copy.deepcopy(entries) for r, entries in reports.items()}})
        return feats, kept

    def _forward_rows(self, batch, pctx, pruner, decoder, dctx, transforms, shares, n_req, nb, max_new,
                      store_rows):
        """Vision (or the vision-side pruner) and the prefill of every row of ``batch``: (logits, state, hidden
        states, the rows' figures (``_row_figures``), vision seconds, prefill seconds, and per request, for each of
        its rows of ``store_rows`` (by branch index, 0: its own) whose answer the prefix cache may keep (of up to
        ``max_new[r]`` tokens), that row's prompt as the first layer received it). The prefix cache keeps what the
        rows of ``store_rows`` computed."""
        adapter, runner = self.adapter, self.runner
        n_visual = pctx.n_visual
        # -- vision
        t_vis = time.perf_counter()
        kept_vision: list[torch.Tensor | None] | None = None
        if pruner.side in ("vision", "both") and any(n_visual):
            feats, kept_vision = self._pruned_images(pctx, pruner, keep=store_rows)
        else:
            feats = self._image_features(batch, keep=store_rows)
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
            torch.cuda.synchronize(self.device)
        vision_s = time.perf_counter() - t_vis
        fed = seq.valid.sum(dim=1).tolist()  # tokens each row feeds the first layer

        # -- prefill
        def before(i: int, s: Seq):
            return pruner.before_layer(pctx, i, s)

        def after(i: int, s: Seq, req):
            keep = pruner.after_layer(pctx, i, s, req)
            if keep is None:
                return None
            return self._share_keep(keep, s, n_req, nb, shares)

        t_pre = time.perf_counter()
        llm_side = pruner.llm_stage(adapter.family)
        owners = {}  # every row of this forward is this context's (row r: request r % n_req; branch-major)
        if decoder.row_hooks:
            owners[id(dctx)] = OwnedRows(rows=None, requests=torch.arange(n_req * nb, device=self.device) % n_req)
        share = self.share_prefixes and not decoder.row_hooks
        with forward_owners(owners):
            logits, state, hidden = runner.prefill(seq, before=before if llm_side else None,
                                                   after=after if llm_side else None,
                                                   hidden_layers=tuple(decoder.prefill_hidden_layers),
                                                   renumber=llm_side and pruner.renumbers_llm_cuts(adapter.family),
                                                   share_prefixes=share,
                                                   prefix_cache=self.prefix_cache, store_rows=store_rows)
        prompts = (self._answer_prompts(seq, state.next_positions, store_rows, n_req, max_new)
                   if share and not llm_side else [{} for _ in range(n_req)])
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        prefill_s = time.perf_counter() - t_pre
        return logits, state, hidden, _row_figures(state, fed), vision_s, prefill_s, prompts

    def _forward_after_probe(self, pre: ProbePrefill, batch, row_prompts, transforms, pixel_fns, n_req, store_rows):
        """What ``_forward_rows`` returns, for main rows that the decoder's pre-pass prefilled (rows 0..n_req-1 of
        ``pre``, unpruned): only the branch rows (``batch``) are prefilled, and their state joins the main rows'
        (``LayerRunner.merge``; rows stay branch-major). A branch row with its request's own images, untouched
        pixels, takes the pre-pass's image features (before its ``visual_transform``)."""
        adapter, runner = self.adapter, self.runner
        main = _row_figures(pre.state, pre.fed, n_req)
        state, logits = pre.state, pre.logits[:n_req]
        if state.next_positions.shape[-1] > n_req:
            runner.reorder(state, list(range(n_req)))
            state.final_seq = state.final_seq.rows(slice(0, n_req))
            state.visual_per_layer = [v[:n_req] for v in state.visual_per_layer]
        if batch is None:
            return logits, state, {}, main, 0.0, 0.0
        t_vis = time.perf_counter()
        own = [n_req + j for j in range(len(row_prompts) - n_req)]
        kept_rows = [r - n_req for r in store_rows if r >= n_req]  # rows of ``batch`` that the prefix cache keeps
        if all(not row_prompts[r].images or (pixel_fns[r] is None and _same_objects(
                row_prompts[r].images, row_prompts[r % n_req].images)) for r in own):
            feats = [pre.features[r % n_req] if row_prompts[r].images else None for r in own]
        else:
            feats = self._image_features(batch, keep=kept_rows)
        feats = [f if f is None or transforms[r] is None else transforms[r](f) for r, f in zip(own, feats)]
        seq = adapter.build_sequence(batch, feats, self.model.dtype, self.device)
        fed = seq.valid.sum(dim=1).tolist()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        vision_s = time.perf_counter() - t_vis
        t_pre = time.perf_counter()
        with forward_owners({}):  # no decoder hooks (the reuse's condition); no running batch's rows either
            branch_logits, branch_state, _ = runner.prefill(seq, share_prefixes=self.share_prefixes,
                                                            prefix_cache=self.prefix_cache, store_rows=kept_rows)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        prefill_s = time.perf_counter() - t_pre
        rows = tuple(a + b for a, b in zip(main, _row_figures(branch_state, fed)))
        merged = runner.merge(state, branch_state)
        # one fresh prefill's rows: its layout and visual counts, as a prefill of all rows would leave them
        merged.final_seq = stack_rows([state.final_seq, branch_state.final_seq])
        merged.visual_per_layer = [torch.cat([a, b]) for a, b in zip(state.visual_per_layer,
                                                                     branch_state.visual_per_layer)]
        return torch.cat([logits, branch_logits]), merged, {}, rows, vision_s, prefill_s

    def _start_copies(self, requests: list[Request], specs: list[GenerationSpec], indices: list[int],
                      positions: list[int], source: list[int]) -> DecodeBatch:
        """Prefill each distinct request once (``n`` choices of one chat request: the same prompt and image
        objects) and give every copy its own rows of the result: its spec, sampler, stream index. Each distinct
        request is prefilled with the longest length its copies ask for (the context check, which names that
        copy)."""
        firsts = sorted(set(source))
        longest = {u: max((i for i in range(len(requests)) if source[i] == u), key=lambda i: specs[i].max_new_tokens)
                   for u in firsts}
        batch = self._start([requests[u] for u in firsts], [specs[longest[u]] for u in firsts],
                            [indices[u] for u in firsts], [positions[longest[u]] for u in firsts])
        row = {u: k for k, u in enumerate(firsts)}
        batch.expand([row[s] for s in source], requests, specs, indices)
        return batch

    def _answer_prompts(self, seq: Seq, next_positions: torch.Tensor, rows, n_req: int,
                        max_new: list[int]) -> list[dict[int, PromptTokens]]:
        """Per request, branch index -> the prompt of its row of that branch among ``rows`` (rows of ``seq``,
        branch-major: row r is request r % n_req's branch r // n_req) whose answer of up to ``max_new`` tokens the
        prefix cache may keep (``LiveRequest.prompts``); none without a cache."""
        prompts: list[dict[int, PromptTokens]] = [{} for _ in range(n_req)]
        if self.prefix_cache is None:
            return prompts
        for r in rows:
            if self.prefix_cache.may_keep_answer(seq, r, max_new[r % n_req]):
                prompts[r % n_req][r // n_req] = PromptTokens.of_row(seq, r, next_positions)
        return prompts

    @staticmethod
    def _report_vision_work(pctx: PruneContext, work: dict[str, list[int]]) -> None:
        """``ModelAdapter.vision_work`` in each request's own report, a list over its images per key (main rows
        only: a decoder's extra rows are no request's images)."""
        per_row = pctx.report.setdefault("per_row", {})
        for key, per_image in work.items():
            for r, n in zip(pctx.batch.rows_with_images, per_image):
                if r in pctx.main_rows:
                    per_row.setdefault(r, {}).setdefault(key, []).append(n)

    @staticmethod
    def _pruning_report(pruner, pctx: PruneContext, row: int) -> dict[str, Any]:
        """The pruner's description and the request's own view of its report (``PruneContext.request_report``)."""
        return {**pruner.describe(), **pctx.request_report(row)}

    @staticmethod
    def _share_keep(keep: torch.Tensor, seq: Seq, n_req: int, nb: int, shares: list[bool]) -> torch.Tensor:
        """Branch rows keep exactly their main row's visual indices when they carry the same visual tokens. A
        row that a vision-side cut left with tokens of its own (FlowCut's stage V on a distorted view) keeps
        the pruner's own cut of it, to the same budget."""
        if nb == 1:
            return keep
        vis = seq.visual_mask()
        keep = keep.clone()
        for r in range(n_req, seq.batch_size):
            main = r % n_req
            if not shares[r]:
                keep[r] |= vis[r]
                continue
            own, mains = seq.visual[r][vis[r]], seq.visual[main][vis[main]]
            if not own.numel() or own.shape != mains.shape or not torch.equal(own, mains):
                continue
            main_kept = seq.visual[main][keep[main] & vis[main]]
            row_keep = torch.isin(seq.visual[r], main_kept) & vis[r]
            keep[r] = (keep[r] & ~vis[r]) | row_keep
        return keep


@dataclass
class ProbePrefill:
    """A pre-pass's prefill kept for decoding (``Engine.probe_forward(keep_prefill=True)``): its rows' encoding,
    image features (per row, before any transform), last-position logits, decode state and tokens fed, and its
    input as the first layer received it (what the prefix cache keeps of a request's prompt with its answer)."""

    batch: EncodedBatch
    features: list[torch.Tensor | None]
    logits: torch.Tensor
    state: DecodeState
    fed: list[int]
    seq: Seq | None = None


def _row_figures(state: DecodeState, fed: list[int], rows: int | None = None) -> tuple[list, ...]:
    """Of a fresh prefill's first ``rows`` rows (default all): the tokens each fed the first layer, its visual
    tokens fed to each layer, its prompt tokens another row computed (a shared prefix), its final visual
    indices (-1: not a visual token) and its prompt tokens taken from the prefix cache."""
    n = len(fed) if rows is None else rows
    visual_fed = torch.stack(state.visual_per_layer, dim=1)[:n].tolist()
    shared = (state.shared_tokens or [0] * len(fed))[:n]
    cached = (state.cached_tokens or [0] * len(fed))[:n]
    return list(fed[:n]), visual_fed, list(shared), list(state.final_seq.visual[:n]), list(cached)


def _same_objects(a: Sequence[Any], b: Sequence[Any]) -> bool:
    return len(a) == len(b) and all(x is y for x, y in zip(a, b))


def check_text(text: str | None, what: str, placeholder: str | None) -> None:
    """A request's text, checked before the tokenizer sees it: valid Unicode (a lone surrogate cannot be encoded)
    and, in a prompt the engine templates, no image placeholder of the model (the processor would count it as
    an image of the request)."""
    if text is None:
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidInput(f"{what} is not valid Unicode text: {text[e.start]!r} at character {e.start} "
                           "(a lone surrogate)") from None
    if placeholder and placeholder in text:
        raise InvalidInput(f"{what} contains the model's image placeholder {placeholder!r}: give the images in "
                           "Request.images (the chat template places them), or a templated prompt with raw_prompt=True")


def _copies(requests: Sequence[Request], specs: Sequence[GenerationSpec]) -> list[int]:
    """For each request, the position of the first request that is the same one: the same prompt, system text
    and template flag, the very same image objects (what the copies of a request with ``n`` choices share;
    images are compared by identity, never by their pixels) prepared the same way (``image_aspect``). The
    requests have passed ``Engine._prompts``."""
    first: dict[tuple, int] = {}
    out = []
    for i, (r, spec) in enumerate(zip(requests, specs)):
        ids = tuple(r.prompt_token_ids) if r.prompt_token_ids is not None else None
        key = (r.prompt, ids, r.system, r.raw_prompt, tuple(id(im) for im in r.images), spec.image_aspect)
        out.append(first.setdefault(key, i))
    return out


def request_specs(spec: SpecArg, n: int) -> tuple[GenerationSpec, list[GenerationSpec]]:
    """(the batch's spec, one spec per request) from ``spec``: None (the defaults), one spec for all ``n``
    requests, or a sequence of ``n`` specs that differ only in their ``PER_REQUEST_FIELDS`` (length, stop
    strings, token selection, seed, diagnostics, log-probabilities): the pruner and decoder are the batch's.
    The first spec speaks for the batch."""
    if spec is None:
        spec = GenerationSpec()
    if isinstance(spec, GenerationSpec):
        return spec, [spec] * n
    if isinstance(spec, (str, bytes)) or not isinstance(spec, Sequence):
        raise InvalidInput(f"spec must be a GenerationSpec or one per request, got {type(spec).__name__}")
    specs = list(spec)
    if len(specs) != n:
        raise InvalidInput(f"{len(specs)} specs for {n} requests")
    for i, s in enumerate(specs):
        if not isinstance(s, GenerationSpec):
            raise InvalidInput(f"spec {i} must be a GenerationSpec, got {type(s).__name__}")
    if not specs:
        return GenerationSpec(), []
    key = specs[0].batch_key()
    for i, s in enumerate(specs[1:], 1):
        if s.batch_key() != key:
            raise InvalidInput(f"spec {i}: the requests of one batch share their pruning and decoding (method, budget, "
                               "parameters); only their own generation settings may differ")
    return specs[0], specs


def load_engine(model: str | Path = "tiny", **kwargs: Any) -> Engine:
    return Engine.load(str(model), **kwargs)
