"""vlmguard perf chat: each turn of a conversation prefilled with no prefix cache, with image prefixes only and
with the conversation's history kept, in one run; the rows, the tokens each setting took, the figure. No timed
assertions."""
from __future__ import annotations

import json

import pytest

from cli_support import run_json
from vlmguard.cli import main
from vlmguard.perf.chat import answer_text
from vlmguard.perf.report import markdown


@pytest.fixture(scope="module")
def report():
    return run_json(["perf", "chat", "--shape", "tiny", "--turns", "3", "--answer-tokens", "40", "--repeats", "1",
                     "--warmup", "0", "--threads", "1", "--quiet", "--json"])


def test_chat_rows(report):
    assert report["command"] == "perf chat" and (report["turns"], report["answer_tokens"]) == (3, 40)
    rows = report["rows"]
    assert [r["turn"] for r in rows] == [1, 2, 3] and all(r["same_tokens"] for r in rows)
    # each turn's prompt carries the last answer (40 tokens) and a new question
    assert all(b["prompt_tokens"] - a["prompt_tokens"] > 40 for a, b in zip(rows, rows[1:]))
    image = rows[1]["image_cached_tokens"]
    assert rows[0]["image_cached_tokens"] == rows[0]["conversation_cached_tokens"] == 0
    # image prefixes: every later turn takes the image prefix alone; the conversation: turn 3 takes turn 2's prompt
    assert image > 0 and rows[2]["image_cached_tokens"] == image and rows[1]["conversation_cached_tokens"] == image
    assert rows[2]["conversation_cached_tokens"] == rows[1]["prompt_tokens"]
    for r in rows:
        assert r["conversation_over_image"] == pytest.approx(r["image_prefill_s"] / r["conversation_prefill_s"])
        assert r["image_speedup"] == pytest.approx(r["none_prefill_s"] / r["image_prefill_s"])


def test_chat_figure_and_markdown(report, tmp_path):
    path = tmp_path / "r.json"
    path.write_text(json.dumps(report))
    assert main(["perf", "plot", str(path), "--out", str(tmp_path / "r.png"), "--markdown"]) == 0
    assert (tmp_path / "r.png").stat().st_size > 0
    assert markdown(report).splitlines()[0].startswith("| turn | prompt tokens | cached, image prefixes")


def test_an_answer_has_the_tokens_asked_for_in_words_the_tokenizer_knows():
    from vlmguard.testing import tiny_engine

    tok = tiny_engine("llava").adapter.tokenizer
    for n in (1, 40, 90):
        ids = tok(answer_text(tok, n), add_special_tokens=False)["input_ids"]
        assert n <= len(ids) <= n + 3 and tok.unk_token_id not in ids


def test_other_chats_about_the_image_fill_the_cache_first():
    """Three other conversations about the image are in each cache before the turns: the history setting holds
    one entry per conversation, and turn 1 takes their shared image prefix (with the history, also the words of
    its question that theirs begin with); the same tokens throughout."""
    report = run_json(["perf", "chat", "--shape", "tiny", "--turns", "2", "--answer-tokens", "40", "--repeats", "1",
                       "--warmup", "0", "--threads", "1", "--quiet", "--json", "--other-chats", "3"])
    assert report["other_chats"] == 3
    before = report["entries_before"]
    assert before["conversation"] == before["image"] + 2  # three whole prompts against one image prefix
    first = report["rows"][0]
    assert 0 < first["image_cached_tokens"] < first["conversation_cached_tokens"] < first["prompt_tokens"]
    assert all(r["same_tokens"] for r in report["rows"])


def test_own_answers_are_taken_from_the_cache_with_their_prompt():
    """The bundled model's answers read back as the tokens it chose: turn 2 takes turn 1's prompt and its answer
    (every answer token but the last, which was never fed), not the prompt alone; the same answers in every
    setting."""
    report = run_json(["perf", "chat", "--shape", "tiny", "--turns", "3", "--answer-tokens", "64", "--repeats", "1",
                       "--warmup", "0", "--threads", "1", "--quiet", "--json", "--own-answers"])
    assert report["own_answers"] is True
    first, second = report["rows"][:2]
    assert first["answered_tokens"] > 32  # a description: its entry is kept with the prompt
    assert second["conversation_cached_tokens"] >= first["prompt_tokens"] + first["answered_tokens"] - 1
    assert second["image_cached_tokens"] < first["prompt_tokens"]
    assert all(r["same_tokens"] for r in report["rows"])


def test_more_other_chats_than_the_script_can_tell_apart_is_an_error(capsys):
    """The bundled tokenizer knows 12 of the script's words: 144 distinct openings, no more."""
    rc = main(["perf", "chat", "--shape", "tiny", "--other-chats", "200", "--repeats", "1", "--warmup", "0",
               "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("vlmguard: error: --other-chats 200:") and "enough for 144" in err
    assert "Traceback" not in err


def test_a_conversation_without_an_image_takes_its_history():
    """``--text-only``: the turns are anchored by their first tokens. With image prefixes only nothing is kept for
    them (the cache before text-only anchors); with the history each turn takes the last one's whole prompt."""
    from vlmguard.prefix_cache import TEXT_ANCHOR

    report = run_json(["perf", "chat", "--shape", "tiny", "--turns", "4", "--answer-tokens", "40", "--repeats", "1",
                       "--warmup", "0", "--threads", "1", "--quiet", "--json", "--text-only"])
    assert report["text_only"] is True
    rows = report["rows"]
    assert all(r["image_cached_tokens"] == 0 for r in rows)
    # turn 1 is a short question (no anchor, nothing kept); from turn 2 on each prompt is kept whole
    assert rows[0]["prompt_tokens"] <= TEXT_ANCHOR and [r["conversation_cached_tokens"] for r in rows[:2]] == [0, 0]
    assert [r["conversation_cached_tokens"] for r in rows[2:]] == [r["prompt_tokens"] for r in rows[1:-1]]
    assert all(r["same_tokens"] for r in rows)


def test_an_image_that_comes_with_a_later_question_takes_the_history_before_it():
    """``--image-at 3``: turns 1-2 have no image; turn 3 brings it and takes turn 2's whole prompt (anchored by its
    first tokens), where image prefixes alone give it nothing; turn 4 takes turn 3's image prefix (the history and
    the image: turn 3's question after it is too short to keep) in both settings."""
    report = run_json(["perf", "chat", "--shape", "tiny", "--turns", "4", "--answer-tokens", "40", "--repeats", "1",
                       "--warmup", "0", "--threads", "1", "--quiet", "--json", "--image-at", "3"])
    assert report["image_at"] == 3
    rows = report["rows"]
    assert rows[2]["prompt_tokens"] - rows[1]["prompt_tokens"] > 100  # the image's tokens came with turn 3
    assert [r["image_cached_tokens"] for r in rows[:3]] == [0, 0, 0]
    assert rows[2]["conversation_cached_tokens"] == rows[1]["prompt_tokens"]
    assert rows[3]["conversation_cached_tokens"] == rows[3]["image_cached_tokens"] > rows[2]["prompt_tokens"] - 32
    assert all(r["same_tokens"] for r in rows)


@pytest.mark.parametrize("args, needle", [(["--image-at", "5"], "--image-at 5: the conversation has 4 questions"),
                                          (["--image-at", "2", "--text-only"], "no image to bring in")])
def test_an_image_at_no_question_of_the_conversation_is_an_error(capsys, args, needle):
    rc = main(["perf", "chat", "--shape", "tiny", "--turns", "4", "--quiet", *args])
    err = capsys.readouterr().err
    assert rc == 2 and needle in err and "Traceback" not in err


def test_text_only_with_a_pruner_is_an_error(capsys):
    rc = main(["perf", "chat", "--shape", "tiny", "--text-only", "--pruning", "fastv", "--budget", "8", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("vlmguard: error: --text-only:") and "fastv" in err and "Traceback" not in err


def test_a_contrastive_decoders_branch_rows_take_their_history_too():
    """``--decoding vcd``: each turn prefills the noised view's rows too, and with the history kept those take the
    last turn's too (the whole prefill's cached tokens are twice the request's own)."""
    report = run_json(["perf", "chat", "--shape", "tiny", "--turns", "3", "--answer-tokens", "40", "--repeats", "1",
                       "--warmup", "0", "--threads", "1", "--quiet", "--json", "--decoding", "vcd"])
    assert report["decoding"] == "vcd"
    rows = report["rows"]
    for r in rows[1:]:
        assert r["conversation_rows_cached_tokens"] == 2 * r["conversation_cached_tokens"] > 0
        assert r["image_rows_cached_tokens"] == 2 * r["image_cached_tokens"] > 0
    assert rows[2]["conversation_cached_tokens"] == rows[1]["prompt_tokens"]
    assert all(r["same_tokens"] for r in rows)
