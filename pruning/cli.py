"""``vlmguard prune``: pruning utilities.

``vlmguard prune analyze --model M [--out schedule.json] [--json]`` runs AdaptInfer's offline
inflection-layer analysis on a calibration set (SynthCOCO scenes rendered on the fly, or ``--images DIR``)
and writes a schedule (stage layers + keep counts for the model's 192/128/64-of-576-equivalent budgets)
that ``--pruning adaptinfer --pruning-param schedule=PATH`` uses.
``vlmguard prune methods`` lists the registered methods.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from vlmguard.errors import InvalidInput
from vlmguard.models.quantization import CHOICES as QUANT_CHOICES


def register(sub) -> None:
    p = sub.add_parser("prune", help="visual-token pruning utilities (AdaptInfer schedule analysis, methods)")
    psub = p.add_subparsers(dest="prune_command", metavar="SUBCOMMAND")
    psub.required = True

    a = psub.add_parser("analyze", help="find AdaptInfer inflection layers for a model and write a schedule")
    a.add_argument("--model", default="tiny", help="model path, HF cache id (offline), 'tiny' or 'random:FAMILY'")
    a.add_argument("--device", default="auto")
    a.add_argument("--dtype", default="auto")
    a.add_argument("--attn", default="auto", help="auto, sdpa, flash_attention_2, eager")
    a.add_argument("--quantization", default="none", choices=QUANT_CHOICES,
                   help="the language model's weights quantized as they load (default: none)")
    a.add_argument("--samples", type=int, default=64, help="calibration samples (official: 1000 MME samples)")
    a.add_argument("--images", default=None, help="calibration images directory (default: SynthCOCO scenes)")
    a.add_argument("--seed", type=int, default=None, help="SynthCOCO calibration seed")
    a.add_argument("--min-size", type=int, default=2,
                   help="change-point minimum segment length (official 2; 1 for very shallow models)")
    a.add_argument("--out", default=None, help="write the schedule JSON here")
    a.add_argument("--json", action="store_true", help="print one JSON object on the last line")
    a.set_defaults(func=_analyze)

    m = psub.add_parser("methods", help="list the registered pruning methods")
    m.add_argument("--json", action="store_true")
    m.set_defaults(func=_methods)


def _analyze(args: argparse.Namespace) -> int:
    from vlmguard.engine import Engine
    from vlmguard.pruning.analysis import CALIBRATION_SEED, analyze, directory_calibration, synth_calibration

    from vlmguard.files import check_output_file, write_output_file

    if args.samples < 1:
        raise InvalidInput(f"--samples must be >= 1, got {args.samples}")
    if args.min_size < 1:
        raise InvalidInput(f"--min-size must be >= 1, got {args.min_size}")
    if args.out is not None and not args.out.strip():  # it was silently not written
        raise InvalidInput("--out is empty: give the schedule file's path")
    if args.out:  # before the analysis, not after it
        check_output_file(args.out, "--out")
    t0 = time.perf_counter()
    if args.images:  # read before the model loads: a bad folder or image is reported first
        prompts = directory_calibration(args.images, args.samples)
    engine = Engine.load(args.model, device=args.device, dtype=args.dtype, attn_implementation=args.attn,
                         quantization=args.quantization)
    n_layers = engine.adapter.num_layers
    if 2 * args.min_size > n_layers:  # no change point can be placed: an all-zero histogram, a made-up schedule
        raise InvalidInput(f"--min-size {args.min_size} is too large for the {n_layers} decoder layers of "
                           f"{args.model} (at most {n_layers // 2})")
    seed = args.seed if args.seed is not None else CALIBRATION_SEED
    if not args.images:
        cfg = engine.model.config
        size = int(getattr(getattr(cfg, "vision_config", None), "image_size", 96) or 96)
        prompts = synth_calibration(args.samples, seed=seed, image_size=max(size, 32))
    result = analyze(engine, prompts, min_size=args.min_size)
    out = result.to_dict(args.model)
    # what the schedule was solved on, so that it can be made again
    out["calibration"] = ({"source": "images", "path": str(Path(args.images).resolve())} if args.images
                          else {"source": "synthcoco", "seed": seed})
    out["seconds"] = round(time.perf_counter() - t0, 2)
    if args.out:
        out["out"] = str(Path(args.out))
    if args.json:
        print(json.dumps(out))
    else:
        print(f"model {args.model}: {result.n_layers} decoder layers, {result.n_visual} visual tokens, "
              f"{result.samples} calibration samples")
        print("inflection histogram (layer: count): "
              + ", ".join(f"{i}:{c}" for i, c in enumerate(result.histogram)))
        print(f"stage layers: {result.layers}")
        for b, info in out["budgets"].items():
            print(f"  budget {b:>4}: keeps {info['keeps']}  official avg {info['official_avg']}  "
                  f"actual avg {info['actual_avg']}  (label accounting: {info['label_accounting']})")
    if args.out:  # written after the results are printed: a failing write does not lose them
        schedule = {k: v for k, v in out.items() if k != "out"}
        write_output_file(args.out, json.dumps(schedule, indent=2) + "\n", "--out")
        if not args.json:
            print(f"schedule written to {args.out}")
    return 0


def _methods(args: argparse.Namespace) -> int:
    from vlmguard.pruning import PRUNERS

    names = sorted(PRUNERS.names()) if hasattr(PRUNERS, "names") else sorted(PRUNERS)
    rows = []
    for n in names:
        cls = PRUNERS.get(n)
        rows.append({"name": n, "side": cls.side, "params": list(cls.Params.model_fields)})
    if args.json:
        print(json.dumps({"methods": rows}))
    else:
        for r in rows:
            print(f"{r['name']:<12} {r['side']:<7} params: {', '.join(r['params']) or '-'}")
    return 0
