"""Security regressions of the HTTP API, found by an audit as a remote client: image URLs that left the
allow-list, request bodies that made 500s, and stop strings that held the engine for minutes."""
from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from vlmguard.errors import InvalidInput
from vlmguard.images import image_to_data_url
from vlmguard.testing import random_image, tiny_engine
from vlmguard.workers.image_intake import make_image_resolver

IMG = image_to_data_url(random_image(2, (36, 36)))


@pytest.fixture(scope="module")
def app():
    from vlmguard.workers.api import LocalBackend, create_api
    from vlmguard.workers.config import ModelConfig, ServiceConfig
    from vlmguard.workers.engine_worker import EngineWorker

    worker = EngineWorker("random:llava", name="tiny", engine=tiny_engine("llava"))
    cfg = ServiceConfig(models=[ModelConfig(name="tiny", model="random:llava", max_new_tokens_limit=8)],
                        api_key_env=None, image_url_allowlist=["https://images.example.org/"])
    return create_api(LocalBackend({"tiny": worker}), cfg)


def post(app, path: str, body: str | bytes | dict) -> httpx.Response:
    content = body if isinstance(body, (str, bytes)) else json.dumps(body)

    async def go():
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as h:
            return await h.post(path, content=content, headers={"Content-Type": "application/json"})

    return asyncio.run(go())


def chat(**extra) -> dict:
    return {"model": "tiny", "max_tokens": 2, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "Is there a dog?"}, {"type": "image_url", "image_url": {"url": IMG}}]}], **extra}


def test_image_url_allowlist_compares_hosts_and_paths_not_string_prefixes(monkeypatch):
    """A prefix without its trailing slash matched other hosts (``...org.evil.com``, ``...org@evil.com``); dot
    segments, plain or percent-encoded, left a path prefix. Nothing outside the list is fetched."""
    fetched: list[str] = []

    def send(self, request, **kw):
        fetched.append(f"{request.url.host}{request.url.raw_path.decode()}")
        return httpx.Response(404, request=request)

    monkeypatch.setattr(httpx.Client, "send", send)
    host_only = make_image_resolver(["https://images.example.org"])
    path_prefix = make_image_resolver(["https://images.example.org/public/"])
    for resolve, url in [(host_only, "https://images.example.org.evil.com/a.png"),
                         (host_only, "https://images.example.org@evil.com/a.png"),
                         (host_only, "https://images.example.org:1@169.254.169.254/latest/meta-data/"),
                         (host_only, "https://images.example.org:8443/a.png"),
                         (path_prefix, "https://images.example.org/public/../private/a.png"),
                         (path_prefix, "https://images.example.org/public/%2e%2e/private/a.png"),
                         (path_prefix, "https://images.example.org/public/%2E%2E%2Fprivate/a.png")]:
        with pytest.raises(InvalidInput, match="allow-list"):
            resolve(url)
    assert fetched == []
    for resolve, url in [(host_only, "https://images.example.org/a.png"),
                         (path_prefix, "https://images.example.org/public/cats/a.png")]:
        with pytest.raises(InvalidInput, match="HTTP 404"):
            resolve(url)
    assert fetched == ["images.example.org/a.png", "images.example.org/public/cats/a.png"]


def test_file_urls_read_images_below_the_allowed_folder_only(tmp_path):
    media, outside = tmp_path / "media", tmp_path / "private"
    (media / "cats").mkdir(parents=True)
    outside.mkdir()
    image = random_image(3, (20, 16))
    image.save(media / "cats" / "a b.png")
    image.save(outside / "secret.png")
    (media / "link.png").symlink_to(outside / "secret.png")  # a link that leads out of the folder
    (media / "big.png").write_bytes(b"\0" * 9000)
    resolve = make_image_resolver([], local_root=media, max_bytes=8192)
    got = resolve((media / "cats" / "a b.png").as_uri())  # (percent-encoded: a%20b.png)
    assert got.size == image.size and got.tobytes() == image.convert("RGB").tobytes()
    assert resolve(f"file://localhost{media}/cats/a%20b.png").size == image.size
    for url, message in [((outside / "secret.png").as_uri(), "not below this server's allowed folder"),
                         (f"file://{media}/../private/secret.png", "not below"),
                         ((media / "link.png").as_uri(), "not below"),
                         ((media / "none.png").as_uri(), "image file not found"),
                         ((media / "big.png").as_uri(), "exceeds 8192 bytes"),
                         (f"file://otherhost{media}/cats/a%20b.png", "names a local path"),
                         ((media / "cats").as_uri(), "cannot be read")]:
        with pytest.raises(InvalidInput, match=message):
            resolve(url)
    with pytest.raises(InvalidInput, match="file:// image URLs are turned off"):
        make_image_resolver([])((media / "cats" / "a b.png").as_uri())


def test_an_unparsable_image_url_is_a_400_not_a_500(app):
    r = post(app, "/v1/generate", {"prompt": "a", "images": ["https://images.example.org/a\t.png"],
                                   "spec": {"max_new_tokens": 2}})
    assert r.status_code == 400, r.text
    assert "images[0]" in r.json()["error"]["message"]


@pytest.mark.parametrize("body", [
    # RecursionError in json.loads; 3.13 parses 5000 levels (C recursion limit ~10000, not sys.getrecursionlimit())
    "[" * 100_000 + "]" * 100_000,
    '{"prompt": "a", "spec": {"seed": ' + "1" * 5000 + "}}",  # over Python's int digit limit: ValueError
    '{"prompt": "a", "spec": {"max_new_tokens": 2, "stop": ["\\ud800"]}}',  # lone surrogate: not encodable
    '{"prompt": "a", "spec": {"max_new_tokens": 2, "stop": ["\\ud800"]}}'.encode("utf-16"),  # the same, UTF-16
    b'{"prompt": "a", "spec": {"max_new_tokens": 2, "stop": ["\xed\xa0\x80"]}}',  # a surrogate's UTF-8 bytes
], ids=["deep-nesting", "huge-integer", "lone-surrogate", "lone-surrogate-utf16", "surrogate-bytes"])
def test_malformed_json_bodies_are_400s(app, body):
    r = post(app, "/v1/generate", body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "invalid_json"


def test_escaped_surrogate_pairs_still_work(app):
    r = post(app, "/v1/generate", '{"prompt": "a dog \\ud83d\\udc36?", "images": ["%s"], '
                                  '"spec": {"max_new_tokens": 2, "stop": ["\\ud83d\\udc36"]}}' % IMG)
    assert r.status_code == 200, r.text


def test_a_schedule_object_nested_past_the_serializer_is_a_400(app):
    deep = json.loads("[" * 300 + "]" * 300)
    schedule = {"layers": [0], "notes": deep}
    r = post(app, "/v1/chat/completions", chat(vlmguard={"pruning": "adaptinfer", "budget": 4,
                                                         "pruning_params": {"schedule": schedule}}))
    assert r.status_code == 400, r.text
    assert "serializ" in r.json()["error"]["message"]


def test_stop_strings_are_bounded(app):
    """Every stop string is matched against the text's end at every token, under the engine lock: 20000 of
    them (8 MB) took seconds per token; a remote request gets at most 16 of at most 256 characters."""
    for stop in (["zz"] * 17, ["z" * 257]):
        for path, body in [("/v1/chat/completions", chat(stop=stop)),
                           ("/v1/generate", {"prompt": "a", "images": [IMG],
                                             "spec": {"max_new_tokens": 2, "stop": stop}})]:
            r = post(app, path, body)
            assert r.status_code == 400 and "stop strings" in r.json()["error"]["message"], (path, r.text)
    r = post(app, "/v1/chat/completions", chat(stop=["z" * 256] * 16))
    assert r.status_code == 200, r.text


def test_a_requests_images_share_a_pixel_budget():
    """Each image may have up to 25 MP, but eight of them that compress to a few hundred KB took ~2 GB to decode
    and preprocess: all of a request's images together get ``max_request_pixels`` (64 MP by default)."""
    from PIL import Image

    from vlmguard.workers.api import LocalBackend, create_api
    from vlmguard.workers.config import ModelConfig, ServiceConfig
    from vlmguard.workers.engine_worker import EngineWorker

    worker = EngineWorker("random:llava", name="tiny", engine=tiny_engine("llava"))
    cfg = ServiceConfig(models=[ModelConfig(name="tiny", model="random:llava", max_new_tokens_limit=8)],
                        api_key_env=None, max_request_pixels=10_000)
    small = create_api(LocalBackend({"tiny": worker}), cfg)
    url = image_to_data_url(Image.new("RGB", (80, 80)))  # 6,400 pixels: one fits, two do not
    one = {"prompt": "hi", "images": [url], "spec": {"max_new_tokens": 1}}
    assert post(small, "/v1/generate", one).status_code == 200
    r = post(small, "/v1/generate", {**one, "images": [url, url]})
    assert r.status_code == 400, r.text
    assert "the request's images add up to 0.0128 MP, over this server's limit of 0.01 MP per request" in r.json()["error"]["message"]
    chat = {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}, *[
        {"type": "image_url", "image_url": {"url": url}}] * 2]}], "max_tokens": 1}
    r = post(small, "/v1/chat/completions", chat)
    assert r.status_code == 400 and "over this server's limit" in r.json()["error"]["message"], r.text
    assert ServiceConfig().max_request_pixels == 64_000_000
