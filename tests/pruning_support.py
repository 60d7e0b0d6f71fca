"""Helpers for the pruning tests: requests, a deeper tiny LLaVA, eager-attention oracles, frozen replays."""
from __future__ import annotations

from contextlib import contextmanager
from functools import lru_cache

import torch

from vlmguard.engine import Engine, Request
from vlmguard.models.base import EncodedBatch
from vlmguard.pruning.base import Pruner
from vlmguard.pruning.scores import keep_mask_from_positions
from vlmguard.spec import GenerationSpec
from vlmguard.testing import LLAVA_TEMPLATE, make_tokenizer, random_image, tiny_llava, tiny_llava_next

SIZES = [(40, 32), (64, 40), (32, 64)]
# decoder parameters that make every contrast act on the tiny models (at some spec defaults one stays idle)
DECODER_PARAMS = {
    "greedy": {},
    "vcd": {},
    "m3id": {"gate": False},
    "vista": {"vsv_lambda": 0.3},
    "iava": {"fallback_rule": "avisc"},
    "lqcd": {},
}


def requests() -> list[Request]:
    return [
        Request("Is there a dog in the image?", [random_image(1, SIZES[0])]),
        Request("describe the photo", [random_image(2, SIZES[1])]),
        Request("what color is the car", [random_image(3, SIZES[2])]),
    ]


def deep_llava(attn: str = "sdpa", vision_layers: int = 8, image_size: int = 48, seed: int = 0):
    """A tiny LLaVA whose CLIP tower is deep enough for FlowCut's multi-event schedule
    (8 layers, features from layer -2 = encoder layer 6, prune events after layers 1, 3, 5)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    tok = make_tokenizer(["<image>"])
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=vision_layers,
                              num_attention_heads=4, image_size=image_size, patch_size=8, projection_dim=32)
    text = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                       tie_word_embeddings=False)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_id=tok.convert_tokens_to_ids("<image>"),
                      vision_feature_layer=-2, vision_feature_select_strategy="default", pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg).eval()
    # sharpen the random CLS attention so entropies differ from 1 (random inits are near-uniform)
    with torch.no_grad():
        for layer in model.model.vision_tower.encoder.layers:
            layer.self_attn.q_proj.weight.mul_(6.0)
            layer.self_attn.k_proj.weight.mul_(6.0)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    ip = CLIPImageProcessorPil(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})
    proc = LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=8, vision_feature_select_strategy="default",
                          num_additional_image_tokens=1, chat_template=LLAVA_TEMPLATE, image_token="<image>")
    model.set_attn_implementation(attn)
    return model, proc


@lru_cache(maxsize=2)
def deep_llava_engine() -> Engine:
    model, proc = deep_llava()
    return Engine(model, proc, name="deep-llava")


def with_pruner(monkeypatch, pruner: Pruner) -> None:
    """Make the next generate() calls use this pruner instance (keeps its recorded state visible)."""
    real = GenerationSpec.resolve
    monkeypatch.setattr(GenerationSpec, "resolve", lambda self: (pruner, real(self)[1]))


class FrozenReplay(Pruner):
    """Replays a finished run's selections: vision side through the real pruner (deterministic), LLM-side
    cuts from the recorded visual indices per layer (no rescoring), for uncached recompute checks."""

    def __init__(self, real: Pruner, stages: dict[int, list[list[int] | None]]):
        super().__init__(real.params, real.budget)
        self.real = real
        self.stages = {int(k): v for k, v in stages.items()}
        self.side = real.side
        self.position_mode = real.position_mode

    def check_budget(self, ctx):
        self.real.check_budget(ctx)

    def renumbers_llm_cuts(self, family):
        return self.real.renumbers_llm_cuts(family)

    def prune_images(self, ctx):
        return self.real.prune_images(ctx)

    def before_layer(self, ctx, layer_idx, seq):
        return None

    def after_layer(self, ctx, layer_idx, seq, req):
        rows = self.stages.get(layer_idx)
        if rows is None:
            return None
        kept = []
        for r, idx in enumerate(rows):
            if idx is None:
                kept.append(None)
                continue
            hit = torch.isin(seq.visual[r], torch.tensor(idx, dtype=torch.long)) & seq.visual_mask()[r]
            kept.append(hit.nonzero().squeeze(1))
        return keep_mask_from_positions(seq, kept)


def append_tokens(engine: Engine, monkeypatch, tokens: list[int]) -> None:
    """Make the adapter encode prompts with ``tokens`` appended (an uncached prefill of prompt + output)."""
    real = type(engine.adapter).encode

    def encode(self, prompts):
        b: EncodedBatch = real(self, prompts)
        extra = torch.tensor([tokens] * b.input_ids.shape[0], dtype=b.input_ids.dtype)
        ones = torch.ones_like(extra, dtype=torch.bool)
        vis = dict(b.vision_inputs)
        if "mm_token_type_ids" in vis:
            vis["mm_token_type_ids"] = torch.cat([vis["mm_token_type_ids"], torch.zeros_like(extra).to(
                vis["mm_token_type_ids"].dtype)], dim=1)
        return EncodedBatch(input_ids=torch.cat([b.input_ids, extra], 1),
                            attention_mask=torch.cat([b.attention_mask, ones], 1),
                            image_token_mask=torch.cat([b.image_token_mask, ~ones], 1),
                            vision_inputs=vis, rows_with_images=b.rows_with_images, extra=b.extra)

    monkeypatch.setattr(type(engine.adapter), "encode", encode)


def check_cached_equals_uncached(engine: Engine, req: Request, spec: GenerationSpec, monkeypatch,
                                 stage_key: str | None, steps: int = 3) -> None:
    """Decode with the pruned KV cache == re-running prefill on prompt + generated tokens with the
    same (frozen) selections: same next token, same probability (fp32, 1e-4)."""
    pruner, _ = spec.resolve()
    with monkeypatch.context() as m:
        with_pruner(m, pruner)
        res = engine.generate([req], spec)[0]
    assert len(res.token_ids) >= steps + 1, "the tiny model stopped early; choose another prompt"
    stages = res.pruning.get(stage_key, {}) if stage_key else {}
    for t in range(1, steps + 1):
        replay = FrozenReplay(pruner, stages)
        with monkeypatch.context() as m:
            with_pruner(m, replay)
            append_tokens(engine, m, res.token_ids[:t])
            one = engine.generate([req], spec.model_copy(update={"max_new_tokens": 1}))[0]
        assert one.token_ids[0] == res.token_ids[t]
        assert abs(one.steps[0].main_prob - res.steps[t].main_prob) < 1e-4
        assert one.kept_indices == res.kept_indices


# ---- positions, joins ------------------------------------------------------------------------------------
@lru_cache(maxsize=2)
def sharp_engine(family: str) -> Engine:
    """A tiny model whose attention depends more on positions (q, k scaled by 3), so position mistakes show in
    the generated tokens, not only in the logits."""
    model, proc = {"llava": tiny_llava, "llava_next": tiny_llava_next}[family]()
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            layer.self_attn.q_proj.weight.mul_(3.0)
            layer.self_attn.k_proj.weight.mul_(3.0)
    return Engine(model, proc, name=f"sharp-{family}")


def prefill(engine: Engine, reqs, spec: GenerationSpec):
    """Prefill logits (rows, V), the decode state and each request's pruning report."""
    batch = engine.start_batch(reqs, spec)
    try:
        return batch.logits.clone(), batch.state, [lv.pruning for lv in batch.lives]
    finally:
        batch.close()


def check_positions_are_cache_lengths(state) -> None:
    """renumber: each layer's next position of a row is the number of keys that layer holds for the row."""
    assert state.layer_next_positions is not None
    for valid, pos in zip(state.layer_valid, state.layer_next_positions):
        assert pos.tolist() == valid.sum(dim=1).tolist()
    assert state.next_positions.tolist() == state.layer_next_positions[0].tolist()


@contextmanager
def only_layers(lm, start: int, stop: int | None, final: bool):
    """Make the transformers language model run only its layers [start:stop] (no final norm unless ``final``)."""
    layers, norm = lm.layers, lm.norm
    lm.layers = torch.nn.ModuleList(list(layers)[start:stop])
    if not final:
        lm.norm = torch.nn.Identity()
    try:
        yield
    finally:
        lm.layers, lm.norm = layers, norm


def run_joined(engine: Engine, spec, first: list[Request], later: list[Request], join_after: int,
               each_step=None, later_spec=None) -> list:
    """Prefill ``first``, decode ``join_after`` steps, merge ``later`` in, decode to the end (requests that finish
    leave the batch: their rows are reordered away). ``each_step(batch)`` runs before every step after the join.
    ``spec`` / ``later_spec`` (default: ``spec``): one spec, or one per request of ``first`` / ``later``."""
    results = {}
    batch = engine.start_batch(first, spec)
    try:
        for _ in range(join_after):
            for ev in batch.advance():
                if ev.done:
                    results[ev.index] = ev.result
        other = engine.start_batch(later, spec if later_spec is None else later_spec,
                                   indices=range(len(first), len(first) + len(later)))
        batch.absorb(other)
        assert other.active == 0
        while batch.active:
            if each_step is not None:
                each_step(batch)
            for ev in batch.advance():
                if ev.done:
                    results[ev.index] = ev.result
    finally:
        batch.close()
    return [results[i] for i in range(len(first) + len(later))]


def renumbered_decode_vs_replay(engine: Engine, req: Request, spec: GenerationSpec, monkeypatch, stage_key: str,
                                steps: int = 3):
    """Cached decoding of ``req`` (checking every step that each layer's next position is its cache length)
    against uncached prefills of prompt + the first t generated tokens with the same frozen cuts. Returns the
    stages, the cached logits per step (steps + 1 of them) and, for t = 1..steps, the replay's logits and
    state."""
    pruner, _ = spec.resolve()
    cached = []
    with monkeypatch.context() as m:
        with_pruner(m, pruner)
        batch = engine.start_batch([req], spec)
        try:
            stages = batch.lives[0].pruning[stage_key]
            for _ in range(steps + 1):
                cached.append(batch.logits[0].clone())
                check_positions_are_cache_lengths(batch.state)
                list(batch.advance())
            tokens = batch.lives[0].gen
        finally:
            batch.close()
    replays = []
    for t in range(1, steps + 1):
        with monkeypatch.context() as m:
            with_pruner(m, FrozenReplay(pruner, stages))
            append_tokens(engine, m, tokens[:t])
            logits, state, _ = prefill(engine, [req], spec)
        replays.append((logits[0], state))
    return stages, cached, replays


def first_step_logits(engine: Engine, req: Request, spec: GenerationSpec) -> torch.Tensor:
    """The logits after one decode step of ``req`` alone."""
    batch = engine.start_batch([req], spec)
    try:
        list(batch.advance())
        return batch.logits[0].clone()
    finally:
        batch.close()


def check_batched_equals_alone(engine: Engine, reqs: list[Request], spec: GenerationSpec) -> list:
    """Batched prefill logits (1e-5), tokens, kept indices and step probabilities equal each request's alone;
    every layer's next position is its cache length. Returns the batched results."""
    import pytest

    logits, state, _ = prefill(engine, reqs, spec)
    check_positions_are_cache_lengths(state)
    batched = engine.generate(reqs, spec)
    for r, (req, b) in enumerate(zip(reqs, batched)):
        one_logits, _, _ = prefill(engine, [req], spec)
        assert (logits[r] - one_logits[0]).abs().max().item() < 1e-5
        s = engine.generate([req], spec)[0]
        assert b.token_ids == s.token_ids and b.kept_indices == s.kept_indices
        assert b.visual_tokens_kept == s.visual_tokens_kept
        assert [x.main_prob for x in b.steps] == pytest.approx([x.main_prob for x in s.steps], abs=1e-5)
    return batched


def check_joined_equals_alone(engine: Engine, spec: GenerationSpec, first: list[Request], later: list[Request]):
    """``later`` joins ``first`` after two steps: tokens, kept indices and step probabilities equal each request's
    alone; where layer groups number differently, every step's next positions are the cache lengths."""
    import pytest

    def positions(batch) -> None:
        if batch.state.layer_next_positions is not None:
            check_positions_are_cache_lengths(batch.state)

    joined = run_joined(engine, spec, first, later, join_after=2, each_step=positions)
    alone = [engine.generate([r], spec)[0] for r in first + later]
    assert [r.token_ids for r in joined] == [r.token_ids for r in alone]
    assert [r.kept_indices for r in joined] == [r.kept_indices for r in alone]
    for j, a in zip(joined, alone):
        assert [x.main_prob for x in j.steps] == pytest.approx([x.main_prob for x in a.steps], abs=1e-5)


def count_tower_images(engine: Engine, monkeypatch) -> list[int]:
    """A list that records, for every vision tower pass of ``engine``, how many images it ran on."""
    seen: list[int] = []
    encode = engine.adapter.encode_images

    def spy(batch):
        seen.append(len(batch.rows_with_images))
        return encode(batch)

    monkeypatch.setattr(engine.adapter, "encode_images", spy)
    return seen
