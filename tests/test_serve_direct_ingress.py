"""Ray Serve direct ingress (``ServiceConfig.direct_ingress``): the model replica's own HTTP server answers
like the app behind the Serve proxy, on a cluster of its own started with the flag."""
from __future__ import annotations

import os
import time

import httpx
import pytest

from vlmguard.images import image_to_data_url
from vlmguard.testing import random_image

pytestmark = pytest.mark.ray
DRAIN_ENV = "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"


@pytest.fixture(scope="module")
def direct_service():
    from vlmguard.workers.config import BatchingConfig, ModelConfig, ServiceConfig
    from vlmguard.workers.launch import DIRECT_INGRESS_ENV, direct_ingress_urls, start_service

    cfg = ServiceConfig(models=[ModelConfig(model="random:llava", num_cpus=0, max_new_tokens_limit=16,
                                            batching=BatchingConfig(max_batch_size=4))],
                        api_key_env=None, route_prefix="/vg", direct_ingress=True)
    svc = start_service(cfg, port=0, num_cpus=2, dashboard_port=0)
    assert DIRECT_INGRESS_ENV not in os.environ and DRAIN_ENV not in os.environ  # for the cluster's processes only
    assert direct_ingress_urls(cfg) == svc.direct_urls
    yield svc
    t0 = time.monotonic()
    svc.shutdown()
    assert time.monotonic() - t0 < 25  # the short drain of a cluster that ends with this process, not 30 s


def test_replica_serves_http_itself_and_answers_like_the_proxy(direct_service):
    svc = direct_service
    assert len(svc.direct_urls) == 1
    direct = svc.direct_urls[0]
    proxy_port = httpx.URL(svc.url).port
    assert httpx.URL(direct).port != proxy_port and direct.endswith("/vg")
    assert httpx.get(direct + "/health", timeout=30).json()["status"] == "ok"
    body = {"prompt": "What is in the image?", "images": [image_to_data_url(random_image(3, (40, 32)))],
            "spec": {"max_new_tokens": 6}}
    via_proxy = httpx.post(svc.url + "/v1/generate", json=body, timeout=120)
    via_replica = httpx.post(direct + "/v1/generate", json=body, timeout=120)
    assert via_proxy.status_code == via_replica.status_code == 200, (via_proxy.text, via_replica.text)
    assert via_replica.json()["token_ids"] == via_proxy.json()["token_ids"]
    # bad input gets the same 4xx JSON error on the direct path
    bad = httpx.post(direct + "/v1/generate", json={"prompt": "hi", "spec": {"max_new_tokens": 0}}, timeout=60)
    assert bad.status_code == 400 and "max_new_tokens" in bad.json()["error"]["message"]

