"""Quality of a LLaVA-style model on a SynthCOCO test split, greedy decoding, plain HF ``generate``.

POPE: the three question files with LLaVA-1.5's prompt (question + "\\nAnswer the question using a single
word or phrase."), answers parsed with the official rule. CHAIR: "Please describe this image in detail."
on the test images, scored with the project's CHAIR pipeline (``vlmguard.bench``: NLTK extraction,
ground truth = instances + reference captions); if that package is unavailable, a simple scorer maps
words to categories with the synonym list. Also measures the latency of one POPE answer (batch 1).
"""
from __future__ import annotations

import json
import re
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tqdm import tqdm

from vlmguard.synth.text import DETAIL_PROMPTS, POPE_SUFFIX

POPE_SPLITS = ("random", "popular", "adversarial")


def load_model(ref: str | Path):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from vlmguard.models.resolve import resolve_model_path

    path = resolve_model_path(str(ref))
    processor = AutoProcessor.from_pretrained(path)
    model = LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    return model, processor


def _prompt(processor, text: str) -> str:
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
    return processor.apply_chat_template(msgs, add_generation_prompt=True)


@torch.no_grad()
def generate_batch(model, processor, images: list[Image.Image], prompts: list[str], max_new_tokens: int) -> list[str]:
    processor.tokenizer.padding_side = "left"
    enc = processor(images=images, text=[_prompt(processor, p) for p in prompts], return_tensors="pt", padding=True)
    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1)
    return processor.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def official_parse(answer: str) -> str:
    text = answer.split(".")[0] if "." in answer else answer
    return "no" if any(w in ("No", "no", "not") for w in text.replace(",", "").split(" ")) else "yes"


def pope_scores(pairs: list[tuple[str, str]]) -> dict[str, Any]:
    tp = sum(p == "yes" and l == "yes" for p, l in pairs)
    fp = sum(p == "yes" and l == "no" for p, l in pairs)
    tn = sum(p == "no" and l == "no" for p, l in pairs)
    fn = sum(p == "no" and l == "yes" for p, l in pairs)
    n = len(pairs)
    prec = tp / (tp + fp) if tp + fp else 0.0
    rec = tp / (tp + fn) if tp + fn else 0.0
    return {"n": n, "accuracy": (tp + tn) / n if n else 0.0, "precision": prec, "recall": rec,
            "f1": 2 * prec * rec / (prec + rec) if prec + rec else 0.0, "yes_ratio": (tp + fp) / n if n else 0.0}


def simple_chair(captions: dict[int, str], gt: dict[int, set[str]]) -> dict[str, Any]:
    """Fallback CHAIR: words and two-word phrases mapped to categories with the CHAIR synonym list."""
    from vlmguard.synth.world import CATEGORIES

    syn = {c.name: c.name for c in CATEGORIES}
    extra = {"ball": "sports ball", "racket": "tennis racket", "bike": "bicycle", "table": None}
    syn.update({k: v for k, v in extra.items() if v})
    mentions = halluc = caps_h = recalled = gt_total = 0
    for iid, cap in captions.items():
        words = re.findall(r"[a-z]+", cap.lower())
        found = []
        i = 0
        while i < len(words):
            two = " ".join(words[i:i + 2])
            if two in syn:
                found.append(syn[two])
                i += 2
                continue
            if words[i] in syn:
                found.append(syn[words[i]])
            i += 1
        h = [f for f in found if f not in gt[iid]]
        mentions += len(found)
        halluc += len(h)
        caps_h += bool(h)
        recalled += len(set(found) & gt[iid])
        gt_total += len(gt[iid])
    n = len(captions)
    return {"n": n, "chair_s": 100.0 * caps_h / n if n else None,
            "chair_i": 100.0 * halluc / mentions if mentions else None,
            "recall": 100.0 * recalled / gt_total if gt_total else None, "scorer": "simple (synonym list)"}


def chair_eval(captions: dict[int, str], data: Path) -> dict[str, Any]:
    try:
        from vlmguard.bench.chair_gt import load_ground_truth
        from vlmguard.bench.chair_score import Caption, score_captions
    except ImportError:
        from pycocotools.coco import COCO

        coco = COCO(str(data / "annotations" / "instances_test.json"))
        names = {c["id"]: c["name"] for c in coco.loadCats(coco.getCatIds())}
        gt = {i: {names[a["category_id"]] for a in coco.loadAnns(coco.getAnnIds(imgIds=[i]))} for i in captions}
        return simple_chair(captions, gt)
    gt = load_ground_truth(data, image_ids=list(captions), splits=["test"])
    caps = [Caption(iid, c, k + 1) for k, (iid, c) in enumerate(captions.items())]
    agg, _ = score_captions(caps, gt)
    return {k: agg[k] for k in ("n", "chair_s", "chair_i", "recall", "len")} | {"scorer": "vlmguard.bench.chair"}


def evaluate(model_ref: str | Path, data: str | Path, pope_limit: int = 0, chair_images: int = 500,
             batch: int = 32, progress: bool = True, model=None, processor=None) -> dict[str, Any]:
    data = Path(data)
    if model is None:
        model, processor = load_model(model_ref)
    torch.manual_seed(0)
    img_dir = data / "images" / "test"
    cache: dict[str, Image.Image] = {}

    def image(fn: str) -> Image.Image:
        if fn not in cache:
            cache[fn] = Image.open(img_dir / fn).convert("RGB")
        return cache[fn]

    res: dict[str, Any] = {"model": str(model_ref), "data": str(data), "decoding": "greedy", "pope": {}}
    for split in POPE_SPLITS:
        qs = [json.loads(line) for line in (data / "pope" / f"synthcoco_pope_{split}.json").read_text().splitlines()]
        if pope_limit:
            qs = qs[:pope_limit]
        pairs = []
        for b in tqdm(range(0, len(qs), batch), desc=f"POPE {split}", disable=not progress, mininterval=10):
            chunk = qs[b:b + batch]
            answers = generate_batch(model, processor, [image(q["image"]) for q in chunk],
                                     [f"{q['text']}\n{POPE_SUFFIX}" for q in chunk], max_new_tokens=8)
            pairs += [(official_parse(a), q["label"]) for a, q in zip(answers, chunk)]
        res["pope"][split] = pope_scores(pairs)
    inst = json.loads((data / "annotations" / "instances_test.json").read_text())
    imgs = inst["images"][:chair_images]
    captions: dict[int, str] = {}
    for b in tqdm(range(0, len(imgs), batch), desc="CHAIR", disable=not progress, mininterval=10):
        chunk = imgs[b:b + batch]
        outs = generate_batch(model, processor, [image(im["file_name"]) for im in chunk],
                              [DETAIL_PROMPTS[0]] * len(chunk), max_new_tokens=128)
        captions.update({im["id"]: o.strip() for im, o in zip(chunk, outs)})
    res["chair"] = chair_eval(captions, data)
    res["chair_examples"] = [{"image_id": k, "caption": v} for k, v in list(captions.items())[:5]]
    # latency of one POPE answer, batch 1 (median of 5 after a warm-up)
    q = "Is there a fork in the image?\n" + POPE_SUFFIX
    im = image(imgs[0]["file_name"])
    generate_batch(model, processor, [im], [q], 8)
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        generate_batch(model, processor, [im], [q], 8)
        times.append(time.perf_counter() - t0)
    res["latency_s"] = {"pope_answer": statistics.median(times)}
    return res
