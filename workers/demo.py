"""The service part of ``vlmguard demo``: start the service in the background, ask it one question through
the Python client, run a small benchmark Ray Job into the results DB, and leave the service running for the
dashboard. ``vlmguard demo`` (owned by ``vlmguard/commands/demo.py``) calls :func:`service_demo`.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import httpx

from vlmguard.errors import VlmguardError

DEFAULT_PORT = 8000
DEFAULT_DASHBOARD_PORT = 8265


def _already_serving(url: str) -> bool:
    try:
        return httpx.get(url + "/health", timeout=3.0).status_code == 200
    except httpx.HTTPError:
        return False


def service_demo(model: str = "tiny", *, db: str | Path = "runs/demo.sqlite", port: int = DEFAULT_PORT,
                 dashboard_port: int = DEFAULT_DASHBOARD_PORT, limit: int = 20, replicas: int = 2,
                 dataset: str = "synthcoco") -> dict:
    """Returns ``{"url", "jobs_address", "answer", "job"}``; raises :class:`VlmguardError` on failure."""
    from vlmguard.client import Client
    from vlmguard.workers import jobs
    from vlmguard.workers.config import BatchingConfig, ModelConfig, ServiceConfig
    from vlmguard.workers.launch import start_detached_cluster, start_service

    url = f"http://127.0.0.1:{port}"
    jobs_address = f"http://127.0.0.1:{dashboard_port}"
    if _already_serving(url):
        print(f"service already running at {url}; reusing it")
    else:
        print(f"starting a background Ray cluster and the service ({model}, {replicas} replicas) on {url} ...")
        address = start_detached_cluster(dashboard_port=dashboard_port)
        cfg = ServiceConfig(port=port, api_key_env=None, models=[
            ModelConfig(model=model, num_replicas=replicas, num_cpus=1, batching=BatchingConfig())])
        svc = start_service(cfg, address=address)
        url = svc.url
    with Client(url) as client:
        from vlmguard.synth import default_dataset

        image = sorted((Path(default_dataset()) / "images" / "test").glob("*.png"))[0]
        t0 = time.perf_counter()
        reply = client.chat("Is there a dog in the image?", images=[image], max_tokens=16, pruning="fastv", budget=0.25)
        answer = reply.choices[0].message.content
        kept = reply.vlmguard.visual_tokens_kept if reply.vlmguard else []
        print(f"client: {image.name}: Is there a dog in the image? -> {answer!r} "
              f"(FastV kept {kept[-1] if kept else '?'}/{reply.vlmguard.visual_tokens if reply.vlmguard else '?'} "
              f"visual tokens, {time.perf_counter() - t0:.2f} s)")
    # a configuration the local sweep did not run (a job shares, and would just reuse, a local run of the same
    # settings): FastV keeping a quarter of the visual tokens, as the client request above
    bench = ["pope", "--dataset", dataset, "--split", "random", "--limit", str(limit), "--pruning", "fastv",
             "--budget", "36", "--db", str(db)]
    print(f"submitting a benchmark job: vlmguard job submit bench {' '.join(bench)}")
    job_id = jobs.submit_bench(bench, address=jobs_address)
    status = jobs.wait(job_id, jobs_address, timeout_s=1800)
    log_text = jobs.logs(job_id, jobs_address)
    result = next((json.loads(line) for line in reversed(log_text.splitlines()) if line.startswith("{")), None)
    if status["status"] != "SUCCEEDED":
        raise VlmguardError(f"benchmark job {job_id} {status['status']}: {log_text.strip().splitlines()[-1:]}")
    run = (result or {}).get("runs", [{}])[0]
    print(f"job {job_id}: {status['status']}; run {run.get('run_id')} with {run.get('n_samples')} samples "
          f"in {db} (POPE accuracy {run.get('metrics', {}).get('accuracy')})")
    print(f"the service keeps running at {url} (OpenAI base URL {url}/v1, jobs API {jobs_address}); "
          "stop it with `vlmguard serve --stop` and `ray stop`")
    return {"url": url, "jobs_address": jobs_address, "answer": answer, "job": result}
