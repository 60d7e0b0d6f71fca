"""``vlmguard perf guided``: what structured output (``GenerationSpec.guided``, ``vlmguard/guided.py``) costs per token.

A format's work comes on top of the model's, once per generated token and request: llguidance computes the
matcher's token mask, the engine turns it into a row of allowed tokens and restricts the final scores to it
(``restrict_to_guides``), and the chosen token advances the matcher. That work depends on the vocabulary (its size
and its tokens' bytes), not on the model's weights, and the shapes' stand-in tokenizers have a hundred words. So
it is measured here on a byte-level BPE vocabulary of ``--vocab`` ids (32000: LLaVA-1.5's; 151936: Qwen2-VL's),
trained on a generated text of words, numbers and JSON punctuation, as a decode loop does it: for ``--batch``
requests at once, each step restricts a (batch, vocab) row of scores and advances every matcher by the token it
picked (the best allowed token of random scores; an answer that ends starts over). Per format also: the time to
compile it (a request's first use; later ones copy the compiled matcher), and the tokenizer's one-off set-up.

With ``--shape``, a plain greedy decode step of that model at the same batch is measured in the same run, and
each format's step cost is reported relative to it: the share of a guided token's time the format adds (the two
run one after the other in the decode loop).
"""
from __future__ import annotations

import random
import time
from typing import Any, Callable, Sequence

import torch

from vlmguard.errors import InvalidInput
from vlmguard.perf.timing import environment, median
from vlmguard.tool_calls import Function, ToolUse

TOOLS = (  # two functions a tool format may call (vlmguard/tool_calls.py)
    Function("find_objects", "Boxes of the objects of a category", {
        "type": "object", "additionalProperties": False, "required": ["category", "max_boxes"],
        "properties": {"category": {"type": "string", "maxLength": 24},
                       "max_boxes": {"type": "integer", "minimum": 1, "maximum": 20}}}, strict=True),
    Function("describe_region", None, {
        "type": "object", "additionalProperties": False, "required": ["box"],
        "properties": {"box": {"type": "array", "minItems": 4, "maxItems": 4,
                               "items": {"type": "integer", "minimum": 0, "maximum": 1000}}}}, strict=True))

FORMATS: dict[str, dict[str, Any]] = {
    "json_schema": {"json_schema": {
        "type": "object", "additionalProperties": False, "required": ["objects", "count", "scene"],
        "properties": {"scene": {"enum": ["street", "kitchen", "park", "living room", "sports field"]},
                       "count": {"type": "integer", "minimum": 0, "maximum": 50},
                       "objects": {"type": "array", "maxItems": 8, "items": {
                           "type": "object", "additionalProperties": False, "required": ["name", "box"],
                           "properties": {"name": {"type": "string", "maxLength": 24},
                                          "box": {"type": "array", "minItems": 4, "maxItems": 4,
                                                  "items": {"type": "integer", "minimum": 0, "maximum": 1000}}}}}}}},
    "json_object": {"json_object": True},
    "regex": {"regex": r"(Yes|No), (there (is|are) [0-9]{1,3} [a-z]+( [a-z]+){0,6}\.)"},
    # a forced tool call (tool_choice "required", one call) of one of the two functions
    "tool_call": {"grammar": ToolUse(TOOLS, "required", parallel=False).grammar()},
    # tool_choice "auto" with strict functions: free text without a call's tag, or text and then held calls (the
    # random scores write text: this is what text costs under the grammar)
    "tool_call_auto": {"grammar": ToolUse(TOOLS, "auto").grammar()},
}


def synthetic_vocabulary(size: int, seed: int = 0) -> Any:
    """A byte-level BPE tokenizer (GPT-2's byte alphabet, as Qwen2's) of ``size`` ids, trained on a generated text
    of syllable words, numbers and JSON punctuation (a second or two for 32000 ids)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(seed)
    syllables = [a + b for a in "bcdfghjklmnprstvwz" for b in "aeiouy"] + list("aeiou")
    words = ["".join(rng.choice(syllables) for _ in range(rng.choice((1, 2, 2, 3, 3, 4)))) for _ in range(size * 2)]

    def text():
        for _ in range(max(20000, size)):
            line = [rng.choice(words) if rng.random() < 0.8 else str(rng.randint(0, 10 ** rng.randint(1, 5)))
                    for _ in range(12)]
            yield " ".join(line) + rng.choice([". ", ", ", '": "', '", "', "{", "}", "[", "]", '{"', '"}'])

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(text(), trainers.BpeTrainer(vocab_size=size, special_tokens=["<s>", "</s>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                        show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def check_formats(names: Sequence[str]) -> list[str]:
    unknown = [n for n in names if n not in FORMATS]
    if unknown or not names:
        raise InvalidInput(f"--formats: unknown format(s) {', '.join(unknown) or '(none given)'} "
                           f"(known: {', '.join(FORMATS)})")
    return list(names)


def _steps(tok: Any, width: int, eos: list[int], guided: Any, batch: int, steps: int, seed: int) -> float:
    """Seconds per decode step of ``batch`` guided requests: restrict a (batch, width) row of scores, pick, advance."""
    from vlmguard.guided import new_matcher, restrict_to_guides

    gen = torch.Generator().manual_seed(seed)
    pool = torch.log_softmax(torch.randn(8, batch, width, generator=gen), dim=-1)  # scores to restrict
    matchers = [new_matcher(tok, width, eos, guided) for _ in range(batch)]
    t0 = time.perf_counter()
    for step in range(steps):
        scores, stuck = restrict_to_guides(pool[step % 8], matchers, eos)
        picked = scores.argmax(dim=-1).tolist()
        for j, t in enumerate(picked):
            if t in eos or j in stuck:  # that answer is over: the next request takes its row
                matchers[j] = new_matcher(tok, width, eos, guided)
            else:
                matchers[j].consume_token(t)
    return (time.perf_counter() - t0) / steps


def _decode_steps(shape: str, batches: Sequence[int], repeats: int, warmup: int, seed: int) -> dict[int, float]:
    """Seconds per plain greedy decode step of the shape's random-weight model, per batch size."""
    from vlmguard.perf.decode import run_decode
    from vlmguard.perf.models import load_engine

    out = run_decode(load_engine(shape), ["greedy"], batches=batches, repeats=repeats, warmup=warmup, seed=seed)
    return {r["batch"]: r["per_token_s"] for r in out["rows"]}


def run_guided(formats: Sequence[str], *, vocab: int = 32000, batches: Sequence[int] = (1, 8), steps: int = 64,
               repeats: int = 5, warmup: int = 1, seed: int = 0, shape: str | None = None,
               progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Per format and batch size: compile seconds, seconds per step and per request-token (medians over
    ``repeats``), and with ``shape`` the ratio to that model's greedy decode step at the batch size."""
    from vlmguard.guided import compile_format, compiled_for
    from vlmguard.spec import GuidedOutput

    say = progress or (lambda _msg: None)
    check_formats(formats)
    if vocab < 300:
        raise InvalidInput(f"--vocab must be at least 300 (the byte alphabet and a few merges), got {vocab}")
    t0 = time.perf_counter()
    tok = synthetic_vocabulary(vocab, seed)
    train_s = time.perf_counter() - t0
    eos, width = [tok.eos_token_id], len(tok)
    t0 = time.perf_counter()
    compiled = compiled_for(tok, width, eos)
    tokenizer_s = time.perf_counter() - t0
    decode = _decode_steps(shape, batches, repeats, warmup, seed) if shape else {}
    rows = []
    for name in formats:
        guided = GuidedOutput(**FORMATS[name])
        compile_s = []
        for r in range(warmup + repeats):
            compiled.templates.clear()  # a fresh compile every round, not the cached copy
            t = time.perf_counter()
            compile_format(tok, width, eos, guided)
            if r >= warmup:
                compile_s.append(time.perf_counter() - t)
        for b in batches:
            say(f"guided {name} batch {b}")
            times = [_steps(tok, width, eos, guided, b, steps, seed + r) for r in range(warmup + repeats)][warmup:]
            step = median(times)
            rows.append({"format": name, "batch": b, "compile_s": median(compile_s), "step_s": step,
                         "per_request_token_s": step / b, "decode_step_s": decode.get(b),
                         "relative_to_decode_step": step / decode[b] if decode.get(b) else None})
    return {"command": "perf guided", "vocab": width, "shape": shape, "steps": steps, "repeats": repeats,
            "vocabulary_train_s": train_s, "tokenizer_setup_s": tokenizer_s, "rows": rows, "environment": environment()}


GUIDED_HEAD = ["format", "batch", "compile ms", "ms / step", "µs / request-token", "decode step ms",
               "x decode step"]


def guided_rows(result: dict[str, Any]) -> list[list[Any]]:
    def ms(v):
        return None if v is None else round(v * 1e3, 3)

    return [[r["format"], r["batch"], ms(r["compile_s"]), ms(r["step_s"]), round(r["per_request_token_s"] * 1e6, 1),
             ms(r["decode_step_s"]), None if r["relative_to_decode_step"] is None
             else round(r["relative_to_decode_step"], 4)] for r in result["rows"]]


def guided_table(result: dict[str, Any]) -> str:
    lines = [f"structured output on a {result['vocab']}-id byte-level BPE vocabulary (tokenizer set-up "
             f"{result['tokenizer_setup_s']:.2f} s)" + (f"; decode steps of {result['shape']}" if result["shape"]
                                                         else ""),
             "  ".join(GUIDED_HEAD)]
    lines += ["  ".join("-" if v is None else str(v) for v in row) for row in guided_rows(result)]
    return "\n".join(lines)
