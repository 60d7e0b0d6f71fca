"""``GET /metrics`` as a Prometheus scrape sees it: the text exposition format checked by hand (no prometheus_client
in the project's dependencies) after a realistic mix of requests, counts against the requests sent and the JSON view,
counters that only go up, labels a client cannot multiply, escaped label values, and counts that survive ~200
concurrent requests and several threads."""
from __future__ import annotations

import asyncio
import math
import re
import threading
from collections import Counter

import httpx
import pytest

from vlmguard.client import image_to_url
from vlmguard.testing import random_image
from vlmguard.workers.metrics import ServiceMetrics

NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
LABEL = r'[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\[\\"n])*"'
SAMPLE = re.compile(rf"^({NAME})(?:\{{((?:{LABEL})(?:,{LABEL})*)?,?\}})? (\S+)$")
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}


def _unescape(v: str) -> str:
    return re.sub(r"\\(.)", lambda m: {"n": "\n"}.get(m.group(1), m.group(1)), v)


def parse(text: str) -> dict[str, dict]:
    """Families of a text exposition (format 0.0.4), asserting its rules: every family has one # HELP and one
    # TYPE before its samples, which are contiguous; counters end in _total; histograms have ascending cumulative
    buckets ending at +Inf equal to _count, and _sum; label values escaped; no duplicate series."""
    assert text.endswith("\n") and "\n\n" not in text
    fams: dict[str, dict] = {}
    seen: set[tuple] = set()
    current = None
    for line in text.rstrip("\n").split("\n"):
        if line.startswith("# HELP ") or line.startswith("# TYPE "):
            _, kind, name, rest = (line.split(" ", 3) + [""])[:4]
            assert re.fullmatch(NAME, name), line
            fam = fams.setdefault(name, {"help": None, "type": None, "samples": []})
            key = "help" if kind == "HELP" else "type"
            assert fam[key] is None and not fam["samples"], f"{kind} repeated or after samples: {line!r}"
            fam[key] = rest
            current = name
            continue
        assert not line.startswith("#"), line
        m = SAMPLE.match(line)
        assert m, f"not a valid sample line: {line!r}"
        name, labels_s, value = m.groups()
        labels = {k: _unescape(v) for k, v in re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"',
                                                           labels_s or "")}
        assert current is not None and fams[current]["type"] is not None, f"sample before its # TYPE: {line!r}"
        kind = fams[current]["type"]
        assert kind in SUFFIXES, line
        assert any(name == current + s if kind != "counter" else name == current for s in SUFFIXES[kind]), \
            f"{name} outside its family {current} ({kind})"
        key = (name, tuple(sorted(labels.items())))
        assert key not in seen, f"duplicate series: {line!r}"
        seen.add(key)
        fams[current]["samples"].append((name, labels, float(value)))
    for name, fam in fams.items():
        assert fam["help"] and fam["type"] in SUFFIXES, name
        if fam["type"] == "counter":
            assert name.endswith("_total"), f"counter {name} does not end in _total"
            assert all(v >= 0 for _, _, v in fam["samples"]), name
        assert "_ms" not in name and "millis" not in name, name
        if fam["type"] == "histogram":
            buckets = [(s[1]["le"], s[2]) for s in fam["samples"] if s[0] == name + "_bucket"]
            les = [float(le) for le, _ in buckets]
            assert buckets and buckets[-1][0] == "+Inf" and les == sorted(les) and len(set(les)) == len(les), buckets
            counts = [c for _, c in buckets]
            assert counts == sorted(counts), f"{name} buckets not cumulative: {buckets}"
            (count,) = [s[2] for s in fam["samples"] if s[0] == name + "_count"]
            (total,) = [s[2] for s in fam["samples"] if s[0] == name + "_sum"]
            assert counts[-1] == count and math.isfinite(total), name
    return fams


def values(fams: dict[str, dict]) -> dict[tuple, float]:
    return {(n, tuple(sorted(lab.items()))): v for f in fams.values() for n, lab, v in f["samples"]}


def _app():
    from test_client import _inprocess_app

    return _inprocess_app()


def _chat(img: str, **extra) -> dict:
    return {"model": "tiny-llava", "max_tokens": 3, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "Is there a dog?"}, {"type": "image_url", "image_url": {"url": img}}]}], **extra}


@pytest.fixture(scope="module")
def mix():
    """One app after a realistic mix: chat, native, both streamed, pruning (fastv budget 8), n=2, 400s, 404s, 405,
    unknown paths with a quote, a backslash and a newline; scraped (text) then read as JSON, then scraped again."""
    app = _app()
    img = image_to_url(random_image(2, (36, 36)))

    async def main():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as h:
            sent = [
                await h.post("/v1/chat/completions", json=_chat(img)),
                await h.post("/v1/generate", json={"prompt": "hi", "images": [img], "spec": {"max_new_tokens": 3}}),
                await h.post("/v1/chat/completions", json=_chat(img, stream=True)),
                await h.post("/v1/generate", json={"prompt": "hi", "stream": True, "spec": {"max_new_tokens": 3}}),
                await h.post("/v1/chat/completions", json=_chat(img, vlmguard={"pruning": "fastv", "budget": 8})),
                await h.post("/v1/chat/completions", json=_chat(img, n=2, temperature=0.7)),
                await h.post("/v1/chat/completions", json=_chat(img, vlmguard={"decoding": "nope"})),
                await h.post("/v1/chat/completions", json=_chat(img, model='evil"\\\nmodel')),
                await h.get('/nope"\\x'),
                await h.get("/a%0Ab%22c"),
                await h.get("/v1/models/tiny-llava"),
                await h.get('/v1/models/evil"\\model'),
                await h.get("/v1/chat/completions"),
                await h.get("/metrics?format=xml"),
            ]
            text = await h.get("/metrics")
            js = await h.get("/metrics?format=json")
            await h.post("/v1/generate", json={"prompt": "hi", "spec": {"max_new_tokens": 2}})
            again = await h.get("/metrics")
            return sent, text, js, again

    return asyncio.run(main())


def test_the_text_follows_the_exposition_format_after_a_realistic_mix(mix):
    sent, text, _, again = mix
    assert [r.status_code for r in sent] == [200] * 6 + [400, 404, 404, 404, 200, 404, 405, 400]
    assert text.headers["content-type"].startswith("text/plain; version=0.0.4")
    fams = parse(text.text)
    assert {"vlmguard_requests_total": "counter", "vlmguard_request_latency_seconds": "histogram",
            "vlmguard_in_flight_requests": "gauge", "vlmguard_failed_results_total": "counter",
            "vlmguard_generated_tokens_total": "counter", "vlmguard_tokens_per_second": "gauge",
            "vlmguard_batch_results_total": "counter"}.items() <= {n: f["type"] for n, f in fams.items()}.items()
    parse(again.text)


def test_counts_match_the_requests_sent_and_the_json_view(mix):
    sent, text, js, _ = mix
    v = values(parse(text.text))
    by_status = Counter()
    for (name, labels), n in v.items():
        if name == "vlmguard_requests_total":
            by_status[dict(labels)["status"]] += n
    assert by_status == Counter(str(r.status_code) for r in sent)  # the scrape itself counts after it is answered
    snap = js.json()
    scrape = Counter({"200": 1})  # the text scrape, counted by the time of the JSON one
    assert Counter(snap["requests_by_status"]) == by_status + scrape
    assert snap["results"] == 7  # six generations, one of them with two choices
    assert v[("vlmguard_generated_tokens_total", ())] == snap["generated_tokens_total"]
    assert v[("vlmguard_failed_results_total", ())] == snap["results_failed"] == 0
    assert sum(n for (name, _), n in v.items() if name == "vlmguard_batch_results_total") == snap["results"]
    assert v[("vlmguard_request_latency_seconds_count", ())] + 1 == snap["latency_s"]["count"]


def test_counters_only_go_up(mix):
    _, text, _, again = mix
    fams1, fams2 = parse(text.text), parse(again.text)
    before, after = values(fams1), values(fams2)
    for key, v in before.items():
        name = key[0]
        fam = next(f for n, f in fams1.items() if name.startswith(n))
        if fam["type"] in ("counter", "histogram"):
            assert key in after and after[key] >= v, key
    assert after[("vlmguard_generated_tokens_total", ())] > before[("vlmguard_generated_tokens_total", ())]


def test_labels_come_from_a_fixed_set_not_from_what_a_client_sends(mix):
    """Unknown paths (with a quote, a backslash, a newline), model names and model ids in the URL add no series:
    one "other" value, one model-card route; a known route (GET /v1/models/ID, answered 200) is not "other"."""
    _, text, _, _ = mix
    endpoints = {dict(labels)["endpoint"]: n for (name, labels), n in values(parse(text.text)).items()
                 if name == "vlmguard_requests_total" and dict(labels)["status"] in ("200", "404")}
    assert {k for k in endpoints} <= {"/v1/chat/completions", "/v1/generate", "/v1/models/{model_id}", "other"}
    assert "evil" not in text.text and "nope" not in text.text
    lines = [ln for ln in text.text.splitlines() if 'endpoint="/v1/models/{model_id}"' in ln]
    assert sorted(lines) == ['vlmguard_requests_total{endpoint="/v1/models/{model_id}",status="200"} 1',
                             'vlmguard_requests_total{endpoint="/v1/models/{model_id}",status="404"} 1']
    assert 'vlmguard_requests_total{endpoint="other",status="404"} 2' in text.text.splitlines()


def test_many_distinct_paths_stay_one_series():
    app = _app()

    async def main():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as h:
            for i in range(30):
                await h.get(f"/probe/{i}")
                await h.get(f"/v1/models/m{i}")
            return (await h.get("/metrics")).text

    text = asyncio.run(main())
    series = [ln for ln in text.splitlines() if ln.startswith("vlmguard_requests_total{")]
    assert series == ['vlmguard_requests_total{endpoint="/v1/models/{model_id}",status="404"} 30',
                      'vlmguard_requests_total{endpoint="other",status="404"} 30']


def test_label_values_are_escaped():
    """The renderer escapes label values itself (a quote, a backslash or a newline broke the line before)."""
    m = ServiceMetrics()
    m.request_finished('/a"b\\c\nd', 404, 0.1)
    fams = parse(m.prometheus())
    ((_, labels, n),) = fams["vlmguard_requests_total"]["samples"]
    assert labels == {"endpoint": '/a"b\\c\nd', "status": "404"} and n == 1
    assert 'vlmguard_requests_total{endpoint="/a\\"b\\\\c\\nd",status="404"} 1' in m.prometheus().splitlines()


def test_an_empty_service_is_a_valid_exposition():
    fams = parse(ServiceMetrics().prometheus())
    assert fams["vlmguard_requests_total"]["samples"] == []
    assert [s[2] for s in fams["vlmguard_request_latency_seconds"]["samples"]][-2:] == [0.0, 0.0]


def test_200_concurrent_requests_are_all_counted():
    app = _app()

    async def main():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as h:
            def request(i: int):
                return [lambda: h.get("/health"), lambda: h.get(f"/x{i}"), lambda: h.get("/v1/models"),
                        lambda: h.post("/v1/generate", json={"prompt": "hi", "spec": {"max_new_tokens": 2}}),
                        lambda: h.post("/v1/chat/completions", json={"model": "no", "messages": [
                            {"role": "user", "content": "x"}]})][i % 5]()
            answers = await asyncio.gather(*[request(i) for i in range(200)])
            return answers, (await h.get("/metrics")).text

    answers, text = asyncio.run(main())
    v = values(parse(text))
    got = Counter()
    for (name, labels), n in v.items():
        if name == "vlmguard_requests_total":
            got[dict(labels)["status"]] += int(n)
    assert got == Counter(str(r.status_code) for r in answers) and sum(got.values()) == 200
    assert v[("vlmguard_in_flight_requests", ())] == 1  # the scrape itself
    ok = sum(r.status_code == 200 for r in answers if r.request.url.path == "/v1/generate")
    assert sum(n for (name, _), n in v.items() if name == "vlmguard_batch_results_total") == ok == 40


def test_counts_from_several_threads_are_not_lost():
    m = ServiceMetrics()

    def work():
        for _ in range(5000):
            m.request_started()
            m.request_finished("/health", 200, 0.01)
            m.observe_result({"token_ids": [1, 2], "timings": {"batch_size": 2}})
            m.observe_failure()

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    v = values(parse(m.prometheus()))
    assert v[("vlmguard_requests_total", (("endpoint", "/health"), ("status", "200")))] == 40000
    assert v[("vlmguard_request_latency_seconds_count", ())] == 40000
    assert v[("vlmguard_request_latency_seconds_bucket", (("le", "+Inf"),))] == 40000
    assert v[("vlmguard_generated_tokens_total", ())] == 80000 and v[("vlmguard_failed_results_total", ())] == 40000
    assert v[("vlmguard_in_flight_requests", ())] == 0
