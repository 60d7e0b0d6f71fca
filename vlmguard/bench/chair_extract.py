"""CHAIR object extraction from a caption: the reference pipeline of benchmarks.md 2.3, in order.

lower-case -> Punkt sentences (untrained splitter, as the spec's "scored here" numbers) + NLTK's
Treebank-style word tokenizer (what ``nltk.word_tokenize`` does) -> averaged-perceptron POS tags ->
WordNet lemmas (J/V/N/R -> adj/verb/noun/adv, else noun) -> double-word merging -> "toilet" + "seat"
rule -> keep synonym-table words, map each to its category.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from vlmguard.bench.chair_vocab import ChairVocabulary, load_vocabulary
from vlmguard.bench.nltk_setup import ensure_nltk_data


@dataclass(frozen=True)
class Extraction:
    """What one caption mentions. ``words``/``categories``/``idxs`` are parallel, in caption order."""

    words: list[str]  # the matched (lemmatised, merged) vocabulary words
    categories: list[str]  # their canonical COCO categories ("node words")
    idxs: list[int]  # position of each match in the lemma list (the reference's ``idxs``)
    tokens: list[str]  # lemma list after double-word merging (its length is CHAIR's "Len")


def _wordnet_pos(tag: str) -> str:
    # WordNet POS constants: 'a' adjective, 'v' verb, 'n' noun, 'r' adverb; default noun.
    if tag.startswith("J"):
        return "a"
    if tag.startswith("V"):
        return "v"
    if tag.startswith("R"):
        return "r"
    return "n"


class ChairExtractor:
    """Reproduces the reference extraction exactly; construct once (loads tagger and WordNet)."""

    def __init__(self, vocabulary: ChairVocabulary | None = None):
        ensure_nltk_data()
        from nltk.stem import WordNetLemmatizer
        from nltk.tag.perceptron import PerceptronTagger
        from nltk.tokenize.destructive import NLTKWordTokenizer
        from nltk.tokenize.punkt import PunktSentenceTokenizer

        self.vocabulary = vocabulary or load_vocabulary()
        self._sentences = PunktSentenceTokenizer()  # untrained: no abbreviation list
        self._words = NLTKWordTokenizer()
        self._tagger = PerceptronTagger()
        lemmatizer = WordNetLemmatizer()
        self._lemmatize = lru_cache(maxsize=200_000)(lambda w, pos: lemmatizer.lemmatize(w, pos=pos))

    def tokenize(self, text: str) -> list[str]:
        return [tok for sent in self._sentences.tokenize(text) for tok in self._words.tokenize(sent)]

    def lemmas(self, caption: str) -> list[str]:
        tokens = self.tokenize(caption.lower())
        return [self._lemmatize(word, _wordnet_pos(tag)) for word, tag in self._tagger.tag(tokens)]

    def extract(self, caption: str) -> Extraction:
        lemmas = self.lemmas(caption)
        double = self.vocabulary.double_words
        merged: list[str] = []
        positions: list[int] = []
        i = 0
        while i < len(lemmas):
            positions.append(i)
            pair = " ".join(lemmas[i : i + 2])
            if pair in double:
                merged.append(double[pair])
                i += 2
            else:
                merged.append(lemmas[i])
                i += 1
        kept = merged
        if "toilet" in kept and "seat" in kept:
            kept = [w for w in kept if w != "seat"]
        vocab = self.vocabulary.to_category
        # The reference indexes ``positions`` with the position in the (possibly seat-filtered) list.
        idxs = [positions[k] for k, w in enumerate(kept) if w in vocab]
        words = [w for w in kept if w in vocab]
        return Extraction(words=words, categories=[vocab[w] for w in words], idxs=idxs, tokens=merged)


@lru_cache(maxsize=1)
def default_extractor() -> ChairExtractor:
    return ChairExtractor()
