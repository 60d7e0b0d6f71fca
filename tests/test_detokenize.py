"""Incremental detokenization equals decoding the whole sequence, token by token, on the kinds of tokenizer
vlmguard meets: the bundled word-level one (WordPiece decoder with space cleanup), byte-level BPE (GPT-2 /
Qwen style) and SentencePiece-style BPE with byte fallback (Llama style), including characters split over
several tokens; and the engine's stream and stop strings agree with its results."""
from __future__ import annotations

import random

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from vlmguard.detokenize import IncrementalText
from vlmguard.engine import Engine
from vlmguard.results import Request
from vlmguard.spec import GenerationSpec
from vlmguard.testing import random_image

CORPUS = ["A red car is parked next to the traffic light, isn't it?", "Two dogs (brown & white) play: fetch!",
          "Café crème, naïve façade; déjà vu.", "东京 的 猫 在 睡觉 。",
          "Emoji 😀🚗 and 🍕 — ok...",
          "There is a knife, a fork and a spoon on the dining table."] * 20


def _byte_level_bpe() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def _sentencepiece_style() -> PreTrainedTokenizerFast:
    """Llama-style: Metaspace pieces, BPE with byte fallback for characters outside the vocabulary."""
    base = Tokenizer(models.BPE())
    base.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    base.train_from_iterator([c for c in CORPUS if "😀" not in c and "东" not in c],
                             trainers.BpeTrainer(vocab_size=200, special_tokens=["<s>", "</s>"]))
    vocab = base.get_vocab()
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m)
              for m in __import__("json").loads(base.to_str())["model"]["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens(["<s>", "</s>"])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def _bundled():
    return Engine.load("tiny").adapter.processor.tokenizer


TOKENIZERS = {"bundled-wordlevel": _bundled, "byte-level-bpe": _byte_level_bpe,
              "sentencepiece-byte-fallback": _sentencepiece_style}


def _check(tok, ids: list[int]) -> None:
    """At every step whose full decode is clean, stable + held-back text is exactly that decode. (While a
    character is incomplete a full decode is not even prefix-stable: a byte-fallback decoder turns a whole run
    of byte tokens into U+FFFD when its last character is cut, including characters it showed a step before.)"""
    inc = IncrementalText(tok)
    streamed = ""
    for k, t in enumerate(ids, 1):
        streamed += inc.push(t)
        assert streamed == inc.text
        full = tok.decode(ids[:k], skip_special_tokens=True)
        if "\ufffd" not in full:
            assert inc.text + inc.pending == full, (ids[:k], full, inc.text, inc.pending)
            assert inc.pending == "" or not inc.pending.strip(), (ids[:k], full, inc.pending)


@pytest.mark.parametrize("name", sorted(TOKENIZERS))
def test_incremental_text_equals_full_decode(name):
    tok = TOKENIZERS[name]()
    texts = CORPUS[:6] + ["yes", "No.", "  spaced   out  ", ""]
    if name == "bundled-wordlevel":  # its vocabulary is the synthetic world's
        texts = ["there is a fork and a knife on the dining table .", "yes", "no , there is no dog .",
                 "a person rides a bicycle next to a car ."]
    for text in texts:
        ids = tok.encode(text, add_special_tokens=False)
        if len(text.split()) > 1:
            assert len(ids) > 1
        _check(tok, ids)
        _check(tok, [tok.convert_tokens_to_ids(tok.eos_token)] + ids + [tok.convert_tokens_to_ids(tok.eos_token)])
    rng = random.Random(0)
    n = len(tok)
    for _ in range(40):  # arbitrary sequences too: invalid byte runs, special tokens in the middle
        _check(tok, [rng.randrange(n) for _ in range(rng.randrange(1, 30))])


def test_characters_split_over_tokens_are_held_back_until_complete():
    tok = _sentencepiece_style()
    ids = tok.encode("ok 😀!", add_special_tokens=False)
    byte_ids = [i for i in ids if tok.convert_ids_to_tokens(i).startswith("<0x")]
    assert len(byte_ids) == 4  # the emoji is four byte-fallback tokens
    inc = IncrementalText(tok)
    out = [inc.push(i) for i in ids]
    first = ids.index(byte_ids[0])
    assert out[first:first + 3] == ["", "", ""]  # nothing printable while the character is incomplete
    assert "".join(out) == "ok 😀!" and inc.pending == ""
    assert out[first + 3].endswith("😀")


def test_engine_stream_and_stop_strings_agree_with_results():
    eng = Engine.load("tiny")
    req = Request("Please describe this image in detail.", [random_image(3, (96, 96))])
    full = eng.generate([req], GenerationSpec(max_new_tokens=40))[0]
    words = full.text.split()
    assert len(words) > 6
    streamed = "".join(ev.text for ev in eng.stream([req], GenerationSpec(max_new_tokens=40)) if not ev.done)
    assert streamed == full.text
    stop = " ".join(words[3:5])  # a stop string spanning two tokens
    cut_events = list(eng.stream([req], GenerationSpec(max_new_tokens=40, stop=[stop])))
    cut = cut_events[-1].result
    assert cut.finish_reason == "stop" and stop not in cut.text and full.text.startswith(cut.text)
    # the stream never shows the stop string, not even the part of it that came before its last token
    # (held back until it could no longer start one); results are stripped, the stream keeps the spaces
    streamed = "".join(ev.text for ev in cut_events if not ev.done)
    assert streamed.strip() == cut.text and not streamed.rstrip().endswith(words[3])
    assert len(cut.token_ids) < len(full.token_ids)


class _StripsLoneToken:
    """A decoder that rewrites a window's start: one token alone loses its leading space, several keep theirs
    (so decoding from one token back does not reproduce the full text by itself)."""

    vocab = ["a", " b", " c", " d", "!"]

    def decode(self, ids, skip_special_tokens=True):
        text = "".join(self.vocab[i] for i in ids)
        return text.lstrip() if len(ids) == 1 else text


def test_a_rewritten_window_resynchronises_on_a_full_decode():
    tok = _StripsLoneToken()
    ids = [0, 1, 2, 3, 4, 2]
    inc = IncrementalText(tok)
    out = [inc.push(i) for i in ids]
    assert "".join(out) == inc.text == tok.decode(ids) == "a b c d! c"
    assert out == ["a", " b", " c", " d", "!", " c"]
