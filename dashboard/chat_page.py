"""Chat: a conversation about one image, or without an image, through the service's OpenAI-compatible chat
endpoint.

Each question goes out with the whole conversation before it (the image, if any, in the first question), with the
pruner and decoder chosen when it is asked. The service's prefix cache keeps the conversation, so a follow-up
computes only what is new; each answer says how many of its prompt tokens came from the cache, and opens onto its
timings, the kept visual tokens (with an image) and the per-token probabilities. A chat without an image can
take one later: the next question carries it. Once an image went out, another image (or none) or another model
begins a new conversation.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator

import streamlit as st
from PIL import Image

from vlmguard.client import image_to_url
from vlmguard.dashboard.request_inputs import (aspect_input, chose_no_image, image_digest, image_input, method_inputs,
                                               selection_inputs, token_ids)
from vlmguard.dashboard.result_view import (answer_view, layers, ms, spec_caption,
                                            step_probabilities, timing_metrics, token_views)
from vlmguard.dashboard.service import ModelFacts, chat_kwargs, failure_message, spec_kwargs
from vlmguard.dashboard.ui import config, method_schemas, service_client, service_page
from vlmguard.errors import VlmguardError

CHAT_KEY = "ch_conversation"
FIRST_QUESTION = "Describe this image in detail."
FIRST_TEXT_QUESTION = "Ask a question"


@dataclass
class Turn:
    """One question and what came back: the answer (as far as it streamed), or the error that ended it."""

    question: str
    spec: dict[str, Any]  # spec_kwargs's fields, as asked
    answer: str = ""
    error: str | None = None
    finish_reason: str | None = None
    info: Any = None  # the last chunk's VlmguardInfo: timings, kept tokens, steps
    usage: Any = None  # Usage: the prompt's tokens and those from the prefix cache
    logprobs: list[dict[str, Any]] = field(default_factory=list)  # per generated token, as steps_frame reads them

    @property
    def answered(self) -> bool:
        """It belongs to the conversation the next question continues (a failed one does not)."""
        return self.error is None and self.finish_reason is not None


@dataclass
class Conversation:
    topic: tuple[Any, ...]  # the model and the image's pixels it is about (None: no image, so far)
    turns: list[Turn] = field(default_factory=list)
    image_url: str | None = None  # the image as its question sends it (encoded once per conversation)
    # the turn (index into ``turns``) from which the image goes out: the first answered one from there carries it
    # (0: the chat began with it; later: it joined a chat without one); None: no image
    image_from: int | None = None

    def image_sent(self) -> bool:
        """An answered turn carried the image: it is part of the conversation."""
        return self.image_from is not None and any(t.answered for t in self.turns[self.image_from:])

    def with_image(self, i: int) -> bool:
        """Turn ``i``'s prompt held the image."""
        return self.image_from is not None and i >= self.image_from


def render() -> None:
    cfg = config()
    status = service_page(cfg, "Chat", "The chat", about="a conversation about one image, or without one; the "
                          "service's prefix cache keeps it, so a follow-up computes only what is new")
    if status is None:
        return
    schemas = method_schemas()
    client = service_client(cfg)
    left, right = st.columns([1, 2])
    with left:
        model = st.selectbox("model", status.models, key="ch_model")
        image, objects = image_input("ch", text_only=True)
        text_only = image is None and chose_no_image("ch")
        if objects:
            st.caption("Objects visible in this scene: " + ", ".join(objects))
        methods = method_inputs(schemas, "ch", pruning="flowcut", decoding="greedy")
        if text_only:
            st.caption("Without an image the pruner has no visual token to prune, and a decoder whose contrast "
                       "needs the image decodes plainly.")
        max_new = st.slider("max new tokens", 1, 256, 64, key="ch_max_new")
        aspect = aspect_input("ch")
        with st.expander("token selection"):
            selection, selection_ok = selection_inputs("ch", token_ids(client, model))
        new = st.button("New conversation", key="ch_new")
    with right:
        if image is None and not text_only:
            st.info("Pick a SynthCOCO sample or upload an image.")
            return
        conv = _conversation((model, None if image is None else image_digest(image)), fresh=new)
        facts = status.facts.get(model) or ModelFacts()
        talk = st.container()  # the turns, above the question box (which this run reads first)
        first = FIRST_QUESTION if image is not None else FIRST_TEXT_QUESTION
        question = st.chat_input(first if not conv.turns else "Ask a follow-up question", key="ch_input",
                                 disabled=not methods.ready or not selection_ok)
        with talk:
            for i, turn in enumerate(conv.turns):
                _show_turn(turn, image if conv.with_image(i) else None, facts)
            if not (question and question.strip()):
                if conv.image_from and not conv.image_sent():
                    st.info("The image goes with the next question; the conversation so far had none.")
                return
            spec = spec_kwargs(methods.pruning, methods.budget, methods.pruning_params, methods.decoding,
                               methods.decoding_params, max_new, selection=selection, image_aspect=aspect)
            turn = Turn(question.strip(), spec)
            messages = messages_for(image, conv, turn.question)
            conv.turns.append(turn)  # kept whatever happens: a failed turn shows its error, not sent again
            _ask(client, model, messages, turn, image, facts)


def _conversation(topic: tuple[Any, ...], fresh: bool) -> Conversation:
    """The conversation about ``topic``: the one on screen, or a new one (asked for, or another model, or another
    image once one went out). A conversation none of whose answered turns carried an image takes the image chosen
    now (or none) for its next question."""
    conv = st.session_state.get(CHAT_KEY)
    model, image = topic
    if (conv is not None and not fresh and conv.topic != topic and conv.topic[0] == model
            and any(t.answered for t in conv.turns) and not conv.image_sent()):
        conv.topic, conv.image_url = topic, None
        conv.image_from = None if image is None else len(conv.turns)
    if conv is not None and conv.topic != topic and conv.turns and not fresh:
        st.info("A new conversation: the image or the model changed since the last one.")
    if conv is None or conv.topic != topic or fresh:
        conv = Conversation(topic, image_from=None if image is None else 0)
        st.session_state[CHAT_KEY] = conv
    return conv


def messages_for(image: Image.Image | None, conv: Conversation, question: str) -> list[dict[str, Any]]:
    """The chat request's messages: each answered turn, then the new question; the image, if any, goes with the
    first question from ``conv.image_from`` on (the one it was asked with, or this one)."""
    out: list[dict[str, Any]] = []
    pending = image is not None and conv.image_from is not None
    for i, turn in [(i, t) for i, t in enumerate(conv.turns) if t.answered] + [(len(conv.turns), None)]:
        text = question if turn is None else turn.question
        content: list[dict[str, Any]] = [{"type": "text", "text": text}]
        if pending and conv.with_image(i):
            pending = False
            if conv.image_url is None:
                conv.image_url = image_to_url(image)
            content.insert(0, {"type": "image_url", "image_url": {"url": conv.image_url}})
        out.append({"role": "user", "content": content})
        if turn is not None:
            out.append({"role": "assistant", "content": turn.answer})
    return out


def _ask(client, model: str, messages: list[dict[str, Any]], turn: Turn, image: Image.Image | None,
         facts: ModelFacts) -> None:
    """Send the conversation with the new question; stream the answer into the page and into ``turn``."""
    with st.chat_message("user"):
        st.markdown(turn.question)
    with st.chat_message("assistant"):
        answer = st.empty()  # the text as it streams in, then the answer (a JSON one indented)
        try:
            with answer:
                st.write_stream(_deltas(client.chat_stream(messages=messages, model=model, **chat_kwargs(turn.spec)),
                                        turn))
        except VlmguardError as e:
            turn.error = failure_message(e, getattr(client, "timeout", 300), "chat")
        if turn.error is None and turn.finish_reason is None:
            turn.error = "the stream ended without an answer"
        if turn.error is not None:
            _show_error(turn)
            return
        with answer:
            answer_view(turn.answer, turn.spec)
        _turn_facts(turn, image, facts)


def _deltas(chunks: Iterator[Any], turn: Turn) -> Iterator[str]:
    """The answer's text as it streams; the rest of each chunk (log-probabilities, the end, vlmguard's facts,
    the usage) goes into ``turn``."""
    for chunk in chunks:
        if getattr(chunk, "usage", None) is not None:
            turn.usage = chunk.usage
        if getattr(chunk, "vlmguard", None) is not None:
            turn.info = chunk.vlmguard
        for choice in chunk.choices:
            if choice.index != 0:
                continue
            if choice.logprobs is not None:
                turn.logprobs += [{"token": e.token, "logprob": e.logprob,
                                   "top": [{"token": t.token, "logprob": t.logprob} for t in e.top_logprobs]}
                                  for e in choice.logprobs.content or []]
            if choice.finish_reason is not None:
                turn.finish_reason = choice.finish_reason
            if choice.delta.content:
                turn.answer += choice.delta.content
                yield choice.delta.content


def _show_turn(turn: Turn, image: Image.Image | None, facts: ModelFacts) -> None:
    with st.chat_message("user"):
        st.markdown(turn.question)
    with st.chat_message("assistant"):
        if turn.answer or turn.error is None:
            answer_view(turn.answer, turn.spec)
        if turn.error is not None:
            _show_error(turn)
            return
        _turn_facts(turn, image, facts)


def _show_error(turn: Turn) -> None:
    st.error(turn.error)
    st.caption("Not part of the conversation: the next question goes without it.")


def cache_line(turn: Turn) -> str:
    """The prompt's tokens and how many came from the service's prefix cache."""
    usage = turn.usage
    if usage is None:
        return ""
    details = getattr(usage, "prompt_tokens_details", None)
    cached = getattr(details, "cached_tokens", 0) or 0
    if not cached:
        return f"{usage.prompt_tokens} prompt tokens, none from the prefix cache"
    return f"{usage.prompt_tokens} prompt tokens, {cached} from the prefix cache"


def _turn_facts(turn: Turn, image: Image.Image | None, facts: ModelFacts) -> None:
    """One line under the answer (settings, prefill, cache), and its details in an expander (the kept visual
    tokens with an image only)."""
    info = turn.info
    parts = [spec_caption(turn.spec)]
    if info is not None:
        parts.append(f"prefill {ms(info.timings.prefill_s)}")
    parts += [p for p in (cache_line(turn), f"finish: {turn.finish_reason}") if p]
    st.caption(" · ".join(parts))
    if info is None:
        return
    with st.expander("timings, per-token probabilities" if image is None
                     else "timings, kept visual tokens, per-token probabilities"):
        timing_metrics(info.timings)
        if image is not None:
            st.caption(f"visual tokens per LLM layer: {layers(info.visual_tokens_kept)}")
            token_views(image, turn.spec, facts, visual_tokens=info.visual_tokens, kept=info.kept_indices,
                        pruning_report=None)
        step_probabilities(info.steps, turn.logprobs, turn.spec)


if __name__ == "__main__":
    render()
