"""``vlmguard bench``, ``vlmguard score`` and ``vlmguard report``.

Datasets for ``bench`` (``--dataset``): ``synthcoco`` (default-seed SynthCOCO, built on demand and
cached), a directory written by ``vlmguard synth build``, or ``coco`` for real COCO + POPE files:
``--coco-images DIR`` (val2014 images), ``--pope-dir DIR`` (``refdata/pope`` layout; default
``../shared/refdata/pope``) with ``--pope-set head|llava15_e3e3926|aokvqa_seem|gqa_seem``; for CHAIR
``--gt TABLE`` (default: refdata's COCO-2014 table) or ``--coco-annotations DIR`` (instances + captions
json), and ``--image-ids FILE`` (default: the standard 500-image list).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from functools import wraps
from pathlib import Path
from typing import Any, Callable

from vlmguard.bench.db import DEFAULT_DB
from vlmguard.commands.generate import budget_arg, positive_int
from vlmguard.errors import InvalidInput
from vlmguard.interrupts import Terminated
from vlmguard.models.quantization import CHOICES as QUANT_CHOICES
from vlmguard.spec import IMAGE_ASPECTS, cli_method_params


# `vlmguard bench --help`: the datasets paragraph of this module's docstring, in the help's own markup
BENCH_DESCRIPTION = ("Run a benchmark into the results database, sample by sample (a rerun of an interrupted\n"
                     "run resumes it).\n\n" + __doc__.split("\n\n", 1)[1].replace("``", "`").strip())


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, default=str))


def _add_dataset_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("dataset")
    g.add_argument("--dataset", default="synthcoco", help="synthcoco | SynthCOCO directory | coco (default: %(default)s)")
    g.add_argument("--image-split", default="test", help="SynthCOCO image split (default: %(default)s)")
    g.add_argument("--coco-images", type=Path, help="COCO val2014 image folder (--dataset coco)")
    g.add_argument("--coco-annotations", type=Path, help="folder with instances_*.json + captions_*.json (CHAIR GT)")
    g.add_argument("--pope-dir", type=Path, help="POPE question folder in the refdata/pope layout")
    g.add_argument("--pope-set", default="head", help="POPE file version: head | llava15_e3e3926 | aokvqa_seem | gqa_seem")
    g.add_argument("--gt", type=Path, help="CHAIR ground truth: table .json(.gz) or COCO annotation folder")
    g.add_argument("--image-ids", type=Path, help="CHAIR image-id list (one id per line)")


def _add_method_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("method and generation")
    g.add_argument("--model", default="tiny", help="model: tiny | local path | HF cache id (default: %(default)s)")
    g.add_argument("--device", default="auto", help="cpu | cuda | auto (default: %(default)s)")
    g.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16 (default: %(default)s; "
                   "a run's identity includes it when not float32)")
    g.add_argument("--quantization", default="none", choices=QUANT_CHOICES,
                   help="the language model's weights quantized as they load (default: none; a run's identity "
                   "includes it when set)")
    g.add_argument("--pruning", default="none", help="visual-token pruner (default: none)")
    g.add_argument("--budget", type=budget_arg, help="visual tokens kept (int) or kept fraction (float)")
    g.add_argument("--pruning-param", action="append", default=[], metavar="K=V", help="pruner parameter (repeat)")
    g.add_argument("--decoding", default="greedy", help="decoding method (default: greedy)")
    g.add_argument("--decoding-param", action="append", default=[], metavar="K=V", help="decoder parameter (repeat)")
    g.add_argument("--param", action="append", default=[], metavar="K=V",
                   help="a parameter of either method, sent to the one that has it (repeat)")
    g.add_argument("--max-new-tokens", type=positive_int, help="default: the preset's")
    choice = g.add_mutually_exclusive_group()
    choice.add_argument("--sample", dest="do_sample", action="store_true", default=None, help="multinomial sampling")
    choice.add_argument("--greedy", dest="do_sample", action="store_false", help="greedy token selection")
    g.add_argument("--temperature", type=float)
    g.add_argument("--top-p", type=float)
    g.add_argument("--top-k", type=int)
    g.add_argument("--seed", type=int)
    g.add_argument("--image-aspect", choices=IMAGE_ASPECTS, help="how images meet the vision tower's square: "
                   "reference (default: the family's reference evaluation; LLaVA-1.5 pads to a square, benchmarks.md "
                   "1.3), pad, or native (the checkpoint's processor as shipped; llava-hf crops the centre)")


def _add_run_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("run")
    g.add_argument("--limit", type=positive_int,
                   help="only the first N items (per split); a later, larger limit grows the same run, and a smaller "
                        "one reports the metrics of its N items")
    g.add_argument("--batch-size", type=positive_int, default=8, help="requests per engine call (default: %(default)s)")
    g.add_argument("--db", type=Path, default=DEFAULT_DB, help="results database (default: %(default)s)")
    g.add_argument("--shard-index", type=int, default=0, help=argparse.SUPPRESS)
    g.add_argument("--num-shards", type=int, default=1, help=argparse.SUPPRESS)
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--json", action="store_true", help="print the metrics as one JSON object on the last line")


def register(subparsers: argparse._SubParsersAction) -> None:
    from vlmguard.bench.pope_leading import ALL_TEMPLATES
    from vlmguard.bench.pope_parsers import PARSERS
    from vlmguard.bench.prompts import CHAIR_PRESETS, POPE_PROMPTS

    bench = subparsers.add_parser("bench", help="run POPE / POPE-leading / CHAIR benchmarks into the results DB",
                                  description=BENCH_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    bsub = bench.add_subparsers(dest="bench_command", metavar="BENCHMARK")
    bsub.required = True

    for name, helptext in (("pope", "POPE yes/no object probing"), ("pope-leading", "POPE with leading cues (LQCD 8)"),
                           ("chair", "CHAIR caption hallucination")):
        p = bsub.add_parser(name, help=helptext)
        _add_dataset_args(p)
        _add_method_args(p)
        _add_run_args(p)
        if name != "chair":
            p.add_argument("--split", action="append", choices=["random", "popular", "adversarial", "all"],
                           help="POPE split (repeat; default: all three)")
            p.add_argument("--prompt-preset", default="llava", choices=sorted(POPE_PROMPTS),
                           help="prompt protocol (default: %(default)s)")
            p.add_argument("--parser", default="official", choices=PARSERS.names(), help="answer parser (default: %(default)s)")
        else:
            p.add_argument("--preset", dest="chair_preset", default="chair512", choices=sorted(CHAIR_PRESETS),
                           help="chair512 (512 tokens) | chair64 (64 tokens, drop incomplete sentence)")
            p.add_argument("--prompt", help="caption prompt (default: the preset's)")
            # issue 5 names `bench pope|pope-leading|chair ... [--split S]`: CHAIR's split is the image split
            p.add_argument("--split", dest="image_split", default=argparse.SUPPRESS,
                           help="image split of the captioned images (alias of --image-split)")
        if name == "pope-leading":
            p.add_argument("--template", action="append", choices=list(ALL_TEMPLATES),
                           help="leading template or view (repeat; default: W-misleading)")
        p.set_defaults(func=cmd_bench, benchmark=name)

    ex = bsub.add_parser("export", help="a benchmark's requests as an OpenAI batch file (for run-batch, a service "
                                        "or OpenAI's Batch API; score the output with `vlmguard score`)",
                         description="Write POPE (one split) or CHAIR as an OpenAI batch input file: each line a "
                                     "sample as `vlmguard bench` asks it (the preset's prompt and answer length, "
                                     "greedy, its image), custom_id the question id (CHAIR: the image id). Answer it "
                                     "with `vlmguard run-batch` (or any OpenAI-compatible batch runner), then score "
                                     "the output with `vlmguard score pope --answers OUT --questions FILE` (the "
                                     "file is printed) or `vlmguard score chair --captions OUT --gt GT`.")
    ex.add_argument("benchmark", choices=["pope", "chair"])
    _add_dataset_args(ex)
    ex.add_argument("-o", "--out", type=Path, required=True, help="the batch file to write (JSON Lines)")
    ex.add_argument("--split", default="random", choices=["random", "popular", "adversarial"],
                    help="POPE split (default: %(default)s)")
    ex.add_argument("--prompt-preset", default="llava", choices=sorted(POPE_PROMPTS),
                    help="POPE prompt protocol (default: %(default)s)")
    ex.add_argument("--preset", dest="chair_preset", default="chair512", choices=sorted(CHAIR_PRESETS),
                    help="CHAIR preset (default: %(default)s)")
    ex.add_argument("--prompt", help="CHAIR caption prompt (default: the preset's)")
    ex.add_argument("--model", help="the model id each request names (default: none, the server's default)")
    ex.add_argument("--url", default="/v1/chat/completions", choices=["/v1/chat/completions", "/v1/responses"],
                    help="the endpoint the lines name (default: %(default)s)")
    ex.add_argument("--images", default="data", choices=["data", "file"],
                    help="data: each image's bytes in a data URL (default); file: file:// URLs (for a server that "
                         "reads this disk: run-batch --allowed-local-media-path)")
    ex.add_argument("--limit", type=positive_int, help="only the first N questions (images)")
    ex.add_argument("--pruning", help="vlmguard's pruner (sent in each request's vlmguard object)")
    ex.add_argument("--budget", type=budget_arg, help="its visual-token budget")
    ex.add_argument("--decoding", help="vlmguard's decoder")
    ex.add_argument("--image-aspect", choices=IMAGE_ASPECTS, default="reference",
                    help="how a vlmguard server meets images to its vision tower (default: %(default)s, as `vlmguard "
                         "bench` does: LLaVA-1.5 pads to a square)")
    ex.add_argument("--plain", action="store_true",
                    help="OpenAI's fields only, for servers other than vlmguard (no vlmguard object: no "
                         "--image-aspect, --pruning, --budget or --decoding)")
    ex.add_argument("--json", action="store_true", help="print the summary as one JSON object on the last line")
    ex.set_defaults(func=cmd_export)

    sw = bsub.add_parser("sweep", help="methods x budgets x benchmarks from a YAML config")
    sw.add_argument("config", type=Path)
    sw.add_argument("--db", type=Path, help="results database (default: the config's, else runs/vlmguard.sqlite)")
    sw.add_argument("--limit", type=positive_int, help="override the config's limit")
    sw.add_argument("--no-progress", action="store_true")
    sw.add_argument("--json", action="store_true")
    sw.set_defaults(func=cmd_sweep)

    ml = bsub.add_parser("make-leading", help="write POPE-leading question files derived from a POPE file")
    ml.add_argument("--questions", type=Path, required=True, help="a POPE question file")
    ml.add_argument("--out", type=Path, required=True, help="output folder")
    ml.add_argument("--template", action="append", choices=list(ALL_TEMPLATES), help="default: all six templates")
    ml.add_argument("--json", action="store_true")
    ml.set_defaults(func=cmd_make_leading)

    score = subparsers.add_parser("score", help="score answer / caption files without running a model")
    ssub = score.add_subparsers(dest="score_command", metavar="BENCHMARK")
    ssub.required = True
    sp = ssub.add_parser("pope", help="POPE metrics of an answer file against a question file")
    sp.add_argument("--answers", type=Path, required=True,
                    help="JSON Lines / array: question_id + text|answer; or an OpenAI batch output file (OpenAI's "
                         "Batch API's, `vlmguard run-batch`'s): custom_id the question_id")
    sp.add_argument("--questions", type=Path, required=True, help="POPE question file with labels")
    sp.add_argument("--parser", default="official", choices=PARSERS.names())
    sp.add_argument("--answer-key", help="field holding the answer (default: text, answer, output, ...)")
    sp.add_argument("--label-dir", type=Path,
                    help="for LLaVA's unlabelled llava_pope_test.jsonl: folder with coco_pope_{split}.json label files")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_score_pope)
    sc = ssub.add_parser("chair", help="CHAIR metrics of a caption file")
    sc.add_argument("--captions", type=Path, required=True,
                    help="JSON Lines / array: image_id + caption; or an OpenAI batch output file: custom_id the "
                         "image id")
    sc.add_argument("--gt", type=Path, required=True, help="COCO annotation folder or ground-truth table .json(.gz)")
    sc.add_argument("--image-id-key", default="image_id")
    sc.add_argument("--caption-key", default="caption")
    sc.add_argument("--drop-incomplete", action="store_true", help="drop an unfinished last sentence (64-token preset)")
    sc.add_argument("--gt-cache", type=Path, help="cache the GT built from COCO files as a table here")
    sc.add_argument("--records", type=Path, help="write the per-caption records (JSON Lines) here")
    sc.add_argument("--json", action="store_true")
    sc.set_defaults(func=cmd_score_chair)

    rp = subparsers.add_parser("report", help="tables, CSV and PNG plots from the results database")
    rp.add_argument("--db", type=Path, default=DEFAULT_DB, help="results database (default: %(default)s)")
    rp.add_argument("--out", type=Path, default=Path("runs") / "report", help="output folder (default: %(default)s)")
    rp.add_argument("--json", action="store_true")
    rp.set_defaults(func=cmd_report)

    cp = subparsers.add_parser(
        "compare", help="POPE / CHAIR runs against a baseline run, with paired bootstrap confidence intervals",
        description="Every finished POPE and CHAIR run against the run of its group (same benchmark, model, "
                    "weights and dtype, dataset version, split, questions, prompt and parser) labelled --baseline: "
                    "CHAIR_i and CHAIR_s as relative changes, POPE accuracy in points and as the share of the "
                    "baseline's kept, each with a paired percentile bootstrap interval over images. '*' marks an "
                    "interval that excludes no change.")
    cp.add_argument("--db", type=Path, default=DEFAULT_DB, help="results database (default: %(default)s)")
    cp.add_argument("--baseline", default="base",
                    help="method label of the baseline run, as `vlmguard report` prints it, or its run id where "
                         "one label names several runs of a group (default: %(default)s)")
    cp.add_argument("--benchmark", choices=("pope", "chair"), help="only this benchmark's runs")
    cp.add_argument("--boot", type=positive_int, default=2000, help="bootstrap resamples, 100 to 100000 (default: %(default)s)")
    cp.add_argument("--confidence", type=float, default=0.95, help="interval level (default: %(default)s)")
    cp.add_argument("--seed", type=int, default=0, help="resampling seed (default: %(default)s)")
    cp.add_argument("--json", action="store_true")
    cp.set_defaults(func=cmd_compare)


# ---- bench ------------------------------------------------------------------------------------------

def _dataset_from_args(args: argparse.Namespace):
    from vlmguard.bench.datasets import resolve_dataset

    return resolve_dataset(
        args.dataset, image_split=args.image_split, coco_images=args.coco_images, pope_dir=args.pope_dir,
        pope_set=args.pope_set, coco_annotations=args.coco_annotations, gt=args.gt, image_ids=args.image_ids,
    )


def _spec_from_args(args: argparse.Namespace):
    from vlmguard.bench.runner import default_spec

    if args.budget is not None and args.pruning == "none":
        raise InvalidInput("--budget needs --pruning (the pruning method it is for)")
    if getattr(args, "prompt", None) is not None and not args.prompt.strip():
        raise InvalidInput("--prompt is empty (leave it out for the preset's prompt)")
    pruning_params, decoding_params = cli_method_params(args)
    return default_spec(
        args.benchmark,
        prompt_preset=getattr(args, "prompt_preset", None),
        chair_preset=getattr(args, "chair_preset", None),
        pruning=args.pruning,
        budget=args.budget,
        pruning_params=pruning_params,
        decoding=args.decoding,
        decoding_params=decoding_params,
        max_new_tokens=args.max_new_tokens,
        do_sample=args.do_sample,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        image_aspect=getattr(args, "image_aspect", None),
    )


def benchmark_runs(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The runs one ``bench`` command makes: CHAIR once; POPE per split (x template for pope-leading)."""
    if args.benchmark == "chair":
        return [{}]
    splits = args.split or ["all"]
    splits = ["random", "popular", "adversarial"] if "all" in splits else list(dict.fromkeys(splits))
    templates = (args.template or [None]) if args.benchmark == "pope-leading" else [None]
    return [{"split": s, "template": t} for s in splits for t in templates]


def _resumable(command: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """A command that writes the results database, which on SIGTERM says so in one line and exits 143."""
    @wraps(command)
    def run(args: argparse.Namespace) -> int:
        try:  # the CLI's main turns SIGTERM into Terminated (vlmguard.interrupts)
            return command(args)
        except Terminated:
            print("vlmguard: terminated (SIGTERM); the samples stored so far are kept: rerun the same command to "
                  "resume", file=sys.stderr)
            return 128 + signal.SIGTERM
    return run


@_resumable
def cmd_bench(args: argparse.Namespace) -> int:
    from vlmguard.bench.db import check_db
    from vlmguard.bench.runner import run_benchmark
    from vlmguard.engine import Engine

    spec = _spec_from_args(args)
    spec.resolve()  # unknown methods / bad params fail before the model loads
    dataset = _dataset_from_args(args)
    jobs = benchmark_runs(args)
    check_db(args.db)
    t0 = time.perf_counter()
    engine = Engine.load(args.model, device=args.device, dtype=args.dtype, quantization=args.quantization)
    outcomes = []
    for job in jobs:
        out = run_benchmark(
            engine, args.benchmark, dataset, spec, args.db, prompt_preset=getattr(args, "prompt_preset", None),
            parser=getattr(args, "parser", None), chair_preset=getattr(args, "chair_preset", None),
            prompt=getattr(args, "prompt", None), image_ids_file=args.image_ids, limit=args.limit,
            batch_size=args.batch_size, shard_index=args.shard_index, num_shards=args.num_shards,
            model_name=args.model, progress=not args.no_progress, **job,
        )
        outcomes.append(out)
        if not args.json:
            print(_summary_line(out))
    if args.json:
        _print_json(_bench_json(args, dataset, outcomes, time.perf_counter() - t0))
    return 0


def _summary_line(out) -> str:
    m = out.metrics
    head = f"{out.benchmark} {out.split or ''} {out.variant or ''}".replace("  ", " ").strip()
    if out.benchmark == "chair":
        body = f"CHAIR_s {_f(m.get('chair_s'))} CHAIR_i {_f(m.get('chair_i'))} recall {_f(m.get('recall'))} len {_f(m.get('len'))}"
    else:
        body = f"acc {_f(m.get('accuracy'))} P {_f(m.get('precision'))} R {_f(m.get('recall'))} F1 {_f(m.get('f1'))} yes {_f(m.get('yes_ratio'))}"
        if out.benchmark == "pope-leading":
            body += f" CTR {_f(m.get('ctr'))} syc {_f(m.get('sycophancy'))}"
    flags = f" [{'; '.join(m.get('flags') or [])}]" if m.get("flags") else ""
    return f"{head}: {body} (n={m.get('n')}, run {out.run_id}, {out.status}, {out.elapsed_s:.1f}s){flags}"


def _f(v: Any) -> str:
    return "-" if v is None else f"{v:.2f}"


def _bench_json(args, dataset, outcomes, elapsed: float) -> dict[str, Any]:
    return {
        "benchmark": args.benchmark,
        "model": args.model,
        "dataset": dataset.name,
        "dataset_version": dataset.version,
        "db": str(args.db),
        "elapsed_s": round(elapsed, 3),
        "runs": [o.to_dict() for o in outcomes],
        "metrics": {_metrics_key(o): o.metrics for o in outcomes},
    }


def _metrics_key(o) -> str:
    if o.benchmark == "chair":
        return str(o.variant)
    if o.benchmark == "pope-leading":
        return f"{o.split}/{o.variant}"
    return str(o.split)


@_resumable
def cmd_sweep(args: argparse.Namespace) -> int:
    from vlmguard.bench.sweep import run_sweep

    t0 = time.perf_counter()
    # with --json the last stdout line is the JSON object: the lines of the runs and duplicates go to stderr
    echo = (lambda line: print(line, file=sys.stderr)) if args.json else print
    outcomes = run_sweep(args.config, db=args.db, limit=args.limit, progress=not args.no_progress, echo=echo)
    if args.json:
        _print_json({"config": str(args.config), "elapsed_s": round(time.perf_counter() - t0, 3),
                     "runs": [o.to_dict() | {"knobs": o.knobs} for o in outcomes]})
    return 0


def cmd_make_leading(args: argparse.Namespace) -> int:
    from vlmguard.bench.pope_data import load_pope_file
    from vlmguard.bench.pope_leading import TEMPLATES, write_leading_files
    from vlmguard.files import check_output_dir

    check_output_dir(args.out, "--out")
    pope = load_pope_file(args.questions)
    paths = write_leading_files(pope, args.out, args.template or list(TEMPLATES))
    if args.json:
        _print_json({"source": str(args.questions), "files": [str(p) for p in paths], "questions": len(pope)})
    else:
        for p in paths:
            print(p)
    return 0


# ---- export -----------------------------------------------------------------------------------------

def cmd_export(args: argparse.Namespace) -> int:
    from vlmguard.bench.export import chair_requests, pope_requests, write_batch
    from vlmguard.bench.prompts import get_chair_preset
    from vlmguard.files import check_output_file

    check_output_file(args.out, "--out")
    ds = _dataset_from_args(args)
    options = {k: v for k, v in (("pruning", args.pruning), ("budget", args.budget), ("decoding", args.decoding))
               if v is not None}
    if args.plain and options:
        raise InvalidInput(f"--plain writes no vlmguard object: --{' --'.join(options)} cannot be sent")
    options["image_aspect"] = args.image_aspect
    common = dict(model=args.model, url=args.url, images=args.images, limit=args.limit,
                  vlmguard=None if args.plain else options)
    if args.benchmark == "pope":
        lines, questions = pope_requests(ds, args.split, preset=args.prompt_preset, **common)
        score = f"vlmguard score pope --answers OUTPUT --questions {questions}"
    else:
        lines = chair_requests(ds, preset=args.chair_preset, prompt=args.prompt, image_ids=args.image_ids, **common)
        gt = ds.gt_table or ds.annotations_dir
        drop = " --drop-incomplete" if get_chair_preset(args.chair_preset).drop_incomplete_sentence else ""
        score = f"vlmguard score chair --captions OUTPUT --gt {gt}{drop}"
    n = write_batch(args.out, lines)
    if args.json:
        _print_json({"command": "bench export", "benchmark": args.benchmark, "out": str(args.out),
                     "requests": n, "score": score})
    else:
        print(f"wrote {n} {args.benchmark} requests to {args.out}; answer them (vlmguard run-batch -i "
              f"{args.out} -o OUTPUT ...), then: {score}")
    return 0


# ---- score ------------------------------------------------------------------------------------------

def cmd_score_pope(args: argparse.Namespace) -> int:
    from vlmguard.bench.pope_data import load_pope_file
    from vlmguard.bench.pope_metrics import load_answers, score_answers

    notes: list[str] = []  # which answer field was scored, when records hold several
    answers = load_answers(args.answers, args.answer_key, notes)
    if args.label_dir is not None:
        return _score_llava(args, answers, notes)
    questions = load_pope_file(args.questions)
    m = score_answers(answers, questions, args.parser, args.answers)
    m["flags"][:0] = notes
    m["questions"] = str(args.questions)
    m["answers"] = str(args.answers)
    if args.json:
        _print_json(m)
    else:
        print(f"{args.answers} vs {args.questions} (parser {m['parser']}, n={m['n']})")
        for k in ("accuracy", "precision", "recall", "f1", "yes_ratio"):
            print(f"  {k:<10} {_f(m[k])}")
        print(f"  TP {m['tp']}  FP {m['fp']}  TN {m['tn']}  FN {m['fn']}  unknown {m['unknown']}  missing {m['missing']}")
        for flag in m["flags"]:
            print(f"  note: {flag}")
    return 0


def _score_llava(args: argparse.Namespace, answers, notes: list[str]) -> int:
    from vlmguard.bench.pope_data import SPLITS, load_pope_file
    from vlmguard.bench.pope_metrics import score_llava_answers

    llava = load_pope_file(args.questions, require_label=False)
    split_files = {s: load_pope_file(args.label_dir / f"coco_pope_{s}.json") for s in SPLITS}
    per_split = score_llava_answers(answers, llava, split_files, args.parser, args.answers)
    if args.json:
        _print_json({"questions": str(args.questions), "answers": str(args.answers), "label_dir": str(args.label_dir),
                     "splits": per_split, "flags": notes})
    else:
        for note in notes:
            print(f"note: {note}")
        for split, m in per_split.items():
            print(f"{split:<12} acc {_f(m['accuracy'])} P {_f(m['precision'])} R {_f(m['recall'])} "
                  f"F1 {_f(m['f1'])} yes {_f(m['yes_ratio'])} (n={m['n']}, missing {m['missing']})")
            for flag in m.get("flags") or []:  # (the missing count is on the line above)
                if "have no answer" not in flag:
                    print(f"  note: {flag}")
    return 0


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def cmd_score_chair(args: argparse.Namespace) -> int:
    from vlmguard.bench.chair_gt import load_ground_truth
    from vlmguard.bench.chair_score import load_captions, score_captions
    from vlmguard.bench.jsonio import write_jsonl
    from vlmguard.files import check_output_file

    if args.records:
        for flag, src in (("--captions", args.captions), ("--gt", args.gt), ("--gt-cache", args.gt_cache)):
            if src is not None and _same_file(args.records, src):  # the input would be overwritten by its records
                raise InvalidInput(f"--records {args.records}: is the {flag} file; choose another path")
        check_output_file(args.records, "--records")
    if args.gt_cache and not args.gt_cache.is_file():  # an existing cache is read, a missing one written
        check_output_file(args.gt_cache, "--gt-cache")
    notes: list[str] = []  # batch records without an answer
    caps = load_captions(args.captions, args.image_id_key, args.caption_key, notes)
    gt = load_ground_truth(args.gt, image_ids=[c.image_id for c in caps], cache=args.gt_cache)
    m, records = score_captions(caps, gt, args.captions, drop_incomplete=args.drop_incomplete)
    m["flags"][:0] = notes
    m["captions"] = str(args.captions)
    m["gt"] = str(args.gt)
    if args.json:
        _print_json(m)
    else:
        print(f"{args.captions} (n={m['n']}, GT {args.gt})")
        for k, label in (("chair_s", "CHAIRs"), ("chair_i", "CHAIRi"), ("recall", "Recall"), ("len", "Len")):
            print(f"  {label:<8} {'-' if m[k] is None else f'{m[k]:.1f}'}")
        for flag in m["flags"]:
            print(f"  note: {flag}")
    if args.records:  # after the metrics are out, so a failing write does not lose them
        sys.stdout.flush()
        write_jsonl(args.records, records)
    return 0


# ---- report -----------------------------------------------------------------------------------------

def cmd_compare(args: argparse.Namespace) -> int:
    from vlmguard.bench.compare import compare_runs, format_comparisons
    from vlmguard.bench.db import require_db_file

    require_db_file(args.db)
    unpaired: list[dict[str, Any]] = []
    rows = compare_runs(args.db, args.baseline, benchmark=args.benchmark, n_boot=args.boot,
                        confidence=args.confidence, seed=args.seed, unique_baseline=True, unpaired=unpaired)
    if args.json:
        _print_json({"db": str(args.db), "baseline": args.baseline, "confidence": args.confidence, "boot": args.boot,
                     "seed": args.seed, "comparisons": [r.to_dict() for r in rows], "unpaired": unpaired})
    else:
        print(format_comparisons(rows))
    for u in unpaired:  # a run left out of the table is said so, not dropped in silence
        print(f"note: {u['benchmark']} {u['split'] or ''} {u['method']} (run {u['run_id']}) shares no questions with "
              f"its baseline run {u['baseline_run_id']}: not compared", file=sys.stderr)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from vlmguard.bench.db import require_db_file
    from vlmguard.bench.report import build_report, is_partial
    from vlmguard.files import check_output_dir

    require_db_file(args.db)
    check_output_dir(args.out, "--out")
    rep = build_report(args.db, args.out)
    if args.json:
        _print_json({"db": str(args.db), "out": str(args.out), "files": rep["files"],
                     "skipped_plots": rep["skipped_plots"],
                     # partial: not finished (killed, or still running: the database cannot tell which)
                     "runs": [{**r, "partial": is_partial(r)} for r in rep["rows"]]})
    else:
        print(rep["table"])
        print()
        for f in rep["files"]:
            print(f"wrote {f}")
        for s in rep["skipped_plots"]:
            print(f"skipped {s} (no data)", file=sys.stderr)
    return 0
