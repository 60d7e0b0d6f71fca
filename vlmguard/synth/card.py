"""Write ``MODEL_CARD.md`` for a trained tiny model from its training report and an evaluation result."""
from __future__ import annotations

import itertools
import json
import re
from pathlib import Path
from typing import Any


def _fmt(x: Any, pct: bool = False) -> str:
    if x is None:
        return "n/a"
    return f"{100 * x:.1f}" if pct else f"{x:.1f}" if isinstance(x, float) else str(x)


def _chain(report: dict) -> list[dict]:
    """The training runs behind a model, oldest first (each ``--init`` run nests its predecessor's report)."""
    runs = []
    while report:
        runs.append(report)
        report = report.get("previous")
    return runs[::-1]


def _images_used(runs: list[dict]) -> str:
    """Which training images each run used ("Runs 1 and 2 used the first 3000 training images, runs 3 and 4
    all of them")."""
    used = [(r.get("config") or {}).get("max_train_images") or 0 for r in runs]
    if len(set(used)) <= 1:
        n = used[0] if used else 0
        return f"Training used {f'the first {n}' if n else 'all'} training images"
    parts = []
    for n, group in itertools.groupby(range(1, len(used) + 1), key=lambda k: used[k - 1]):
        ks = [str(k) for k in group]
        who = f"run {ks[0]}" if len(ks) == 1 else f"runs {', '.join(ks[:-1])} and {ks[-1]}"
        if not parts:
            parts.append(f"{who} used {f'the first {n}' if n else 'all'} training images")
        else:
            parts.append(f"{who} {f'the first {n}' if n else 'all of them'}")
    text = ", ".join(parts)
    return text[0].upper() + text[1:]


def _reproduce_args(run: dict, k: int) -> str:
    """A run's recorded arguments with ``--init`` pointing at the previous line's ``--out`` (keeping a
    ``checkpoints/step-N`` suffix): the recorded path is wherever that run's predecessor happened to be."""
    args = run.get("command_args", "")
    m = re.search(r"--init (\S+)", args)
    if m is None or k == 1:
        return args
    ckpt = re.search(r"/checkpoints/step-\d+$", m.group(1))
    return args[:m.start(1)] + f"runs/run{k - 1}" + (ckpt.group(0) if ckpt else "") + args[m.end(1):]


def _all(runs: list[dict], key: str) -> bool:
    """Whether every run's training config set ``key``."""
    return bool(runs) and all((r.get("config") or {}).get(key) for r in runs)


def _checkpoint_lines(runs: list[dict]) -> list[str]:
    """Which runs ended on a checkpoint picked on validation before their last step: their commands, run to the
    end, give other weights (each learning rate follows a cosine over the steps the command names)."""
    out = []
    for k, r in enumerate(runs, 1):
        st = (r.get("stages") or {}).get("instruct") or {}
        planned = (r.get("config") or {}).get("instruct_steps")
        if "pope_val" in st and planned and st.get("steps", planned) < planned:
            which = "- the bundled weights are" if k == len(runs) else "- the weights carried on are"
            out.append(f"{which} run {k}'s `checkpoints/step-{st['steps']}` (picked on validation), not the end of"
                       f" its {planned} steps: its learning rate follows a cosine over {planned} steps, so the run"
                       " may be stopped there. The times above count the steps up to it.")
    return out + ([""] if out else [])


def _stage_rows(runs: list[dict]) -> list[str]:
    rows = []
    for k, rep in enumerate(runs, 1):
        for name, st in rep.get("stages", {}).items():
            name = f"run {k}: {name}"
            pope = st.get("pope_quick") or st.get("pope_presence_probe") or st.get("pope_val") or {}
            how = ("presence probe (CLS head), test" if "pope_presence_probe" in st else
                   "first answer token, greedy, val split (checkpoint)" if "pope_val" in st else
                   "first answer token, greedy, test")
            rows.append(f"| {name} | {st['steps']} | {st['seconds'] / 60:.1f} | "
                        f"{_fmt(pope.get('random', {}).get('acc'), True)} | "
                        f"{_fmt(pope.get('adversarial', {}).get('acc'), True)} | {how} |")
    return rows


def model_card(model_dir: Path, evaluation: dict | None) -> str:
    model_dir = Path(model_dir)
    cfg = json.loads((model_dir / "config.json").read_text())
    report = json.loads((model_dir / "training_report.json").read_text())
    runs = _chain(report)
    v, t = cfg["vision_config"], cfg["text_config"]
    files = [f for f in model_dir.iterdir() if f.is_file()]
    total_mb = sum(f.stat().st_size for f in files) / 2**20
    from safetensors import safe_open

    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        n_params = sum(f.get_slice(k).get_shape().numel() if hasattr(f.get_slice(k).get_shape(), "numel")
                       else _prod(f.get_slice(k).get_shape()) for k in f.keys())
    lines = [
        "# tiny-llava (SynthCOCO)",
        "",
        "A small `LlavaForConditionalGeneration` trained from scratch on SynthCOCO (`vlmguard synth build`), so",
        "that every pruning / decoding method and the POPE / CHAIR benchmarks run and are measured offline on a",
        "CPU. It is a stand-in for LLaVA-1.5 with the same code path (CLIP-style ViT with a CLS token,",
        "`vision_feature_layer=-2`, `default` feature selection, 2-layer GELU projector, Llama decoder, LLaVA-1.5",
        "chat template), not a useful model of real images.",
        "",
        "## Architecture",
        "",
        f"- Vision: CLIP ViT, {v['num_hidden_layers']} layers x {v['hidden_size']} (heads {v['num_attention_heads']},"
        f" MLP {v['intermediate_size']}), {v['image_size']} px images, {v['patch_size']} px patches ="
        f" {(v['image_size'] // v['patch_size']) ** 2} visual tokens + CLS.",
        f"- Projector: Linear({v['hidden_size']}, {t['hidden_size']}) - GELU - Linear({t['hidden_size']}, {t['hidden_size']}).",
        f"- Decoder: Llama, {t['num_hidden_layers']} layers x {t['hidden_size']} (heads {t['num_attention_heads']},"
        f" kv heads {t['num_key_value_heads']}, MLP {t['intermediate_size']}), vocabulary {t['vocab_size']}"
        " (word level, trained with `tokenizers` on the SynthCOCO corpus), tied embeddings.",
        f"- Parameters: {n_params / 1e6:.2f} M; files: {total_mb:.1f} MB (safetensors, float32).",
        "- Prompt: `USER: <image>\\n{prompt} ASSISTANT:`; answers end with `</s>` (eos id"
        f" {t.get('eos_token_id')}); `AutoProcessor` gives a `LlavaProcessor` that expands `<image>` to"
        f" {(v['image_size'] // v['patch_size']) ** 2} tokens.",
        "",
        "## Training data",
        "",
        "SynthCOCO seed 0 (`vlmguard synth build --seed 0 --out runs/synth0 --train 8000 --val 200 --test 500`): 28 COCO categories",
        "drawn as fixed glyphs in 5 scene types with co-occurring pairs; about 1 in 5 pair-completed objects",
        "(6% of the others) is drawn nearly invisible but still mentioned in the training text (the",
        "hallucination prior).",
        f"{_images_used(runs)}; per image a caption, a detailed description and balanced yes/no questions (POPE"
        " wording, with and without the LLaVA suffix).",
        "",
        "## Recipe and time (2 shared CPU cores)",
        "",
        "1. vision: ViT alone, per-patch category labels from the penultimate layer + CLS presence (BCE)"
        + (" + CLS scene type (cross-entropy; as CLIP's CLS learns the whole scene from captions, so its attention"
           " covers the background that carries the scene cue, not only the objects)" if _scene_cls(runs) else "") + ";",
        "2. align: projector built from the patch classifier (`linear_1`) and the category-name embeddings",
        "   (`linear_2`), vision frozen (features cached); "
        + ("the projector stays fixed too (`tie_projector`: its category columns are re-tied to the current"
           " word embeddings after every step), so the decoder alone learns short captions;"
           if _all(runs, "tie_projector") else "projector + decoder on short captions;"),
        "3. instruct: " + ("the decoder alone (vision frozen on cached features, `freeze_vision_after_stage1`;"
                           " projector tied as above)" if _all(runs, "tie_projector")
                           and _all(runs, "freeze_vision_after_stage1") else "decoder + projector")
        + " on multi-turn yes/no conversations, captions and detailed descriptions,",
        "   checkpointed at every validation POPE (val split, never the test split); later runs continue a",
        "   checkpoint with `--init`.",
        *_augmentation_lines(runs),
        "",
        f"{len(runs)} run(s), total training time "
        f"{sum(r.get('total_seconds', 0) for r in runs) / 60:.1f} min."
        " The machine was shared with other jobs, so times are wall-clock under load.",
        "",
        "| stage | steps | minutes | POPE random acc (quick) | POPE adversarial acc | measured with |",
        "|---|---|---|---|---|---|",
        *_stage_rows(runs),
        "",
        "Reproduce: `vlmguard synth build --seed 0 --out runs/synth0 --train 8000 --val 200 --test 500`, then",
        "the runs in order, each `--init` pointing at the checkpoint the previous run ended with (or the one",
        "picked on validation):",
        "",
        *[f"{k}. `vlmguard synth train --data runs/synth0 --out runs/run{k} {_reproduce_args(r, k)}`"
          for k, r in enumerate(runs, 1)],
        "",
        *_checkpoint_lines(runs),
    ]
    if evaluation:
        data = evaluation.get("data", "synthcoco")  # the default world, or another SynthCOCO directory
        where = "SynthCOCO seed 0 test split" if data == "synthcoco" else f"SynthCOCO test split of {data}"
        pope_images = max((m["n"] for m in evaluation["pope"].values()), default=0) // 6  # 3 + 3 questions each
        lines += [f"## Measured quality ({where}, greedy)", "",
                  f"POPE asks about the {pope_images} images with at least 3 visible objects (POPE's protocol takes 3"
                  f" of them as positives), six questions each; CHAIR describes all {evaluation['chair']['n']}.", ""]
        lines += ["| POPE split | n | accuracy | F1 | yes ratio |", "|---|---|---|---|---|"]
        for split, m in evaluation["pope"].items():  # percentages, as the benchmark runner reports them
            lines.append(f"| {split} | {m['n']} | {m['accuracy']:.2f} | {m['f1']:.2f} | {m['yes_ratio']:.1f} |")
        c = evaluation["chair"]
        lines += ["", f"CHAIR, preset {c.get('preset')} (\"Please describe this image in detail.\", up to 512 new"
                      f" tokens; {c['n']} images; scorer {c['scorer']}): CHAIR_s {_fmt(c['chair_s'])}, CHAIR_i"
                      f" {_fmt(c['chair_i'])}, recall {_fmt(c.get('recall'))}, mean length {_fmt(c.get('len'))} words.",
                  "", f"Latency of one POPE answer (batch 1, CPU): {1000 * evaluation['latency_s']['pope_answer']:.0f} ms.",
                  "", "Measured with `vlmguard synth eval --write-card`, which runs the project's benchmark runner"
                  " (`vlmguard bench pope` with the LLaVA prompt and official parsing, `vlmguard bench chair`).", ""]
        ex = evaluation.get("chair_examples") or []
        if ex:
            lines += ["Example detailed description:", "", f"> {ex[0]['caption']}", ""]
    return "\n".join(lines)


def _augmentation_lines(runs: list[dict]) -> list[str]:
    """What the later runs added to the instruct stage, with the shares they used."""
    used = {}
    for r in runs:
        for key in ("position_jitter", "text_only_share", "token_dropout", "token_dropout_object_share"):
            v = (r.get("config") or {}).get(key)
            if v:
                used[key] = v
    if not used:
        return []
    text = {
        "position_jitter": "RoPE positions of the text after the image moved down by a random amount smaller than"
                           " the visual span (share {v}): a pretrained LLM has seen text at every distance from an"
                           " image, this tiny decoder had not, and shortened visual spans (FlowCut, random) move it",
        "text_only_share": "sequences with the image left out (share {v}): the decoder learns the world's language"
                           " prior, which image-free contrast branches (M3ID, VISTA) ask for",
        "token_dropout": "sequences keeping a uniformly random subset of their visual tokens, count uniform in"
                         " [n/9, n], raster order (share {v}): the tolerance of a variable visual-token count a"
                         " pretrained LLM brings; uniform subsets are what `random` pruning feeds, so they make the"
                         " model most at home with that baseline (docs/pruning.md)",
        "token_dropout_object_share": "of those, a share {v} object-first instead of uniform (ground-truth patch"
                                      " labels: every object patch in random order, then background, the first k):"
                                      " trained on uniform subsets alone, the decoder learns that an object it does"
                                      " not see may be out of view and fills it in from the scene prior, which suits"
                                      " random pruning and penalises any pruner that keeps the objects; no pruning"
                                      " method's scores are used",
    }
    return ["4. augmentations of the instruct stage in later runs:"] + [
        f"   - {text[k].format(v=v)};" for k, v in used.items()]


def _scene_cls(runs: list[dict]) -> bool:
    """Whether a stage-1 run of the chain trained the CLS token on the scene type too."""
    return any((r.get("stages") or {}).get("vision") and (r.get("config") or {}).get("vision_scene_weight")
               for r in runs)


def _prod(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def write_model_card(model_dir: Path, evaluation: dict | None) -> Path:
    p = Path(model_dir) / "MODEL_CARD.md"
    p.write_text(model_card(model_dir, evaluation))
    return p
