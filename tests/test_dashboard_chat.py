"""The dashboard's Chat page under Streamlit's ``AppTest``: a conversation about one image through a stubbed
OpenAI-compatible client (what each turn sends, what it shows), failed turns, a new conversation when the image
changes; and the request it makes read by the real API as the playground's native request is."""
from __future__ import annotations

import json

import pytest

from test_dashboard_pages import StubClient, all_text, i_caption, page, quiet_env
from vlmguard.api_schema import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChoiceLogprobs,
    ChunkChoice,
    ChunkDelta,
    PromptTokensDetails,
    StepModel,
    TimingsModel,
    TokenLogprobModel,
    TopLogprobModel,
    Usage,
    VlmguardInfo,
)
from vlmguard.client import APIError, _chat_body
from vlmguard.dashboard.chat_page import CHAT_KEY
from vlmguard.dashboard.request_inputs import NO_IMAGE
from vlmguard.dashboard.service import CLIENT_KEY, chat_kwargs, selection_kwargs, spec_kwargs
from vlmguard.workers.openai_compat import chat_spec, native_spec

PROMPT_TOKENS = 40  # the stub's first prompt; each turn adds as many


@pytest.fixture(autouse=True)
def _env(monkeypatch, tmp_path):
    quiet_env(monkeypatch, tmp_path)


class ChatStub(StubClient):
    """The playground's stub, which also chats: turn k answers "answer k ." in chunks, as the service streams
    them; from the second turn on, the earlier turns' tokens come from the prefix cache."""

    def __init__(self, fail_on: str | None = None):
        super().__init__()
        self.chats: list[dict] = []
        self.fail_on = fail_on

    def chat_stream(self, prompt=None, images=(), *, messages=None, model=None, **kwargs):
        self.chats.append({"messages": messages, "model": model, **kwargs})
        question = messages[-1]["content"][-1]["text"]
        if self.fail_on and self.fail_on in question:
            raise APIError(400, f"refused: {self.fail_on}")
        k = sum(m["role"] == "user" for m in messages)
        words = [f"answer{k}", " one", " ."]
        if kwargs.get("response_format") == {"type": "json_object"}:  # a JSON answer
            words = ['{"answer":', f" {k}", "}"]
        image = any(c["type"] == "image_url" for m in messages if isinstance(m["content"], list) for c in m["content"])
        n = self.N if image else 0  # a text-only chat has no visual token, as the service reports
        kept = [1, 3, 5, 7, 9, 11] if image else []
        yield ChatCompletionChunk(id="c", created=0, model=model,
                                  choices=[ChunkChoice(delta=ChunkDelta(role="assistant", content=""))])
        for i, w in enumerate(words[:-1]):
            yield ChatCompletionChunk(id="c", created=0, model=model, choices=[ChunkChoice(
                delta=ChunkDelta(content=w), logprobs=self._logprobs(w, i))])
        info = VlmguardInfo(
            pruning=kwargs.get("pruning", "none"), decoding=kwargs.get("decoding", "greedy"), visual_tokens=n,
            visual_tokens_kept=[n, n, len(kept), len(kept)], kept_indices=kept,
            timings=TimingsModel(prefill_s=0.02 if k == 1 else 0.004, ttft_s=0.03, decode_s=0.01, total_s=0.05,
                                 prompt_cached_tokens=PROMPT_TOKENS * (k - 1)),
            steps=[StepModel(token_id=20 + i, token=w.strip(), main_prob=0.5, contrast_prob=0.25, score=0.4,
                             main_top_id=20 + i) for i, w in enumerate(words)])
        yield ChatCompletionChunk(id="c", created=0, model=model, vlmguard=info, choices=[ChunkChoice(
            delta=ChunkDelta(content=words[-1]), finish_reason="stop", logprobs=self._logprobs(words[-1], 2))])
        yield ChatCompletionChunk(id="c", created=0, model=model, choices=[], usage=Usage(
            prompt_tokens=PROMPT_TOKENS * k, completion_tokens=3, total_tokens=PROMPT_TOKENS * k + 3,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=PROMPT_TOKENS * (k - 1))))

    @staticmethod
    def _logprobs(word: str, i: int) -> ChoiceLogprobs:
        return ChoiceLogprobs(content=[TokenLogprobModel(token=word, logprob=-0.5 * (i + 1), top_logprobs=[
            TopLogprobModel(token=word, logprob=-0.5 * (i + 1)), TopLogprobModel(token="maybe", logprob=-3.0)])])


def chat(stub: ChatStub):
    at = page("chat_page.py")
    at.session_state[CLIENT_KEY] = stub
    return at.run()


def ask(at, question: str):
    return at.chat_input(key="ch_input").set_value(question).run()


def test_chat_without_service_shows_notice():
    at = page("chat_page.py").run()
    assert not at.exception
    warn = " ".join(w.value for w in at.warning)
    assert "not reachable" in warn and "The chat needs it" in warn
    assert not at.chat_input


def test_a_conversation_sends_its_history_and_shows_what_the_cache_kept():
    stub = ChatStub()
    at = chat(stub)
    assert not at.exception, at.exception
    assert at.selectbox(key="ch_pruning").value == "flowcut" and at.selectbox(key="ch_decoding").value == "greedy"
    at.selectbox(key="ch_decoding").select("vcd")
    at.text_input(key="ch_budget").input("6")
    at.slider(key="ch_max_new").set_value(32)
    at = ask(at, "Describe this image.")
    assert not at.exception, at.exception

    first = stub.chats[0]
    assert first["model"] == "tiny-llava" and len(first["messages"]) == 1
    content = first["messages"][0]["content"]
    assert content[0]["type"] == "image_url" and content[0]["image_url"]["url"].startswith("data:image/png;base64,")
    assert content[1] == {"type": "text", "text": "Describe this image."}
    assert (first["pruning"], first["budget"], first["decoding"]) == ("flowcut", 6, "vcd")
    assert first["max_tokens"] == 32 and first["diagnostics"] is True
    assert (first["logprobs"], first["top_logprobs"]) == (True, 3)
    assert first["stream_options"] == {"include_usage": True}
    text = all_text(at)
    assert "answer1 one ." in text
    assert "40 prompt tokens, none from the prefix cache" in text and "prefill 20.0 ms" in text
    assert "pruner `flowcut @ 6` · decoder `vcd`" in text

    at.selectbox(key="ch_decoding").select("greedy")  # each turn is asked with the settings of its time
    at = ask(at, "What is on the left?")
    assert not at.exception, at.exception
    second = stub.chats[1]
    roles = [m["role"] for m in second["messages"]]
    assert roles == ["user", "assistant", "user"]
    assert second["messages"][0] == first["messages"][0]  # the image goes with the first question only
    assert second["messages"][1] == {"role": "assistant", "content": "answer1 one ."}
    assert second["messages"][2]["content"] == [{"type": "text", "text": "What is on the left?"}]
    assert second["decoding"] == "greedy"
    text = all_text(at)
    assert "answer1 one ." in text and "answer2 one ." in text  # the history stays on screen
    assert "80 prompt tokens, 40 from the prefix cache" in text and "prefill 4.0 ms" in text
    assert [m.name for m in at.chat_message] == ["user", "assistant", "user", "assistant"]
    # each answer opens onto its details: the kept tokens over the image, the per-token probabilities
    assert "kept visual tokens: 6 of 16" in " ".join(i_caption(at))
    assert "visual tokens per LLM layer: 16 → 6 (4 layers)" in text
    assert len(at.get("vega_lite_chart")) == 2
    assert "Per-token probabilities" in text

    # a re-run (any widget change) shows the conversation without asking again
    n = len(stub.chats)
    at.slider(key="ch_max_new").set_value(16).run()
    assert len(stub.chats) == n and "answer2 one ." in all_text(at)


def test_a_failed_turn_shows_its_error_and_is_not_sent_again():
    stub = ChatStub(fail_on="refuse me")
    at = chat(stub)
    at.selectbox(key="ch_pruning").select("none")
    at = ask(at, "Is there a cat?")
    at = ask(at, "Please refuse me")
    assert not at.exception, at.exception
    assert "refused: refuse me" in " ".join(e.value for e in at.error)
    assert "Not part of the conversation" in all_text(at)
    at = ask(at, "And a dog?")
    last = stub.chats[-1]["messages"]
    assert [m["role"] for m in last] == ["user", "assistant", "user"]
    assert last[-1]["content"][-1]["text"] == "And a dog?"
    assert "answer2 one ." in all_text(at)  # the third question continues the first answer's conversation
    assert "refused: refuse me" in " ".join(e.value for e in at.error)  # the failed turn stays on screen


def test_another_image_or_the_button_begins_a_new_conversation():
    stub = ChatStub()
    at = chat(stub)
    at = ask(at, "Describe this image.")
    assert len(at.session_state[CHAT_KEY].turns) == 1
    at.number_input(key="ch_seed").set_value(2).run()  # another rendered scene
    assert not at.exception, at.exception
    assert "A new conversation: the image or the model changed" in all_text(at)
    assert "answer1" not in all_text(at)
    at = ask(at, "And this one?")
    assert len(stub.chats[-1]["messages"]) == 1 and stub.chats[-1]["messages"][0]["content"][0]["type"] == "image_url"
    at.button(key="ch_new").click().run()
    assert not at.session_state[CHAT_KEY].turns and "answer1" not in all_text(at)


def test_a_chat_without_an_image_sends_text_only_and_shows_no_visual_tokens():
    stub = ChatStub()
    at = chat(stub)
    at.radio(key="ch_source").set_value(NO_IMAGE).run()
    assert not at.exception, at.exception
    assert "no visual token to prune" in all_text(at) and not at.image  # no input image drawn
    at = ask(at, "What is usually in a kitchen?")
    at = ask(at, "And in a street?")
    assert not at.exception, at.exception
    first, second = stub.chats
    question = {"type": "text", "text": "What is usually in a kitchen?"}
    assert first["messages"] == [{"role": "user", "content": [question]}]
    assert second["messages"][:2] == first["messages"] + [{"role": "assistant", "content": "answer1 one ."}]
    assert second["messages"][2]["content"] == [{"type": "text", "text": "And in a street?"}]
    text = all_text(at)
    assert "answer1 one ." in text and "answer2 one ." in text
    assert "80 prompt tokens, 40 from the prefix cache" in text
    assert "Per-token probabilities" in text  # the details: timings and probabilities, no token grid
    assert "visual tokens per LLM layer" not in text
    assert len(at.get("vega_lite_chart")) == 2  # each answer's per-token probabilities
    assert not i_caption(at)
    assert [e.label for e in at.expander if e.label.startswith("timings")] == ["timings, per-token probabilities"] * 2



def test_a_chat_without_an_image_takes_one_for_its_next_question():
    """The image chosen after a text-only exchange goes with the next question, the history before it kept;
    until it goes out it can be changed or dropped; once it went out, another image begins a new conversation."""
    stub = ChatStub()
    at = chat(stub)
    at.radio(key="ch_source").set_value(NO_IMAGE).run()
    at = ask(at, "What is usually in a kitchen?")
    at.radio(key="ch_source").set_value("render a SynthCOCO scene").run()
    assert not at.exception, at.exception
    text = all_text(at)
    assert "The image goes with the next question" in text and "answer1 one ." in text
    assert "A new conversation" not in text
    at.number_input(key="ch_seed").set_value(2).run()  # not sent yet: another scene takes its place
    assert "answer1 one ." in all_text(at) and "A new conversation" not in all_text(at)
    at = ask(at, "Which of those are here?")
    assert not at.exception, at.exception
    msgs = stub.chats[-1]["messages"]
    assert [m["role"] for m in msgs] == ["user", "assistant", "user"]
    assert msgs[0]["content"] == [{"type": "text", "text": "What is usually in a kitchen?"}]
    assert [c["type"] for c in msgs[2]["content"]] == ["image_url", "text"]  # the image joins with this question
    # the first answer shows no token grid, the second the kept tokens over the image
    assert [c for c in i_caption(at) if c.startswith("kept visual tokens")] == ["kept visual tokens: 6 of 16"]
    assert "The image goes with the next question" not in all_text(at)
    at = ask(at, "And on the left?")
    msgs = stub.chats[-1]["messages"]
    assert len(msgs) == 5 and msgs[2]["content"][0]["type"] == "image_url"  # it stays with the question it came in
    assert all(c["type"] == "text" for m in msgs if m["role"] == "user" and m is not msgs[2] for c in m["content"])
    at.number_input(key="ch_seed").set_value(3).run()  # the image went out: another one begins a new conversation
    assert "A new conversation" in all_text(at) and "answer1" not in all_text(at)


def test_a_json_answer_is_asked_for_and_shown_indented():
    stub = ChatStub()
    at = chat(stub)
    at.selectbox(key="ch_format").select("any JSON object").run()
    ask(at, "what is in it?")
    assert not at.exception, at.exception
    assert stub.chats[-1]["response_format"] == {"type": "json_object"}
    assert [c.value for c in at.code] == ['{\n  "answer": 1\n}']  # once it has streamed in
    ask(at, "and now?")
    assert [c.value for c in at.code] == ['{\n  "answer": 1\n}', '{\n  "answer": 2\n}']  # each turn's, kept


def test_a_token_bias_goes_with_the_question_and_a_bad_one_holds_it_back():
    stub = ChatStub()
    at = chat(stub)
    at.text_input(key="ch_bias").input("a dog=5").run()
    assert any("'a dog' is 2 tokens" in e.value for e in at.error) and at.chat_input(key="ch_input").disabled
    at.text_input(key="ch_bias").input("No=-100").run()
    ask(at, "is there a dog?")
    assert not at.exception, at.exception
    assert stub.chats[-1]["logit_bias"] == {22: -100.0}


def test_an_unreadable_budget_disables_the_question():
    at = chat(ChatStub())
    at.text_input(key="ch_budget").input("0")
    at.run()
    assert at.chat_input(key="ch_input").disabled
    assert at.error


@pytest.mark.parametrize("selection", [selection_kwargs(0.0, 0, 0.0, 0.0, 1.0),
                                       selection_kwargs(0.7, 5, 0.5, -0.3, 1.2, top_p=0.9, min_p=0.05),
                                       selection_kwargs(0.0, 0, 0.0, 0.0, 1.0, ["Yes", "No"]),
                                       *[selection_kwargs(0.0, 0, 0.0, 0.0, 1.0, (), guided) for guided in (
                                           {"regex": "(Yes|No)"}, {"json_object": True, "whitespace": "compact"},
                                           {"json_schema": {"type": "object"}}, {"grammar": 'start: "a"'})],
                                       {**selection_kwargs(0.0, 0, 0.0, 0.0, 1.0), "logit_bias": {23: -100.0}}])
@pytest.mark.parametrize("methods", [("none", None, "greedy", {}), ("flowcut", 0.25, "vcd", {"alpha": 2.0}),
                                     ("adaptinfer", 16, "sample", {}), ("random", 8, "lqcd", {})])
def test_the_chat_request_is_the_playgrounds_request(methods, selection):
    """What the chat page sends, read by the service's chat endpoint, is the GenerationSpec the playground's native
    request is: the same pruner, decoder, token selection and diagnostics."""
    pruning, budget, decoding, decoding_params = methods
    spec = spec_kwargs(pruning, budget, {}, decoding, decoding_params, 24, selection=selection, image_aspect="pad")
    body = _chat_body(None, (), [{"role": "user", "content": "hi"}], None, "tiny-llava", True, chat_kwargs(spec))
    body = json.loads(json.dumps(body))  # as it goes over HTTP (a logit_bias's ids become the JSON keys "23")
    from_chat = chat_spec(ChatCompletionRequest.model_validate(body), 64)
    native = native_spec(spec, 64)
    assert from_chat == native
    assert from_chat.sampling == (bool(selection.get("do_sample")) or decoding == "sample")
