"""vLLM's sampling extensions of the chat API: top-level ``top_k`` (-1 or 0: off), ``min_p`` (``GenerationSpec.min_p``,
transformers' ``MinPLogitsWarper`` after temperature, top-k and top-p), ``ignore_eos`` (the end of sequence held back
until ``max_tokens``) and ``stop_token_ids`` (``GenerationSpec.stop_token_ids``: ends the answer as the end of
sequence does), as clients following vLLM's or a model card's examples send them (``extra_body``)."""
from __future__ import annotations

import pytest
import torch

from service_support import qwen_api, run_with_sdk
from vlmguard.engine import Request
from vlmguard.errors import InvalidInput
from vlmguard.images import image_to_data_url
from vlmguard.sampling import RowSampler
from vlmguard.spec import GenerationSpec
from vlmguard.testing import random_image

MODEL = "tiny-qwen"
IMAGE = {"type": "image_url", "image_url": {"url": image_to_data_url(random_image(3, (48, 40)))}}
MESSAGES = [{"role": "user", "content": [IMAGE, {"type": "text", "text": "What is in the picture?"}]}]


@pytest.fixture(scope="module")
def app(qwen):
    return qwen_api(qwen)


def test_min_p_leaves_out_the_tokens_below_its_share_of_the_most_likely():
    probs = torch.tensor([0.5, 0.3, 0.12, 0.05, 0.03])
    sampler = RowSampler.for_spec(GenerationSpec(do_sample=True, min_p=0.2, seed=0))
    kept = sampler.distribution(probs.log())[0]
    assert torch.equal(kept > 0, torch.tensor([True, True, True, False, False]))  # (>= 0.2 x 0.5 = 0.1)
    assert kept[:3] == pytest.approx(probs[:3] / probs[:3].sum())
    only_top = RowSampler.for_spec(GenerationSpec(do_sample=True, min_p=1.0, seed=0)).distribution(probs.log())[0]
    assert only_top.tolist() == [1.0, 0.0, 0.0, 0.0, 0.0]
    assert GenerationSpec(min_p=0.3).batch_key() == GenerationSpec().batch_key()  # (its own in a batch)
    for bad in (-0.1, 1.5, "x"):
        with pytest.raises(InvalidInput, match="min_p"):
            GenerationSpec.build(min_p=bad)


def test_vllms_top_k_min_p_and_ignore_eos_are_taken_at_the_top_level(app, qwen):
    eos = qwen.engine.adapter.eos_token_ids[0]

    async def scenario(client, http):
        async def ask(**kw):
            kw.setdefault("max_tokens", 12)
            extra = {k: kw.pop(k) for k in ("top_k", "min_p", "ignore_eos", "vlmguard") if k in kw}
            return await client.chat.completions.create(model=MODEL, messages=MESSAGES, extra_body=extra, **kw)

        greedy = await ask()
        sampled = dict(temperature=1.0, seed=7)
        answers = {
            "top_k 1": await ask(top_k=1, **sampled), "min_p 1": await ask(min_p=1.0, **sampled),
            "top_k -1": await ask(top_k=-1, **sampled), "no top_k": await ask(**sampled),
            "top_k 0": await ask(top_k=0, **sampled), "top_k 5": await ask(top_k=5, **sampled),
            "vlmguard.top_k 5": await ask(vlmguard={"top_k": 5}, **sampled),
            "both top_k 5": await ask(top_k=5, vlmguard={"top_k": 5}, **sampled)}
        ended = await ask(logit_bias={str(eos): 100})  # (the end of sequence all but forced at once)
        held = await ask(logit_bias={str(eos): 100}, ignore_eos=True)
        chat = {"model": MODEL, "messages": MESSAGES}
        bad = [await http.post("/v1/chat/completions", json={**chat, **body}) for body in (
            {"top_k": -2}, {"min_p": 1.5}, {"top_k": 5, "vlmguard": {"top_k": 3}}, {"ignore_eos": "yes"},
            {"ignore_eos": True, "response_format": {"type": "json_object"}},
            {"ignore_eos": True, "guided_choice": ["yes", "no"]})]
        return greedy, answers, ended, held, bad

    greedy, answers, ended, held, bad = run_with_sdk(app, scenario)
    text = {k: a.choices[0].message.content for k, a in answers.items()}
    assert text["top_k 1"] == text["min_p 1"] == greedy.choices[0].message.content  # (one token left: the argmax)
    assert text["top_k -1"] == text["top_k 0"] == text["no top_k"]  # (off)
    assert text["top_k 5"] == text["vlmguard.top_k 5"] == text["both top_k 5"]  # (the same setting, either name)
    assert len({text["top_k 5"], text["no top_k"], text["top_k 1"]}) == 3  # (and each setting its own draws)
    assert ended.choices[0].finish_reason == "stop" and ended.usage.completion_tokens == 0
    assert held.choices[0].finish_reason == "length" and held.usage.completion_tokens == 12
    assert [b.status_code for b in bad] == [400] * 6
    assert [b.json()["error"]["param"] for b in bad] == ["top_k", "min_p", None, "ignore_eos", "response_format",
                                                         "guided_choice"]
    assert "top_k 5 and vlmguard.top_k 3 disagree" in bad[2].json()["error"]["message"]
    assert "guided and ignore_eos cannot go together" in bad[4].json()["error"]["message"]
    assert "choices and ignore_eos cannot go together" in bad[5].json()["error"]["message"]


@pytest.mark.parametrize("name, value", [("min_p", 0.1), ("stop_token_ids", [3]), ("ignore_eos", True)])
def test_benchmarks_refuse_the_vllm_sampling_settings(name, value):
    from vlmguard.bench.runner import run_benchmark

    with pytest.raises(InvalidInput, match=f"benchmarks do not take {name}"):
        run_benchmark(None, "chair", None, GenerationSpec(**{name: value}), db=":memory:")


def test_a_stop_token_ends_the_answer_where_it_is_drawn_unless_held_by_min_tokens(qwen):
    engine = qwen.engine
    req = [Request("What is in the picture?", [random_image(3, (48, 40))])]
    plain = engine.generate(req, GenerationSpec(max_new_tokens=12))[0].token_ids
    stop = plain[4]
    first = plain.index(stop)  # (where it is first drawn)
    cut = engine.generate(req, GenerationSpec(max_new_tokens=12, stop_token_ids=[stop]))[0]
    assert cut.token_ids == plain[:first] and cut.finish_reason == "stop"
    held = engine.generate(req, GenerationSpec(max_new_tokens=12, stop_token_ids=[stop], min_new_tokens=first + 2))
    assert held[0].token_ids[:first] == plain[:first] and stop not in held[0].token_ids[:first + 2]
    assert len(held[0].token_ids) >= first + 2
    eos = engine.adapter.eos_token_ids[0]  # (all but forced at every step: ignore_eos holds it, not the stop token)
    ignoring = engine.generate(req, GenerationSpec(max_new_tokens=12, stop_token_ids=[stop], ignore_eos=True,
                                                   logit_bias={eos: 100}))[0]
    assert ignoring.finish_reason == "stop" and eos not in ignoring.token_ids and len(ignoring.token_ids) < 12


def test_stop_token_ids_over_the_chat_api(app):
    async def scenario(client, http):
        chat = {"model": MODEL, "messages": MESSAGES, "max_tokens": 6, "logit_bias": {"7": 100}}  # (7, 7, ...)
        answers = [(await http.post("/v1/chat/completions", json={**chat, "stop_token_ids": ids})).json()
                   for ids in ([8], [8, 7])]
        bad = [await http.post("/v1/chat/completions", json={**chat, "stop_token_ids": ids}) for ids in (
            [10**9], [-1], "7")]
        return answers, bad

    (other, seven), bad = run_with_sdk(app, scenario)
    assert (other["choices"][0]["finish_reason"], other["usage"]["completion_tokens"]) == ("length", 6)
    assert (seven["choices"][0]["finish_reason"], seven["usage"]["completion_tokens"]) == ("stop", 0)
    assert [b.status_code for b in bad] == [400] * 3
    assert [b.json()["error"]["param"].split(".")[0] for b in bad] == ["stop_token_ids"] * 3
    assert "past the model's vocabulary" in bad[0].json()["error"]["message"]
