"""Quality of a model on a SynthCOCO test split, greedy, measured with the project's benchmark runner.

POPE: the three question files with LLaVA-1.5's prompt (question + "\\nAnswer the question using a single
word or phrase."), official answer parsing (``vlmguard bench pope``). CHAIR: preset ``chair512`` ("Please
describe this image in detail.", up to 512 new tokens) on the first ``chair_images`` test images, scored
with the offline NLTK pipeline (``vlmguard bench chair``). Also the latency of one POPE answer (batch 1).
Samples go to a results database (a temporary one unless ``db`` is given), so runs resume and can be
inspected with ``vlmguard report``.
"""
from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

POPE_SPLITS = ("random", "popular", "adversarial")
CHAIR_PRESET = "chair512"


def evaluate(model_ref: str | Path, data: str | Path | None = None, pope_limit: int = 0, chair_images: int = 500,
             batch: int = 32, progress: bool = True, db: str | Path | None = None) -> dict[str, Any]:
    from vlmguard.bench import db as dbm
    from vlmguard.bench.datasets import resolve_dataset
    from vlmguard.bench.runner import default_spec, run_benchmark
    from vlmguard.engine import Engine

    engine = Engine.load(str(model_ref))
    dataset = resolve_dataset(str(data) if data else "synthcoco", image_split="test")
    with tempfile.TemporaryDirectory() as tmp:
        db_path = Path(db) if db else Path(tmp) / "eval.sqlite"
        res: dict[str, Any] = {"model": str(model_ref), "data": dataset.name, "dataset_version": dataset.version,
                               "decoding": "greedy", "pope": {}}
        pope_spec = default_spec("pope")
        for split in POPE_SPLITS:
            out = run_benchmark(engine, "pope", dataset, pope_spec, db_path, split=split, limit=pope_limit or None,
                                batch_size=batch, model_name=str(model_ref), progress=progress)
            res["pope"][split] = {k: out.metrics[k] for k in ("n", "accuracy", "precision", "recall", "f1",
                                                              "yes_ratio")}
        chair_spec = default_spec("chair", chair_preset=CHAIR_PRESET)
        out = run_benchmark(engine, "chair", dataset, chair_spec, db_path, chair_preset=CHAIR_PRESET,
                            limit=chair_images or None, batch_size=batch, model_name=str(model_ref),
                            progress=progress)
        res["chair"] = {k: out.metrics.get(k) for k in ("n", "chair_s", "chair_i", "recall", "len")}
        res["chair"].update(preset=CHAIR_PRESET, scorer="vlmguard.bench.chair")
        res["chair_examples"] = [{"image": s["image"], "caption": s["output_text"]}
                                 for s in dbm.run_samples(db_path, out.run_id)[:5]]
    res["latency_s"] = {"pope_answer": pope_latency(engine, dataset)}
    return res


def pope_latency(engine, dataset, repeats: int = 5) -> float:
    """Median seconds of one POPE answer at batch 1 (after a warm-up)."""
    from PIL import Image

    from vlmguard.bench.runner import default_spec
    from vlmguard.results import Request
    from vlmguard.synth.text import POPE_SUFFIX

    image_path = next(iter(sorted(Path(dataset.image_dirs[0]).glob("*.png"))))
    req = Request(f"Is there a fork in the image?\n{POPE_SUFFIX}", [Image.open(image_path).convert("RGB")])
    spec = default_spec("pope")
    engine.generate([req], spec)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        engine.generate([req], spec)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)
