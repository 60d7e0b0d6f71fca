"""``vlmguard synth build|train|eval``: the SynthCOCO world and the bundled tiny LVLM."""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from vlmguard.errors import InvalidInput


def _path(text: str) -> Path:
    """argparse type of a path option: an empty value is refused (``Path("")`` would be the current folder)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("empty path")
    return Path(text)


def register(subparsers) -> None:
    p = subparsers.add_parser("synth", help="SynthCOCO world and the tiny model trained on it")
    sub = p.add_subparsers(dest="synth_command", metavar="SUBCOMMAND")
    sub.required = True

    b = sub.add_parser("build", help="render a deterministic SynthCOCO dataset")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--out", required=True, type=_path)
    b.add_argument("--train", type=int, default=0, help="number of training images")
    b.add_argument("--val", type=int, default=0, help="number of validation images")
    b.add_argument("--test", type=int, default=500, help="number of test images (POPE files use this split)")
    b.add_argument("--scene-cue", type=float, default=None,
                   help="how strongly the background tells the scene type, in [0, 1] (default: the world's)")
    b.add_argument("--json", action="store_true", help="print a JSON summary as the last line")
    b.set_defaults(func=_build)

    t = sub.add_parser("train", help="train the tiny LLaVA on a SynthCOCO directory (staged recipe)")
    t.add_argument("--data", required=True, type=_path)
    t.add_argument("--out", required=True, type=_path)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--steps", default=None,
                   help="steps per stage as VISION,ALIGN,INSTRUCT (e.g. 500,150,500); 0 skips a stage")
    t.add_argument("--init", type=Path, default=None,
                   help="continue from a saved tiny model (its tokenizer is kept); use with --steps 0,0,N")
    t.add_argument("--max-train-images", type=int, default=0, help="use only the first N training images")
    t.add_argument("--instruct-lr", type=float, default=None, help="peak learning rate of stage 3")
    t.add_argument("--caption-share", type=float, default=None,
                   help="share of stage-3 sequences that are captions / detailed descriptions")
    t.add_argument("--val-every", type=int, default=100, help="instruct steps between validation checks")
    t.add_argument("--position-jitter", type=float, default=None,
                   help="share of sequences whose post-image text positions move down (by less than the visual span)")
    t.add_argument("--text-only-share", type=float, default=None,
                   help="share of sequences with the image left out (teaches the language prior)")
    t.add_argument("--token-dropout", type=float, default=None,
                   help="share of sequences keeping a random subset of their visual tokens")
    t.add_argument("--vision-lr", type=float, default=None, help="peak learning rate of stage 1")
    t.add_argument("--scene-weight", type=float, default=None,
                   help="weight of the stage-1 scene-type loss on the vision CLS token (default 0: off)")
    t.add_argument("--object-dropout-share", type=float, default=None,
                   help="share of token-dropout sequences that keep object patches first (default 0)")
    t.add_argument("--val-questions", type=int, default=200, help="validation POPE questions per split")
    t.add_argument("--val-stop", type=float, default=0.0,
                   help="stop instruction tuning once validation POPE-random accuracy reaches this (0 = never)")
    t.add_argument("--log", type=Path, default=None, help="also append progress lines to this file")
    t.add_argument("--json", action="store_true")
    t.set_defaults(func=_train)

    e = sub.add_parser("eval", help="POPE + simple CHAIR of a model on a SynthCOCO test split (greedy)")
    e.add_argument("--data", type=_path, default=None, help="SynthCOCO directory (default: cached seed-0 test split)")
    e.add_argument("--model", default="tiny")
    e.add_argument("--pope-limit", type=int, default=0, help="questions per POPE file (0 = all)")
    e.add_argument("--chair-images", type=int, default=500, help="CHAIR test images (0 = all)")
    e.add_argument("--batch", type=int, default=32)
    e.add_argument("--write-card", action="store_true", help="write MODEL_CARD.md beside the model")
    e.add_argument("--save", type=Path, default=None, help="also write the result JSON to this file")
    e.add_argument("--db", type=Path, default=None, help="keep the samples in this results database")
    e.add_argument("--json", action="store_true")
    e.set_defaults(func=_eval)

    h = sub.add_parser("hallucinations",
                       help="sort the CHAIR hallucinations of a results database by kind (planted, co-occurrence "
                            "partner, scene-typical, foreign), from the SynthCOCO scene graphs")
    h.add_argument("--db", required=True, type=Path, help="results database with CHAIR runs on SynthCOCO")
    h.add_argument("--data", default="synthcoco",
                   help="the SynthCOCO directory the runs used (default: synthcoco, the cached seed-0 world)")
    h.add_argument("--split", default=None, help="its image split (default: the one each run recorded)")
    h.add_argument("--json", action="store_true", help="print a JSON list as the last line")
    h.set_defaults(func=_hallucinations)


MAX_SPLIT_IMAGES = 9_999_999  # each split's image ids span 10,000,000 (build.SPLIT_ID_BASE)


def _build(args: argparse.Namespace) -> int:
    from vlmguard.files import check_output_dir
    from vlmguard.synth.build import build_dataset
    from vlmguard.synth.world import WorldParams

    check_output_dir(args.out, "--out")
    for name in ("train", "val", "test"):
        if getattr(args, name) < 0:
            raise InvalidInput(f"--{name} must be >= 0")
        if getattr(args, name) > MAX_SPLIT_IMAGES:  # image ids would run into the next split's id range
            raise InvalidInput(f"--{name} must be at most {MAX_SPLIT_IMAGES:,} images, got {getattr(args, name):,}")
    if args.train == args.val == args.test == 0:
        raise InvalidInput("--train, --val and --test are all 0: nothing to build")
    try:
        params = WorldParams() if args.scene_cue is None else WorldParams(scene_cue=args.scene_cue)
    except InvalidInput as err:
        raise InvalidInput(f"--scene-cue: {err}") from None
    out = build_dataset(args.out, seed=args.seed, train=args.train, val=args.val, test=args.test,
                        params=params, progress=not args.json)
    summary = {"out": str(out), "seed": args.seed, "train": args.train, "val": args.val, "test": args.test}
    print(json.dumps(summary) if args.json else f"SynthCOCO written to {out}")
    return 0


def _parse_steps(text: str | None):
    if text is None:
        return None
    try:
        parts = [int(x) for x in text.split(",")]
    except ValueError:
        raise InvalidInput(f"--steps must be three integers VISION,ALIGN,INSTRUCT, got {text!r}") from None
    if len(parts) != 3 or min(parts) < 0:
        raise InvalidInput(f"--steps must be three non-negative integers VISION,ALIGN,INSTRUCT, got {text!r}")
    return parts


# `synth train` option -> TrainConfig field, for the options whose default is the recipe's
_OVERRIDES = {"position_jitter": "position_jitter", "text_only_share": "text_only_share",
              "token_dropout": "token_dropout", "object_dropout_share": "token_dropout_object_share",
              "instruct_lr": "instruct_lr", "vision_lr": "vision_lr", "scene_weight": "vision_scene_weight",
              "caption_share": "caption_share"}


def _train(args: argparse.Namespace) -> int:
    from vlmguard.files import check_output_dir, check_output_file
    from vlmguard.synth.train import TrainConfig, Trainer

    if not (args.data / "manifest.json").exists():
        from vlmguard.synth.build import BUILD_MARKER

        if (args.data / BUILD_MARKER).is_file():  # a build started there and never wrote its manifest (its last step)
            raise InvalidInput(f"{args.data}: its `vlmguard synth build` did not finish (no manifest.json); run it again")
        raise InvalidInput(f"{args.data} is not a SynthCOCO directory (no manifest.json); run `vlmguard synth build`")
    if not (args.data / "text" / "train.jsonl").exists():
        raise InvalidInput(f"{args.data} has no training split; build it with --train N")
    for name in ("caption_share", "position_jitter", "text_only_share", "token_dropout", "object_dropout_share"):
        v = getattr(args, name)
        if v is not None and not 0.0 <= v <= 1.0:
            raise InvalidInput(f"--{name.replace('_', '-')} must be a share in [0, 1], got {v}")
    for name in ("instruct_lr", "vision_lr"):  # every learning-rate option
        v = getattr(args, name)
        if v is not None and not 0 < v < math.inf:
            raise InvalidInput(f"--{name.replace('_', '-')} must be a learning rate > 0 (and finite), got {v}")
    if args.scene_weight is not None and not 0 <= args.scene_weight < math.inf:
        raise InvalidInput(f"--scene-weight must be a finite weight >= 0 (0 = off), got {args.scene_weight}")
    for flag, v in (("--max-train-images", args.max_train_images), ("--val-every", args.val_every),
                    ("--val-questions", args.val_questions)):
        if v < 0:
            raise InvalidInput(f"{flag} must be >= 0, got {v}")
    if not 0.0 <= args.val_stop <= 1.0:
        raise InvalidInput(f"--val-stop must be an accuracy in [0, 1] (0 = never stop), got {args.val_stop}")
    steps = _parse_steps(args.steps)
    if steps is not None and not any(steps):
        raise InvalidInput(f"--steps {args.steps}: every stage is skipped, nothing to train")
    if args.init is not None and not (args.init / "tokenizer.json").is_file():
        raise InvalidInput(f"--init {args.init}: not a saved tiny model (no tokenizer.json)")
    if args.init is not None and not ((args.init / "config.json").is_file() and any(
            (args.init / n).is_file() for n in ("model.safetensors", "pytorch_model.bin"))):
        raise InvalidInput(f"--init {args.init}: not a saved tiny model (no config.json and model.safetensors)")
    check_output_dir(args.out, "--out")
    _check_train_out(args.out)
    if args.log is not None:
        check_output_file(args.log, "--log")
    test = args.data / "annotations" / "instances_test.json"
    pope = [args.data / "pope" / f"synthcoco_pope_{s}.json" for s in ("random", "adversarial")]
    if not test.is_file() or not all(p.is_file() for p in pope):
        raise InvalidInput(f"{args.data} has no test split (its POPE files measure every stage); "
                           f"build it with --test N")
    if args.val_stop > 0:  # without validation checks it would never stop, silently
        if not (args.data / "annotations" / "instances_val.json").is_file():
            raise InvalidInput(f"--val-stop needs a val split, and {args.data} has none; build it with --val N")
        if args.val_every == 0 or args.val_questions == 0:
            raise InvalidInput("--val-stop needs validation checks: --val-every and --val-questions must be > 0")
    cfg = TrainConfig(seed=args.seed)
    if steps:
        cfg.vision_steps, cfg.align_steps, cfg.instruct_steps = steps
    cfg.val_every, cfg.val_stop_acc = args.val_every, args.val_stop
    cfg.max_train_images = args.max_train_images
    cfg.val_questions = args.val_questions
    for arg, field in _OVERRIDES.items():  # options left unset keep the recipe's defaults
        if getattr(args, arg) is not None:
            setattr(cfg, field, getattr(args, arg))
    logf = open(args.log, "a") if args.log else None

    def log(msg: str) -> None:
        print(msg, file=sys.stderr if args.json else sys.stdout, flush=True)
        if logf:
            logf.write(msg + "\n")
            logf.flush()

    trainer = Trainer(args.data, args.out, cfg, log=log, init=args.init)
    given = [("seed", args.seed), ("steps", args.steps), ("max_train_images", args.max_train_images),
             ("val_every", args.val_every), ("val_stop", args.val_stop), ("val_questions", args.val_questions),
             *((k, getattr(args, k)) for k in _OVERRIDES), ("init", args.init)]
    trainer.report["command_args"] = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in given
                                              if v not in (None, 0, 0.0))
    try:
        out = trainer.run()
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (the CLI's main turns it into Terminated, a KeyboardInterrupt)
        try:  # a checkpoint this run saved (an earlier run's finished model there says "complete": true)
            partial = json.loads((args.out / "training_report.json").read_text()).get("complete") is False
        except (OSError, ValueError, AttributeError):
            partial = False
        if partial:
            print(f"vlmguard: {args.out} holds the last checkpoint, not the finished model (training_report.json: "
                  f'"complete": false); continue it with --init {args.out}', file=sys.stderr)
        raise
    if args.json:
        print(json.dumps({"out": str(out), **trainer.report}))
    return 0


# what ``Trainer.save`` writes into --out (transformers' save_pretrained of the model and the processor)
_MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                "processor_config.json", "chat_template.jinja", "training_report.json")


def _check_train_out(out: Path) -> None:
    """--out may hold an earlier `synth train` output (it has a training_report.json), which is replaced; a
    folder of other files whose names a save would overwrite (someone's config.json, ...) is refused."""
    if not out.is_dir() or (out / "training_report.json").is_file():
        return
    taken = [n for n in _MODEL_FILES if (out / n).exists()]
    if taken:
        raise InvalidInput(f"--out {out}: not a `vlmguard synth train` output, and saving the model would overwrite "
                           f"{', '.join(taken)}; choose an empty or new folder")


def _hallucinations(args: argparse.Namespace) -> int:
    from vlmguard.synth import default_dataset
    from vlmguard.synth.hallucinations import breakdowns_from_db, format_table

    data = default_dataset() if args.data == "synthcoco" else Path(args.data)
    rows = breakdowns_from_db(args.db, data, args.split)
    print(json.dumps([r.to_dict() for r in rows]) if args.json else format_table(rows))
    return 0


def _eval(args: argparse.Namespace) -> int:
    from vlmguard.files import check_output_file
    from vlmguard.synth.evaluate import evaluate

    # every option is checked before the first benchmark runs
    for flag, v, low in (("--pope-limit", args.pope_limit, 0), ("--chair-images", args.chair_images, 0),
                         ("--batch", args.batch, 1)):
        if v < low:
            raise InvalidInput(f"{flag} must be >= {low}{' (0 = all)' if low == 0 else ''}, got {v}")
    if args.data is not None and not args.data.is_dir() and str(args.data) not in ("synthcoco", "coco"):
        raise InvalidInput(f"--data {args.data}: {'not a directory' if args.data.exists() else 'not found'} "
                           f"(expected a SynthCOCO directory written by `vlmguard synth build`)")
    if args.save:
        check_output_file(args.save, "--save")
    if args.db:
        from vlmguard.bench.db import check_db

        check_db(args.db)
    res = evaluate(args.model, args.data, pope_limit=args.pope_limit, chair_images=args.chair_images, batch=args.batch,
                   progress=not args.json, db=args.db)
    if args.json:  # printed before any file is written: a failing write does not lose the results
        print(json.dumps(res), flush=True)
    else:
        def num(v: float | None, digits: int = 2) -> str:  # undefined metrics (no mentions, no positives): "-"
            return "-" if v is None else f"{v:.{digits}f}"

        for k, v in res["pope"].items():
            print(f"POPE {k:12s} acc {num(v['accuracy'])}  f1 {num(v['f1'])}  yes {num(v['yes_ratio'], 1)}  (n={v['n']})")
        c = res["chair"]
        print(f"CHAIR_s {num(c['chair_s'])}  CHAIR_i {num(c['chair_i'])}  recall {num(c['recall'])}  ({c['scorer']})",
              flush=True)
    if args.save:
        from vlmguard.files import write_output_file

        write_output_file(args.save, json.dumps(res, indent=2) + "\n", "--save")
    if args.write_card:
        from vlmguard.models.resolve import resolve_model_path
        from vlmguard.synth.card import write_model_card

        write_model_card(resolve_model_path(args.model), res)
    return 0
