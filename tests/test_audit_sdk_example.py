"""The OpenAI-SDK example of workers/README.md ("Conversations with the OpenAI SDK") runs as written against the HTTP
API on the bundled ``tiny`` model (served by uvicorn in this process; only its address is changed), so the example
cannot drift from the API: pruning and decoding in ``extra_body``, ``detail: low``, ``previous_response_id`` with
``truncation: auto``, a conversation, a polled background response, and a background stream read on after its
client left."""
from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

from service_support import served

ROOT = Path(__file__).resolve().parents[1]


def test_the_readme_sdk_example_runs_as_written(tmp_path, monkeypatch):
    from vlmguard.testing import random_image
    from vlmguard.workers.api import LocalBackend, create_api
    from vlmguard.workers.config import ModelConfig, ServiceConfig
    from vlmguard.workers.engine_worker import EngineWorker

    code = re.search(r"```python\n(.*?)```", (ROOT / "workers" / "README.md").read_text(), re.S).group(1)
    assert 'base_url="http://127.0.0.1:8000/v1"' in code
    app = create_api(LocalBackend({"tiny": EngineWorker("tiny", name="tiny")}),
                     ServiceConfig(models=[ModelConfig(name="tiny", model="tiny")], api_key_env=None))
    monkeypatch.chdir(tmp_path)
    random_image(0, (320, 240)).save("photo.png")  # (the example's image)
    out = io.StringIO()
    with served(app) as (url,), contextlib.redirect_stdout(out):
        exec(code.replace("http://127.0.0.1:8000", url), {})
    printed = out.getvalue()  # the second turn, the conversation's reply, its items, the job, the stream's text
    assert "\n3\ncompleted\n" in printed and printed.rstrip("\n").rsplit("\n", 1)[-1].strip(), printed
