"""``vlmguard perf prefill|decode|prefix|chat|serve|routing|gemm|guided|plot``: speed measured as ratios within one run
(never timed tests)."""
from __future__ import annotations

import argparse
import sys
from typing import Any

from vlmguard.commands.generate import budget_arg
from vlmguard.errors import InvalidInput
from vlmguard.models.quantization import CHOICES as QUANT_CHOICES
from vlmguard.workers.config import DEFAULT_ROUTING_SPILL_QUEUE as DEFAULT_SPILL_QUEUE

# the formats of vlmguard/perf/guided.py's FORMATS (named here so that parsing the command line imports no torch)
GUIDED_FORMATS = ("json_schema", "json_object", "regex", "tool_call", "tool_call_auto")

DEFAULT_SHAPE = "llava-1.5-7b-cpu"


def _csv(kind):
    def parse(text: str) -> list:
        items = [t.strip() for t in text.split(",")]
        if not any(items):
            raise argparse.ArgumentTypeError("expected a comma-separated list")
        if not all(items):
            raise argparse.ArgumentTypeError(f"empty item in {text!r}")
        try:
            return [kind(t) for t in items]
        except ValueError:
            raise argparse.ArgumentTypeError(f"bad list {text!r}") from None
    return parse


def _method_list(text: str) -> list[str]:
    """Comma-separated methods; a method may carry parameters, ``flowcut[qwen_vit_keep=0;history=0.5]``."""
    items, depth, cur = [], 0, ""
    for ch in text:
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            items.append(cur)
            cur = ""
        else:
            cur += ch
    items = [t.strip() for t in items + [cur]]
    if not any(items):
        raise argparse.ArgumentTypeError("expected a comma-separated list")
    if not all(items):
        raise argparse.ArgumentTypeError(f"empty item in {text!r}")
    return items  # each one is parsed (with a one-line error for a bad one) by perf.prefill.parse_method


def _think(text: str) -> float:
    v = float(text)
    if not 0 <= v <= 600:
        raise argparse.ArgumentTypeError(f"must be in [0, 600] seconds, got {text}")
    return v


def _positive(text: str) -> int:
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError("must be >= 1")
    return v


MAX_BATCH = 1024  # images are built before anything runs: a typo of 80000000 would exhaust memory, not fail


def _other_chats(text: str) -> int:
    v = int(text)
    if not 0 <= v <= MAX_BATCH:
        raise argparse.ArgumentTypeError(f"must be in [0, {MAX_BATCH}], got {v}")
    return v


def _batch(text: str) -> int:
    v = _positive(text)
    if v > MAX_BATCH:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_BATCH}, got {v}")
    return v


def _nonneg(text: str) -> int:
    v = int(text)
    if v < 0:
        raise argparse.ArgumentTypeError("must be >= 0")
    return v


def _seed(text: str) -> int:
    v = int(text)
    if not 0 <= v <= 2**63 - 1:  # what numpy's and torch's generators take
        raise argparse.ArgumentTypeError(f"must be in [0, 2**63-1], got {v}")
    return v


def _common(p: argparse.ArgumentParser, shape: str = DEFAULT_SHAPE) -> None:
    p.add_argument("--shape", default=shape,
                   help=f"model shape (default {shape}; e.g. llava-1.5-7b, llava-next-7b, qwen2-vl-7b, "
                        "their -cpu variants, random:llava, tiny, or a local model path)")
    p.add_argument("--attn", default="auto", help="auto | sdpa | flash_attention_2 | eager")
    p.add_argument("--quantization", default="none", choices=QUANT_CHOICES,
                   help="the language model's weights quantized as they load (bitsandbytes; a benchmark shape is "
                        "saved to a temporary directory first)")
    _measurement(p)


def _measurement(p: argparse.ArgumentParser) -> None:
    """Where and how a benchmark runs and reports (every perf command's options but --shape and --attn)."""
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16 | float16")
    p.add_argument("--threads", type=_positive, default=None, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--repeats", type=_positive, default=5, help="timed rounds (median reported)")
    p.add_argument("--warmup", type=_nonneg, default=1, help="untimed rounds first")
    p.add_argument("--seed", type=_seed, default=0)
    p.add_argument("--out", default=None, help="also write the JSON report to this file")
    p.add_argument("--plot", default=None, help="write a figure of the results to this file (.png, .pdf, .svg, ...)")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    p.add_argument("--json", action="store_true", help="print one JSON object on the last line")


def _pruning_options(p) -> None:
    p.add_argument("--pruning", default=None, help="compose a pruner with every decoder (needs --budget)")
    p.add_argument("--budget", type=budget_arg, default=None,
                   help="the composed pruner's budget: visual tokens kept, or a ratio in (0, 1]")


def _check_pruning(args) -> None:
    """``--pruning`` and ``--budget`` come together (``none`` takes no budget)."""
    if (args.pruning is None) != (args.budget is None) and args.pruning not in (None, "none"):
        raise InvalidInput("--pruning needs --budget (visual tokens kept, or a ratio)")
    if args.budget is not None and args.pruning in (None, "none"):  # it was silently dropped
        raise InvalidInput("--budget needs --pruning (the pruning method it is for)")


def register(subparsers) -> None:
    perf = subparsers.add_parser("perf", help="performance benchmarks (prefill, decode, serving)",
                                 description="Speed as ratios measured within one run: prefill per pruning method "
                                             "and budget against no pruning and the FLOP ideal, decode per decoder "
                                             "against greedy, shared prefixes against none, a chat's turns with "
                                             "and without a prefix cache, the Ray service against "
                                             "the Engine, routing by image against by load (routing), matrix "
                                             "products per token count (gemm), structured output's work per token "
                                             "(guided), and plots of saved runs.")
    sub = perf.add_subparsers(dest="perf_command", metavar="PERF_COMMAND")
    sub.required = True

    p = sub.add_parser("prefill", help="prefill time / TTFT per pruning method and budget vs the FLOP ideal")
    _common(p)
    p.add_argument("--methods", type=_method_list, default=["none", "flowcut", "adaptinfer", "fastv", "random"],
                   help="comma-separated pruning methods, each NAME or NAME[KEY=VALUE;...] with its parameters "
                        "(e.g. flowcut[qwen_vit_keep=0])")
    p.add_argument("--budgets", type=_csv(budget_arg), default=None,
                   help="comma-separated budgets: visual tokens kept per request, or ratios in (0, 1] (default: "
                        "LLaVA-1.5's 192,128,64 of 576, scaled to the shape's visual tokens: 48,32,16 of 144 on tiny)")
    p.add_argument("--batch", type=_batch, default=1, help="requests per prefill (default: 1)")
    p.set_defaults(func=cmd_prefill)

    d = sub.add_parser("decode", help="per-token decode time of each decoding method relative to greedy")
    _common(d)
    d.set_defaults(repeats=3)
    d.add_argument("--decoders", type=_method_list, default=["greedy", "vcd", "m3id", "vista", "iava", "lqcd"],
                   help="comma-separated decoding methods, each NAME or NAME[KEY=VALUE;...] with its parameters "
                        "(e.g. vcd[alpha=0.5])")
    d.add_argument("--batch", type=_csv(_batch), default=[1, 8], help="batch sizes, e.g. 1,8")
    _pruning_options(d)
    d.add_argument("--new-tokens", type=int, default=16, help="tokens generated per request")
    d.set_defaults(func=cmd_decode)

    s = sub.add_parser("serve", help="requests/s and tokens/s of the Ray service vs the Engine directly")
    _common(s, shape="tiny")
    s.set_defaults(repeats=3, warmup=1)
    s.add_argument("--clients", type=_csv(_positive), default=[1, 4, 16], help="concurrent clients, e.g. 1,4,16")
    s.add_argument("--requests", type=_positive, default=32,
                   help="requests per measurement and round (split over the clients); throughput is taken over "
                        "the steady part, without the first and last `clients` answers")
    s.add_argument("--new-tokens", type=int, default=16)
    s.add_argument("--decoding", default="greedy",
                   help="decoding method of every request (e.g. vcd: contrastive requests, two rows each)")
    s.add_argument("--mixed-settings", action="store_true",
                   help="requests with their own settings: 0.5x, 1x and 1.5x --new-tokens in turn, every other one "
                        "sampling (temperature 0.7) with its own seed")
    s.add_argument("--max-batch", type=_positive, default=16, help="batch size limit of the batching service")
    s.add_argument("--batch-wait-ms", type=float, default=10.0, help="batching window of the service")
    s.add_argument("--batch-mode", choices=["inflight", "whole"], default="inflight",
                   help="the batching service's scheduling: requests join the running batch between decode steps "
                        "(inflight) or the next batch forms when the engine is free (whole)")
    s.add_argument("--ingress", choices=["model", "separate"], default="model",
                   help="service topology: the model replica serves HTTP itself (model, the one-model default of "
                        "`vlmguard serve`) or behind a separate FastAPI ingress deployment")
    s.add_argument("--direct-ingress", action="store_true",
                   help="Ray Serve direct ingress: clients call the replicas' own HTTP servers, not the Serve proxy")
    s.add_argument("--throughput-optimized", action="store_true",
                   help="Ray Serve's throughput-optimized mode (RAY_SERVE_THROUGHPUT_OPTIMIZED; implies "
                        "--direct-ingress)")
    s.add_argument("--no-ray", action="store_true", help="measure the direct Engine only")
    s.set_defaults(func=cmd_serve)

    r = sub.add_parser("routing", help="multi-turn chats on a service of several replicas, routed by image against "
                                       "by load alone: prefix cache hits and latency per turn")
    _common(r, shape="tiny")
    r.set_defaults(repeats=3, warmup=1)
    r.add_argument("--replicas", type=_positive, default=2, help="replicas of each app (default: 2)")
    r.add_argument("--conversations", type=_positive, default=16,
                   help="conversations per round, each about an image of its own (default: 16)")
    r.add_argument("--turns", type=_positive, default=3, help="questions per conversation (default: 3)")
    r.add_argument("--clients", type=_positive, default=4, help="conversations held at once (default: 4)")
    r.add_argument("--new-tokens", type=_positive, default=8, help="tokens per answer (default: 8)")
    r.add_argument("--prefix-cache-mb", type=float, default=1024.0,
                   help="each replica's prefix cache in MiB (default: 1024)")
    r.add_argument("--spill-queue", type=_positive, default=DEFAULT_SPILL_QUEUE,
                   help="image affinity's routing_spill_queue: requests more in an image's home's queue than in the "
                        f"shortest other before the others go first (default: {DEFAULT_SPILL_QUEUE})")
    r.add_argument("--think-s", type=_think, default=0.0,
                   help="seconds a conversation waits between an answer and its next question (default: 0)")
    r.set_defaults(func=cmd_routing)

    x = sub.add_parser("prefix", help="prefill of batches that ask several questions about each image, with shared "
                                      "prefixes against without")
    _common(x, shape="tiny")
    x.add_argument("--decoders", type=_method_list, default=["greedy", "lqcd"],
                   help="comma-separated decoding methods, each NAME or NAME[KEY=VALUE;...] (default: greedy,lqcd; "
                        "LQCD's query variants share their image too)")
    x.add_argument("--batch", type=_batch, default=12, help="requests per prefill (default: 12)")
    x.add_argument("--questions-per-image", type=_positive, default=6,
                   help="consecutive requests about each image (default: 6, as POPE asks)")
    _pruning_options(x)
    x.add_argument("--cache", action="store_true",
                   help="also measure the batch from a warm prefix cache (an earlier batch asked other questions "
                        "about the same images, as a chat's next turn does)")
    x.set_defaults(func=cmd_prefix)

    c = sub.add_parser("chat", help="each turn of a conversation about an image: its prefill with no prefix cache, "
                                    "one of image prefixes and one that keeps the conversation's history")
    _common(c)
    c.set_defaults(repeats=3)
    c.add_argument("--turns", type=_positive, default=4, help="questions in the conversation (default: 4)")
    c.add_argument("--answer-tokens", type=_positive, default=64,
                   help="tokens in each answer, which the next turn's history carries (default: 64)")
    c.add_argument("--other-chats", type=_other_chats, default=0,
                   help="other conversations about the same image in the cache before the turns (each setting, "
                        "each round; not timed): what a turn's lookup chooses among (default: 0)")
    c.add_argument("--own-answers", action="store_true",
                   help="the history carries the model's own answers (greedy, up to --answer-tokens each) instead of "
                        "a scripted one: the next turn can take the answer from the cache too")
    c.add_argument("--decoding", default="greedy",
                   help="every turn's decoder, NAME or NAME[KEY=VALUE;...] (default: greedy; e.g. vcd: each turn "
                        "also prefills the decoder's branch rows)")
    c.add_argument("--text-only", action="store_true",
                   help="a conversation without an image: the prefix cache anchors it by its first tokens (the image "
                        "prefixes setting then keeps nothing, as it did for text before)")
    c.add_argument("--image-at", type=_positive, default=1, metavar="K",
                   help="the image comes with the K-th question, the turns before it have none (default: 1): that "
                        "turn takes the history before the image from the cache")
    _pruning_options(c)
    c.set_defaults(func=cmd_chat)

    g = sub.add_parser("gemm", help="the rate of a shape's decoder-layer matrix products at each token count, "
                                    "weights streamed and warm: the ceiling of a pruned prefill's LLM")
    g.add_argument("--shape", default=DEFAULT_SHAPE, help=f"a named model shape (default {DEFAULT_SHAPE})")
    g.add_argument("--tokens", type=_csv(_positive), default=[628, 244, 180, 116],
                   help="token counts, the first the reference (default: what `perf prefill` feeds LLaVA-1.5: 576 "
                        "visual + 52 text tokens, then 192 / 128 / 64 kept + 52)")
    g.add_argument("--layers", type=_positive, default=None, help="layers of weights streamed (default: the shape's)")
    _measurement(g)
    g.set_defaults(repeats=7, func=cmd_gemm)

    gd = sub.add_parser("guided", help="what structured output (JSON schema, JSON object, regex, a forced tool "
                                      "call, text under strict tools) adds to each generated token, on a vocabulary "
                                      "of a real checkpoint's size")
    gd.add_argument("--formats", type=_csv(str), default=list(GUIDED_FORMATS),
                    help=f"comma-separated: {', '.join(GUIDED_FORMATS)} (default: all)")
    gd.add_argument("--vocab", type=_positive, default=32000,
                    help="ids of the byte-level BPE vocabulary measured on (default 32000, LLaVA-1.5's; Qwen2-VL: "
                         "151936)")
    gd.add_argument("--batch", type=_csv(_positive), default=[1, 8], help="requests per step (default 1,8)")
    gd.add_argument("--steps", type=_positive, default=64, help="decode steps timed per round (default 64)")
    gd.add_argument("--shape", default=None, help="also time a plain greedy decode step of this shape at each batch "
                    "size, and report the format's work relative to it")
    _measurement(gd)
    gd.set_defaults(repeats=5, func=cmd_guided)

    pl = sub.add_parser("plot", help="draw the PNG figure of a saved perf JSON report")
    pl.add_argument("report", help="a JSON file written with --out")
    pl.add_argument("--out", required=True, help="figure path (.png, .pdf, .svg, ...)")
    pl.add_argument("--markdown", action="store_true", help="also print the report's table as markdown")
    pl.set_defaults(func=cmd_plot)


def _progress(args) -> Any:
    if args.quiet:
        return None
    return lambda msg: print(f"[perf] {msg}", file=sys.stderr, flush=True)


def _engine(args):
    from vlmguard.perf.models import load_engine
    from vlmguard.perf.timing import set_threads

    set_threads(args.threads)
    return load_engine(args.shape, device=args.device, dtype=args.dtype, attn=args.attn, seed=args.seed,
                       quantization=args.quantization)


def _check_outputs(args) -> None:
    """--out and --plot are checked before the (long) measurement, not after it."""
    from vlmguard.files import check_output_file, check_plot_path

    if args.out:
        check_output_file(args.out, "--out")
    if args.plot:
        check_plot_path(args.plot, "--plot")


def _finish(args, result: dict[str, Any], text: str) -> int:
    """Print the results first, then write the files: a failing write never loses a measurement."""
    from vlmguard.perf.report import emit

    emit(result, text, args.json, args.out)
    if args.plot:
        from vlmguard.perf.plots import plot_report

        plot_report(result, args.plot)
    return 0


def cmd_prefill(args) -> int:
    from vlmguard.perf.prefill import check_configs, prefill_table, run_prefill

    _check_outputs(args)
    check_configs(args.methods, args.budgets or [64])  # names, parameters and budgets before the model loads
    engine = _engine(args)
    budgets = args.budgets or default_budgets(engine)
    result = run_prefill(engine, args.methods, budgets, batch=args.batch, repeats=args.repeats,
                         warmup=args.warmup, seed=args.seed, progress=_progress(args))
    return _finish(args, result, prefill_table(result))


def default_budgets(engine) -> list[int]:
    """LLaVA-1.5's 192 / 128 / 64 of 576 visual tokens, scaled to the visual tokens of the shape's benchmark image
    (the same three on a 576-token shape)."""
    from vlmguard.perf.models import bench_encoding

    n_visual = int(bench_encoding(engine).image_token_mask.sum())
    return [max(1, round(n_visual * k / 576)) for k in (192, 128, 64)]


def cmd_decode(args) -> int:
    from vlmguard.perf.decode import check_decoders, decode_table, run_decode

    _check_pruning(args)
    _check_outputs(args)
    check_decoders(args.decoders, args.pruning, args.budget, args.new_tokens)  # before the model loads
    engine = _engine(args)
    result = run_decode(engine, args.decoders, args.batch, pruning=args.pruning, budget=args.budget,
                        new_tokens=args.new_tokens, repeats=args.repeats, warmup=args.warmup, seed=args.seed,
                        progress=_progress(args))
    return _finish(args, result, decode_table(result))


def cmd_prefix(args) -> int:
    from vlmguard.perf.prefix import check_prefix_decoders, prefix_table, run_prefix

    _check_pruning(args)
    _check_outputs(args)
    check_prefix_decoders(args.decoders, args.pruning, args.budget)  # before the model loads
    engine = _engine(args)
    result = run_prefix(engine, args.decoders, batch=args.batch, questions=args.questions_per_image,
                        repeats=args.repeats, warmup=args.warmup, seed=args.seed, progress=_progress(args),
                        cache=args.cache, pruning=args.pruning, budget=args.budget)
    return _finish(args, result, prefix_table(result))


def cmd_serve(args) -> int:
    from vlmguard.perf.serve import run_serve, serve_table

    _check_outputs(args)
    result = run_serve(args, progress=_progress(args))
    return _finish(args, result, serve_table(result))


def cmd_chat(args) -> int:
    from vlmguard.perf.chat import chat_spec, chat_table, check_image_at, check_text_only, run_chat

    _check_pruning(args)
    _check_outputs(args)
    check_text_only(args.text_only, args.pruning)
    check_image_at(args.image_at, args.turns, args.text_only)
    chat_spec(args.pruning, args.budget, decoding=args.decoding).resolve()  # before the model loads
    engine = _engine(args)
    result = run_chat(engine, turns=args.turns, answer_tokens=args.answer_tokens, repeats=args.repeats,
                      warmup=args.warmup, seed=args.seed, pruning=args.pruning, budget=args.budget,
                      other_chats=args.other_chats, own_answers=args.own_answers, text_only=args.text_only,
                      decoding=args.decoding, image_at=args.image_at, progress=_progress(args))
    return _finish(args, result, chat_table(result))


def cmd_routing(args) -> int:
    from vlmguard.perf.routing import routing_table, run_routing

    _check_outputs(args)
    result = run_routing(args, progress=_progress(args))
    return _finish(args, result, routing_table(result))


def cmd_gemm(args) -> int:
    from vlmguard.engine import pick_device, pick_dtype
    from vlmguard.perf.gemm import gemm_table, run_gemm
    from vlmguard.perf.timing import set_threads

    _check_outputs(args)
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    set_threads(args.threads)
    result = run_gemm(args.shape, args.tokens, layers=args.layers, device=device, dtype=dtype, repeats=args.repeats,
                      warmup=args.warmup, seed=args.seed, progress=_progress(args))
    return _finish(args, result, gemm_table(result))


def cmd_guided(args) -> int:
    from vlmguard.perf.guided import check_formats, guided_table, run_guided
    from vlmguard.perf.timing import set_threads

    _check_outputs(args)
    check_formats(args.formats)
    if args.shape:
        from vlmguard.perf.models import check_shape

        check_shape(args.shape)  # an unknown name before the vocabulary is trained
    set_threads(args.threads)
    result = run_guided(args.formats, vocab=args.vocab, batches=args.batch, steps=args.steps, repeats=args.repeats,
                        warmup=args.warmup, seed=args.seed, shape=args.shape, progress=_progress(args))
    return _finish(args, result, guided_table(result))


def cmd_plot(args) -> int:
    import json
    from pathlib import Path

    from vlmguard.files import check_plot_path
    from vlmguard.perf.plots import plot_report

    check_plot_path(args.out, "--out")
    from vlmguard.perf.report import markdown

    path = Path(args.report)
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise InvalidInput(f"{path} is not a JSON report: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise InvalidInput(f"{path} is not a JSON report: {e}") from None
    if not isinstance(result, dict) or "rows" not in result:
        raise InvalidInput(f"{path} is not a vlmguard perf report")
    try:  # a row without the fields of its command's report is the file's problem, not a crash
        plot_report(result, args.out)
        table = markdown(result) if args.markdown else None
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
        raise InvalidInput(f"{path} is not a vlmguard perf report ({type(e).__name__}: {e})") from None
    if table is not None:
        print(table)
    print(args.out)
    return 0
