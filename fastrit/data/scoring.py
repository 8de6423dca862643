"""Scoring an answer against its gold answers, all on SQuAD-normalised text (:func:`fastrit.data.normalize_answer`).

- :func:`exact_match`: the normalised answer equals a normalised gold answer.
- :func:`contains_answer` (in :mod:`fastrit.data.text`): a gold answer's normalised tokens occur contiguously in the
  normalised answer; the *accuracy* of RAG robustness papers, which an answer given as a sentence still earns.
- :func:`token_f1`: SQuAD's token F1, the best over the gold answers: the F1 of the bags of normalised tokens of
  answer and gold answer (1.0 when both are empty, 0.0 when only one is).
- :func:`abstains`: the normalised answer is, or contains (as whole words), one of :data:`ABSTENTIONS`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from .text import contains_answer, normalize_answer

__all__ = ["ABSTENTIONS", "abstains", "exact_match", "token_f1"]

#: Phrases that mark an answer as an abstention, already normalised (lowercase, no punctuation, so "don't" is
#: "dont"). "unknown" is what the embedded reader answers (``fastrit.demo.ABSTAIN``); the others are how instruct
#: models commonly decline. Matched as whole words, so "unknown" also catches "The answer is unknown." (and would
#: catch a gold answer such as "Unknown Pleasures": abstention is a diagnostic, it does not change EM or accuracy).
ABSTENTIONS: tuple[str, ...] = (
    "unknown",
    "i dont know",
    "i do not know",
    "no answer",
    "not mentioned",
    "not provided",
    "not enough information",
    "cannot be determined",
    "cannot answer",
)


def exact_match(prediction: str, answers: Iterable[str]) -> bool:
    """Whether ``prediction``, normalised, equals any normalised answer."""
    text = normalize_answer(prediction)
    return any(text == normalize_answer(answer) for answer in answers)


def _f1(prediction: list[str], gold: list[str]) -> float:
    if not prediction or not gold:
        return float(prediction == gold)
    same = sum((Counter(prediction) & Counter(gold)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(prediction), same / len(gold)
    return 2 * precision * recall / (precision + recall)


def token_f1(prediction: str, answers: Iterable[str]) -> float:
    """SQuAD's token F1 of ``prediction``: the largest over ``answers`` (0.0 when there is none)."""
    words = normalize_answer(prediction).split()
    return max((_f1(words, normalize_answer(answer).split()) for answer in answers), default=0.0)


def abstains(prediction: str, phrases: Iterable[str] = ABSTENTIONS) -> bool:
    """Whether ``prediction``, normalised, equals or contains (as whole words) one of ``phrases``."""
    return contains_answer(prediction, phrases)
