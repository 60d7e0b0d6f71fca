"""The OpenAI-SDK example of workers/README.md ("Conversations with the OpenAI SDK") runs as written against the HTTP
API on the bundled ``tiny`` model (served by uvicorn in this process; only its address is changed), so the example
cannot drift from the API: pruning and decoding in ``extra_body``, ``detail: low``, ``previous_response_id`` with
``truncation: auto``, a conversation, a polled background response, and a background stream read on after its
client left."""
from __future__ import annotations

import contextlib
import io
import re
import socket
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_readme_sdk_example_runs_as_written(tmp_path, monkeypatch):
    import uvicorn

    from vlmguard.testing import random_image
    from vlmguard.workers.api import LocalBackend, create_api
    from vlmguard.workers.config import ModelConfig, ServiceConfig
    from vlmguard.workers.engine_worker import EngineWorker

    code = re.search(r"```python\n(.*?)```", (ROOT / "workers" / "README.md").read_text(), re.S).group(1)
    assert 'base_url="http://127.0.0.1:8000/v1"' in code
    app = create_api(LocalBackend({"tiny": EngineWorker("tiny", name="tiny")}),
                     ServiceConfig(models=[ModelConfig(name="tiny", model="tiny")], api_key_env=None))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    monkeypatch.chdir(tmp_path)
    random_image(0, (320, 240)).save("photo.png")  # (the example's image)
    out = io.StringIO()
    try:
        while not server.started:
            time.sleep(0.02)
        with contextlib.redirect_stdout(out):
            exec(code.replace("127.0.0.1:8000", f"127.0.0.1:{port}"), {})
    finally:
        server.should_exit = True
        thread.join(timeout=60)
    printed = out.getvalue()  # the second turn, the conversation's reply, its items, the job, the stream's text
    assert "\n3\ncompleted\n" in printed and printed.rstrip("\n").rsplit("\n", 1)[-1].strip(), printed
