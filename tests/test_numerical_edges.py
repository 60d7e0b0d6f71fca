"""Numerical edge cases of generation: parameter values at the edges of their validated ranges.

Regression tests of the numerical-edge audit (tiny random models, CPU).
"""
from __future__ import annotations

import math

import pytest
import torch

from vlmguard.engine import Request
from vlmguard.sampling import RowSampler, select_tokens
from vlmguard.spec import GenerationSpec
from vlmguard.testing import random_image, tiny_engine


# ---- sampler: temperatures so small that scores / T leaves no finite score ---------------------------
@pytest.mark.parametrize("temperature", [1e-40, 1e-46, 5e-324])
def test_sampling_at_a_vanishing_temperature_is_greedy_not_a_crash(temperature):
    # validated (temperature >= 0), but -4.8 / 1e-40 overflows float32 to -inf in every entry (softmax NaN),
    # and a score of exactly 0 (a one-token plausible set) divided by a T that rounds to 0 is NaN
    scores = torch.log_softmax(torch.tensor([[5.0, 4.0, 0.0, -1.0, float("-inf")],
                                             [0.0, float("-inf"), float("-inf"), float("-inf"), float("-inf")]]), -1)
    spec = GenerationSpec(do_sample=True, seed=0, temperature=temperature, top_k=2)
    assert select_tokens(scores, [RowSampler.for_spec(spec) for _ in range(2)]).tolist() == [0, 0]


@pytest.mark.parametrize("temperature", [1e-38, 1e-39])
def test_vanishing_temperature_with_positive_contrast_scores_is_greedy(temperature):
    # a contrastive decoder's scores can be positive ((1 + a) * main - a * contrast): 5 / 1e-38 overflows to +inf
    # while 1e-3 / 1e-38 stays finite, and softmax over +inf and finite entries is NaN (multinomial raised)
    scores = torch.tensor([[1e-3, 5.0, -2.0, float("-inf")], [0.5, -0.2, 4.0, -1.0]])
    spec = GenerationSpec(do_sample=True, seed=0, temperature=temperature)
    assert select_tokens(scores, [RowSampler.for_spec(spec) for _ in range(2)]).tolist() == [1, 2]


def test_tiny_temperature_in_the_engine_matches_greedy():
    eng = tiny_engine("llava")
    reqs = [Request("Is there a dog in the image?", [random_image(1, (40, 32))])]
    greedy = eng.generate(reqs, GenerationSpec(decoding="vcd", decoding_params={"beta": 1.0}, max_new_tokens=3))
    for t in (1e-40, 1e-46):
        out = eng.generate(reqs, GenerationSpec(decoding="vcd", decoding_params={"beta": 1.0}, do_sample=True, seed=0,
                                                temperature=t, max_new_tokens=3))
        assert out[0].token_ids == greedy[0].token_ids
        assert all(math.isfinite(s.score) and math.isfinite(s.main_prob) for s in out[0].steps)


# ---- image intake: 16-bit grayscale pixels -------------------------------------------------------------
def _gradient_16bit():
    """A 64x64 gradient over 0..65535 in PIL mode I;16."""
    import numpy as np
    from PIL import Image

    return Image.fromarray(np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16))


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_16_bit_grayscale_images_are_scaled_not_clipped_to_white(fmt):
    import base64
    import io

    import numpy as np

    from vlmguard.client import image_to_url
    from vlmguard.images import check_image, image_from_bytes

    img = _gradient_16bit()
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    # PIL's convert("RGB") clips I;16 at 255: the gradient turned 99.6% white (mean 254.5 instead of 127.5)
    for rgb in (image_from_bytes(buf.getvalue()), check_image(img),
                image_from_bytes(base64.b64decode(image_to_url(img).split(",", 1)[1]))):
        x = np.asarray(rgb)
        assert rgb.mode == "RGB" and x.min() == 0 and x.max() == 255
        assert abs(float(x.mean()) - 127.5) < 1.0


# ---- seeds past what a torch generator holds -----------------------------------------------------------
@pytest.mark.parametrize("field, make", [
    ("noise_seed", lambda seed: dict(decoding="iava", decoding_params={"noise_seed": seed, "mask_value": "noise",
                                                                       "fallback_rule": "avisc"})),
    ("seed", lambda seed: dict(pruning="random", budget=3, pruning_params={"seed": seed})),
])
def test_seeds_a_generator_cannot_hold_are_invalid_input_not_a_traceback(field, make):
    from vlmguard.errors import InvalidInput

    eng = tiny_engine("llava")
    reqs = [Request("Is there a dog?", [random_image(1, (40, 32))])]
    # validated as ge=0 only: torch.Generator.manual_seed raised "Overflow when unpacking long long" mid-request
    for seed in (2**64, 10**30):
        with pytest.raises(InvalidInput, match=field):
            eng.generate(reqs, GenerationSpec(max_new_tokens=1, **make(seed)))
    assert eng.generate(reqs, GenerationSpec(max_new_tokens=1, **make(2**64 - 1)))[0].token_ids


def _own_engine():
    from vlmguard.engine import Engine
    from vlmguard.testing import FAMILIES

    model, proc = FAMILIES["llava"](seed=0)
    return Engine(model, proc, name="tiny-llava-own")


# ---- an output layer padded beyond the tokenizer (llava-hf 1.5: 32064 rows, 32002 tokens) ---------------------
@pytest.mark.parametrize("decoding, sample", [("greedy", False), ("vcd", False), ("m3id", False), ("greedy", True)])
def test_padding_rows_of_the_output_layer_are_never_chosen(decoding, sample):
    """Ids past the tokenizer decode to nothing: chosen, they made empty text, steps with token None (the HTTP
    API's step model then failed) and, here, the same padding id for ever. Only the tokenizer's ids compete."""
    from torch import nn

    eng = _own_engine()  # its output layer is swapped: never the shared (cached) tiny_engine
    n_tok = len(eng.adapter.tokenizer)
    old = eng.model.lm_head
    padded = nn.Linear(old.in_features, n_tok + 8, bias=True)
    with torch.no_grad():
        padded.weight[:n_tok] = old.weight
        padded.weight[n_tok:] = 0.0
        padded.bias.zero_()
        padded.bias[-1] = 1e4  # a padding row that would win every step
    eng.model.lm_head = padded
    spec = GenerationSpec(decoding=decoding, max_new_tokens=4, do_sample=sample, seed=0, diagnostics=True)
    out = eng.generate([Request("Is there a dog in the image?", [random_image(1, (40, 32))])], spec)[0]
    assert out.token_ids and max(out.token_ids) < n_tok
    assert all(s.token is not None and math.isfinite(s.score) for s in out.steps)
    eng.model.lm_head = old
    ref = eng.generate([Request("Is there a dog in the image?", [random_image(1, (40, 32))])], spec)[0]
    assert out.token_ids == ref.token_ids  # the padding rows take no probability from the real ones


def test_images_thinner_than_200_to_1_are_refused_in_one_line():
    """A LLaVA processor resizes the shortest side to its input size: a 20000x1 strip became a huge intermediate
    image (2 GB under VCD on the tiny model). Qwen2-VL's processor refuses ratios over 200 itself."""
    from PIL import Image

    from vlmguard.errors import InvalidInput
    from vlmguard.images import check_image

    assert check_image(Image.new("RGB", (400, 2))).size == (400, 2)  # 200:1 is still an image
    with pytest.raises(InvalidInput, match=r"request 0 image 0 is too thin: 2001x10, an aspect ratio over 200:1"):
        tiny_engine("llava").generate([Request("hi", [Image.new("RGB", (2001, 10))])], GenerationSpec(max_new_tokens=1))


def test_a_model_that_overflows_is_a_clear_error_not_a_repeated_token():
    """float16 overflow in the model itself (Qwen2-VL's known case) gave NaN logits, and every decoder then
    answered token 0 over and over with NaN diagnostics. The prefill's logits are checked: one line saying why,
    and the service answers that request alone with a 500 (its batch mates are retried without it)."""
    from vlmguard.errors import NonFiniteLogits
    from vlmguard.workers.engine_worker import error_answer

    eng = _own_engine()  # never the shared (cached) tiny_engine: its weights change here
    eng.model.to(torch.float16)
    with torch.no_grad():
        eng.model.lm_head.weight.mul_(3e5)  # fp16 tops out at 65504: the logits overflow to +-inf, softmax NaN
    req = Request("Is there a dog in the image?", [random_image(1, (40, 32))])
    with pytest.raises(NonFiniteLogits, match=r"request\(s\) 0 \(float16 weights\): float16 overflows in this model; "
                                              r"load it in bfloat16 or float32"):
        eng.generate([req], GenerationSpec(decoding="vcd", max_new_tokens=3))
    err = error_answer(NonFiniteLogits("x"))["error"]
    assert err["status"] == 500 and err["type"] == "server_error"
