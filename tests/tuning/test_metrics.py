"""The answer-loss measures against a reference built one prompt at a time from model.generate and the model's own
loss: the answer right after the prompt, and the answer after the model's own evidence (marker written by the
model, or appended when it wrote none)."""

import copy
import math

import pytest
import torch

from fastrit import data, demo
from fastrit.tuning import metrics
from fastrit.tuning.stages import stage_data


def _records(n: int) -> data.RagData:
    return data.RagData(demo.load_data("dev").records.select(range(n)))


def _answer_nll(model, prompt: list[int], target: list[int]) -> tuple[float, int]:
    """Summed cross-entropy of ``target`` after ``prompt`` (the model's own loss), and its token count."""
    ids = torch.tensor([prompt + target])
    labels = torch.tensor([[-100] * len(prompt) + target])
    with torch.no_grad():
        loss = model(input_ids=ids, labels=labels).loss
    return float(loss) * len(target), len(target)


def _reference_after_evidence(model, tokenizer, records, marker_text: str, budget: int) -> tuple[float, float]:
    built = data.prompts(records, tokenizer, condition="noisy")
    marker = data.encode_pair(tokenizer, built.texts[0], marker_text)[1]
    eos = tokenizer.eos_token_id
    total, count, written = 0.0, 0, 0
    for row in range(len(built)):
        prompt = built.prompt_ids[row]
        with torch.no_grad():
            out = model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=budget, do_sample=False,
                                 eos_token_id=eos, pad_token_id=built.pad_token_id)
        new = out[0, len(prompt):].tolist()
        if eos in new:
            new = new[:new.index(eos)]
        cut = None
        for start in range(len(new) - len(marker) + 1):
            if new[start:start + len(marker)] == marker:
                cut = start + len(marker)
                break
        written += cut is not None
        evidence = new[:cut] if cut is not None else new + marker
        answer = records.records[built.records[row]]["answers"][0]
        target = data.encode_pair(tokenizer, marker_text, answer)[1] + [eos]
        nll, n = _answer_nll(model, prompt + evidence, target)
        total, count = total + nll, count + n
    return total / count, written / len(built)


def test_answer_loss_equals_the_models_own_loss_per_token():
    model, tokenizer = demo.load_model()
    records = _records(6)
    examples = stage_data(records, tokenizer, "denoise").dataset
    total, count = 0.0, 0
    for row in examples:
        start = next(i for i, v in enumerate(row["labels"]) if v != -100)
        nll, n = _answer_nll(model, row["input_ids"][:start], row["input_ids"][start:])
        total, count = total + nll, count + n
    assert metrics.answer_loss(model, examples, tokenizer, batch_size=4) == pytest.approx(total / count, rel=1e-5)


@pytest.mark.parametrize("marker_kind", ["written", "appended"])
def test_answer_loss_after_evidence_equals_a_prompt_by_prompt_reference(monkeypatch, marker_kind):
    model, tokenizer = demo.load_model()
    records = _records(5)
    if marker_kind == "written":
        # a marker the untuned reader does write: the first word it generates for the first prompt
        built = data.prompts(records, tokenizer, condition="noisy")
        first = model.generate(input_ids=torch.tensor([built.prompt_ids[0]]), max_new_tokens=1, do_sample=False,
                               pad_token_id=built.pad_token_id)[0, -1]
        marker_text = tokenizer.decode([int(first)])
    else:
        marker_text = "Answer:"  # the untuned reader answers at once and never writes it
    monkeypatch.setattr(metrics, "ANSWER_MARKER", marker_text)
    result = metrics.answer_loss_after_evidence(model, tokenizer, records, max_evidence_tokens=6, batch_size=2)
    expected, written = _reference_after_evidence(model, tokenizer, records, marker_text, budget=6)
    assert result.examples == 5 and result.marker_written == pytest.approx(written)
    assert (written > 0) if marker_kind == "written" else (written == 0)
    assert result.loss == pytest.approx(expected, rel=1e-5)
    assert not model.training


def test_answer_loss_after_evidence_refuses_bad_input():
    model, tokenizer = demo.load_model()
    with pytest.raises(ValueError, match="max_evidence_tokens"):
        metrics.answer_loss_after_evidence(model, tokenizer, _records(2), max_evidence_tokens=0)


def test_answer_loss_over_evidence_equals_a_sum_over_the_ways_of_answering():
    """Against the model's own loss on each way of writing the answer, one at a time: the answer right after the
    prompt, and ``Evidence: s Answer: answer`` for each distinct passage sentence s; -log of the summed
    probability per prompt, over the answer's token count."""
    from fastrit.data.text import sentences

    model, tokenizer = demo.load_model()
    records = _records(4)
    built = data.prompts(records, tokenizer, condition="noisy")
    eos = tokenizer.eos_token_id
    total, count = 0.0, 0
    for row, text in enumerate(built.texts):
        record = records.records[built.records[row]]
        answer = record["answers"][0]
        prompt, direct = data.encode_pair(tokenizer, text, answer)
        targets = {tuple(direct + [eos])}
        for ctx in record["ctxs"]:
            for sentence in sentences(ctx["text"]):
                ids = data.encode_pair(tokenizer, text, f"Evidence: {sentence} {data.ANSWER_MARKER} {answer}")[1]
                targets.add(tuple(ids + [eos]))
        assert len(targets) > 2
        logprobs = torch.tensor([-_answer_nll(model, prompt, list(t))[0] for t in targets], dtype=torch.float64)
        total -= float(torch.logsumexp(logprobs, dim=0))
        count += len(direct) + 1
    got = metrics.answer_loss_over_evidence(model, tokenizer, records, batch_size=5)
    assert got == pytest.approx(total / count, rel=1e-4)
    # a sum over more ways than the direct answer alone: never above the direct answer's loss
    direct_only = metrics.answer_loss(model, stage_data(records, tokenizer, "denoise").dataset, tokenizer)
    assert got <= direct_only + 1e-6


def _exact_own_evidence(model, tokenizer, prompt: list[int], opener: list[int], marker: list[int],
                        answer: list[int]) -> tuple[float, float]:
    """Mean and variance of ``p(answer | prompt, opener, e, marker)`` over the model's continuations ``e`` of
    ``prompt + opener`` cut at a one-token ``marker`` within a budget of two tokens (0 where there is no marker),
    by enumerating every first token."""
    (m,) = marker
    eos = tokenizer.eos_token_id
    with torch.no_grad():  # the shared prefix once; every row continues it from its cache
        prefix = model(input_ids=torch.tensor([prompt + opener]), use_cache=True)

    def last_logits(tails: list[list[int]], count: int) -> torch.Tensor:  # tails of one length; their last count
        out = []
        with torch.no_grad():
            for start in range(0, len(tails), 512):
                chunk = tails[start:start + 512]
                cache = copy.deepcopy(prefix.past_key_values)
                cache.batch_repeat_interleave(len(chunk))
                hidden = model.model(input_ids=torch.tensor(chunk), cache=cache).last_hidden_state
                out.append(model.lm_head(hidden[:, -count:]).double())
        return torch.cat(out)

    def answer_logprob(tails: list[list[int]]) -> torch.Tensor:
        logits = last_logits([t + answer for t in tails], len(answer) + 1)[:, :-1]
        logprobs = torch.log_softmax(logits, dim=-1)
        return logprobs.gather(2, torch.tensor(answer)[None, :, None].expand(len(tails), -1, 1)).sum((1, 2))

    first = torch.log_softmax(prefix.logits[0, -1].double(), dim=-1)
    others = [t for t in range(first.numel()) if t not in (m, eos)]
    second = torch.log_softmax(last_logits([[t] for t in others], 1)[:, 0], dim=-1)[:, m]
    path = torch.cat([first[m:m + 1], first[others] + second])  # log p of [m] and of each [t, m]
    value = torch.cat([answer_logprob([[m]]), answer_logprob([[t, m] for t in others])]).exp()
    weight = path.exp()
    mean = float((weight * value).sum())
    return mean, float((weight * value**2).sum()) - mean**2


def test_sampled_evidence_matches_an_exact_enumeration():
    """With a one-token marker and a two-token budget every continuation can be enumerated: the sampled mean of
    p(answer | continuation) lies within 5 standard errors of the exact mean (a wrong sampling temperature fails)."""
    model, tokenizer = demo.load_model()
    records = _records(2)
    built = data.prompts(records, tokenizer, condition="noisy")
    eos = tokenizer.eos_token_id
    samples = 800
    torch.manual_seed(0)
    for row in range(len(built)):
        prompt = built.prompt_ids[row]
        opener = data.encode_pair(tokenizer, built.texts[row], data.EVIDENCE_MARKER)[1]
        opened = prompt + opener
        # the marker: the reader's likeliest token after the opener; the answer: its two likeliest after that
        with torch.no_grad():
            marker = int(model(input_ids=torch.tensor([opened])).logits[0, -1].argmax())
            answer = model.generate(input_ids=torch.tensor([opened + [marker]]), max_new_tokens=2, do_sample=False,
                                    pad_token_id=built.pad_token_id)[0, len(opened) + 1:].tolist()
        mean, variance = _exact_own_evidence(model, tokenizer, prompt, opener, [marker], answer)
        assert mean > 1e-3 and variance > 0
        estimate = float(metrics._sampled_answer_logprob(model, opened, answer, [[marker]], samples, 2,
                                                         built.pad_token_id, [eos], samples).exp())
        assert abs(estimate - mean) <= 5 * math.sqrt(variance / samples), (estimate, mean, variance)


def test_answer_loss_over_own_evidence_sums_the_direct_and_the_sampled_evidence_way():
    """Against the model's own loss for the direct answer and for ``Evidence:``, and the sampled evidence way drawn
    from the same seed: -log of p(answer) + p(Evidence:) * mean p(answer | own evidence), over the answer tokens."""
    model, tokenizer = demo.load_model()
    records = _records(3)
    built = data.prompts(records, tokenizer, condition="noisy", seed=7)
    eos = tokenizer.eos_token_id
    marker = data.encode_pair(tokenizer, built.texts[0], data.ANSWER_MARKER)[1]
    torch.manual_seed(7)
    total, count, evidence_ways = 0.0, 0, 0
    for row in range(len(built)):
        answer = records.records[built.records[row]]["answers"][0]
        prompt, direct = data.encode_pair(tokenizer, built.texts[row], answer)
        opener = data.encode_pair(tokenizer, built.texts[row], data.EVIDENCE_MARKER)[1]
        after_marker = data.encode_pair(tokenizer, data.ANSWER_MARKER, answer)[1] + [eos]
        ways = [-_answer_nll(model, prompt, direct + [eos])[0]]
        sampled = metrics._sampled_answer_logprob(model, prompt + opener, after_marker, [marker], 6, 24,
                                                  built.pad_token_id, [eos], 32)
        if sampled is not None:
            ways.append(-_answer_nll(model, prompt, opener)[0] + float(sampled))
            evidence_ways += 1
        total -= float(torch.logsumexp(torch.tensor(ways, dtype=torch.float64), dim=0))
        count += len(direct) + 1
    assert evidence_ways > 0
    got = metrics.answer_loss_over_own_evidence(model, tokenizer, records, samples=6, max_evidence_tokens=24,
                                                seed=7, batch_size=4)
    assert got == pytest.approx(total / count, rel=1e-5)


def test_answer_loss_over_own_evidence_is_seeded_and_leaves_rng_and_mode_as_they_were():
    model, tokenizer = demo.load_model()
    records = _records(3)
    model.train()
    state = torch.get_rng_state()
    first = metrics.answer_loss_over_own_evidence(model, tokenizer, records, samples=4, max_evidence_tokens=8)
    assert torch.equal(torch.get_rng_state(), state) and model.training
    again = metrics.answer_loss_over_own_evidence(model, tokenizer, records, samples=4, max_evidence_tokens=8,
                                                  batch_size=5)
    other = metrics.answer_loss_over_own_evidence(model, tokenizer, records, samples=4, max_evidence_tokens=8,
                                                  seed=1)
    assert again == pytest.approx(first, rel=1e-6) and other != first
    # the evidence way only adds probability: never above the direct answer's loss
    direct_only = metrics.answer_loss(model, stage_data(records, tokenizer, "denoise").dataset, tokenizer)
    assert first <= direct_only + 1e-6


@pytest.mark.parametrize("argument", ["samples", "max_evidence_tokens", "batch_size"])
def test_answer_loss_over_own_evidence_refuses_bad_input(argument):
    model, tokenizer = demo.load_model()
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match=argument):
            metrics.answer_loss_over_own_evidence(model, tokenizer, _records(2), **{argument: bad})
