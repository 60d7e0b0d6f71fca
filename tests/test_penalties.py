"""Repetition penalties (presence, frequency: OpenAI's; repetition: transformers' and vLLM's) on the tokens a
request has generated, and OpenAI's logit_bias: the arithmetic, transformers' own processors as the reference,
per-request settings in a shared batch, composition with contrastive decoding (VISTA: on its mixed logits), and
their place in benchmark run identities."""
from __future__ import annotations

import pytest
import torch
from transformers import LogitsProcessorList, RepetitionPenaltyLogitsProcessor, SequenceBiasLogitsProcessor

from vlmguard.bench.report import method_label
from vlmguard.bench.runner import run_benchmark, spec_knobs
from vlmguard.decoding.registry import DECODERS
from vlmguard.errors import InvalidInput
from vlmguard.models.base import Prompt
from vlmguard.penalties import apply_penalties
from vlmguard.results import Request
from vlmguard.spec import GenerationSpec
from vlmguard.testing import random_image, tiny_engine


def test_presence_and_frequency_penalties_count_generated_tokens():
    scores = torch.tensor([[2.0, 1.0, -1.0, 0.5, float("-inf")]])
    spec = GenerationSpec(presence_penalty=0.5, frequency_penalty=0.25)
    out = apply_penalties(scores, [[0, 0, 2, 4]], [spec])
    assert out[0].tolist() == [2.0 - 0.5 - 0.5, 1.0, -1.0 - 0.5 - 0.25, 0.5, float("-inf")]
    assert scores[0, 0] == 2.0  # the decoder's own scores are not changed in place
    untouched = apply_penalties(scores, [[0, 2]], [GenerationSpec()])
    assert untouched is scores


def test_repetition_penalty_equals_transformers_processor_on_generated_tokens():
    torch.manual_seed(0)
    scores = torch.randn(2, 50)
    generated = [[3, 7, 7, 12], [1]]
    ref = RepetitionPenaltyLogitsProcessor(1.7)(torch.tensor([[3, 7, 7, 12]]), scores[:1].clone())
    out = apply_penalties(scores, generated, [GenerationSpec(repetition_penalty=1.7), GenerationSpec()])
    assert torch.equal(out[0], ref[0]) and torch.equal(out[1], scores[1])


def test_penalties_stop_repeats_and_each_request_keeps_its_own_in_a_batch():
    eng = tiny_engine("llava")
    reqs = [Request("describe the photo", [random_image(i + 1, (40, 32))]) for i in range(3)]
    plain = GenerationSpec(max_new_tokens=12)
    strong = GenerationSpec(max_new_tokens=12, frequency_penalty=2.0, presence_penalty=2.0)
    rep = GenerationSpec(max_new_tokens=12, repetition_penalty=3.0, logprobs=1)
    alone = [eng.generate([r], s)[0] for r, s in zip(reqs, [plain, strong, rep])]
    batched = eng.generate(reqs, [plain, strong, rep])
    assert [r.token_ids for r in batched] == [r.token_ids for r in alone]
    assert len(set(alone[0].token_ids)) < 12  # the random test model repeats itself...
    assert len(set(alone[1].token_ids)) == 12  # ...and a strong penalty stops it
    assert batched[0].token_ids == eng.generate([reqs[0]], plain)[0].token_ids
    # log-probabilities are of the penalised scores: what selection read
    assert all(e.top[0].token_id == e.token_id for e in batched[2].logprobs)


@pytest.mark.parametrize("decoding", ["vcd", "vista"])
def test_penalties_compose_with_contrastive_decoding(decoding):
    eng = tiny_engine("llava")
    req = Request("describe the photo", [random_image(1, (40, 32))])
    base = eng.generate([req], GenerationSpec(max_new_tokens=10, decoding=decoding))[0]
    pen = eng.generate([req], GenerationSpec(max_new_tokens=10, decoding=decoding, frequency_penalty=2.0))[0]
    assert len(set(pen.token_ids)) >= len(set(base.token_ids))
    assert pen.decoding["name"] == decoding


def test_vista_penalises_its_mixture_with_the_window_read_out():
    """VISTA's final logits mix the model's with a read-out of its window layers, z = (1 - a) logits + a window.
    The penalties acted on the model's logits only, so under VISTA they had (1 - a) of their strength, and none at
    a = 1. They act on z now, as a logits processor acts on the reference's output (z is its model's logits)."""
    eng = tiny_engine("llava")
    req = Request("describe the photo", [random_image(1, (40, 32))])
    window_only = {"sla_alpha": 1.0, "vsv_lambda": 0.0}
    base = eng.generate([req], GenerationSpec(max_new_tokens=12, decoding="vista", decoding_params=window_only))[0]
    pen = eng.generate([req], GenerationSpec(max_new_tokens=12, decoding="vista", decoding_params=window_only,
                                             presence_penalty=2.0, frequency_penalty=2.0))[0]
    assert len(set(base.token_ids)) < 12  # the window read-out repeats itself...
    assert len(set(pen.token_ids)) == 12  # ...and the penalty stops it (before: the same tokens as base)


def test_vista_combine_applies_the_penalty_to_z():
    from vlmguard.decoding.base import StepInputs
    from vlmguard.decoding.vista import VISTA, VISTAParams

    torch.manual_seed(0)
    main, window = torch.randn(2, 30), torch.randn(2, 30)
    dec = VISTA(VISTAParams(sla_alpha=0.3))
    dec.hidden_layers = (1,)
    specs = [GenerationSpec(presence_penalty=1.5), GenerationSpec(repetition_penalty=2.0)]
    gens = [[4, 4, 9], [7]]
    out = dec.combine(StepInputs(logits={"main": main}, hidden={}, step=3, head=window,
                                 penalise=lambda t: apply_penalties(t, gens, specs)))
    z = apply_penalties(0.7 * main + 0.3 * window, gens, specs)
    assert torch.allclose(out.scores, torch.log_softmax(z, dim=-1))
    assert torch.allclose(out.main_logprobs, torch.log_softmax(apply_penalties(main, gens, specs), dim=-1))


def test_benchmark_runs_with_penalties_are_runs_of_their_own():
    plain = spec_knobs(GenerationSpec())
    assert not {"presence_penalty", "frequency_penalty", "repetition_penalty"} & set(plain)  # ids unchanged
    knobs = spec_knobs(GenerationSpec(presence_penalty=0.5, repetition_penalty=1.2))
    assert knobs["presence_penalty"] == 0.5 and knobs["repetition_penalty"] == 1.2
    assert method_label(knobs) == "penalty[presence=0.5,repetition=1.2]"
    assert method_label({**knobs, "decoding": "vcd"}) == "vcd+penalty[presence=0.5,repetition=1.2]"


def test_sweep_configs_take_penalties(tmp_path):
    from vlmguard.bench.sweep import expand, job_spec, load_config

    cfg_path = tmp_path / "s.yaml"
    cfg_path.write_text("model: tiny\ndataset: synthcoco\nbenchmarks: [chair]\nrepetition_penalty: 1.3\n"
                        "methods:\n  - {name: base}\n  - {name: vcd-pen, decoding: vcd, presence_penalty: 0.5}\n")
    jobs = expand(load_config(cfg_path))
    specs = [job_spec(j) for j in jobs]
    assert [(s.repetition_penalty, s.presence_penalty, s.decoding) for s in specs] == [
        (1.3, 0.0, "greedy"), (1.3, 0.5, "vcd")]


# ---- logit_bias ---------------------------------------------------------------------------------------------

def test_logit_bias_is_added_at_every_step_with_the_penalties():
    scores = torch.tensor([[2.0, 1.0, -1.0, 0.5]])
    biased = GenerationSpec(logit_bias={1: -100, 3: 2.5})
    assert apply_penalties(scores, [[]], [biased])[0].tolist() == [2.0, -99.0, -1.0, 3.0]  # the first step too
    both = GenerationSpec(logit_bias={1: -100}, frequency_penalty=0.5)
    assert apply_penalties(scores, [[0, 0]], [both])[0].tolist() == [1.0, -99.0, -1.0, 0.5]
    assert scores[0, 1] == 1.0


def test_logit_bias_under_greedy_decoding_is_transformers_sequence_bias():
    eng = tiny_engine("llava")
    req = Request("describe the photo", [random_image(1, (40, 32))])
    plain = eng.generate([req], GenerationSpec(max_new_tokens=8))[0].token_ids
    bias = {plain[0]: -100.0, plain[1]: -3.0, 5: 4.0}
    res = eng.generate([req], GenerationSpec(max_new_tokens=8, logit_bias=bias))[0]
    inputs = eng.processor(images=req.images, text=[eng.adapter.format_prompt(Prompt(req.prompt, req.images))],
                           return_tensors="pt")
    n = inputs["input_ids"].shape[1]
    ref = SequenceBiasLogitsProcessor([[[t], b] for t, b in bias.items()])
    out = eng.model.generate(**inputs, max_new_tokens=len(res.token_ids), min_new_tokens=len(res.token_ids),
                             do_sample=False, logits_processor=LogitsProcessorList([ref]))
    assert res.token_ids == out[0, n:].tolist() and res.token_ids[0] != plain[0]


@pytest.mark.parametrize("decoding", sorted(DECODERS.names()))
def test_logit_bias_bans_and_forces_a_token_under_every_decoder(decoding):
    """-100 on a token keeps it out of the answer and +100 makes the whole answer of it: every branch row gets
    the bias, and a contrastive combination (1 + a) l - a l' keeps it once."""
    eng = tiny_engine("llava")
    req = Request("describe the photo", [random_image(2, (40, 32))])
    base = eng.generate([req], GenerationSpec(max_new_tokens=8, decoding=decoding, seed=0))[0].token_ids
    banned = eng.generate([req], GenerationSpec(max_new_tokens=8, decoding=decoding, seed=0,
                                                logit_bias={base[0]: -100}))[0]
    assert base[0] not in banned.token_ids
    forced = eng.generate([req], GenerationSpec(max_new_tokens=5, decoding=decoding, seed=0, logit_bias={7: 100},
                                                logprobs=0))[0]
    assert forced.token_ids == [7] * 5
    assert all(e.logprob > -1e-3 for e in forced.logprobs)  # log-probabilities of what selection read


def test_each_request_of_a_batch_keeps_its_own_logit_bias():
    eng = tiny_engine("qwen2_vl")
    reqs = [Request("describe the photo", [random_image(i + 1, (40, 32))]) for i in range(3)]
    first = eng.generate(reqs[:1], GenerationSpec(max_new_tokens=6))[0].token_ids[0]
    specs = [GenerationSpec(max_new_tokens=6), GenerationSpec(max_new_tokens=6, logit_bias={first: -100}),
             GenerationSpec(max_new_tokens=6, logit_bias={9: 100})]
    batched = eng.generate(reqs, specs)
    assert [r.token_ids for r in batched] == [eng.generate([r], s)[0].token_ids for r, s in zip(reqs, specs)]
    assert batched[2].token_ids == [9] * 6


def test_a_logit_bias_past_the_vocabulary_or_out_of_range_is_refused():
    eng = tiny_engine("llava")
    width = eng.adapter.logits_width
    req = Request("describe the photo", [random_image(1, (40, 32))])
    with pytest.raises(InvalidInput, match=f"request 1: logit_bias names token id {width}, past the model's "
                                           f"vocabulary \\(ids 0-{width - 1}\\)") as e:
        eng.generate([req, req], [GenerationSpec(), GenerationSpec(logit_bias={width: 1.0})])
    assert e.value.param == "logit_bias"
    for bias, needle in (({-1: 1}, "greater than or equal to 0"), ({1: -101}, "greater than or equal to -100"),
                         ({"x": 1}, "valid integer"), ({1: True}, "not a boolean")):
        with pytest.raises(InvalidInput, match=needle):
            GenerationSpec(logit_bias=bias)
    assert GenerationSpec.model_validate_json('{"logit_bias": {"12": -100}}').logit_bias == {12: -100.0}


def test_benchmarks_refuse_a_logit_bias():
    """A bias is not one of a run's knobs: a biased run would resume (and be reported as) the plain one."""
    with pytest.raises(InvalidInput, match="benchmarks do not take logit_bias"):
        run_benchmark(None, "chair", None, GenerationSpec(logit_bias={3: -100}), db=":memory:")
