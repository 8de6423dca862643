"""Answer matching on text: the SQuAD normalisation, answer containment, and the evidence sentence.

One rule everywhere (has_answer, evidence, exact match): lowercase, punctuation removed, the articles
"a", "an", "the" removed, whitespace collapsed. An answer is contained in a text when its normalised tokens
occur contiguously among the text's normalised tokens (so "art" is not found in "party").
"""

from __future__ import annotations

import re
import string
from collections.abc import Iterable

__all__ = ["normalize_answer", "contains_answer", "sentences", "evidence_sentence"]

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lowercase, no punctuation, no articles, single spaces."""
    text = text.lower().translate(_PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def _tokens(text: str) -> list[str]:
    return normalize_answer(text).split()


def contains_answer(text: str, answers: Iterable[str]) -> bool:
    """Whether any answer's normalised tokens occur contiguously in ``text``'s (empty answers never match)."""
    words = _tokens(text)
    for answer in answers:
        target = _tokens(answer)
        width = len(target)
        if width and any(words[i : i + width] == target for i in range(len(words) - width + 1)):
            return True
    return False


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def sentences(text: str) -> list[str]:
    """``text`` split after ``.``, ``!`` or ``?`` followed by whitespace; empty pieces dropped."""
    return [piece.strip() for piece in _SENTENCE_END.split(text) if piece.strip()]


def evidence_sentence(texts: Iterable[str], answers: Iterable[str]) -> str | None:
    """The first sentence, in the order of ``texts``, that contains an answer; None if none does."""
    answers = list(answers)
    for text in texts:
        for sentence in sentences(text):
            if contains_answer(sentence, answers):
                return sentence
    return None
