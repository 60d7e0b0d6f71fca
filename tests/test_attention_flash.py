"""FlashAttention-2: the engine runs transformers' own flash path with the recording wrapper, and answers as SDPA.

The kernels are a CPU stand-in with flash-attn's semantics (``tests/flash_emulation.py``); everything around
them (transformers' checks and un-padding, the wrapper, the runner's 2-D masks, the score facility) is the
code a GPU runs. Before the wrapper took the ``flash_attention_2`` name, ``--attn flash_attention_2`` (and
``auto`` on a CUDA machine with flash-attn) failed at load: transformers took the custom name for a Hub kernel.
"""
from __future__ import annotations

import pytest
import torch

import flash_emulation
from vlmguard.attention import FLASH, choose_attention, register_attention_functions
from vlmguard.engine import Engine, Request
from vlmguard.errors import InvalidInput
from vlmguard.spec import GenerationSpec
from vlmguard.testing import FAMILIES, random_image

@pytest.fixture
def flash_on_cpu(monkeypatch):
    return flash_emulation.install(monkeypatch)


SPECS = [
    GenerationSpec(max_new_tokens=6),
    GenerationSpec(max_new_tokens=6, pruning="fastv", budget=4),  # LLM-side scores under flash
    GenerationSpec(max_new_tokens=6, pruning="flowcut", budget=0.25, decoding="vcd"),  # tower scores, two branches
    GenerationSpec(max_new_tokens=6, pruning="adaptinfer", budget=0.25, decoding="vista"),
]


def _requests() -> list[Request]:
    # different image sizes and prompt lengths: left padding, so flash un-pads through the 2-D mask
    return [Request("Describe the image.", [random_image(1, (40, 32))]),
            Request("Is there a dog in this image? Answer yes or no.", [random_image(2, (32, 48))]),
            Request("Say something.")]


def test_flash_wrapper_takes_the_name_around_transformers_function():
    from transformers.integrations.flash_attention import flash_attention_forward
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    import vlmguard.attention as attention

    register_attention_functions()
    register_attention_functions()  # idempotent: never wraps its own wrapper
    assert getattr(ALL_ATTENTION_FUNCTIONS[FLASH], "vlmguard_probe", False)
    assert attention._ORIGINAL[FLASH] is flash_attention_forward


def test_auto_picks_flash_on_cuda_in_half_precision(flash_on_cpu):
    cuda = torch.device("cuda")
    assert choose_attention("auto", cuda) == FLASH
    assert choose_attention("auto", cuda, torch.bfloat16) == FLASH
    assert choose_attention("flash_attention_2", cuda, torch.float16) == FLASH
    assert choose_attention("auto", torch.device("cpu")) == "vlmguard_sdpa"
    # flash-attn's kernels take half precision only: auto falls back, an explicit choice is refused in one line
    assert choose_attention("auto", cuda, torch.float32) == "vlmguard_sdpa"
    with pytest.raises(InvalidInput, match="float16 or bfloat16, not float32"):
        choose_attention("flash_attention_2", cuda, torch.float32)


def test_flash_without_flash_attn_is_refused():
    with pytest.raises(InvalidInput, match="needs CUDA and the flash-attn package"):
        Engine.load("tiny", attn_implementation="flash_attention_2")


@pytest.mark.parametrize("family", ["llava", "llava_next", "qwen2_vl"])
def test_flash_engine_answers_as_sdpa(family, flash_on_cpu):
    model, proc = FAMILIES[family](seed=0)
    sdpa = Engine(model, proc, name="sdpa")
    expected = [sdpa.generate(_requests(), spec) for spec in SPECS]

    model, proc = FAMILIES[family](seed=0)
    flash = Engine(model, proc, name="flash", attn_implementation="flash_attention_2")
    assert flash.attn_implementation == FLASH and flash.runner.flash
    assert model.config._attn_implementation == FLASH
    for spec, want in zip(SPECS, expected):
        flash_on_cpu.clear()
        got = flash.generate(_requests(), spec)
        assert flash_on_cpu["varlen"] + flash_on_cpu["func"] > 0, "the flash kernels never ran"
        for g, w in zip(got, want):
            assert g.token_ids == w.token_ids, (spec.pruning, spec.decoding)
            assert g.visual_tokens_kept == w.visual_tokens_kept


def test_bundled_model_loads_with_flash(flash_on_cpu):
    eng = Engine.load("tiny", attn_implementation="flash_attention_2")
    assert eng.attn_implementation == FLASH
    reqs = [Request("Is there a dog in the image?", [random_image(3, (96, 96))]),
            Request("Please describe this image in detail.", [random_image(4, (96, 96))])]
    spec = GenerationSpec(pruning="flowcut", budget=16, max_new_tokens=8)
    got = eng.generate(reqs, spec)
    assert flash_on_cpu["varlen"] + flash_on_cpu["func"] > 0
    want = Engine.load("tiny", attn_implementation="sdpa").generate(reqs, spec)
    assert [r.token_ids for r in got] == [r.token_ids for r in want]


@pytest.mark.parametrize("pruning, budget, decoding", [("fastv", 4, "greedy"), ("adaptinfer", 0.25, "vcd")])
def test_flash_requests_joining_a_running_batch_get_their_own_answers(pruning, budget, decoding, flash_on_cpu):
    """In-flight joins under FlashAttention: the merged batch's per-layer caches of different lengths reach the
    kernel as 2-D padding masks (one per layer), and each request decodes as it does alone."""
    from pruning_support import check_joined_equals_alone

    model, proc = FAMILIES["llava"](seed=0)
    eng = Engine(model, proc, name="flash", attn_implementation="flash_attention_2")
    spec = GenerationSpec(max_new_tokens=6, pruning=pruning, budget=budget, decoding=decoding, diagnostics=True)
    reqs = _requests()
    check_joined_equals_alone(eng, spec, reqs[:1], reqs[1:])
    assert flash_on_cpu["varlen"] > 0  # padded rows went through flash's un-padding path


def test_flash_shares_prefixes_as_sdpa_does(flash_on_cpu, monkeypatch):
    """Shared prefixes under FlashAttention: the second pass's queries are un-padded through the last columns of the
    key mask, and flash's causal rule (bottom-right) lets each row's own tokens see its whole prefix."""
    from vlmguard.runner import LayerRunner

    plans = []
    original = LayerRunner.prefill_shared
    monkeypatch.setattr(LayerRunner, "prefill_shared",
                        lambda self, seq, plan, *a, **k: plans.append(plan) or original(self, seq, plan, *a, **k))
    image = random_image(5, (64, 48))
    reqs = [Request(f"Is there a {x} in the image?", [image]) for x in ("dog", "cat", "car", "person", "table")]
    reqs.append(Request("Describe the image.", [random_image(6, (48, 64))]))
    for family in ("llava", "qwen2_vl"):
        model, proc = FAMILIES[family](seed=0)
        sdpa = Engine(model, proc, name="sdpa")
        sdpa.share_prefixes = False
        model, proc = FAMILIES[family](seed=0)
        flash = Engine(model, proc, name="flash", attn_implementation="flash_attention_2")
        for decoding in ("greedy", "lqcd"):
            spec = GenerationSpec(max_new_tokens=6, decoding=decoding)
            plans.clear()
            flash_on_cpu.clear()
            got = flash.generate(reqs, spec)
            assert plans and flash_on_cpu["varlen"] > 0, (family, decoding)
            assert [r.token_ids for r in got] == [r.token_ids for r in sdpa.generate(reqs, spec)], (family, decoding)
