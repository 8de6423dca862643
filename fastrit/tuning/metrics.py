"""The answer loss on held-out noisy-context prompts, in the format a model answers in.

- :func:`answer_loss`: the answer right after the prompt (stage 1's format, and an untuned reader's), teacher
  forced: mean cross-entropy per answer token.
- :func:`answer_loss_after_evidence`: the answer after the model's *own* evidence (stage 2's format,
  ``Evidence: ... Answer: ...``): the model writes greedily from the prompt until it has written the answer marker,
  then the gold answer is teacher forced after what it wrote. Teacher forcing the gold evidence instead would hand
  the model the sentence that holds the answer, which a noisy-context prompt does not.
"""

from __future__ import annotations

from typing import NamedTuple

import datasets
import torch
from torch import nn

from .. import data as rag
from ..arch import max_positions
from ..data import ANSWER_MARKER, RagData
from ..evaluate import greedy_continuations, index_after
from .loss import causal_lm_loss
from .stages import IGNORE_INDEX, collate

__all__ = ["EvidenceAnswerLoss", "answer_loss", "answer_loss_after_evidence"]


def answer_loss(model: nn.Module, examples, tokenizer, *, batch_size: int = 32) -> float:
    """Mean cross-entropy per target token of ``examples`` (a stage dataset: input_ids and labels), no grad."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        with torch.no_grad():
            for start in range(0, len(examples), batch_size):
                batch = collate([examples[i] for i in range(start, min(start + batch_size, len(examples)))], pad)
                tokens = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
                loss = causal_lm_loss(model, batch["input_ids"].to(model.device), batch["labels"].to(model.device),
                                      batch["attention_mask"].to(model.device))
                total += float(loss) * tokens
                count += tokens
    finally:
        model.train(was_training)
    return total / max(count, 1)


class EvidenceAnswerLoss(NamedTuple):
    """``loss``: mean cross-entropy per answer token (answer and end token) after the model's own evidence;
    ``examples``: prompts measured; ``marker_written``: the share of them where the model wrote the answer marker
    itself within the token budget (elsewhere the marker was appended to what it wrote)."""

    loss: float
    examples: int
    marker_written: float


def answer_loss_after_evidence(model: nn.Module, tokenizer, data: RagData, *, k: int = 5,
                               template: str | None = None, seed: int = 0, max_evidence_tokens: int = 64,
                               batch_size: int = 32) -> EvidenceAnswerLoss:
    """The answer loss on ``data``'s noisy-context prompts after the model's own evidence (module docstring).

    Each prompt is that of the distill stage (fastrit.data.prompts, condition "noisy", ``k``, ``template``,
    ``seed``). The model generates greedily up to ``max_evidence_tokens`` tokens; its text is cut just after the
    first answer marker (``Answer:``, tokenized as it continues a prompt), or at its end token with the marker
    appended when it wrote none. Then the first gold answer and the end token are teacher forced and scored.
    The model is put in eval mode and given back in the mode it had.
    """
    if not isinstance(max_evidence_tokens, int) or max_evidence_tokens < 1:
        raise ValueError(f"max_evidence_tokens: expected a positive integer, got {max_evidence_tokens!r}")
    positions = max_positions(model.config)
    answer_room = 16  # the answer and the end token, in tokens
    max_length = None if positions is None else positions - max_evidence_tokens - answer_room
    if max_length is not None and max_length < 1:
        raise ValueError(f"max_evidence_tokens: {max_evidence_tokens} leaves no room for a prompt in "
                         f"{positions} positions")
    built = rag.prompts(data, tokenizer, condition="noisy", k=k, template=template, max_length=max_length,
                        seed=seed)
    if len(built) == 0:
        raise ValueError(f"data: no noisy-context prompt could be built from {len(data)} records")
    marker = rag.encode_pair(tokenizer, built.texts[0], ANSWER_MARKER)[1]
    eos = tokenizer.eos_token_id
    rows: dict[str, list] = {"input_ids": [], "labels": []}
    written = 0
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(built), batch_size):
            span = range(start, min(start + batch_size, len(built)))
            with torch.inference_mode():
                new = greedy_continuations(model, built.tensors(span), max_evidence_tokens, built.pad_token_id, eos)
            for row, tokens in zip(span, new.tolist(), strict=True):
                if eos is not None and eos in tokens:
                    tokens = tokens[:tokens.index(eos)]
                end = index_after(tokens, marker)
                written += end >= 0
                evidence = tokens[:end] if end >= 0 else tokens + marker
                answer = data.records[built.records[row]]["answers"][0]
                target = rag.encode_pair(tokenizer, ANSWER_MARKER, answer)[1] + ([eos] if eos is not None else [])
                prompt = built.prompt_ids[row] + evidence
                rows["input_ids"].append(prompt + target)
                rows["labels"].append([IGNORE_INDEX] * len(prompt) + target)
    finally:
        model.train(was_training)
    examples = datasets.Dataset.from_dict(rows)
    loss = answer_loss(model, examples, tokenizer, batch_size=batch_size)
    return EvidenceAnswerLoss(loss, len(examples), written / len(examples))
