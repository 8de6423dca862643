"""Greedy answers per context condition, scored as RAG robustness papers score them: how much irrelevant passages
hurt a reader.

Per condition (relevant, noisy, irrelevant passages; :func:`fastrit.data.prompts`), every kept record's greedy
answer is scored against its gold answers on SQuAD-normalised text (:mod:`fastrit.data.scoring`):

- ``accuracy``: a gold answer is contained in the answer (``fastrit.data.contains_answer``), what RAG robustness
  papers report; an instruct model that answers "The language of Lumamu is Paboish." earns it;
- ``em``: exact match, the answer equals a gold answer;
- ``f1``: SQuAD's token F1, the best over the gold answers;
- ``abstain``: the share of answers that decline (``fastrit.data.abstains``: "unknown", "I don't know", ...).

Generation stops at every token that ends a turn (``fastrit.data.turns.stop_token_ids``: the end-of-sequence
token, the model's ``generation_config.eos_token_id`` and a chat template's end-of-turn token), so a chat model
stops after its answer.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from . import _args
from .arch import max_positions
from .data import RagData, RagPrompts, abstains, contains_answer, encode_pair, exact_match, prompts, token_f1
from .data.turns import stop_token_ids

__all__ = ["METRICS", "evaluate", "index_after"]

logger = logging.getLogger("fastrit.evaluate")

#: the keys of each condition's scores (``n``: the records scored)
METRICS = ("accuracy", "em", "f1", "abstain", "n")


def greedy_continuations(model, batch: dict[str, torch.Tensor], max_new_tokens: int, pad: int,
                         eos: int | list[int] | None) -> torch.Tensor:
    """The new tokens ``[n, <= max_new_tokens]`` of greedy generation from left-padded prompts; ``eos``: the token
    id, or ids, that end generation (a finished row is filled with ``pad``)."""
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


def marker_variants(tokenizer, prompt: str, marker: str) -> list[list[int]]:
    """The token ids of ``marker`` as a model writes it: right after ``prompt`` (no space after a chat template's
    assistant header, :func:`fastrit.data.encode_pair`) and after a word (one space before it), without repeats;
    the last one is always the marker after a word."""
    variants = []
    for before in (prompt, prompt.rstrip() or prompt):
        ids = encode_pair(tokenizer, before, marker)[1]
        if ids:
            variants = [v for v in variants if v != ids] + [ids]
    return variants


def marker_end(tokens: list[int], variants: list[list[int]]) -> int:
    """The index just past the earliest occurrence in ``tokens`` of any marker variant, or -1."""
    found = []
    for ids in variants:
        end = index_after(tokens, ids)
        if end >= 0:
            found.append((end - len(ids), end))
    return min(found)[1] if found else -1


def _after_marker(tokens: list[int], variants: list[list[int]]) -> list[int]:
    """``tokens`` after the earliest occurrence of any marker variant; all of them when there is none."""
    end = marker_end(tokens, variants)
    return tokens[end:] if end >= 0 else tokens


def until_stop(tokens: list[int], stops: set[int]) -> list[int]:
    """``tokens`` up to the first stop token (what follows it is padding)."""
    for index, token in enumerate(tokens):
        if token in stops:
            return tokens[:index]
    return tokens


def score_answer(prediction: str, answers: list[str]) -> dict[str, bool | float]:
    """One answer's scores: ``correct`` (exact match), ``contains`` (accuracy), ``f1`` and ``abstained``."""
    return {"correct": exact_match(prediction, answers), "contains": contains_answer(prediction, answers),
            "f1": token_f1(prediction, answers), "abstained": abstains(prediction)}


def summarize(rows: list[dict]) -> dict[str, float | int]:
    """A condition's scores from its prediction rows: the means of the rows' flags and F1 (NaN without rows)."""
    n = len(rows)

    def mean(key: str) -> float:
        return sum(float(row[key]) for row in rows) / n if n else float("nan")

    return {"accuracy": mean("contains"), "em": mean("correct"), "f1": mean("f1"), "abstain": mean("abstained"),
            "n": n}


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
    stop_at_newline: bool = False,
):
    """Accuracy, exact match, token F1 and abstention of ``model``'s greedy answers per condition.

    Each condition's prompts come from :func:`fastrit.data.prompts` (``k``, ``template``, ``seed``), bounded so
    that prompt and ``max_new_tokens`` fit the model's maximum positions; records it skips are left out of that
    condition's score (and logged). ``template=None`` asks with the tokenizer's chat template when it has one (an
    instruct model is asked as it was tuned to be asked), else with ``fastrit.data.prompts.DEFAULT_TEMPLATE``;
    ``"chat"`` or a format string with ``{passages}`` and ``{question}`` choose. Batches of ``batch_size``
    left-padded prompts go through ``model.generate``, which stops a row at any of
    ``fastrit.data.turns.stop_token_ids(tokenizer, model)`` (end of sequence, the model's generation config, a chat
    template's end of turn); the answer is the generated text before that token, stripped of surrounding
    whitespace. The model is put in eval mode while generating and given back in the mode it had.

    ``answer_marker``: for a model that writes something before its answer (Neuro-RIT's distill stage teaches
    ``Evidence: ... Answer: ...``; pass ``fastrit.data.ANSWER_MARKER``), the answer is what follows the first
    marker in the generated tokens, tokenized either as it would follow the prompt directly (no space after a chat
    template's ``assistant\n``) or as it follows a word; a continuation without the marker is scored as it is. Give
    ``max_new_tokens`` room for what comes before the answer.

    ``stop_at_newline``: the answer ends at its first newline (after the marker, leading whitespace stripped first),
    for a model that goes on after a one-line answer. Generation itself does not stop there (the tokens are still
    generated up to a stop token or ``max_new_tokens``): a newline before the marker or before the answer must not
    end it.

    Returns ``{condition: {"accuracy", "em", "f1", "abstain", "n"}}``: the share of answers containing a gold
    answer (``fastrit.data.contains_answer``), equal to one (exact match), their mean token F1
    (``fastrit.data.token_f1``), the share that abstain (``fastrit.data.abstains``), all floats, all SQuAD-normalised
    and against any gold answer; and ``n``, the number of records scored (an int; the four are NaN when it is 0).
    With ``return_predictions=True``, ``(scores, predictions)`` where ``predictions[condition]`` lists
    ``{"record", "prediction", "answers", "correct", "contains", "f1", "abstained"}`` per kept record
    (``correct``: exact match; ``contains``: accuracy).
    """
    _check_settings(batch_size, max_new_tokens, answer_marker)
    if isinstance(conditions, str):
        conditions = (conditions,)
    max_length = _prompt_room(model, max_new_tokens)
    how = _Answering(batch_size, max_new_tokens, stop_token_ids(tokenizer, model), answer_marker, stop_at_newline,
                     progress)
    scores: dict[str, dict[str, float | int]] = {}
    predictions: dict[str, list[dict]] = {}
    with eval_mode(model):
        for condition in conditions:
            batch_prompts = prompts(data, tokenizer, condition=condition, k=k, template=template,
                                    max_length=max_length, seed=seed)
            if batch_prompts.skipped:
                logger.info("fastrit.evaluate %s: skipped %s", condition, batch_prompts.skipped)
            predictions[condition] = _condition_rows(model, tokenizer, data, batch_prompts, condition, how)
            scores[condition] = summarize(predictions[condition])
    return (scores, predictions) if return_predictions else scores


def _check_settings(batch_size: int, max_new_tokens: int, answer_marker: str | None) -> None:
    """ValueError naming the first of :func:`evaluate`'s generation settings that is out of range."""
    _args.positive("batch_size", batch_size)
    _args.positive("max_new_tokens", max_new_tokens)
    if answer_marker is not None and (not isinstance(answer_marker, str) or not answer_marker):
        raise ValueError(f"answer_marker: expected a non-empty string or None, got {answer_marker!r}")


def _prompt_room(model, max_new_tokens: int) -> int | None:
    """The most tokens a prompt may have so that ``max_new_tokens`` more fit the model's maximum positions (None:
    the model names no limit); ValueError naming ``max_new_tokens`` when that leaves no room."""
    positions = max_positions(model.config)
    if positions is None:
        return None
    if positions - max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: {max_new_tokens} leaves no room for a prompt in {positions} positions")
    return positions - max_new_tokens


@contextmanager
def eval_mode(model) -> Iterator[None]:
    """``model`` in eval mode for the block, then given back in the mode it had (also on error)."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@dataclass(frozen=True)
class _Answering:
    """How :func:`evaluate` generates and reads answers: its settings, checked, and the stop token ids."""

    batch_size: int
    max_new_tokens: int
    stops: list[int]
    answer_marker: str | None
    stop_at_newline: bool
    progress: bool


def _condition_rows(model, tokenizer, data: RagData, batch_prompts: RagPrompts, condition: str,
                    how: _Answering) -> list[dict]:
    """One prediction row per prompt of ``batch_prompts`` (:func:`evaluate`'s ``predictions[condition]``), in
    order: greedy answers generated ``how.batch_size`` prompts at a time, read and scored."""
    markers = (marker_variants(tokenizer, batch_prompts.texts[0], how.answer_marker)
               if how.answer_marker is not None and len(batch_prompts) else None)
    stop_set = set(how.stops)
    rows = []
    starts = range(0, len(batch_prompts), how.batch_size)
    for start in tqdm(starts, desc=f"evaluate {condition}", disable=not how.progress):
        span = range(start, min(start + how.batch_size, len(batch_prompts)))
        with torch.inference_mode():
            new = greedy_continuations(model, batch_prompts.tensors(span), how.max_new_tokens,
                                       batch_prompts.pad_token_id, how.stops or None)
        for row, tokens in zip(span, new.tolist(), strict=True):
            text = _answer_text(tokenizer, until_stop(tokens, stop_set), markers, how.stop_at_newline)
            record = batch_prompts.records[row]
            answers = data.records[record]["answers"]
            rows.append({"record": record, "prediction": text, "answers": answers, **score_answer(text, answers)})
    return rows


def _answer_text(tokenizer, tokens: list[int], markers: list[list[int]] | None, stop_at_newline: bool) -> str:
    """The answer in generated ``tokens`` (already cut at a stop token): what follows the first answer marker when
    ``markers`` are given, decoded and stripped, up to its first newline with ``stop_at_newline``."""
    if markers:
        tokens = _after_marker(tokens, markers)
    text = tokenizer.decode(tokens, skip_special_tokens=True).strip()
    return text.split("\n", 1)[0].strip() if stop_at_newline else text
