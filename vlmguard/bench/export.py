"""``vlmguard bench export pope|chair``: a benchmark's requests as an OpenAI batch file, for any OpenAI-compatible
server to answer (``vlmguard run-batch``, a running vlmguard service, OpenAI's own Batch API), then scored with
``vlmguard score pope|chair`` on the batch's output.

Each line is one sample exactly as ``vlmguard bench`` asks it (benchmarks.md 1.3 and 2.4): the POPE question
rendered by the prompt preset (the CHAIR preset's description prompt), the preset's answer length, greedy
selection (``temperature`` 0), its image as a data URL (or, ``images="file"``, a ``file://`` URL for a server that
reads local files), and its ``custom_id`` the question id (the CHAIR image id) that the scorer joins on. The server
applies its model's chat template; a preset that writes LLaVA-1.5's whole prompt itself (OPERA's, HALC's) cannot be
sent as a chat and is refused.
"""
from __future__ import annotations

import base64
import json
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal

from PIL import Image

from vlmguard.bench.datasets import BenchDataset
from vlmguard.bench.prompts import get_chair_preset, get_pope_prompt
from vlmguard.errors import InvalidInput

URLS = ("/v1/chat/completions", "/v1/responses")


@lru_cache(maxsize=32)  # (POPE asks several questions of each image)
def _image_url(path: Path, images: Literal["data", "file"]) -> str:
    """The image file as a ``file://`` URL, or as a data URL of its own bytes (the pixels the benchmark reads)."""
    if images == "file":
        return path.resolve().as_uri()
    with Image.open(path) as probe:
        mime = Image.MIME.get(probe.format or "", "image/png")
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode()}"


def _body(url: str, model: str | None, image: str, text: str, max_tokens: int,
          vlmguard: dict[str, Any] | None) -> dict[str, Any]:
    """A greedy request of one image and one text, as the endpoint ``url`` takes it."""
    if url == "/v1/responses":
        body: dict[str, Any] = {"input": [{"role": "user", "content": [
            {"type": "input_image", "image_url": image}, {"type": "input_text", "text": text}]}],
            "max_output_tokens": max_tokens, "temperature": 0}
    else:
        body = {"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": image}}, {"type": "text", "text": text}]}],
            "max_tokens": max_tokens, "temperature": 0}
    if model is not None:
        body["model"] = model
    if vlmguard:
        body["vlmguard"] = vlmguard
    return body


def pope_requests(dataset: BenchDataset, split: str, *, preset: str | None = None, model: str | None = None,
                  url: str = URLS[0], images: Literal["data", "file"] = "data", limit: int | None = None,
                  vlmguard: dict[str, Any] | None = None) -> tuple[Iterator[dict[str, Any]], Path]:
    """The batch lines of a POPE split (the first ``limit`` questions), made as they are written, and the question
    file to score against. The preset and the split's files are checked now."""
    prompt = get_pope_prompt(preset)
    if prompt.llava_raw:
        raise InvalidInput(f"prompt preset {prompt.name!r} writes LLaVA-1.5's whole prompt itself, which a chat request "
                           "cannot carry; export a preset the model's chat template frames (llava, ...)")
    pope = dataset.pope_file(split)
    questions = pope.questions[:limit] if limit else pope.questions
    lines = ({"custom_id": str(q.question_id), "method": "POST", "url": url,
              "body": _body(url, model, _image_url(dataset.image_path(q.image), images),  # type: ignore[arg-type]
                            prompt.render(q.text), prompt.max_new_tokens, vlmguard)} for q in questions)
    return lines, pope.path


def chair_requests(dataset: BenchDataset, *, preset: str | None = None, prompt: str | None = None,
                   model: str | None = None, url: str = URLS[0], images: Literal["data", "file"] = "data",
                   limit: int | None = None, image_ids: Path | None = None,
                   vlmguard: dict[str, Any] | None = None) -> Iterator[dict[str, Any]]:
    """The batch lines of a CHAIR image list (the first ``limit`` images), made as they are written: each image
    described. The image list is checked now."""
    chair = get_chair_preset(preset)
    ids, _ = dataset.chair_image_ids(image_ids)
    if not ids:
        raise InvalidInput(f"dataset {dataset.name}: empty CHAIR image list")
    return ({"custom_id": str(i), "method": "POST", "url": url,
             "body": _body(url, model, _image_url(dataset.chair_image_path(i), images), prompt or chair.prompt,
                           chair.max_new_tokens, vlmguard)} for i in (ids[:limit] if limit else ids))


def write_batch(path: Path, lines: Iterable[dict[str, Any]]) -> int:
    """Write the lines (never all in memory: each holds an image); their count."""
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for line in lines:
            f.write(json.dumps(line, ensure_ascii=False) + "\n")
            n += 1
    return n
