"""``vlmguard run-batch`` (``workers/run_batch.py``): a file of requests in OpenAI's batch format answered offline
by the bundled model, each as the HTTP service answers it, the requests sharing batches; file errors before any
model work; ``--resume`` after an interruption."""
from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import pytest

from cli_support import check_one_line_error, run_json, stop_with_sigterm
from vlmguard.images import image_to_data_url
from vlmguard.testing import random_image
from vlmguard.workers.api import LocalBackend, create_api
from vlmguard.workers.config import ModelConfig, ServiceConfig
from vlmguard.workers.engine_worker import EngineWorker


def _chat(image_seed: int, question: str, **extra) -> dict:
    image = image_to_data_url(random_image(image_seed, (96, 96)))
    return {"model": "tiny", "max_tokens": 12, **extra, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": image}}, {"type": "text", "text": question}]}]}


BODIES = {
    **{f"pope-{i}": _chat(i % 3, f"Is there a {obj} in the image?")
       for i, obj in enumerate(["dog", "cup", "car", "bench", "cat", "fork", "bus", "chair"])},
    "described": _chat(4, "Describe this image.", max_tokens=24),
    "flowcut-vista": _chat(5, "Is there a car in the image?",
                           vlmguard={"pruning": "flowcut", "budget": 16, "decoding": "vista"}),
    "two-choices": _chat(6, "What is in the image?", n=2, temperature=1.0, seed=3),
    "refused": {"messages": [], "max_tokens": 8},  # the API's own 400
    "unknown-model": {**_chat(1, "Is there a dog?"), "model": "gpt-9"},
    "streamed": {**_chat(1, "Is there a dog?"), "stream": True},
}
NATIVE = {"prompt": "Is there a cat in the image?", "images": [image_to_data_url(random_image(7, (96, 96)))],
          "spec": {"max_new_tokens": 6, "pruning": "adaptinfer", "budget": 32}}


COMPLETION = {"model": "tiny", "prompt": ["USER: Is there a dog? ASSISTANT:", "A photo of"], "max_tokens": 8}
RESPONSES = {"model": "tiny", "max_output_tokens": 12, "input": [{"role": "user", "content": [  # pope-0's question
    {"type": "input_image", "image_url": BODIES["pope-0"]["messages"][0]["content"][0]["image_url"]["url"]},
    {"type": "input_text", "text": "Is there a dog in the image?"}]}]}


def _write_requests(path: Path, extra_lines: tuple[str, ...] = ()) -> None:
    lines = [json.dumps({"custom_id": cid, "method": "POST", "url": "/v1/chat/completions", "body": body})
             for cid, body in BODIES.items()]
    lines.append(json.dumps({"custom_id": "native", "method": "POST", "url": "/v1/generate", "body": NATIVE}))
    lines.append(json.dumps({"custom_id": "responses", "method": "POST", "url": "/v1/responses", "body": RESPONSES}))
    lines.append(json.dumps({"custom_id": "background", "method": "POST", "url": "/v1/responses",
                             "body": {**RESPONSES, "background": True}}))
    lines.append(json.dumps({"custom_id": "completion", "method": "POST", "url": "/v1/completions",
                             "body": COMPLETION}))
    path.write_text("\n".join([*lines, "", *extra_lines]) + "\n")  # (a blank line is skipped)


def _records(path: Path) -> dict[str, dict]:
    records = [json.loads(line) for line in path.read_text().splitlines()]
    by_id = {r["custom_id"]: r for r in records}
    assert len(by_id) == len(records)  # one record per request
    return by_id


def _direct(body: dict, url: str = "/v1/chat/completions") -> dict:
    """The same request to the API over a plain (unbatched) backend."""
    app = create_api(LocalBackend({"tiny": EngineWorker("tiny")}),
                     ServiceConfig(models=[ModelConfig(name="tiny")], api_key_env=None))

    async def call():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            return (await c.post(url, json=body)).json()

    return asyncio.run(call())


@pytest.fixture(scope="module")
def batch_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("run-batch")
    _write_requests(tmp / "in.jsonl")
    summary = run_json(["run-batch", "-i", str(tmp / "in.jsonl"), "-o", str(tmp / "out.jsonl"),
                        "--max-batch-size", "4", "--json"])
    return summary, _records(tmp / "out.jsonl")


def test_every_request_gets_one_record_in_openais_batch_output_format(batch_run):
    summary, records = batch_run
    assert summary == {**summary, "command": "run-batch", "requests": len(BODIES) + 4, "skipped": 0, "ok": 14,
                       "failed": 4}
    assert set(records) == {*BODIES, "native", "responses", "background", "completion"}
    for cid, rec in records.items():
        assert rec["id"].startswith("batch_req_") and rec["error"] is None and rec["custom_id"] == cid
        assert set(rec["response"]) == {"status_code", "request_id", "body"}
    statuses = {cid: rec["response"]["status_code"] for cid, rec in records.items()}
    assert statuses == {**{cid: 200 for cid in records}, "refused": 400, "unknown-model": 404, "streamed": 400,
                        "background": 400}
    assert records["background"]["response"]["body"]["error"]["param"] == "background"
    assert records["refused"]["response"]["body"]["error"]["param"] == "messages"
    assert "not supported in a batch" in records["streamed"]["response"]["body"]["error"]["message"]
    chat = records["pope-0"]["response"]
    assert chat["request_id"] == chat["body"]["id"] and chat["body"]["object"] == "chat.completion"
    assert len(records["two-choices"]["response"]["body"]["choices"]) == 2
    reply = records["responses"]["response"]  # the Responses API: the same question, the same answer
    assert reply["request_id"] == reply["body"]["id"] and reply["body"]["object"] == "response"
    assert reply["body"]["output"][0]["content"][0]["text"] == \
        records["pope-0"]["response"]["body"]["choices"][0]["message"]["content"]


def test_answers_equal_the_services_own_and_requests_share_batches(batch_run):
    _, records = batch_run
    for cid in ("pope-0", "pope-5", "described", "flowcut-vista"):
        body = records[cid]["response"]["body"]
        alone = _direct(BODIES[cid])
        assert body["choices"][0]["message"] == alone["choices"][0]["message"], cid
        assert body["vlmguard"]["kept_indices"] == alone["vlmguard"]["kept_indices"]
        assert body["vlmguard"]["decoding"] == alone["vlmguard"]["decoding"]
    completion = records["completion"]["response"]["body"]  # (two prompts, as the service answers them)
    assert completion["object"] == "text_completion" and [c["text"] for c in completion["choices"]] == [
        c["text"] for c in _direct(COMPLETION, "/v1/completions")["choices"]]
    native = records["native"]["response"]["body"]
    assert native["text"] == _direct(NATIVE, "/v1/generate")["text"] and native["pruning"]["name"] == "adaptinfer"
    batches = [r["response"]["body"]["vlmguard"]["timings"]["batch_size"] for r in records.values()
               if r["response"]["status_code"] == 200 and "vlmguard" in r["response"]["body"]]
    assert max(batches) > 1  # prefilled and decoded together, not one by one


@pytest.mark.parametrize("line, message", [
    ("not json", "in.jsonl:20: not JSON"),
    ('["a list"]', "in.jsonl:20: a request line is a JSON object, got list"),
    ('{"method": "POST", "url": "/v1/chat/completions", "body": {}}', "in.jsonl:20: custom_id must be a non-empty"),
    ('{"custom_id": "pope-2", "url": "/v1/chat/completions", "body": {}}', "custom_id 'pope-2' repeats line 3"),
    ('{"custom_id": "x", "url": "/v1/embeddings", "body": {}}', "url must be one of /v1/chat/completions, "
                                                                 "/v1/completions, /v1/responses, /v1/generate, got "
                                                                 "'/v1/embeddings'"),
    ('{"custom_id": "x", "method": "GET", "url": "/v1/generate", "body": {}}', "method must be POST, got 'GET'"),
    ('{"custom_id": "x", "url": "/v1/generate", "body": "hi"}', "body must be a JSON object"),
    ('{"custom_id": "x", "url": "/v1/generate", "body": {}, "extra": 1}', "unknown field(s) extra"),
])
def test_a_bad_line_fails_the_file_before_any_model_loads(tmp_path, capsys, line, message):
    _write_requests(tmp_path / "in.jsonl", (line,))
    # the model does not exist: had it been loaded first, that would be the error
    check_one_line_error(["run-batch", "-i", str(tmp_path / "in.jsonl"), "-o", str(tmp_path / "out.jsonl"),
                          "--model", str(tmp_path / "no-model")], message, capsys)
    assert not (tmp_path / "out.jsonl").exists()


def test_files_that_cannot_be_used_are_one_line_errors(tmp_path, capsys):
    requests, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    base = ["run-batch", "-i", str(requests), "-o", str(out)]
    check_one_line_error(base, "--input: no such file", capsys)
    requests.write_text("\n\n")
    check_one_line_error(base, "holds no request", capsys)
    _write_requests(requests)
    out.write_text('{"custom_id": "pope-0"}\n')
    check_one_line_error(base, "exists; --resume goes on from it", capsys)
    check_one_line_error(["run-batch", "-i", str(requests), "-o", str(requests)], "--output must not be --input",
                         capsys)
    check_one_line_error([*base, "--resume", "--batch-wait-ms", "-1"], "--batch-wait-ms must be >= 0", capsys)
    requests.write_bytes(b'{"custom_id": "\xff"}\n')
    check_one_line_error(base, "is not UTF-8 text", capsys)


def test_resume_keeps_final_answers_and_runs_the_rest(tmp_path, batch_run):
    _, records = batch_run
    requests, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    _write_requests(requests)
    kept = records["pope-1"]
    server_error = {**records["pope-2"], "response": {"status_code": 500, "request_id": "r", "body": {}}}
    refused = records["refused"]
    cut = json.dumps(records["pope-3"])[:40]  # the last line of an interrupted run
    out.write_text("\n".join(json.dumps(r) for r in (kept, server_error, refused)) + "\n" + cut)
    summary = run_json(["run-batch", "-i", str(requests), "-o", str(out), "--resume", "--json"])
    assert (summary["skipped"], summary["ok"] + summary["failed"]) == (2, len(BODIES) + 4 - 2)
    after = _records(out)
    assert set(after) == {*BODIES, "native", "responses", "background", "completion"}
    assert after["pope-1"] == kept and after["refused"] == refused  # not run again
    assert after["pope-2"]["response"]["status_code"] == 200  # the server error ran again
    assert after["pope-3"]["response"]["body"]["choices"][0]["message"] == \
        records["pope-3"]["response"]["body"]["choices"][0]["message"]


def test_local_images_are_read_from_the_allowed_folder_only(tmp_path, batch_run):
    _, records = batch_run
    media = tmp_path / "media"
    media.mkdir()
    random_image(0, (96, 96)).save(media / "zero.png")  # pope-0's image, as a file
    body = {**BODIES["pope-0"], "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": (media / "zero.png").as_uri()}},
        {"type": "text", "text": "Is there a dog in the image?"}]}]}
    requests = tmp_path / "in.jsonl"
    requests.write_text(json.dumps({"custom_id": "file", "url": "/v1/chat/completions", "body": body}) + "\n")
    run_json(["run-batch", "-i", str(requests), "-o", str(tmp_path / "on.jsonl"), "--allowed-local-media-path",
              str(media), "--json"])
    run_json(["run-batch", "-i", str(requests), "-o", str(tmp_path / "off.jsonl"), "--json"])
    on, off = _records(tmp_path / "on.jsonl")["file"], _records(tmp_path / "off.jsonl")["file"]
    assert on["response"]["body"]["choices"][0]["message"] == \
        records["pope-0"]["response"]["body"]["choices"][0]["message"]  # the same image, the same answer
    assert off["response"]["status_code"] == 400
    assert "file:// image URLs are turned off" in off["response"]["body"]["error"]["message"]


def test_a_services_overloaded_answers_are_retried_and_a_lost_request_is_recorded(tmp_path):
    """The client side of ``--url``: 503 with Retry-After is retried, an error answer is its record, and a request
    that never got an answer is a record with no response (so that --resume runs it again)."""
    import io

    from vlmguard.client import AsyncClient
    from vlmguard.workers.run_batch import BatchRequest, answered_ids, run_requests

    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        cid = json.loads(request.content)["cid"]
        seen.append(cid)
        if cid == "lost":
            raise httpx.ConnectError("connection refused", request=request)
        if cid == "busy" and seen.count("busy") < 3:
            return httpx.Response(503, headers={"Retry-After": "0"}, json={"error": {"message": "overloaded"}})
        if cid == "throttled":
            return httpx.Response(429, json={"error": {"message": "slow down"}})
        if cid == "refused":
            return httpx.Response(400, json={"error": {"message": "bad", "type": "invalid_request_error",
                                                       "param": "messages", "code": "invalid_request"}})
        return httpx.Response(200, json={"id": f"chatcmpl-{cid}", "object": "chat.completion"})

    requests = [BatchRequest(i, cid, "/v1/chat/completions", {"cid": cid})
                for i, cid in enumerate(["ok", "busy", "refused", "lost", "throttled"], 1)]
    out = io.StringIO()

    async def main():
        client = AsyncClient("http://service", transport=httpx.MockTransport(handler), max_retries=3, backoff_s=0.0)
        try:
            return await run_requests(client, iter(requests), out, concurrency=2)
        finally:
            await client.aclose()

    assert asyncio.run(main()) == (2, 3)
    records = {r["custom_id"]: r for r in map(json.loads, out.getvalue().splitlines())}
    assert seen.count("busy") == 3 and seen.count("lost") == 4  # retried; the lost one each time
    assert records["busy"]["response"] == {"status_code": 200, "request_id": "chatcmpl-busy",
                                           "body": {"id": "chatcmpl-busy", "object": "chat.completion"}}
    assert records["refused"]["response"]["status_code"] == 400
    assert records["refused"]["response"]["body"]["error"]["param"] == "messages"
    assert records["lost"]["response"] is None and records["lost"]["error"]["code"] == "no_answer"
    saved = tmp_path / "out.jsonl"
    saved.write_text(out.getvalue())
    assert records["throttled"]["response"]["status_code"] == 429  # (after the client's retries)
    assert answered_ids(saved) == {"ok", "busy", "refused"}  # --resume runs the lost and the throttled again


def test_sigterm_keeps_the_answers_written_and_resume_runs_the_rest(tmp_path):
    """A run stopped by SIGTERM (a scheduler, a container stop) says where its answers are and loses none of those
    it wrote; ``--resume`` runs the rest only."""
    import signal
    import sys

    n = 48
    requests, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    requests.write_text("".join(json.dumps({"custom_id": f"d{i}", "url": "/v1/chat/completions",
                                            "body": _chat(i % 8, "Describe this image.", max_tokens=24)}) + "\n"
                                for i in range(n)))
    cmd = [sys.executable, "-m", "vlmguard.cli", "run-batch", "-i", str(requests), "-o", str(out),
           "--max-batch-size", "1", "--concurrency", "1", "--quiet"]
    returncode, err = stop_with_sigterm(cmd, lambda: out.exists() and out.read_text().count("\n") >= 2)
    assert returncode == 128 + signal.SIGTERM, (returncode, err)
    assert "--resume goes on from it" in err and "terminated" in err and "Traceback" not in err
    written = _records(out)  # every line a whole record
    assert 2 <= len(written) < n
    summary = run_json(["run-batch", "-i", str(requests), "-o", str(out), "--resume", "--json"])
    assert (summary["skipped"], summary["ok"]) == (len(written), n - len(written))
    after = _records(out)
    assert set(after) == {f"d{i}" for i in range(n)} and all(after[k] == written[k] for k in written)
