"""Prompts from RAG records: the passages of a context condition, a template, the answer tokens, truncation.

Conditions (ctxs are in retrieval rank order):
- "relevant": up to ``k`` has_answer passages, best ranked first (at least one);
- "irrelevant": ``k`` passages without the answer, best ranked first;
- "noisy": the best-ranked relevant passage and the ``k - 1`` best-ranked irrelevant ones, shuffled.

The scored sequence is prompt + answer[:-1] (fastrit's definition); it must fit ``max_length`` tokens. Too long,
the lowest-ranked passages are dropped first (never the last one of a kind the condition needs), then passage
texts are shortened from their end (irrelevant passages before relevant ones); the question and the answer are
never cut. A record that still does not fit, or lacks passages of a needed kind, is skipped and counted.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .. import _args
from ..arch import max_positions
from .rag import RagData
from .turns import resolve_template

__all__ = ["CONDITIONS", "DEFAULT_TEMPLATE", "RagPrompts", "encode_pair", "prompts"]

CONDITIONS = ("relevant", "irrelevant", "noisy")
DEFAULT_TEMPLATE = "{passages}\nQuestion: {question}\nAnswer:"


def format_passage(ctx: dict) -> str:
    return f"Passage: {ctx['title']}. {ctx['text']}" if ctx["title"] else f"Passage: {ctx['text']}"


@dataclass
class RagPrompts:
    """Token ids of one prompt per kept record, its answer tokens, and the records skipped, by reason.

    ``prompt_ids[i]`` and ``target_ids[i]`` are lists of token ids; ``records[i]`` is the index of the record
    in the data; :meth:`tensors` pads them into what ``fastrit.attribute`` and ``model.generate`` take.
    """

    texts: list[str]
    prompt_ids: list[list[int]]
    target_ids: list[list[int]]
    records: list[int]
    pad_token_id: int
    skipped: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.texts)

    def tensors(self, rows: list[int] | range | None = None) -> dict[str, torch.Tensor]:
        """``input_ids`` / ``attention_mask`` ``[n, T]`` (left-padded) and ``target_ids`` ``[n, K]`` (padded with
        -100) of ``rows`` (default: all), int64."""
        rows = range(len(self)) if rows is None else rows
        prompts = [self.prompt_ids[i] for i in rows]
        targets = [self.target_ids[i] for i in rows]
        width = max((len(p) for p in prompts), default=0)
        answer_width = max((len(t) for t in targets), default=0)
        input_ids = torch.full((len(prompts), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
        target_ids = torch.full((len(targets), answer_width), -100, dtype=torch.long)
        for row, (prompt, target) in enumerate(zip(prompts, targets, strict=True)):
            if prompt:
                input_ids[row, width - len(prompt) :] = torch.tensor(prompt)
                attention_mask[row, width - len(prompt) :] = 1
            target_ids[row, : len(target)] = torch.tensor(target, dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "target_ids": target_ids}


def _select(ctxs: list[dict], condition: str, k: int, rng: random.Random) -> tuple[list[int], str]:
    """Indices (rank order) of the passages of ``condition``, or ``([], reason)``."""
    relevant = [i for i, c in enumerate(ctxs) if c["has_answer"]]
    irrelevant = [i for i, c in enumerate(ctxs) if not c["has_answer"]]
    if condition == "relevant":
        return (relevant[:k], "") if relevant else ([], "no relevant passage")
    if condition == "irrelevant":
        return (irrelevant[:k], "") if len(irrelevant) >= k else ([], f"fewer than {k} irrelevant passages")
    if not relevant:
        return [], "no relevant passage"
    if len(irrelevant) < k - 1:
        return [], f"fewer than {k - 1} irrelevant passages"
    chosen = [relevant[0], *irrelevant[: k - 1]]
    rng.shuffle(chosen)
    return chosen, ""


class _Formatter:
    def __init__(self, tokenizer, template: str | None):
        placeholders = "{passages}" in (template or "") and "{question}" in (template or "")
        if template is not None and template != "chat" and not placeholders:
            raise ValueError("template: expected None, 'chat', or a format string with {passages} and {question}")
        if template == "chat" and not getattr(tokenizer, "chat_template", None):
            raise ValueError("template: 'chat' needs a tokenizer with a chat template")
        self.tokenizer = tokenizer
        self.template = template

    def __call__(self, question: str, passages: list[dict]) -> str:
        joined = "\n".join(format_passage(p) for p in passages)
        if self.template == "chat":
            content = DEFAULT_TEMPLATE.format(passages=joined, question=question).removesuffix("\nAnswer:")
            return self.tokenizer.apply_chat_template(
                [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
            )
        return (self.template or DEFAULT_TEMPLATE).format(passages=joined, question=question)


def answer_separator(prompt: str) -> str:
    """What goes between a prompt and its answer as the model would write it: nothing after a prompt that ends in
    whitespace (a chat template's ``assistant\n``), else one space (``Answer: 1760``)."""
    return "" if not prompt or prompt[-1].isspace() else " "


def encode_pair(tokenizer, prompt: str, answer: str) -> tuple[list[int], list[int]]:
    """The prompt's ids and the answer's, tokenized as the answer continues the prompt (after
    :func:`answer_separator`): after a chat template's assistant header the answer starts without a space token. A
    prompt that already starts with the BOS token's text gets no second BOS token."""
    separator = answer_separator(prompt)
    # a chat template writes the BOS token into the text itself (Llama-3, Gemma): the tokenizer adds no second one
    bos = getattr(tokenizer, "bos_token", None)
    special = not (isinstance(bos, str) and bos and prompt.startswith(bos))
    prompt_ids = tokenizer(prompt, add_special_tokens=special)["input_ids"]
    full = tokenizer(f"{prompt}{separator}{answer}", add_special_tokens=special)["input_ids"]
    if full[: len(prompt_ids)] == prompt_ids and len(full) > len(prompt_ids):
        return prompt_ids, full[len(prompt_ids) :]
    return prompt_ids, tokenizer(f"{separator}{answer}", add_special_tokens=False)["input_ids"]


def _fit(question, answer, passages, needed_kinds, formatter, tokenizer, max_length):
    """``(prompt, prompt ids, answer ids)`` within ``max_length``, or None. ``passages`` in rank order."""
    passages = [dict(p) for p in passages]
    while True:
        prompt = formatter(question, sorted(passages, key=lambda p: p["_order"]))
        prompt_ids, answer_ids = encode_pair(tokenizer, prompt, answer)
        over = len(prompt_ids) + len(answer_ids) - 1 - max_length
        if over <= 0 and answer_ids:
            return prompt, prompt_ids, answer_ids
        if not answer_ids:
            return None
        # drop the lowest-ranked passage whose kind stays represented without it
        kinds = Counter(p["has_answer"] for p in passages)
        droppable = [p for p in passages if kinds[p["has_answer"]] > 1 or p["has_answer"] not in needed_kinds]
        if droppable:
            passages.remove(max(droppable, key=lambda p: p["_rank"]))
            continue
        # then shorten a passage from its end: irrelevant ones first, the lowest ranked first
        words = [p for p in passages if len(p["text"].split()) > 1]
        if not words:
            return None
        victim = max(words, key=lambda p: (not p["has_answer"], p["_rank"]))
        kept = victim["text"].split()
        victim["text"] = " ".join(kept[: max(1, len(kept) - max(1, over))])


def _default_max_length(tokenizer, model) -> int:
    if model is not None:
        limit = max_positions(getattr(model, "config", model))
        if limit is None:
            raise ValueError("model: its config names no maximum positions; pass max_length")
        return limit
    limit = getattr(tokenizer, "model_max_length", None)
    return limit if isinstance(limit, int) and limit < 1_000_000 else 1 << 62  # transformers' "no limit" is huge


def prompts(
    data: RagData,
    tokenizer,
    *,
    condition: str,
    k: int = 5,
    template: str | None = None,
    max_length: int | None = None,
    seed: int = 0,
    model=None,
    indices: Sequence[int] | None = None,
) -> RagPrompts:
    """One prompt per record of ``data`` in ``condition`` ("relevant", "irrelevant" or "noisy"), with its first answer
    as target tokens. ``template``: a format string with ``{passages}`` and ``{question}`` (such as
    ``DEFAULT_TEMPLATE``), "chat" (the tokenizer's chat template), or None: "chat" when the tokenizer has a chat
    template, else ``DEFAULT_TEMPLATE`` (:func:`fastrit.data.turns.resolve_template`). ``max_length`` bounds prompt
    + answer[:-1] in tokens; by default it is the maximum positions of ``model`` (a transformers model or config)
    when one is given, else the tokenizer's ``model_max_length`` when that is a real limit, else none. ``indices``:
    the records to make prompts for (default: all), by their index in ``data``. Deterministic from ``seed`` and a
    record's index: a record gets the same prompt whichever other records are asked for with it.
    """
    _args.one_of("condition", condition, CONDITIONS)
    _args.positive("k", k)
    if max_length is None:
        max_length = _default_max_length(tokenizer, model)
    _args.positive("max_length", max_length)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("tokenizer: needs a pad or an end-of-sequence token to pad prompts")
    formatter = _Formatter(tokenizer, resolve_template(tokenizer, template))
    needed = {"relevant": {True}, "irrelevant": {False}, "noisy": {True, False}}[condition]
    out = RagPrompts([], [], [], [], pad)
    skipped: Counter = Counter()
    if indices is None:
        indices, rows = range(len(data.records)), data.records
    else:
        indices = [int(i) for i in indices]
        if any(not 0 <= i < len(data.records) for i in indices):
            raise ValueError(f"indices: expected record indices in [0, {len(data.records)})")
        rows = data.records.select(indices)
    for index, record in zip(indices, rows, strict=True):
        rng = random.Random(f"{seed}/{index}")
        chosen, reason = _select(record["ctxs"], condition, k, rng)
        if not record["answers"]:  # fastrit.data.load drops these; a RagData built by hand may hold them
            reason = "no answer"
        if reason:
            skipped[reason] += 1
            continue
        passages = [{**record["ctxs"][i], "_rank": i, "_order": position} for position, i in enumerate(chosen)]
        fitted = _fit(record["question"], record["answers"][0], passages, needed, formatter, tokenizer, max_length)
        if fitted is None:
            skipped[f"longer than max_length={max_length}"] += 1
            continue
        prompt, prompt_ids, answer_ids = fitted
        out.texts.append(prompt)
        out.prompt_ids.append(prompt_ids)
        out.target_ids.append(answer_ids)
        out.records.append(index)
    out.skipped = dict(sorted(skipped.items()))
    return out
