"""Rouge-L of a prediction against a reference: the Natural Instructions scorer, and our unstemmed one.

Three Rouge-L metrics per example (0-100, F1 of the longest common token subsequence), all from
``rouge_score.rouge_scorer.RougeScorer``:

* ``rougeL`` (primary, :func:`rouge_l`): the scorer of the Super-NaturalInstructions evaluation script
  (``eval/automatic/evaluation.py`` of allenai/natural-instructions). For its default (English) track it is
  rouge-score's own tokenizer (lowercase, every character outside ``[a-z0-9]`` a separator) with the Porter
  stemmer. For its cross-lingual track it tokenises without stemming; the script uses GPT-2's byte-level BPE
  pieces (leading space marker removed), which needs GPT-2's vocabulary: we use :func:`rouge_tokenize`
  (words of any script, one token per character of scripts written without spaces) instead, offline.
  The script assigns tracks by task metadata; the data here carries no language, so an example is scored
  on the cross-lingual track when its reference has a letter outside ASCII (the default tokenizer would
  drop it), else on the default track.
* ``rougeL_unstemmed`` (secondary, :func:`rouge_l_unstemmed`): every example with :func:`rouge_tokenize`,
  no stemming: the only Rouge-L of runs recorded before ``rougeL`` existed, not comparable with published
  Natural Instructions scores (no stemming, and other tokens).
* ``tf_argmax_rougeL`` (:func:`rouge_scores`): ``rougeL_unstemmed`` of the argmax of the teacher-forced
  logits at the response positions, scored on held-out clients (a cheap diagnostic; not the FlexLoRA paper
  code's proxy, which scores the unshifted argmax over the whole sequence, prompt included, on training
  clients). Unstemmed, as the ``proxy_rougeL`` of older records it continues.
"""

from __future__ import annotations

import unicodedata
from typing import Any

__all__ = [
    "RougeTokenizer",
    "is_default_track",
    "rouge_l",
    "rouge_l_unstemmed",
    "rouge_scores",
    "rouge_tokenize",
]

# Scripts written without spaces between words: each character is one Rouge token.
_CHAR_SCRIPTS = (
    (0x0E00, 0x0EFF),  # Thai, Lao
    (0x1000, 0x109F),  # Myanmar
    (0x1780, 0x17FF),  # Khmer
    (0x3040, 0x30FF),  # Hiragana, Katakana
    (0x31F0, 0x31FF),  # Katakana phonetic extensions
    (0x3400, 0x4DBF),  # CJK extension A
    (0x4E00, 0x9FFF),  # CJK unified ideographs
    (0xF900, 0xFAFF),  # CJK compatibility ideographs
    (0x20000, 0x3FFFF),  # CJK extensions B and later
)


def _own_token(ch: str) -> bool:
    code = ord(ch)
    return any(lo <= code <= hi for lo, hi in _CHAR_SCRIPTS)


def rouge_tokenize(text: str) -> list[str]:
    """Split ``text`` into Rouge tokens, keeping every script: NFKC-normalise and lowercase, then words are
    runs of Unicode letters, digits and combining marks (Devanagari vowel signs stay in their words), and
    each character of a script written without spaces (CJK, kana, Thai, Lao, Khmer, Myanmar) is a token.

    Args:
        text: any string.

    Returns:
        Lowercased tokens, e.g. ``"Hello, دنیا! 你好"`` -> ``["hello", "دنیا", "你", "好"]``.
    """
    tokens: list[str] = []
    word: list[str] = []
    for ch in unicodedata.normalize("NFKC", text).lower():
        if _own_token(ch):
            if word:
                tokens.append("".join(word))
                word = []
            tokens.append(ch)
        elif unicodedata.category(ch)[0] in "LNM":  # letter, number, combining mark
            word.append(ch)
        elif word:
            tokens.append("".join(word))
            word = []
    if word:
        tokens.append("".join(word))
    return tokens


class RougeTokenizer:
    """The ``tokenizer`` to give ``rouge_score.rouge_scorer.RougeScorer``: :func:`rouge_tokenize`."""

    def tokenize(self, text: str) -> list[str]:
        return rouge_tokenize(text)


_SCORERS: dict[str, Any] = {}


def _score(kind: str, prediction: str, reference: str) -> float:
    if kind not in _SCORERS:
        from rouge_score.rouge_scorer import RougeScorer

        _SCORERS[kind] = (
            RougeScorer(["rougeL"], use_stemmer=True)
            if kind == "default"
            else RougeScorer(["rougeL"], tokenizer=RougeTokenizer())
        )
    return 100.0 * _SCORERS[kind].score(reference, prediction)["rougeL"].fmeasure


def is_default_track(reference: str) -> bool:
    """Whether ``reference`` is scored on the Natural Instructions default (English) track: every letter
    in it is ASCII, so rouge-score's default tokenizer loses none."""
    return all(ch.isascii() for ch in reference if ch.isalpha())


def rouge_l(prediction: str, reference: str) -> float:
    """The Natural Instructions Rouge-L (0-100) of ``prediction`` against ``reference``: stemmed with
    rouge-score's tokenizer on the default track, :func:`rouge_tokenize` unstemmed otherwise (module doc).
    """
    return _score("default" if is_default_track(reference) else "xlingual", prediction, reference)


def rouge_l_unstemmed(prediction: str, reference: str) -> float:
    """Rouge-L (0-100) with :func:`rouge_tokenize` and no stemming, whatever the language; 0 when either
    side has no token."""
    return _score("xlingual", prediction, reference)


def rouge_scores(prediction: str | None, argmax_text: str, reference: str) -> dict[str, float | None]:
    """An example's three Rouge-L metrics (module doc): ``rougeL`` and ``rougeL_unstemmed`` of the
    generation ``prediction`` (``None`` without one) and ``tf_argmax_rougeL`` of the teacher-forced argmax
    text ``argmax_text``."""
    generated = prediction is not None
    return {
        "rougeL": rouge_l(prediction, reference) if generated else None,
        "rougeL_unstemmed": rouge_l_unstemmed(prediction, reference) if generated else None,
        "tf_argmax_rougeL": rouge_l_unstemmed(argmax_text, reference),
    }
