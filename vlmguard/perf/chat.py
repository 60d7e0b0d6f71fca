"""``vlmguard perf chat``: the prefill of each turn of one conversation about an image (the history asked again
with every new question, as a chat client sends it), with no prefix cache, with one that keeps image prefixes
only, and with one that keeps a conversation's history (``PrefixCache.min_tail``, the default).

The conversation is scripted: ``turns`` questions, each answer a fixed description cut to ``answer_tokens``
tokens (the prefix cache keeps prompts, so whose answers they are does not matter). Then ``warmup`` + ``repeats``
rounds; in each the three settings take turns, each with a new cache, and each replays the turns in order
(prefill and the first token). Per turn: the prompt's tokens, the tokens it took from the cache per setting,
median prefill seconds (a decoder's pre-pass, IAVA's or VISTA's, + vision tower + projector, or the vision-side
pruner, + LLM prefill) per setting and their ratios, and whether every setting gave the same first token.

With ``other_chats`` K, each setting's cache first takes K other conversations about the same image (each its own
first question, its answer and a second question, prefilled 8 at a time, not timed): with the history kept, K
entries begin with the image prefix, and every turn's lookup chooses among them (``PrefixCache._best``).

With ``text_only``, the conversation has no image: its prompts are anchored by their first tokens
(``prefix_cache.TEXT_ANCHOR``), the image-prefix setting keeps nothing for them (what the cache did for every
text-only prompt before), and the history setting keeps the conversation as it does one about an image.

With ``image_at`` K > 1, the image comes with the K-th question (the turns before it have none, as in a chat that
began without one): that turn takes the history before the image from the cache (its first tokens anchor it, as a
text-only prompt's do), the image-prefix setting nothing.

With ``own_answers``, the history carries the model's own answers (greedy, up to ``answer_tokens`` each, generated
in each setting as it replays the turns; the timings are still the prefill's): a finished request's answer is
then kept with its prompt (``PrefixCache.store_answer``), and where the answer's text reads back as the tokens the
model chose (a trained model's; a random-weight one's rarely does), the next turn computes only its new question.
"""
from __future__ import annotations

from typing import Any

from vlmguard.perf.models import bench_image, warm_threads
from vlmguard.perf.timing import environment, median, ratio
from vlmguard.results import Request
from vlmguard.spec import GenerationSpec

QUESTIONS = ("Describe this image in detail.", "What colors stand out in it?", "Is there anything on the left?",
             "What might happen next?", "Which object is the largest?", "Is it indoors or outdoors?")
SETTINGS = ("none", "image", "conversation")  # no cache; image prefixes only; the conversation's history too
NEVER = 1 << 62  # a min_tail no prompt reaches: image prefixes only


ANSWER = ("The picture shows a quiet street in the late afternoon. A red car is parked beside a wooden bench, and a "
          "woman in a blue coat walks a small brown dog past a bakery whose window is full of bread. Two bicycles lean "
          "against a lamp post, a pigeon stands on the curb, and behind the buildings the sky turns orange. ")


def check_text_only(text_only: bool, pruning: str | None) -> None:
    """A conversation without an image has nothing to prune."""
    if text_only and pruning not in (None, "none"):
        from vlmguard.errors import InvalidInput

        raise InvalidInput(f"--text-only: a conversation without an image has no visual tokens for {pruning} to prune; "
                           "drop --pruning")


def check_image_at(image_at: int, turns: int, text_only: bool) -> None:
    """The question the image comes with: one of the conversation's, in a conversation with an image."""
    from vlmguard.errors import InvalidInput

    if text_only and image_at != 1:
        raise InvalidInput("--image-at: a --text-only conversation has no image to bring in")
    if not 1 <= image_at <= turns:
        raise InvalidInput(f"--image-at {image_at}: the conversation has {turns} questions (--turns)")


def chat_spec(pruning: str | None, budget: int | float | None, max_new_tokens: int = 1,
              decoding: str = "greedy") -> GenerationSpec:
    """A turn's replay: its prefill and first token (or an answer of up to ``max_new_tokens``); ``decoding``: NAME
    or NAME[KEY=VALUE;...], every turn's decoder."""
    from vlmguard.perf.prefill import parse_method

    name, params = parse_method(decoding)
    return GenerationSpec.build(pruning=pruning or "none", budget=budget if pruning else None, decoding=name,
                                decoding_params=params, max_new_tokens=max_new_tokens, diagnostics=False)


def answer_text(tokenizer: Any, tokens: int) -> str:
    """A plausible answer of ``tokens`` tokens alone (a fixed description, repeated as needed, of the words the
    tokenizer knows): the history a conversation carries, the same on any model, whatever a random-weight model
    would say."""
    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    words = known_words(tokenizer)
    text = ""
    while count(text) < tokens:
        text = f"{text} {words[len(text.split()) % len(words)]}".strip()
    return text


def known_words(tokenizer: Any) -> list[str]:
    """The words of the scripted answer the tokenizer has tokens for (a random-weight shape's small vocabulary
    reads others, digits among them, as its unknown token)."""
    unk = getattr(tokenizer, "unk_token_id", None)
    words = [w for w in dict.fromkeys(ANSWER.split())
             if unk is None or unk not in tokenizer(w, add_special_tokens=False)["input_ids"]]
    return words or ["yes"]


def other_openings(tokenizer: Any, k: int) -> list[str]:
    """``k`` first questions, each its own: the first question with two known words after it, a pair for each."""
    words = known_words(tokenizer)
    pairs = [(a, b) for a in words for b in words][:k]
    if len(pairs) < k:
        from vlmguard.errors import InvalidInput

        raise InvalidInput(f"--other-chats {k}: this model's tokenizer knows {len(words)} of the script's words, "
                           f"enough for {len(pairs)} other chats")
    return [f"{QUESTIONS[0]} Mind the {a} {b}." for a, b in pairs]


def chat_prompts(engine: Any, image: Any, turns: int, answer: str, opening: str | None = None,
                 image_at: int = 1) -> list[Request]:
    """The conversation's turns about ``image`` (None: a conversation without one; it comes with question
    ``image_at``) as requests: templated prompts, each with the history before it (the earlier questions, each
    answered ``answer``); ``opening``: another first question."""
    messages: list[dict[str, Any]] = []
    requests = []
    for k in range(turns):
        requests.append(next_turn(engine, image, messages, opening if k == 0 and opening else None, image_at))
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return requests


def next_turn(engine: Any, image: Any, messages: list[dict[str, Any]], question: str | None = None,
              image_at: int = 1) -> Request:
    """The next question of the conversation in ``messages`` (the script's, or ``question``) added to it, and the
    request that asks it: the whole conversation, templated, the image (if any) with question ``image_at``."""
    k = sum(m["role"] == "user" for m in messages)
    text = question or QUESTIONS[k % len(QUESTIONS)]
    with_image = image is not None and k + 1 >= image_at
    content = ([{"type": "image"}] if with_image and k + 1 == image_at else []) + [{"type": "text", "text": text}]
    messages.append({"role": "user", "content": content})
    return Request(engine.adapter.format_messages(messages), [image] if with_image else [], raw_prompt=True)


def run_chat(engine: Any, turns: int = 4, answer_tokens: int = 64, repeats: int = 3, warmup: int = 1,
             seed: int = 0, pruning: str | None = None, budget: int | float | None = None, cache_mb: float = 4096,
             other_chats: int = 0, own_answers: bool = False, text_only: bool = False, decoding: str = "greedy",
             image_at: int = 1, progress=None) -> dict[str, Any]:
    check_text_only(text_only, pruning)
    check_image_at(image_at, turns, text_only)
    first = chat_spec(pruning, budget, decoding=decoding)
    first.resolve()
    turn_spec = chat_spec(pruning, budget, answer_tokens, decoding) if own_answers else first
    image = None if text_only else bench_image(engine, seed)
    answer = answer_text(engine.adapter.tokenizer, answer_tokens)
    requests = chat_prompts(engine, image, turns, answer, image_at=image_at)
    others = [chat_prompts(engine, image, 2, answer, opening=text)[1]
              for text in other_openings(engine.adapter.tokenizer, other_chats)]
    entries = {s: 0 for s in SETTINGS}
    warm_threads()
    before = engine.prefix_cache
    times = {s: [[] for _ in requests] for s in SETTINGS}
    took = {s: [0] * len(requests) for s in SETTINGS}
    took_rows = {s: [0] * len(requests) for s in SETTINGS}  # the decoder's branch rows included
    tokens = {s: [None] * len(requests) for s in SETTINGS}
    prompt_tokens = [0] * len(requests)
    answered = [0] * len(requests)
    try:
        for rep in range(warmup + repeats):
            for setting in SETTINGS:
                engine.prefix_cache = None
                if setting != "none":
                    cache = engine.enable_prefix_cache(cache_mb)
                    if setting == "image":
                        cache.min_tail = NEVER
                    for j in range(0, len(others), 8):
                        engine.generate(others[j:j + 8], first)
                    entries[setting] = len(cache)
                messages: list[dict[str, Any]] = []
                for k, request in enumerate(requests):
                    if own_answers:  # the conversation so far, with this setting's own answers
                        request = next_turn(engine, image, messages, image_at=image_at)
                    (result,) = engine.generate([request], turn_spec)
                    t = result.timings
                    if rep >= warmup:
                        # IAVA's pre-pass prefills the request's rows (setup_s; 0 for a decoder without one)
                        times[setting][k].append(t.setup_s + t.vision_s + t.prefill_s)
                    took[setting][k], tokens[setting][k] = t.prompt_cached_tokens, result.token_ids
                    took_rows[setting][k] = t.prefill_cached_tokens
                    prompt_tokens[k], answered[k] = result.prompt_tokens, len(result.token_ids)
                    messages.append({"role": "assistant", "content": [{"type": "text", "text": result.text}]})
                engine.prefix_cache = None
            if progress and rep >= warmup:
                progress(f"round {rep + 1 - warmup}/{repeats}: last turn "
                         + ", ".join(f"{times[s][-1][-1]:.3f}s {s}" for s in SETTINGS))
    finally:
        engine.prefix_cache = before
    rows = []
    for k in range(len(requests)):
        med = {s: median(times[s][k]) for s in SETTINGS}
        rows.append({
            "turn": k + 1,
            "prompt_tokens": prompt_tokens[k],
            "answered_tokens": answered[k],  # the turn's answer (1: the first token of a scripted one)
            **{f"{s}_cached_tokens": took[s][k] for s in SETTINGS[1:]},
            # every row of the turn's prefill (a contrastive decoder's branch rows too)
            **{f"{s}_rows_cached_tokens": took_rows[s][k] for s in SETTINGS[1:]},
            **{f"{s}_prefill_s": med[s] for s in SETTINGS},
            "image_speedup": ratio(med["none"], med["image"]),
            "conversation_speedup": ratio(med["none"], med["conversation"]),
            "conversation_over_image": ratio(med["image"], med["conversation"]),
            "same_tokens": tokens["none"][k] == tokens["image"][k] == tokens["conversation"][k],
            "samples": {f"{s}_prefill_s": times[s][k] for s in SETTINGS},
        })
    return {
        "command": "perf chat",
        "shape": engine.model_name,
        "turns": turns,
        "answer_tokens": answer_tokens,
        "pruning": pruning or "none",
        "decoding": decoding,
        "budget": budget if pruning else None,
        "other_chats": other_chats,
        "own_answers": own_answers,
        "text_only": text_only,
        "image_at": None if text_only else image_at,
        # the cache's entries (prefixes and image features) when each setting's first turn looked
        "entries_before": {s: entries[s] for s in SETTINGS[1:]},
        "repeats": repeats,
        "warmup": warmup,
        "environment": environment(engine),
        "rows": rows,
    }


CHAT_HEAD = ["turn", "prompt tokens", "cached, image prefixes", "cached, conversation", "no cache s",
             "image prefixes s", "conversation s", "image x", "conversation x", "conversation / image x",
             "same tokens"]


def chat_rows(result: dict[str, Any]) -> list[list[Any]]:
    return [[r["turn"], r["prompt_tokens"], r["image_cached_tokens"], r["conversation_cached_tokens"],
             r["none_prefill_s"], r["image_prefill_s"], r["conversation_prefill_s"], r["image_speedup"],
             r["conversation_speedup"], r["conversation_over_image"], r["same_tokens"]] for r in result["rows"]]


def chat_table(result: dict[str, Any]) -> str:
    from vlmguard.perf.report import table

    env = result["environment"]
    head = (f"perf chat  shape={result['shape']}  turns={result['turns']}  answer tokens={result['answer_tokens']}  "
            f"pruning={result['pruning']}@{result['budget']}  decoding={result.get('decoding', 'greedy')}  "
            f"other chats={result.get('other_chats', 0)}  "
            f"own answers={'yes' if result.get('own_answers') else 'no'}  "
            f"{'text only (no image)  ' if result.get('text_only') else ''}"
            f"{'image with question ' + str(result['image_at']) + '  ' if (result.get('image_at') or 1) > 1 else ''}"
            f"repeats={result['repeats']}  "
            f"device={env.get('device')}  dtype={env.get('dtype')}  threads={env.get('threads')}")
    return head + "\n" + table(CHAT_HEAD, chat_rows(result))
