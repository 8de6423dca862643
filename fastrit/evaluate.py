"""Exact match of greedy answers per context condition: how much irrelevant passages hurt a reader."""

from __future__ import annotations

import logging

import torch
from tqdm.auto import tqdm

from .arch import max_positions
from .data import RagData, encode_pair, normalize_answer, prompts

__all__ = ["evaluate", "index_after"]

logger = logging.getLogger("fastrit.evaluate")


def greedy_continuations(model, batch: dict[str, torch.Tensor], max_new_tokens: int, pad: int,
                         eos: int | None) -> torch.Tensor:
    """The new tokens ``[n, <= max_new_tokens]`` of greedy generation from left-padded prompts."""
    input_ids = batch["input_ids"].to(model.device)
    out = model.generate(
        input_ids=input_ids,
        attention_mask=batch["attention_mask"].to(model.device),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        pad_token_id=pad,
        eos_token_id=eos,
    )
    return out[:, input_ids.shape[1] :].cpu()


def index_after(sequence: list[int], part: list[int]) -> int:
    """The index just past the first occurrence of ``part`` in ``sequence``, or -1."""
    for start in range(len(sequence) - len(part) + 1):
        if sequence[start:start + len(part)] == part:
            return start + len(part)
    return -1


def evaluate(
    model,
    tokenizer,
    data: RagData,
    *,
    conditions: tuple[str, ...] = ("relevant", "noisy"),
    k: int = 5,
    batch_size: int = 32,
    max_new_tokens: int = 16,
    template: str | None = None,
    seed: int = 0,
    progress: bool = False,
    return_predictions: bool = False,
    answer_marker: str | None = None,
):
    """Exact match (SQuAD-normalised, against any answer) of ``model``'s greedy answer per condition.

    Each condition's prompts come from :func:`fastrit.data.prompts` (``k``, ``template``, ``seed``), bounded so
    that prompt and ``max_new_tokens`` fit the model's maximum positions; records it skips are left out of that
    condition's score (and logged). Batches of ``batch_size`` left-padded prompts go
    through ``model.generate``; the answer is the generated text up to the end-of-sequence token. The model is
    put in eval mode while generating and given back in the mode it had.

    ``answer_marker``: for a model that writes something before its answer (Neuro-RIT's distill stage teaches
    ``Evidence: ... Answer: ...``; pass ``fastrit.data.ANSWER_MARKER``), the answer is what follows the first
    marker in the generated tokens; a continuation without the marker is scored as it is. Give
    ``max_new_tokens`` room for what comes before the answer.

    Returns ``{condition: EM}``; with ``return_predictions=True``, ``(scores, predictions)`` where
    ``predictions[condition]`` lists ``{"record", "prediction", "answers", "correct"}`` per kept record.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive integer, got {batch_size!r}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: expected a positive integer, got {max_new_tokens!r}")
    if isinstance(conditions, str):
        conditions = (conditions,)
    positions = max_positions(model.config)
    max_length = None if positions is None else positions - max_new_tokens
    if max_length is not None and max_length < 1:
        raise ValueError(f"max_new_tokens: {max_new_tokens} leaves no room for a prompt in {positions} positions")
    scores: dict[str, float] = {}
    predictions: dict[str, list[dict]] = {}
    was_training = model.training
    model.eval()
    try:
        for condition in conditions:
            batch_prompts = prompts(data, tokenizer, condition=condition, k=k, template=template,
                                    max_length=max_length, seed=seed)
            if batch_prompts.skipped:
                logger.info("fastrit.evaluate %s: skipped %s", condition, batch_prompts.skipped)
            rows = []
            marker = (encode_pair(tokenizer, batch_prompts.texts[0], answer_marker)[1]
                      if answer_marker is not None and len(batch_prompts) else None)
            starts = range(0, len(batch_prompts), batch_size)
            for start in tqdm(starts, desc=f"evaluate {condition}", disable=not progress):
                span = range(start, min(start + batch_size, len(batch_prompts)))
                with torch.inference_mode():
                    new = greedy_continuations(model, batch_prompts.tensors(span), max_new_tokens,
                                               batch_prompts.pad_token_id, tokenizer.eos_token_id)
                for row, tokens in zip(span, new.tolist(), strict=True):
                    if marker is not None:
                        end = index_after(tokens, marker)
                        tokens = tokens[end:] if end >= 0 else tokens
                    text = tokenizer.decode(tokens, skip_special_tokens=True).strip()
                    answers = data.records[batch_prompts.records[row]]["answers"]
                    correct = normalize_answer(text) in {normalize_answer(a) for a in answers}
                    rows.append({"record": batch_prompts.records[row], "prediction": text, "answers": answers,
                                 "correct": correct})
            scores[condition] = sum(r["correct"] for r in rows) / len(rows) if rows else float("nan")
            predictions[condition] = rows
    finally:
        model.train(was_training)
    return (scores, predictions) if return_predictions else scores
