"""vLLM's sampling extensions of the chat API: top-level ``top_k`` (-1 or 0: off), ``min_p`` (``GenerationSpec.min_p``,
transformers' ``MinPLogitsWarper`` after temperature, top-k and top-p) and ``ignore_eos`` (the end of sequence held
back until ``max_tokens``), as clients following vLLM's or a model card's examples send them (``extra_body``)."""
from __future__ import annotations

import pytest
import torch

from service_support import qwen_api, run_with_sdk
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
    assert [b.json()["error"]["param"] for b in bad] == ["top_k", "min_p", None, "ignore_eos", "ignore_eos",
                                                         "ignore_eos"]
    assert "top_k 5 and vlmguard.top_k 3 disagree" in bad[2].json()["error"]["message"]
    assert "ignore_eos cannot go with a format" in bad[4].json()["error"]["message"]


def test_benchmarks_refuse_min_p():
    from vlmguard.bench.runner import run_benchmark

    with pytest.raises(InvalidInput, match="benchmarks do not take min_p"):
        run_benchmark(None, "chair", None, GenerationSpec(min_p=0.1), db=":memory:")
