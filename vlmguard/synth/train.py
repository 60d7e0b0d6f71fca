"""Train the tiny LLaVA on SynthCOCO with a staged recipe (see ``shared/design/synth-world.md``).

Naive end-to-end training learns the language prior long before it learns to look, so:

1. **vision** - pretrain the ViT alone with a dense objective: a per-patch label (which visible category
   covers the patch, 0 = background) read from the penultimate layer (the one LLaVA feeds to the
   projector), plus multi-label presence from the CLS token (pooled output). Heads are discarded.
2. **align** - vision tower frozen; the projector is built from the patch classifier and the category-word
   embeddings and, with ``tie_projector`` (the default), stays fixed (re-tied to the word embeddings after each
   step), so the decoder learns short captions; without it the projector trains too.
3. **instruct** - the decoder on multi-turn conversations of balanced yes/no questions, plus single-turn captions
   and detailed descriptions; with ``freeze_vision_after_stage1`` (the default) on cached features of the frozen
   vision tower, else the vision tower trains too at ``instruct_vision_lr``.

POPE (random / adversarial, quick first-token greedy answers on the test split) is measured after each
stage. Everything is seeded; progress is shown with tqdm.
"""
from __future__ import annotations

import json
import math
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from pycocotools import mask as mask_utils
from tqdm import tqdm

from vlmguard.synth.model import TinySize, build_tiny_model, tiny_config
from vlmguard.synth.processor import BOS, CLIP_MEAN, CLIP_STD, EOS, IMAGE, PAD, build_processor, train_tokenizer
from vlmguard.synth.render import patch_labels
from vlmguard.synth.world import CATEGORIES, SCENE_TYPES

CAT_INDEX = {c.id: i for i, c in enumerate(CATEGORIES)}  # category id -> 0-based class index


@dataclass
class TrainConfig:
    seed: int = 0
    vision_steps: int = 150
    vision_batch: int = 32
    vision_lr: float = 2e-3
    # weight of the stage-1 scene-type loss on the CLS token. CLIP's CLS is trained against captions that name
    # the whole scene ("a kitchen with ..."), so its attention covers context as well as objects; a CLS trained
    # on object presence alone attends to objects only, and CLS-attention pruners (FlowCut) then drop the
    # background that carries the scene cue. Off (0) in the bundled model's recipe; see docs/pruning.md for what
    # it changed when tried
    vision_scene_weight: float = 0.0
    align_steps: int = 100
    align_batch: int = 32
    align_lr: float = 1.5e-3
    instruct_steps: int = 500
    instruct_batch: int = 32
    instruct_lr: float = 1e-3
    instruct_vision_lr: float = 2e-4
    yesno_per_conv: tuple[int, int] = (4, 8)
    freeze_vision_after_stage1: bool = True
    tie_projector: bool = True  # keep projector outputs on the category-word embeddings while training  # stages 2-3 on cached vision features (much cheaper on CPU)
    # share of training sequences whose text after the image gets its RoPE positions moved down by a random
    # amount below the row's visual span: a pretrained LLM has seen text at every distance from an image, this tiny one has not,
    # and methods that shorten the visual span with contiguous positions (FlowCut, random) depend on it
    position_jitter: float = 0.0
    # share of training sequences with the image left out: the decoder learns the language prior of the world
    # (what a scene's text says without looking), as a pretrained LLM has one; image-free contrast branches
    # (M3ID, VISTA, ...) ask for exactly that distribution
    text_only_share: float = 0.0
    # share of training sequences that keep only a random subset of their visual tokens (uniform count in
    # [n_image/9, n_image], raster order, contiguous positions): the tolerance of a variable visual-token count
    # that a pretrained LLM brings (LLaVA-NeXT / Qwen2-VL train on variable counts). Without it the tiny model's
    # answers collapse under any pruning, whichever tokens are kept.
    token_dropout: float = 0.0
    # share of those dropped-token sequences whose subset is object-first instead of uniform: the patches that
    # show an object (ground-truth patch labels) in random order, then background patches, the first k of them.
    # Trained on uniform subsets only, the model learns that a missing object may just be out of view and fills
    # it in from the scene prior; a pretrained LLM has also seen object-centred views (region crops, grounding
    # data), where what is not shown is absent. Uses no pruning method's scores.
    token_dropout_object_share: float = 0.0
    caption_share: float = 0.3  # share of instruct sequences that are captions / detailed descriptions
    eval_questions: int = 200  # per POPE split in the quick stage evaluations
    max_train_images: int = 0  # use only the first N training images (0 = all)
    val_questions: int = 200  # validation POPE questions per split
    val_every: int = 100  # instruct steps between validation POPE checks (and checkpoints)
    val_stop_acc: float = 0.0  # stop instruct early once val POPE-random accuracy reaches this (0 = never)
    threads: int = 2
    size: TinySize = field(default_factory=TinySize)

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d["size"] = self.size.to_dict()
        d["yesno_per_conv"] = list(self.yesno_per_conv)
        return d


class SplitData:
    """One split in memory: uint8 images, patch labels, presence vectors, texts grouped per image."""

    def __init__(self, root: Path, split: str, patch: int, limit: int = 0):
        inst = json.loads((root / "annotations" / f"instances_{split}.json").read_text())
        if limit:
            inst["images"] = inst["images"][:limit]
            keep = {im["id"] for im in inst["images"]}
            inst["annotations"] = [a for a in inst["annotations"] if a["image_id"] in keep]
        self.image_ids = [im["id"] for im in inst["images"]]
        self.index = {iid: i for i, iid in enumerate(self.image_ids)}
        n = len(self.image_ids)
        size = inst["images"][0]["height"] if n else 96
        self.size = size
        self.file_names = [im["file_name"] for im in inst["images"]]
        scene_index = {t.name: i for i, t in enumerate(SCENE_TYPES)}
        self.scene = torch.tensor([scene_index[im.get("scene_type", SCENE_TYPES[0].name)] for im in inst["images"]],
                                  dtype=torch.long)
        self.pixels = torch.empty((n, 3, size, size), dtype=torch.uint8)
        for i, fn in enumerate(self.file_names):
            arr = np.array(Image.open(root / "images" / split / fn).convert("RGB"))
            self.pixels[i] = torch.from_numpy(arr).permute(2, 0, 1)
        g = size // patch
        masks: dict[int, list] = {iid: [] for iid in self.image_ids}
        for a in inst["annotations"]:
            masks[a["image_id"]].append((mask_utils.decode(a["segmentation"]).astype(bool), CAT_INDEX[a["category_id"]] + 1))
        self.patch_labels = torch.zeros((n, g, g), dtype=torch.long)
        self.presence = torch.zeros((n, len(CATEGORIES)))
        self.gt_names: list[list[str]] = []
        for i, iid in enumerate(self.image_ids):
            ms = masks[iid]
            if ms:
                self.patch_labels[i] = torch.from_numpy(patch_labels([m for m, _ in ms], [lab for _, lab in ms], size, patch))
            for _, lab in ms:
                self.presence[i, lab - 1] = 1.0
            self.gt_names.append([CATEGORIES[lab - 1].name for _, lab in ms])
        self.texts: dict[int, dict[str, list[dict]]] = {}
        tpath = root / "text" / f"{split}.jsonl"
        if tpath.exists():
            for line in tpath.read_text().splitlines():
                r = json.loads(line)
                if r["image_id"] not in self.index:
                    continue
                self.texts.setdefault(r["image_id"], {}).setdefault(r["task"], []).append(r)

    def normalized(self, idx) -> torch.Tensor:
        x = self.pixels[idx].float() / 255.0
        mean = torch.tensor(CLIP_MEAN)[:, None, None]
        std = torch.tensor(CLIP_STD)[:, None, None]
        return (x - mean) / std


class Encoder:
    """Builds training token sequences exactly as processor + chat template would (word-level tokens)."""

    def __init__(self, tok, n_image_tokens: int):
        self.tok = tok
        self.bos = tok.token_to_id(BOS)
        self.eos = tok.token_to_id(EOS)
        self.pad = tok.token_to_id(PAD)
        self.image = tok.token_to_id(IMAGE)
        self.n_image = n_image_tokens
        self._cache: dict[str, list[int]] = {}

    def words(self, text: str) -> list[int]:
        ids = self._cache.get(text)
        if ids is None:
            ids = self.tok.encode(text, add_special_tokens=False).ids
            self._cache[text] = ids
        return ids

    def conversation(self, turns: list[tuple[str, str]], image: bool = True,
                     n_image: int | None = None) -> tuple[list[int], list[int]]:
        """ids and labels (-100 outside answers) of 'USER: <image>\\np1 ASSISTANT: a1</s>USER: p2 ...'
        (``image=False``: the same conversation with the image left out; ``n_image``: visual tokens kept)."""
        ids = [self.bos]
        labels = [-100]
        for k, (prompt, answer) in enumerate(turns):
            head = self.words("USER:")
            if k == 0 and image:
                head = head + [self.image] * (self.n_image if n_image is None else n_image)
            head = head + self.words(prompt) + self.words("ASSISTANT:")
            ans = self.words(answer) + [self.eos]
            ids += head + ans
            labels += [-100] * len(head) + ans
        return ids, labels

    def prompt(self, prompt: str) -> list[int]:
        return [self.bos] + self.words("USER:") + [self.image] * self.n_image + self.words(prompt) + self.words("ASSISTANT:")


def pad_batch(seqs: list[list[int]], value: int) -> torch.Tensor:
    L = max(len(s) for s in seqs)
    return torch.tensor([s + [value] * (L - len(s)) for s in seqs], dtype=torch.long)


def lr_at(step: int, total: int, peak: float, warmup: int = 30) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    prog = (step - warmup) / max(1, total - warmup)
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * prog)))


def set_lr(opt: torch.optim.Optimizer, step: int, total: int) -> None:
    for g in opt.param_groups:
        g["lr"] = lr_at(step, total, g["peak_lr"])


def load_pope(root: Path, split: str) -> list[dict]:
    p = root / "pope" / f"synthcoco_pope_{split}.json"
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


@torch.no_grad()
def quick_pope(model, enc: Encoder, test: SplitData, questions: list[dict], batch: int = 48) -> dict:
    """Accuracy / yes-ratio with the greedy first answer token (the answer is "no" iff it is ``No``)."""
    if not questions:  # a split with no image of >= 3 objects has no POPE questions: nothing measured
        return {"acc": None, "yes_ratio": None}
    model.eval()
    no_id = enc.tok.token_to_id("No")
    by_file = {fn: i for i, fn in enumerate(test.file_names)}
    correct = yes = 0
    for b in range(0, len(questions), batch):
        qs = questions[b:b + batch]
        seqs = [enc.prompt(q["text"]) for q in qs]
        lens = torch.tensor([len(s) for s in seqs])
        ids = pad_batch(seqs, enc.pad)
        att = (torch.arange(ids.shape[1])[None, :] < lens[:, None]).long()
        pix = test.normalized([by_file[q["image"]] for q in qs])
        logits = model(input_ids=ids, attention_mask=att, pixel_values=pix).logits
        last = logits[torch.arange(len(qs)), lens - 1]
        pred_no = last.argmax(-1) == no_id
        for q, pn in zip(qs, pred_no.tolist()):
            ans = "no" if pn else "yes"
            yes += ans == "yes"
            correct += ans == q["label"]
    model.train()
    return {"acc": correct / max(1, len(questions)), "yes_ratio": yes / max(1, len(questions))}


@torch.no_grad()
def presence_pope(vision, presence_head, test: SplitData, questions: list[dict]) -> dict:
    """Stage-1 probe: answer POPE questions with the CLS presence head (logit > 0 means yes)."""
    if not questions:
        return {"acc": None, "yes_ratio": None}
    vision.eval()
    logits = []
    for b in range(0, len(test.image_ids), 128):
        out = vision(test.normalized(list(range(b, min(b + 128, len(test.image_ids))))))
        logits.append(presence_head(out.pooler_output))
    logits = torch.cat(logits)
    by_file = {fn: i for i, fn in enumerate(test.file_names)}
    name_idx = {c.name: i for i, c in enumerate(CATEGORIES)}
    correct = yes = 0
    for q in questions:
        name = re.match(r"Is there an? (.+?) in the im", q["text"]).group(1)
        ans = "yes" if logits[by_file[q["image"]], name_idx[name]] > 0 else "no"
        yes += ans == "yes"
        correct += ans == q["label"]
    vision.train()
    return {"acc": correct / len(questions), "yes_ratio": yes / len(questions)}


class Trainer:
    def __init__(self, data: Path, out: Path, cfg: TrainConfig, log=print, init: Path | None = None):
        self.data, self.out, self.cfg, self.log = Path(data), Path(out), cfg, log
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        torch.set_num_threads(cfg.threads)
        self.rng = random.Random(cfg.seed)
        s = cfg.size
        t0 = time.time()
        self.train = SplitData(self.data, "train", s.patch_size, limit=cfg.max_train_images)
        self.test = SplitData(self.data, "test", s.patch_size)
        self.log(f"loaded data: {len(self.train.image_ids)} train / {len(self.test.image_ids)} test images "
                 f"in {time.time() - t0:.1f}s")
        self.n_image = (s.image_size // s.patch_size) ** 2
        if init is not None:  # continue training a saved model with its own tokenizer
            from tokenizers import Tokenizer
            from transformers import LlavaForConditionalGeneration

            self.tok = Tokenizer.from_file(str(Path(init) / "tokenizer.json"))
            self.processor = build_processor(self.tok, s.image_size, s.patch_size)
            self.enc = Encoder(self.tok, self.n_image)
            self.model = LlavaForConditionalGeneration.from_pretrained(init, dtype=torch.float32)
            prev = Path(init) / "training_report.json"
            self.previous_report = json.loads(prev.read_text()) if prev.exists() else None
        else:
            corpus = [r[k] for per in self.train.texts.values() for rs in per.values() for r in rs
                      for k in ("prompt", "answer")]
            self.tok = train_tokenizer(corpus)
            self.processor = build_processor(self.tok, s.image_size, s.patch_size)
            self.enc = Encoder(self.tok, self.n_image)
            mcfg = tiny_config(s, self.tok.get_vocab_size(), self.enc.bos, self.enc.eos, self.enc.pad, self.enc.image)
            self.model = build_tiny_model(mcfg)
            self.previous_report = None
        self.model.train()
        pope_rng = random.Random(cfg.seed + 1)
        self.eval_qs = {}
        for split in ("random", "adversarial"):
            qs = load_pope(self.data, split)
            self.eval_qs[split] = pope_rng.sample(qs, min(cfg.eval_questions, len(qs)))
        self.losses: dict[str, list[float]] = {}
        self.features: torch.Tensor | None = None
        self.tied = False
        self.patch_head: torch.nn.Linear | None = None
        self.val_qs: dict[str, list[dict]] = {}
        self.val = None
        if (self.data / "annotations" / "instances_val.json").exists():
            from vlmguard.synth.pope import build_questions, select_images

            self.val = SplitData(self.data, "val", s.patch_size)
            recs = list(zip(self.val.file_names, self.val.gt_names))
            sel = select_images(recs, random.Random(cfg.seed + 2))
            for split in ("random", "adversarial"):
                qs = build_questions(sel, split, random.Random(cfg.seed + 3))
                self.val_qs[split] = qs[: cfg.val_questions]
        # "complete" stays false in every save before the last (checkpoints, or what a Ctrl-C leaves in ``out``)
        self.report: dict = {"config": cfg.to_dict(), "stages": {}, "complete": False}
        self._t0: float | None = None  # start of run()
        if self.previous_report:
            self.report["previous"] = self.previous_report
        self.train_ids = [iid for iid in self.train.image_ids if iid in self.train.texts]

    # ---------------------------------------------------------------- stage 1
    def stage_vision(self) -> None:
        cfg = self.cfg
        vision = self.model.model.vision_tower
        hid = cfg.size.vision_hidden
        patch_head = torch.nn.Linear(hid, len(CATEGORIES) + 1)
        presence_head = torch.nn.Linear(hid, len(CATEGORIES))
        # created only when used: the recipe without it draws the same random numbers as before it existed
        scene_head = torch.nn.Linear(hid, len(SCENE_TYPES)) if cfg.vision_scene_weight > 0 else None
        params = [p for m in (vision, patch_head, presence_head, scene_head) if m is not None for p in m.parameters()]
        opt = torch.optim.AdamW(params, lr=cfg.vision_lr, weight_decay=0.01)
        for g in opt.param_groups:
            g["peak_lr"] = cfg.vision_lr
        n = len(self.train.image_ids)
        layer = self.model.config.vision_feature_layer
        t0 = time.time()
        bar = tqdm(range(cfg.vision_steps), desc="stage 1 vision", mininterval=10)
        for step in bar:
            set_lr(opt, step, cfg.vision_steps)
            idx = [self.rng.randrange(n) for _ in range(cfg.vision_batch)]
            pix = self.train.normalized(idx)
            if self.rng.random() < 0.5:  # horizontal flip, labels flipped accordingly
                pix = pix.flip(-1)
                pl = self.train.patch_labels[idx].flip(-1)
            else:
                pl = self.train.patch_labels[idx]
            out = vision(pix, output_hidden_states=True)
            feats = out.hidden_states[layer][:, 1:]
            patch_loss = F.cross_entropy(patch_head(feats).reshape(-1, len(CATEGORIES) + 1), pl.reshape(-1))
            pres_loss = F.binary_cross_entropy_with_logits(presence_head(out.pooler_output), self.train.presence[idx])
            loss = patch_loss + pres_loss
            parts = {"patch": patch_loss, "presence": pres_loss}
            if scene_head is not None:
                parts["scene"] = F.cross_entropy(scene_head(out.pooler_output), self.train.scene[idx])
                loss = loss + cfg.vision_scene_weight * parts["scene"]
            self.losses.setdefault("stage 1 vision", []).append(loss.item())
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if step % 25 == 0:
                bar.set_postfix({k: f"{v.item():.3f}" for k, v in parts.items()})
                self.log(f"stage1 step {step} " + " ".join(f"{k}_loss {v.item():.4f}" for k, v in parts.items()))
        secs = time.time() - t0
        with torch.no_grad():
            out = vision(self.test.normalized(list(range(min(200, len(self.test.image_ids))))), output_hidden_states=True)
            pred = patch_head(out.hidden_states[layer][:, 1:]).argmax(-1)
            gold = self.test.patch_labels[: pred.shape[0]].reshape(pred.shape[0], -1)
            fg = gold > 0
            patch_acc_fg = (pred[fg] == gold[fg]).float().mean().item() if fg.any() else 0.0
            scene_acc = None if scene_head is None else \
                (scene_head(out.pooler_output).argmax(-1) == self.test.scene[: pred.shape[0]]).float().mean().item()
        pope = {s: presence_pope(vision, presence_head, self.test, qs) for s, qs in self.eval_qs.items()}
        self.patch_head = patch_head
        self.report["stages"]["vision"] = {"steps": cfg.vision_steps, "seconds": round(secs, 1),
                                           "test_patch_acc_foreground": round(patch_acc_fg, 4),
                                           "test_scene_acc": None if scene_acc is None else round(scene_acc, 4),
                                           "pope_presence_probe": pope}
        self.log(f"stage1 done in {secs:.0f}s: foreground patch acc {patch_acc_fg:.3f}, scene acc {scene_acc}, presence-probe POPE {pope}")

    # ---------------------------------------------------------------- stage 2 / 3 batches
    def init_projector_from_patch_head(self) -> None:
        """Align the projector by construction: its first layer starts as the stage-1 patch classifier
        (one unit per category), its second maps each category unit to the embedding of the category's
        name word. A visual token then starts out close to the word of the object it shows."""
        proj = self.model.model.multi_modal_projector
        emb = self.model.get_input_embeddings().weight
        head = self.patch_head
        k = head.out_features  # background + categories
        with torch.no_grad():
            proj.linear_1.weight[:k] = head.weight
            proj.linear_1.bias[:k] = head.bias
            proj.linear_2.weight.zero_()
            proj.linear_2.bias.zero_()
            for i, cat in enumerate(CATEGORIES):
                word = self.tok.token_to_id(cat.name.split()[-1])
                proj.linear_2.weight[:, i + 1] = emb[word] / emb[word].norm() * emb.norm(dim=1).mean()
        self.log("projector initialised from the patch classifier and the category-name embeddings")
        self.tied = self.cfg.tie_projector

    @torch.no_grad()
    def retie_projector(self) -> None:
        """Re-point the projector's category columns at the current category-word embeddings, so a visual
        token showing a fork stays (a scaled copy of) the embedding of the word "fork" during training."""
        proj = self.model.model.multi_modal_projector
        emb = self.model.get_input_embeddings().weight
        scale = emb.norm(dim=1).mean()
        for i, cat in enumerate(CATEGORIES):
            word = self.tok.token_to_id(cat.name.split()[-1])
            proj.linear_2.weight[:, i + 1] = emb[word] / emb[word].norm() * scale

    @torch.no_grad()
    def cache_features(self) -> None:
        """Frozen-vision features (the layer LLaVA projects) of every training image, stored in bf16."""
        vision = self.model.model.vision_tower
        vision.eval()
        layer = self.model.config.vision_feature_layer
        out = []
        t0 = time.time()
        for b in range(0, len(self.train.image_ids), 256):
            idx = list(range(b, min(b + 256, len(self.train.image_ids))))
            hs = vision(self.train.normalized(idx), output_hidden_states=True).hidden_states[layer][:, 1:]
            out.append(hs.to(torch.bfloat16))
        self.features = torch.cat(out)
        vision.train()
        self.log(f"cached frozen vision features {tuple(self.features.shape)} in {time.time() - t0:.0f}s")

    def _lm_batch(self, convs: list[tuple[int, list[tuple[str, str]]]]):
        seqs, labs, idx, keep = [], [], [], []
        for iid, turns in convs:
            with_image = not (self.cfg.text_only_share > 0 and self.rng.random() < self.cfg.text_only_share)
            kept = None
            if with_image and self.cfg.token_dropout > 0 and self.rng.random() < self.cfg.token_dropout:
                kept = self._dropout_subset(iid)
            ids, lab = self.enc.conversation(turns, image=with_image, n_image=None if kept is None else len(kept))
            seqs.append(ids)
            labs.append(lab)
            if with_image:
                idx.append(self.train.index[iid])
                keep.append(kept)
        ids = pad_batch(seqs, self.enc.pad)
        labels = pad_batch(labs, -100)
        lens = torch.tensor([len(s) for s in seqs])
        att = (torch.arange(ids.shape[1])[None, :] < lens[:, None]).long()
        extra = {}
        if self.cfg.position_jitter > 0:
            pos = torch.arange(ids.shape[1])[None].repeat(ids.shape[0], 1)
            for r in range(ids.shape[0]):
                img = (ids[r] == self.enc.image).nonzero()
                if len(img) and self.rng.random() < self.cfg.position_jitter:
                    end = int(img[-1]) + 1
                    pos[r, end:] -= self.rng.randrange(len(img))  # as if up to all its visual tokens were cut
            extra["position_ids"] = pos
        if self.features is not None:  # frozen vision: cached features -> projector -> embeddings
            feats = self.model.model.multi_modal_projector(self.features[idx].float())
            if any(k is not None for k in keep):
                feats = torch.cat([f if k is None else f[k] for f, k in zip(feats, keep)])
            embeds = self.model.get_input_embeddings()(ids)
            mask = (ids == self.enc.image).unsqueeze(-1).expand_as(embeds)
            embeds = embeds.masked_scatter(mask, feats.to(embeds.dtype))
            return {"inputs_embeds": embeds, "attention_mask": att, "labels": labels, **extra}
        if any(k is not None for k in keep):
            raise ValueError("token_dropout needs the cached-feature path (freeze_vision_after_stage1)")
        return {"input_ids": ids, "attention_mask": att, "labels": labels,
                "pixel_values": self.train.normalized(idx) if idx else None, **extra}

    def _dropout_subset(self, iid: int) -> torch.Tensor:
        """Sorted indices of the visual tokens a dropped-token sequence keeps (see ``token_dropout``)."""
        k = self.rng.randint(max(1, self.n_image // 9), self.n_image)
        if self.rng.random() < self.cfg.token_dropout_object_share:
            labels = self.train.patch_labels[self.train.index[iid]].reshape(-1)
            objects = [i for i in range(self.n_image) if labels[i] > 0]
            background = [i for i in range(self.n_image) if labels[i] == 0]
            self.rng.shuffle(objects)
            self.rng.shuffle(background)
            return torch.tensor(sorted((objects + background)[:k]))
        return torch.tensor(sorted(self.rng.sample(range(self.n_image), k)))

    def _caption_conv(self, iid: int, task: str) -> list[tuple[str, str]]:
        r = self.rng.choice(self.train.texts[iid][task])
        return [(r["prompt"], r["answer"])]

    def _yesno_conv(self, iid: int) -> list[tuple[str, str]]:
        qs = list(self.train.texts[iid].get("yesno", []))
        self.rng.shuffle(qs)
        k = self.rng.randint(*self.cfg.yesno_per_conv)
        return [(r["prompt"], r["answer"]) for r in qs[:k]]

    def validate(self) -> dict:
        """Quick POPE on questions built from the val split (used for early stopping, never the test split)."""
        return {s: quick_pope(self.model, self.enc, self.val, qs) for s, qs in self.val_qs.items()}

    def _run_lm_stage(self, name: str, steps: int, batch: int, opt, make_conv, trainable,
                      val_every: int = 0, tag: str | None = None) -> float:
        t0 = time.time()
        bar = tqdm(range(steps), desc=name, mininterval=10)
        ema = None
        for step in bar:
            set_lr(opt, step, steps)
            convs = [(iid, make_conv(iid)) for iid in (self.rng.choice(self.train_ids) for _ in range(batch))]
            loss = self.model(**self._lm_batch(convs)).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if self.tied:
                self.retie_projector()
            ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
            self.losses.setdefault(name, []).append(loss.item())
            if step % 25 == 0:
                bar.set_postfix(loss=f"{ema:.3f}")
                self.log(f"{name} step {step} loss {loss.item():.4f} ema {ema:.4f} ({time.time() - t0:.0f}s)")
            if val_every and self.val_qs and (step + 1) % val_every == 0 and step + 1 < steps:
                val = self.validate()
                self.report.setdefault("validation", []).append({"stage": name, "step": step + 1, "pope": val,
                                                                 "seconds": round(time.time() - t0, 1)})
                self.log(f"{name} step {step + 1} val POPE {val}")
                if tag:  # a checkpoint's own report says where it stopped (the stage's end overwrites it)
                    self.report["stages"][tag] = {"steps": step + 1, "seconds": round(time.time() - t0, 1),
                                                  "pope_val": val}
                self.save()
                self.save(self.out / "checkpoints" / f"step-{step + 1}")  # keep each, to pick on val later
                if self.cfg.val_stop_acc and (val["random"]["acc"] or 0.0) >= self.cfg.val_stop_acc:
                    self.log(f"{name}: val POPE-random {val['random']['acc']:.3f} >= {self.cfg.val_stop_acc}, stopping")
                    self.report.setdefault("early_stop", {})[name] = step + 1
                    break
        return time.time() - t0

    def stage_align(self) -> None:
        cfg = self.cfg
        vision = self.model.model.vision_tower
        vision.requires_grad_(False)
        if self.tied:  # projector fixed by construction (patch classifier -> category-word embeddings)
            self.model.model.multi_modal_projector.requires_grad_(False)
        trainable = [p for n, p in self.model.named_parameters() if p.requires_grad]
        opt = torch.optim.AdamW(trainable, lr=cfg.align_lr, weight_decay=0.0)
        for g in opt.param_groups:
            g["peak_lr"] = cfg.align_lr
        secs = self._run_lm_stage("stage 2 align", cfg.align_steps, cfg.align_batch, opt,
                                  lambda iid: self._caption_conv(iid, "caption"), trainable)
        vision.requires_grad_(True)
        pope = {s: quick_pope(self.model, self.enc, self.test, qs) for s, qs in self.eval_qs.items()}
        self.report["stages"]["align"] = {"steps": cfg.align_steps, "seconds": round(secs, 1), "pope_quick": pope}
        self.log(f"stage2 done in {secs:.0f}s: POPE {pope}")

    def stage_instruct(self, steps: int | None = None, tag: str = "instruct") -> None:
        cfg = self.cfg
        steps = cfg.instruct_steps if steps is None else steps
        vision_params = list(self.model.model.vision_tower.parameters())
        vids = {id(p) for p in vision_params}
        if self.tied:
            self.model.model.multi_modal_projector.requires_grad_(False)
        other = [p for p in self.model.parameters() if id(p) not in vids and p.requires_grad]
        groups = [{"params": other, "lr": cfg.instruct_lr, "peak_lr": cfg.instruct_lr, "weight_decay": 0.0}]
        if cfg.instruct_vision_lr > 0 and self.features is None:
            groups.append({"params": vision_params, "lr": cfg.instruct_vision_lr, "peak_lr": cfg.instruct_vision_lr,
                           "weight_decay": 0.0})
        else:
            self.model.model.vision_tower.requires_grad_(False)
        opt = torch.optim.AdamW(groups)

        def make_conv(iid: int):
            r = self.rng.random()
            if r < cfg.caption_share / 2:
                return self._caption_conv(iid, "caption")
            if r < cfg.caption_share:
                return self._caption_conv(iid, "detail")
            return self._yesno_conv(iid)

        trainable = [p for g in groups for p in g["params"]]
        secs = self._run_lm_stage("stage 3 instruct", steps, cfg.instruct_batch, opt, make_conv, trainable,
                                  val_every=cfg.val_every, tag=tag)
        self.model.model.vision_tower.requires_grad_(True)
        pope = {s: quick_pope(self.model, self.enc, self.test, qs) for s, qs in self.eval_qs.items()}
        done = self.report.get("early_stop", {}).get("stage 3 instruct", steps)
        self.report["stages"][tag] = {"steps": done, "seconds": round(secs, 1), "pope_quick": pope}
        self.log(f"stage3 ({tag}) done in {secs:.0f}s: POPE {pope}")

    def save(self, out: Path | None = None) -> Path:
        out = self.out if out is None else out
        out.mkdir(parents=True, exist_ok=True)
        if self._t0 is not None:  # every save, checkpoints included, records the time so far
            self.report["total_seconds"] = round(time.time() - self._t0, 1)
        was_training = self.model.training
        self.model.eval()
        self.model.save_pretrained(out, safe_serialization=True)
        self.processor.save_pretrained(out)
        (out / "training_report.json").write_text(json.dumps(self.report, indent=2) + "\n")
        self.model.train(was_training)
        self.log(f"saved to {out}")
        return out

    def run(self) -> Path:
        self._t0 = time.time()
        if self.cfg.vision_steps > 0:
            self.stage_vision()
        if self.cfg.freeze_vision_after_stage1:
            if self.patch_head is not None:
                self.init_projector_from_patch_head()
            elif self.previous_report is not None and self.cfg.tie_projector:
                self.tied = True  # continuing a tied model: keep the projector on the word embeddings
                self.retie_projector()
            self.cache_features()
        if self.cfg.align_steps > 0:
            self.stage_align()
            self.save()  # checkpoint between stages
        if self.cfg.instruct_steps > 0:
            self.stage_instruct()
        self.report["complete"] = True
        return self.save()


def train(data: str | Path, out: str | Path, cfg: TrainConfig | None = None, log=print) -> Path:
    return Trainer(Path(data), Path(out), cfg or TrainConfig(), log=log).run()
