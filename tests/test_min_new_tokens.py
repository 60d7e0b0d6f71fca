"""``min_new_tokens`` (vLLM's ``min_tokens`` in the chat API): no end of sequence before that many tokens, as
transformers' ``min_new_tokens``; per request in a batch; with contrastive decoders; validated."""
from __future__ import annotations

import pytest
import torch

from vlmguard.engine import Request, load_engine
from vlmguard.errors import InvalidInput
from vlmguard.models.base import Prompt
from vlmguard.spec import GenerationSpec
from vlmguard.testing import random_image

SHORT = "Is there a dog in the image?"  # the bundled model answers in a few tokens, then ends


@pytest.fixture(scope="module")
def tiny():
    return load_engine("tiny")


def _req(seed: int = 0) -> Request:
    return Request(SHORT, [random_image(seed, (96, 96))])


def test_end_of_sequence_waits_for_min_new_tokens_as_in_transformers(tiny):
    plain = tiny.generate([_req()], GenerationSpec(max_new_tokens=20))[0]
    assert plain.finish_reason == "stop" and len(plain.token_ids) < 8  # a short answer that ends by itself
    held = tiny.generate([_req()], GenerationSpec(max_new_tokens=20, min_new_tokens=8))[0]
    assert len(held.token_ids) >= 8 and held.token_ids[:len(plain.token_ids)] == plain.token_ids
    assert not set(held.token_ids) & set(tiny.adapter.eos_token_ids)
    req = _req()
    inputs = tiny.processor(images=req.images, text=[tiny.adapter.format_prompt(Prompt(req.prompt, req.images))],
                            return_tensors="pt")
    n = inputs["input_ids"].shape[1]
    ref = tiny.model.generate(**inputs, max_new_tokens=20, min_new_tokens=8, do_sample=False)[0, n:].tolist()
    eos = set(tiny.adapter.eos_token_ids)
    assert held.token_ids == [t for t in ref if t not in eos][:len(held.token_ids)]
    assert len(held.token_ids) == len([t for t in ref if t not in eos])


def test_each_request_of_a_batch_keeps_its_own_minimum(tiny):
    reqs = [_req(0), _req(1), _req(2)]
    specs = [GenerationSpec(max_new_tokens=12), GenerationSpec(max_new_tokens=12, min_new_tokens=6),
             GenerationSpec(max_new_tokens=12, min_new_tokens=12)]
    batched = tiny.generate(reqs, specs)
    alone = [tiny.generate([r], s)[0] for r, s in zip(reqs, specs)]
    assert [r.token_ids for r in batched] == [r.token_ids for r in alone]
    assert len(batched[1].token_ids) >= 6 and len(batched[2].token_ids) == 12
    assert GenerationSpec(min_new_tokens=6).batch_key() == GenerationSpec().batch_key()  # they share a batch


@pytest.mark.parametrize("decoding", ["vcd", "m3id", "vista", "lqcd"])
def test_contrastive_decoders_hold_the_end_too(tiny, decoding):
    res = tiny.generate([_req()], GenerationSpec(max_new_tokens=10, min_new_tokens=10, decoding=decoding))[0]
    assert len(res.token_ids) == 10 and res.finish_reason == "length"  # no NaN from contrasting two -inf scores


def test_stop_strings_still_end_the_answer(tiny):
    plain = tiny.generate([_req()], GenerationSpec(max_new_tokens=10))[0]
    first = plain.text.split()[0]
    res = tiny.generate([_req()], GenerationSpec(max_new_tokens=10, min_new_tokens=10, stop=[first]))[0]
    assert res.finish_reason == "stop" and res.text == ""


def test_min_new_tokens_is_validated():
    with pytest.raises(InvalidInput, match="min_new_tokens: 9 is more than max_new_tokens 5"):
        GenerationSpec.build(max_new_tokens=5, min_new_tokens=9)
    for bad in (-1, True, 1.5):
        with pytest.raises(InvalidInput, match="min_new_tokens"):
            GenerationSpec.build(min_new_tokens=bad)


def test_chat_min_tokens_is_vllms_extension():
    from vlmguard.api_schema import ChatCompletionRequest
    from vlmguard.workers.openai_compat import chat_spec

    req = ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], max_tokens=8, min_tokens=4)
    assert chat_spec(req, 64).min_new_tokens == 4
    assert chat_spec(ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}]), 64).min_new_tokens == 0


def test_a_benchmark_run_with_a_minimum_length_is_a_run_of_its_own():
    from vlmguard.bench.runner import spec_knobs

    assert "min_new_tokens" not in spec_knobs(GenerationSpec())  # the ids of earlier runs are unchanged
    assert spec_knobs(GenerationSpec(min_new_tokens=4))["min_new_tokens"] == 4


def test_a_benchmark_run_with_a_minimum_length_is_stored_migrated_and_labelled(tmp_path):
    """A run with min_new_tokens used to fail when it was created ("unknown run knobs"); databases written before
    the column existed get it by migration, and the report tells the run from one without a minimum."""
    import sqlite3

    from test_bench_runner import SYNTH, FakeEngine
    from vlmguard.bench import db as dbm
    from vlmguard.bench.datasets import synth_dataset
    from vlmguard.bench.report import method_label
    from vlmguard.bench.runner import default_spec, run_benchmark
    from vlmguard.bench.sweep import run_sweep

    old = tmp_path / "old.sqlite"  # a database of the version before: no min_new_tokens column
    conn = dbm.connect(old)
    conn.execute("ALTER TABLE runs DROP COLUMN min_new_tokens")
    conn.close()
    assert "min_new_tokens" not in {r[1] for r in sqlite3.connect(old).execute("PRAGMA table_info(runs)")}
    for db in (tmp_path / "new.sqlite", old):
        plain = run_benchmark(FakeEngine(), "pope", synth_dataset(SYNTH), default_spec("pope"), db, split="random",
                              progress=False, limit=3)
        held = run_benchmark(FakeEngine(), "pope", synth_dataset(SYNTH), default_spec("pope", min_new_tokens=2), db,
                             split="random", progress=False, limit=3)
        assert held.run_id != plain.run_id
        runs = {r["run_id"]: r for r in dbm.list_runs(db)}
        assert runs[held.run_id]["min_new_tokens"] == 2 and runs[plain.run_id]["min_new_tokens"] is None
        assert method_label(runs[held.run_id]) == "min_new_tokens=2" and method_label(runs[plain.run_id]) == "base"
    cfg = tmp_path / "sweep.yaml"  # a sweep may set it too, per method or for all
    cfg.write_text(f"model: fake\ndataset: {SYNTH}\nlimit: 3\nbenchmarks:\n  - pope: {{splits: [random]}}\n"
                   "methods:\n  - {name: base}\n  - {name: held, min_new_tokens: 2}\n")
    base, swept = run_sweep(cfg, db=tmp_path / "s.sqlite", load_engine=lambda name: FakeEngine(), progress=False)
    assert {r["run_id"]: r["min_new_tokens"] for r in dbm.list_runs(tmp_path / "s.sqlite")}[swept.run_id] == 2


def test_lqcd_on_a_leading_query_falls_back_to_its_neutral_expert(tiny, monkeypatch):
    """Where LQCD's plausible set keeps only end-of-sequence while min_new_tokens holds it back, the row decodes
    plainly from the expert, the neutral query x_n (lqcd.md 3), not from the main row: on a leading query the main
    row is the amateur, the query as sent with its cue."""
    from vlmguard.decoding.lqcd import LQCD

    seen = []
    combine = LQCD.combine

    def spy(self, step):
        out = combine(self, step)
        seen.append((out.scores[0].clone(), out.main_logprobs[0], out.fallback_logprobs[0]))
        return out

    monkeypatch.setattr(LQCD, "combine", spy)
    eos = tiny.model.generation_config.eos_token_id
    leading = Request("Is there a dog in the image? It seems like there isn't.", [random_image(2, (96, 96))])
    res = tiny.generate([leading], GenerationSpec(max_new_tokens=8, min_new_tokens=8, decoding="lqcd"))[0]
    assert res.decoding["modes"] == ["leading"]
    differ = 0
    for k, (scores, main, expert) in enumerate(seen):
        if torch.isfinite(scores).nonzero().flatten().tolist() != [eos]:
            continue  # the method had a token to give
        expert, main = expert.clone(), main.clone()
        expert[eos] = main[eos] = float("-inf")
        assert res.token_ids[k] == int(expert.argmax()), k
        differ += int(expert.argmax() != main.argmax())
    assert differ  # (a step where the leading row would have picked another token)
