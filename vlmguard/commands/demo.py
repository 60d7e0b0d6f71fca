"""``vlmguard demo``: the main job on the embedded defaults (what ``make demo`` runs).

1. one image from the SynthCOCO test split through the bundled tiny model, plain and with FlowCut + VCD;
2. a short benchmark sweep (POPE + CHAIR, pruners and decoders) into a results database;
3. the report (tables, CSV, PNG plots);
4. the service: a background Ray cluster with the tiny model behind the OpenAI-compatible API, one client
   request and a small benchmark Ray Job; the service is left running for the dashboard
   (stop it with ``vlmguard serve --stop`` and ``ray stop``).
"""
from __future__ import annotations

import argparse
from importlib import resources


def register(sub) -> None:
    p = sub.add_parser("demo", help="run the main job on the embedded defaults")
    p.add_argument("--model", default="tiny")
    p.add_argument("--db", default="runs/demo.sqlite")
    p.add_argument("--out", default="runs/demo-report")
    p.add_argument("--config", default=None, help="sweep YAML (default: the embedded demo sweep)")
    p.add_argument("--skip-sweep", action="store_true", help="skip the benchmark sweep and report")
    p.add_argument("--no-serve", action="store_true", help="do not start the Ray service")
    p.set_defaults(func=run)


def _examples(model: str) -> None:
    from vlmguard.engine import Engine, Request
    from vlmguard.images import load_image
    from vlmguard.spec import GenerationSpec
    from vlmguard.synth import default_dataset

    data = default_dataset()
    image_path = sorted((data / "images" / "test").glob("*.png"))[0]
    image = load_image(image_path)
    engine = Engine.load(model)
    print(f"model: {engine.model_name} ({engine.family}), image: {image_path.name}")
    prompts = ["Is there a dog in the image?", "Please describe this image in detail."]
    specs = {
        "plain": GenerationSpec(max_new_tokens=48),
        "flowcut@16 + vcd": GenerationSpec(pruning="flowcut", budget=16, decoding="vcd", max_new_tokens=48),
    }
    for prompt in prompts:
        print(f"\nQ: {prompt}")
        for label, spec in specs.items():
            r = engine.generate([Request(prompt, [image])], spec)[0]
            kept = r.visual_tokens_kept[-1] if r.visual_tokens_kept else 0
            print(f"  [{label:>16}] {r.text!r}  (visual tokens {kept}/{r.visual_tokens}, "
                  f"prefill {r.timings.prefill_s * 1000:.1f} ms, {len(r.token_ids)} tokens "
                  f"in {r.timings.decode_s * 1000:.0f} ms)")


def run(args: argparse.Namespace) -> int:
    from vlmguard.cli import main as cli_main

    _check_args(args)
    print("== 1. generation examples")
    _examples(args.model)
    rc = 0 if args.skip_sweep else _sweep(args, cli_main)
    if rc or args.no_serve:
        return rc
    print("\n== 4. service (Ray Serve) + client request + benchmark job")
    from vlmguard.workers.demo import service_demo

    out = service_demo(args.model, db=args.db)
    print(f"\nThe service is running at {out['url']} (stop: `vlmguard serve --stop` then `ray stop`).\n"
          f"Look at everything: `vlmguard dashboard --db {args.db} --service {out['url']}` (http://127.0.0.1:8501).")
    return 0


def _config(args: argparse.Namespace) -> str:
    return args.config or str(resources.files("vlmguard") / "configs" / "demo-sweep.yaml")


def _check_args(args: argparse.Namespace) -> None:
    """The files the later steps read or write, checked before step 1, so a bad path does not fail only
    after the examples and the sweep have run."""
    from vlmguard.bench.db import check_db
    from vlmguard.files import check_output_dir

    if not args.skip_sweep:
        from vlmguard.bench.sweep import load_config

        load_config(_config(args))
        check_output_dir(args.out, "--out")
    if not (args.skip_sweep and args.no_serve):  # the sweep and the service's benchmark job write it
        check_db(args.db)


def _sweep(args: argparse.Namespace, cli_main) -> int:
    config = _config(args)
    print(f"\n== 2. benchmark sweep ({config}) -> {args.db}")
    rc = cli_main(["bench", "sweep", config, "--db", args.db])
    if rc:
        return rc
    print(f"\n== 3. report -> {args.out}")
    rc = cli_main(["report", "--db", args.db, "--out", args.out])
    return rc
