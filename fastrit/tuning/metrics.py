"""The answer loss on held-out noisy-context prompts, in the format a model answers in.

- :func:`answer_loss`: the answer right after the prompt (stage 1's format, and an untuned reader's), teacher
  forced: mean cross-entropy per answer token.
- :func:`answer_loss_after_evidence`: the answer after the model's *own* evidence (stage 2's format,
  ``Evidence: ... Answer: ...``): the model writes greedily from the prompt until it has written the answer marker,
  then the gold answer is teacher forced after what it wrote. Teacher forcing the gold evidence instead would hand
  the model the sentence that holds the answer, which a noisy-context prompt does not.
- :func:`answer_loss_over_evidence`: the answer's likelihood under a model that may write evidence first, with the
  evidence marginalised rather than fixed to the greedy one: ``-log(p(answer) + sum_s p(Evidence: s Answer:
  answer))`` over the record's passage sentences ``s``. These are disjoint ways of writing the answer, so the sum
  is a lower bound on the model's probability of answering it, and the loss an upper bound on its answer loss;
  evidence the model writes in its own words is not counted.
- :func:`answer_loss_over_own_evidence`: the same likelihood with the evidence marginalised over the model's own
  distribution, by sampling: ``-log(p(answer) + p(Evidence:) * mean_e p(answer | Evidence: e Answer:))`` with
  ``e`` drawn from the model. The answer loss in whichever of the two trained formats the model answers.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import datasets
import torch
from torch import nn

from .. import _args
from .. import data as rag
from ..arch import max_positions
from ..data import ANSWER_MARKER, EVIDENCE_MARKER, RagData
from ..data.text import sentences
from ..data.turns import end_token_id, stop_token_ids
from ..evaluate import eval_mode, greedy_continuations, marker_end, marker_variants, until_stop
from .loss import causal_lm_loss
from .stages import IGNORE_INDEX, collate

__all__ = ["EvidenceAnswerLoss", "answer_loss", "answer_loss_after_evidence", "answer_loss_over_evidence",
           "answer_loss_over_own_evidence"]


def answer_loss(model: nn.Module, examples, tokenizer, *, batch_size: int = 32) -> float:
    """Mean cross-entropy per target token of ``examples`` (a stage dataset: input_ids and labels), no grad."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    total, count = 0.0, 0
    with eval_mode(model), torch.no_grad():
        for start in range(0, len(examples), batch_size):
            batch = collate([examples[i] for i in range(start, min(start + batch_size, len(examples)))], pad)
            tokens = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
            loss = causal_lm_loss(model, batch["input_ids"].to(model.device), batch["labels"].to(model.device),
                                  batch["attention_mask"].to(model.device))
            total += float(loss) * tokens
            count += tokens
    return total / max(count, 1)


class EvidenceAnswerLoss(NamedTuple):
    """``loss``: mean cross-entropy per answer token (answer and end token) after the model's own evidence;
    ``examples``: prompts measured; ``marker_written``: the share of them where the model wrote the answer marker
    itself within the token budget (elsewhere the marker was appended to what it wrote)."""

    loss: float
    examples: int
    marker_written: float


def _answer_markers(tokenizer, prompt: str) -> list[list[int]]:
    """The answer marker's ids as the model may write them after ``prompt`` (fastrit.evaluate.marker_variants); the
    last, the marker after a word, is the one an evidence-then-answer target writes and the one appended to a
    continuation that wrote none."""
    return marker_variants(tokenizer, prompt, ANSWER_MARKER)


def _prompts_with_room(model: nn.Module, tokenizer, data: RagData, max_evidence_tokens: int, k: int,
                       template: str | None, seed: int) -> rag.RagPrompts:
    """``data``'s noisy-context prompts (those of the two stages), short enough to leave ``max_evidence_tokens``
    and the answer room in the model's positions; refuses a budget that leaves none, and data that gives none."""
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
    return built


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
    _args.positive("max_evidence_tokens", max_evidence_tokens)
    built = _prompts_with_room(model, tokenizer, data, max_evidence_tokens, k, template, seed)
    markers = _answer_markers(tokenizer, built.texts[0])
    eos = end_token_id(tokenizer, template)
    stops = stop_token_ids(tokenizer, model)
    stop_set = set(stops)
    rows: dict[str, list] = {"input_ids": [], "labels": []}
    written = 0
    with eval_mode(model):
        for start in range(0, len(built), batch_size):
            span = range(start, min(start + batch_size, len(built)))
            with torch.inference_mode():
                new = greedy_continuations(model, built.tensors(span), max_evidence_tokens, built.pad_token_id,
                                           stops or None)
            for row, tokens in zip(span, new.tolist(), strict=True):
                tokens = until_stop(tokens, stop_set)
                end = marker_end(tokens, markers)
                written += end >= 0
                evidence = tokens[:end] if end >= 0 else tokens + markers[-1]
                answer = data.records[built.records[row]]["answers"][0]
                target = rag.encode_pair(tokenizer, ANSWER_MARKER, answer)[1] + ([eos] if eos is not None else [])
                prompt = built.prompt_ids[row] + evidence
                rows["input_ids"].append(prompt + target)
                rows["labels"].append([IGNORE_INDEX] * len(prompt) + target)
    examples = datasets.Dataset.from_dict(rows)
    loss = answer_loss(model, examples, tokenizer, batch_size=batch_size)
    return EvidenceAnswerLoss(loss, len(examples), written / len(examples))


def _target_logprobs(model: nn.Module, rows: list[tuple[list[int], list[int]]], pad: int,
                     batch_size: int) -> list[float]:
    """The summed log-probability (natural log) of each ``(prompt, target)`` row's target tokens, teacher forced,
    no grad."""
    head = model.get_output_embeddings()
    softcap = getattr(model.config, "final_logit_softcapping", None)
    out: list[float] = []
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            batch = collate([{"input_ids": p + t, "labels": [IGNORE_INDEX] * len(p) + t} for p, t in chunk], pad)
            ids, labels = batch["input_ids"].to(model.device), batch["labels"].to(model.device)
            hidden = model.base_model(input_ids=ids, attention_mask=batch["attention_mask"].to(model.device),
                                      use_cache=False).last_hidden_state
            targets = labels[:, 1:]
            picked = targets != IGNORE_INDEX
            logits = head(hidden[:, :-1][picked]).float()
            if softcap:
                logits = torch.tanh(logits / softcap) * softcap
            logprobs = torch.log_softmax(logits, dim=-1).gather(1, targets[picked][:, None])[:, 0]
            sums = torch.zeros(len(chunk), device=logprobs.device).index_add_(0, picked.nonzero()[:, 0], logprobs)
            out.extend(sums.tolist())
    return out


def answer_loss_over_evidence(model: nn.Module, tokenizer, data: RagData, *, k: int = 5,
                              template: str | None = None, seed: int = 0, batch_size: int = 32) -> float:
    """Mean cross-entropy per answer token (answer and end token) of ``data``'s noisy-context prompts, the
    evidence marginalised over the ways of writing the answer that the two stages train (module docstring).

    For each prompt (the denoise/distill prompt: fastrit.data.prompts, condition "noisy", ``k``, ``template``,
    ``seed``) the ways are: the first gold answer right after the prompt, and ``Evidence: s Answer: <answer>`` for
    every distinct sentence ``s`` of the record's passages (fastrit.data.text.sentences, the sentences evidence
    is taken from); each ends with the end token. The loss of a prompt is ``-log`` of the summed probability of
    those ways; the result is the summed loss over the summed number of answer tokens (answer and end token, as
    :func:`answer_loss` counts them). The model is put in eval mode and given back in the mode it had.
    """
    built = rag.prompts(data, tokenizer, condition="noisy", k=k, template=template, seed=seed, model=model)
    if len(built) == 0:
        raise ValueError(f"data: no noisy-context prompt could be built from {len(data)} records")
    end = end_token_id(tokenizer, template)
    eos = [end] if end is not None else []
    rows: list[tuple[list[int], list[int]]] = []
    owner: list[int] = []
    answer_tokens = 0
    for row, text in enumerate(built.texts):
        record = data.records[built.records[row]]
        answer = record["answers"][0]
        prompt, direct = rag.encode_pair(tokenizer, text, answer)
        answer_tokens += len(direct) + len(eos)
        ways = {tuple(direct + eos)}
        for ctx in record["ctxs"]:
            for sentence in sentences(ctx["text"]):
                target = f"{EVIDENCE_MARKER} {sentence} {ANSWER_MARKER} {answer}"
                ways.add(tuple(rag.encode_pair(tokenizer, text, target)[1] + eos))
        for way in sorted(ways):
            rows.append((prompt, list(way)))
            owner.append(row)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    with eval_mode(model):
        logprobs = torch.tensor(_target_logprobs(model, rows, pad, batch_size), dtype=torch.float64)
    owners = torch.tensor(owner)
    total = -sum(float(torch.logsumexp(logprobs[owners == row], dim=0)) for row in range(len(built)))
    return total / answer_tokens


def _sampled_answer_logprob(model: nn.Module, opened: list[int], answer: list[int], markers: list[list[int]],
                            samples: int, max_tokens: int, pad: int, stops: list[int],
                            batch_size: int) -> torch.Tensor | None:
    """``log`` of the mean, over ``samples`` continuations of ``opened`` drawn from the model (temperature 1, at
    most ``max_tokens``, stopping at any of ``stops``) and cut just after the first of ``markers``, of
    ``p(answer | opened, continuation)``; a continuation without a marker counts 0. A float64 scalar, or None when
    no continuation wrote the marker. Draws from the global RNG."""
    ids = torch.tensor([opened] * samples, device=model.device)
    with torch.inference_mode():
        new = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                             do_sample=True, temperature=1.0, top_k=0, top_p=1.0, num_beams=1, pad_token_id=pad,
                             eos_token_id=stops or None)[:, len(opened):].tolist()
    scored = []
    stop_set = set(stops)
    for tokens in new:
        tokens = until_stop(tokens, stop_set)
        cut = marker_end(tokens, markers)
        if cut >= 0:
            scored.append((opened + tokens[:cut], answer))
    if not scored:
        return None
    logprobs = torch.tensor(_target_logprobs(model, scored, pad, batch_size), dtype=torch.float64)
    return torch.logsumexp(logprobs, dim=0) - math.log(samples)


def answer_loss_over_own_evidence(model: nn.Module, tokenizer, data: RagData, *, samples: int = 16,
                                  max_evidence_tokens: int = 64, k: int = 5, template: str | None = None,
                                  seed: int = 0, batch_size: int = 32) -> float:
    """The answer loss of a model that may write evidence first, the evidence marginalised over the model's own
    distribution by sampling: mean cross-entropy per answer token (answer and end token) of ``data``'s noisy-context
    prompts (those of the two stages: fastrit.data.prompts, condition "noisy", ``k``, ``template``, ``seed``).

    The probability of the gold answer (the first one, with the end token) after a prompt ``x`` sums the two
    formats the stages train, which are disjoint:

    - ``p(answer | x)``: the answer right after the prompt, exact (teacher forced);
    - ``p(Evidence: | x) * E_e[p(answer | x, Evidence: e Answer:)]``, the expectation over the model's own
      continuations of ``x, Evidence:``, cut at the first answer marker. It is estimated by the mean over ``samples``
      continuations drawn from the model (temperature 1, no top-k or top-p), up to ``max_evidence_tokens`` tokens;
      a continuation that ends, or runs out of tokens, before it writes the marker contributes 0.

    The probability estimate is unbiased (for evidence within the token budget), so the loss, ``-log`` of it, is
    conservative: above the true loss in expectation (Jensen), by less as ``samples`` grows. Unlike
    :func:`answer_loss_over_evidence`, it counts evidence the model writes in its own words, not only the passages'
    sentences. The draws are seeded by ``seed`` inside a forked RNG, one prompt's ``samples`` continuations per
    ``generate`` call, so the result is reproducible, does not depend on ``batch_size`` (the scoring batches), and
    the global RNG is left as it was. The model is put in eval mode and given back in the mode it had.

    Returns the summed loss over the summed number of answer tokens, as :func:`answer_loss` counts them.
    """
    _args.positive("samples", samples)
    _args.positive("max_evidence_tokens", max_evidence_tokens)
    _args.positive("batch_size", batch_size)
    built = _prompts_with_room(model, tokenizer, data, max_evidence_tokens, k, template, seed)
    eos = end_token_id(tokenizer, template)
    end = [eos] if eos is not None else []
    pad = built.pad_token_id
    markers = _answer_markers(tokenizer, built.texts[0])
    stops = stop_token_ids(tokenizer, model)
    total, answer_tokens = 0.0, 0
    cuda = model.device.type == "cuda"
    with eval_mode(model):
        # only the generator that draws (the CPU's, or the model's GPU's) is seeded, and it is restored on exit
        with torch.random.fork_rng(devices=[model.device] if cuda else []):
            generator = torch.cuda.default_generators[model.device.index or 0] if cuda else torch.default_generator
            generator.manual_seed(seed)
            for row in range(len(built)):
                answer = data.records[built.records[row]]["answers"][0]
                prompt, direct = rag.encode_pair(tokenizer, built.texts[row], answer)
                opened = prompt + rag.encode_pair(tokenizer, built.texts[row], EVIDENCE_MARKER)[1]
                after_marker = rag.encode_pair(tokenizer, ANSWER_MARKER, answer)[1] + end
                answer_tokens += len(direct) + len(end)
                direct_lp, opener_lp = _target_logprobs(model, [(prompt, direct + end), (prompt, opened[len(prompt):])],
                                                        pad, batch_size)
                ways = [torch.tensor(direct_lp, dtype=torch.float64)]
                sampled = _sampled_answer_logprob(model, opened, after_marker, markers, samples,
                                                  max_evidence_tokens, pad, stops, batch_size)
                if sampled is not None:
                    ways.append(opener_lp + sampled)
                total -= float(torch.logsumexp(torch.stack(ways), dim=0))
    return total / answer_tokens
