"""RAG QA data: records in one canonical schema on 🤗 datasets, loaded from the files users hold, and the
answer matching (SQuAD normalisation) that has_answer, evidence and the answer scores (exact match, accuracy as
containment, token F1, abstention) share."""

from .prompts import CONDITIONS, RagPrompts, encode_pair, prompts
from .rag import FEATURES, SKIP_REASONS, RagData, load
from .scoring import ABSTENTIONS, abstains, exact_match, token_f1
from .text import contains_answer, evidence_sentence, normalize_answer
from .world import synthetic

__all__ = [
    "ABSTENTIONS", "ANSWER_MARKER", "CONDITIONS", "EVIDENCE_MARKER", "FEATURES", "SKIP_REASONS", "RagData",
    "RagPrompts", "abstains", "contains_answer", "encode_pair", "evidence", "evidence_target", "exact_match", "load",
    "normalize_answer", "prompts", "synthetic", "token_f1",
]

#: what precedes the answer in an evidence-then-answer target (the evidence comes before it)
ANSWER_MARKER = "Answer:"
#: what opens an evidence-then-answer target
EVIDENCE_MARKER = "Evidence:"


def evidence(record: dict) -> str | None:
    """The first sentence of a has_answer passage of ``record`` (canonical schema) that contains an answer
    (normalised match), for the evidence-distillation stage of tuning; None if there is none."""
    texts = [ctx["text"] for ctx in record["ctxs"] if ctx["has_answer"]]
    return evidence_sentence(texts, record["answers"])


def evidence_target(record: dict) -> str | None:
    """``Evidence: <sentence> Answer: <first answer>`` (the target of Neuro-RIT's evidence-distillation stage), or
    None when ``record`` has no evidence sentence (:func:`evidence`)."""
    sentence = evidence(record)
    if sentence is None:
        return None
    return f"{EVIDENCE_MARKER} {sentence} {ANSWER_MARKER} {record['answers'][0]}"
