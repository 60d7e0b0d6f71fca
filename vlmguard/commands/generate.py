"""``vlmguard generate``: one image + prompt through any pruner x decoder, printed or as JSON."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from vlmguard.errors import InvalidInput, NonFiniteLogits
from vlmguard.models.quantization import CHOICES as QUANT_CHOICES
from vlmguard.spec import IMAGE_ASPECTS, GenerationSpec, cli_method_params, parse_budget


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="tiny", help="model path, HF cache id (offline), 'tiny' (bundled) or "
                   "'random:FAMILY' (a tiny random-weight model: llava, llava_next, qwen2_vl)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16")
    p.add_argument("--attn", default="auto", help="attention: auto, sdpa, flash_attention_2, eager")
    p.add_argument("--quantization", default="none", choices=QUANT_CHOICES,
                   help="the language model's weights quantized as they load (bitsandbytes; default: none)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow model repos to run their own code")


def add_method_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pruning", default="none", help="visual-token pruning method")
    p.add_argument("--budget", type=budget_arg, default=None,
                   help="visual tokens kept per request, shared by its images (int), or kept fraction (0 < r <= 1)")
    p.add_argument("--pruning-param", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                   help="pruning-method parameters (one or more; repeatable)")
    p.add_argument("--decoding", default="greedy", help="decoding method")
    p.add_argument("--decoding-param", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                   help="decoding-method parameters (one or more; repeatable)")
    # issue 2's `[--param key=value ...]`: several pairs after one --param, or --param repeated
    p.add_argument("--param", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                   help="parameters of either method: each goes to the one that has it (one or more; repeatable)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--min-new-tokens", type=int, default=0,
                   help="no end of sequence before this many tokens (stop strings still end the answer)")
    p.add_argument("--sample", action="store_true", help="sample instead of greedy selection")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--min-p", type=float, default=0.0,
                   help="min-p sampling: leave out tokens less likely than MIN_P x the most likely one's probability "
                        "(0: off)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--presence-penalty", type=float, default=0.0,
                   help="subtracted from the score of every token the answer already has (-2..2)")
    p.add_argument("--frequency-penalty", type=float, default=0.0,
                   help="subtracted once per earlier occurrence of a token in the answer (-2..2)")
    p.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="divides (multiplies, when negative) the scores of tokens the answer already has; 1 = off")
    p.add_argument("--image-aspect", choices=IMAGE_ASPECTS, default="native",
                   help="native (default): the checkpoint's processor as shipped (llava-hf crops the centre square); "
                   "pad: padded to a square first, as LLaVA-1.5 was trained; reference: the family's reference code")


def budget_arg(text: str) -> int | float:
    """The argparse type of every ``--budget`` (generate, bench, perf): visual tokens kept or the kept fraction
    (:func:`vlmguard.spec.parse_budget`); a budget out of range is left to GenerationSpec's one-line error."""
    try:
        return parse_budget(text, check=False)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def positive_int(text: str) -> int:
    """The argparse type of a count that must be at least 1."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {v}")
    return v


def logit_bias_arg(text: str) -> tuple[str, str]:
    """The argparse type of ``--logit-bias``: ``ID=BIAS`` (GenerationSpec checks the id and the bias)."""
    token, eq, bias = text.partition("=")
    if not eq or not token.strip() or not bias.strip():
        raise argparse.ArgumentTypeError(f"expected TOKEN_ID=BIAS (e.g. 2=-100), got {text!r}")
    return token.strip(), bias.strip()


def spec_from_args(args: argparse.Namespace) -> GenerationSpec:
    if args.budget is not None and args.pruning == "none":
        raise InvalidInput("--budget needs --pruning (the pruning method it is for)")
    pruning_params, decoding_params = cli_method_params(args)
    return GenerationSpec.build(
        pruning=args.pruning, budget=args.budget, pruning_params=pruning_params,
        decoding=args.decoding, decoding_params=decoding_params,
        max_new_tokens=args.max_new_tokens, min_new_tokens=args.min_new_tokens,
        do_sample=True if args.sample else None,
        temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p, seed=args.seed,
        logprobs=getattr(args, "logprobs", None), prompt_logprobs=getattr(args, "prompt_logprobs", None),
        presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty, repetition_penalty=args.repetition_penalty,
        image_aspect=args.image_aspect, logit_bias=dict(getattr(args, "logit_bias", None) or []),
        ignore_eos=bool(getattr(args, "ignore_eos", False)), stop_token_ids=getattr(args, "stop_token_id", None) or [],
        choices=getattr(args, "choice", None) or [], guided=guided_from_args(args),
    )


def _text_or_file(text: str, option: str) -> str:
    """An option's value, or the text of the file ``@PATH`` names (read as the project reads text files: a missing
    file, a directory or bytes that are not UTF-8 are one error naming the option and the file)."""
    from vlmguard.bench.jsonio import read_text

    if not text.startswith("@"):
        return text
    try:
        return read_text(text[1:])
    except OSError as e:
        raise InvalidInput(f"{option}: cannot read {text[1:]!r}: {e.strerror or e}") from None
    except InvalidInput as e:
        raise InvalidInput(f"{option}: cannot read {e}") from None


def guided_from_args(args: argparse.Namespace) -> dict[str, Any] | None:
    """The answer's format from ``--json-schema`` / ``--json-object`` / ``--regex`` / ``--grammar`` (one of them;
    GenerationSpec.guided), None when none is given."""
    if getattr(args, "json_schema", None) is not None:
        try:
            schema = json.loads(_text_or_file(args.json_schema, "--json-schema"))
        except ValueError as e:
            raise InvalidInput(f"--json-schema is not JSON: {e}") from None
        if not isinstance(schema, dict):
            raise InvalidInput("--json-schema must be a JSON object (a schema)")
        fields: dict[str, Any] = {"json_schema": schema}
    elif getattr(args, "json_object", False):
        fields = {"json_object": True}
    elif getattr(args, "regex", None) is not None:
        fields = {"regex": args.regex}
    elif getattr(args, "grammar", None) is not None:
        fields = {"grammar": _text_or_file(args.grammar, "--grammar")}
    else:
        return None
    return {**fields, "whitespace": getattr(args, "json_whitespace", "flexible")}


def register(sub) -> None:
    p = sub.add_parser("generate", help="generate from an image and a prompt")
    add_model_args(p)
    p.add_argument("--image", action="append", default=[], help="image file (repeatable)")
    p.add_argument("--image-detail", choices=["auto", "low", "high"], default="auto",
                   help="low: each image fitted within 512 x 512 first, OpenAI's low-detail image (fewer visual "
                        "tokens on Qwen2-VL); auto / high (default): as it is")
    p.add_argument("--prompt", required=True)
    p.add_argument("--raw", action="store_true",
                   help="the prompt as the model reads it, with no chat template: it writes the model's image "
                        "placeholder (<image>, Qwen2-VL's <|vision_start|><|image_pad|><|vision_end|>) once per "
                        "--image (a reference's own prompt string; what /v1/completions sends)")
    add_method_args(p)
    p.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    p.add_argument("--json", action="store_true", help="print one JSON object on the last line")
    p.add_argument("--logprobs", type=int, default=None, metavar="K",
                   help="report each token's log-probability under the decoder's final scores and the K most "
                        "likely tokens (0-20)")
    p.add_argument("--prompt-logprobs", type=int, default=None, metavar="K",
                   help="report each prompt token's log-probability under the model given the tokens before it "
                        "(the whole image seen, no pruner or decoder) and the K most likely tokens (0-20)")
    p.add_argument("--logit-bias", type=logit_bias_arg, action="append", metavar="ID=BIAS",
                   help="add BIAS (-100..100) to token ID's score at every step: -100 all but bans it, 100 all but "
                        "forces it (repeatable; OpenAI's logit_bias)")
    p.add_argument("--ignore-eos", action="store_true",
                   help="hold the end of sequence back: the answer runs to --max-new-tokens unless a stop token ends "
                        "it (vLLM's ignore_eos)")
    p.add_argument("--stop-token-id", type=int, action="append", metavar="ID",
                   help="drawing token ID ends the answer, as the end of sequence does (repeatable; vLLM's "
                        "stop_token_ids)")
    p.add_argument("--choice", action="append", metavar="TEXT",
                   help="the answer must be one of these texts (repeatable: --choice Yes --choice No; vLLM's "
                        "guided_choice)")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json-schema", metavar="SCHEMA", help="the answer is JSON following this schema (JSON text, "
                     "or @FILE; OpenAI's response_format json_schema)")
    fmt.add_argument("--json-object", action="store_true", help="the answer is a JSON object (OpenAI's "
                     "response_format json_object)")
    fmt.add_argument("--regex", metavar="PATTERN", help="the whole answer matches this regular expression (vLLM's "
                     "guided_regex)")
    fmt.add_argument("--grammar", metavar="LARK", help="the answer follows this Lark grammar (text or @FILE; "
                     "llguidance's dialect, vLLM's guided_grammar)")
    p.add_argument("--json-whitespace", choices=["flexible", "compact"], default="flexible",
                   help="JSON answers: any whitespace JSON allows, or none outside strings (default: flexible)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vlmguard.engine import Engine, Request
    from vlmguard.images import load_image, low_detail

    spec = spec_from_args(args)
    images = [load_image(p) for p in args.image]
    if args.image_detail == "low":
        images = [low_detail(image) for image in images]
    if not args.prompt.strip():
        raise InvalidInput("--prompt is empty")
    spec.resolve()  # validate methods and parameters before loading the model
    engine = Engine.load(args.model, device=args.device, dtype=args.dtype, attn_implementation=args.attn,
                         trust_remote_code=args.trust_remote_code, quantization=args.quantization)
    request = Request(prompt=args.prompt, images=images, raw_prompt=args.raw)
    result = None
    for ev in engine.stream([request], spec):
        if args.stream and not args.json and ev.text:
            sys.stdout.write(ev.text)
            sys.stdout.flush()
        if ev.done:
            result = ev.result
    assert result is not None
    if result.error:
        if args.stream and not args.json:
            sys.stdout.write("\n")
        kind = InvalidInput if result.error_code == "FormatDeadEnd" else NonFiniteLogits
        raise kind(f"{result.error} (generated before: {result.text!r})")
    if args.json:
        out = {
            "text": result.text,
            "tokens": result.token_ids,
            "finish_reason": result.finish_reason,
            "prompt_tokens": result.prompt_tokens,
            "visual_tokens": result.visual_tokens,
            "visual_tokens_kept": result.visual_tokens_kept,
            "kept_indices": result.kept_indices,
            "timings": result.to_dict()["timings"],
            "prefill_flops": result.prefill_flops,
            "pruning": result.pruning,
            "decoding": result.decoding,
            # per generated token: the main branch's probability, the contrast branch's and the final score
            "steps": result.to_dict()["steps"],
            "model": engine.model_name,
        }
        for key in ("logprobs", "prompt_logprobs"):
            if getattr(result, key) is not None:
                out[key] = result.to_dict()[key]
        print(json.dumps(out))
        return 0
    if args.stream:
        sys.stdout.write("\n")
    else:
        print(result.text)
    if result.prompt_logprobs is not None:
        print("prompt:")
        _print_entries(result.prompt_logprobs)
        print("answer:" if result.logprobs else "")
    _print_entries(result.logprobs or [])
    return 0


def _print_entries(entries) -> None:
    """One line per log-probability entry: the token, its log-probability (- where it has none) and the top ones."""
    for e in entries:
        top = "  ".join(f"{t.token!r} {t.logprob:.3f}" for t in e.top)
        value = "-" if e.logprob is None else f"{e.logprob:.3f}"
        print(f"{e.token!r:>16} {value:>9}" + (f"   top: {top}" if top else ""))
