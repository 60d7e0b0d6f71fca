"""A request whose scores become NaN mid-answer (a float16 model overflowing) ends with an error that names it;
the other requests of its batch get exactly what they get alone. Before, greedy decoding went on choosing the
NaN row's argmax (garbage tokens, no error) and sampling raised inside ``torch.multinomial``, failing every
request of the batch. The prefill check (``NonFiniteLogits``) is in ``test_numerical_edges.py``."""
from __future__ import annotations

import asyncio

import httpx
import pytest

from vlmguard.decode_batch import DecodeBatch
from vlmguard.errors import NonFiniteLogits
from vlmguard.results import Request
from vlmguard.spec import GenerationSpec
from vlmguard.testing import random_image, tiny_engine

PROMPTS = ["Is there a dog in the image?", "describe the photo", "what color is the car"]


def reqs() -> list[Request]:
    return [Request(p, [random_image(i + 1, (40, 32))]) for i, p in enumerate(PROMPTS)]


@pytest.fixture
def nan_at(monkeypatch):
    """``nan_at(row, step)``: from decode step ``step`` on, the decoder's scores of the request at position
    ``row`` of the batch are NaN (what an overflowing float16 model gives)."""
    where: dict[str, int] = {}
    original = DecodeBatch._combine

    def combine(self, blocks):
        out = original(self, blocks)
        row = where.get("row")
        if row is not None and self.cohorts[0].step >= where["step"] and row < len(self.lives) \
                and self.lives[row].index == where["index"]:
            out.scores[row] = float("nan")
        return out

    monkeypatch.setattr(DecodeBatch, "_combine", combine)

    def set_(row: int, step: int, index: int | None = None) -> None:
        where.update(row=row, step=step, index=row if index is None else index)

    return set_


@pytest.mark.parametrize("sampling", [False, True])
def test_a_request_whose_scores_become_nan_ends_with_an_error_and_the_others_go_on(nan_at, sampling):
    eng = tiny_engine("llava")
    spec = GenerationSpec(max_new_tokens=6, do_sample=sampling, temperature=0.8, seed=1, logprobs=1)
    alone = [eng.generate([r], spec)[0] for r in reqs()]
    nan_at(row=1, step=2)
    got = eng.generate(reqs(), spec)
    assert [g.token_ids for g in (got[0], got[2])] == [alone[0].token_ids, alone[2].token_ids]
    broken = got[1]
    assert broken.finish_reason == "error" and broken.token_ids == alone[1].token_ids[:2]
    assert "became NaN at generated token 2 (float32 weights): the weights or the input are broken" in broken.error
    assert broken.text == eng.adapter.tokenizer.decode(broken.token_ids, skip_special_tokens=True).strip()
    assert len(broken.logprobs) == 2 and got[0].error is None


def test_over_http_the_broken_request_is_a_500_and_a_stream_gets_an_error_event(nan_at):
    from test_client import _inprocess_app

    app = _inprocess_app()
    body = {"model": "tiny-llava", "max_tokens": 6, "messages": [{"role": "user", "content": "describe the photo"}]}
    nan_at(row=0, step=1)

    async def main():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
            plain = await http.post("/v1/chat/completions", json=body)
            stream = await http.post("/v1/chat/completions", json={**body, "stream": True})
            native = await http.post("/v1/generate", json={"prompt": "describe the photo", "stream": True,
                                                           "spec": {"max_new_tokens": 6}})
            metrics = (await http.get("/metrics", params={"format": "json"})).json()
            prometheus = (await http.get("/metrics")).text
            return plain, stream, native, metrics, prometheus

    plain, stream, native, metrics, prometheus = asyncio.run(main())
    assert metrics["results_failed"] == 3 and "vlmguard_failed_results_total 3" in prometheus
    assert plain.status_code == 500 and "became NaN at generated token 1" in plain.json()["error"]["message"]
    assert plain.json()["error"]["code"] == "NonFiniteLogits"
    for r in (stream, native):
        assert r.status_code == 200  # the answer had started: the error is its last event
        assert "became NaN at generated token 1" in r.text and r.text.rstrip().endswith("data: [DONE]")
        assert '"done": true' not in r.text.replace('"done":true', '"done": true')


def test_a_benchmark_stops_at_the_batch_with_the_broken_request_and_resumes_there(nan_at, tmp_path):
    from vlmguard.bench import db as dbm
    from vlmguard.bench.datasets import synth_dataset
    from vlmguard.bench.runner import default_spec, run_benchmark
    from test_bench_runner import SYNTH

    eng = tiny_engine("llava")
    nan_at(row=1, step=0)
    spec = default_spec("pope")
    with pytest.raises(NonFiniteLogits, match="became NaN"):
        run_benchmark(eng, "pope", synth_dataset(SYNTH), spec, tmp_path / "r.sqlite", split="random", limit=4,
                      batch_size=2, progress=False, model_name="random:llava")
    runs = dbm.list_runs(tmp_path / "r.sqlite")
    assert len(runs) == 1 and runs[0]["n_samples"] == 0  # nothing of the broken batch was recorded


def test_the_cli_names_the_error_and_exits_non_zero(nan_at, capsys, tmp_path):
    from vlmguard.cli import main

    image = tmp_path / "img.png"
    random_image(3).save(image)
    nan_at(row=0, step=3)
    rc = main(["generate", "--model", "random:llava", "--image", str(image), "--prompt", "hi",
               "--max-new-tokens", "6"])
    err = capsys.readouterr().err
    assert rc != 0 and "became NaN at generated token 3" in err and "Traceback" not in err


def test_in_a_running_inflight_batch_only_the_broken_request_ends(nan_at):
    from vlmguard.workers.engine_worker import EngineWorker, WorkItem
    from vlmguard.workers.inflight import InflightBatcher

    worker = EngineWorker(name="tiny-llava", engine=tiny_engine("llava"))
    spec = GenerationSpec(max_new_tokens=6)
    items = [WorkItem(prompt=r.prompt, images=r.images, spec=spec, request_id=f"q{i}") for i, r in enumerate(reqs())]
    alone = [worker.generate_many([it])[0]["result"] for it in items]
    nan_at(row=0, step=2, index=0)  # the first request the batcher takes
    b = InflightBatcher(worker, max_batch_size=4, wait_s=0.0)

    async def main():
        tasks = []
        for it in items:
            tasks.append(asyncio.ensure_future(b.submit(it)))
            await asyncio.sleep(0.005)
        return await asyncio.wait_for(asyncio.gather(*tasks), 120)

    answers = [a["result"] for a in asyncio.run(main())]
    assert answers[0]["finish_reason"] == "error" and "became NaN" in answers[0]["error"]
    assert [a["token_ids"] for a in answers[1:]] == [a["token_ids"] for a in alone[1:]]
    assert all(a["error"] is None for a in answers[1:])
