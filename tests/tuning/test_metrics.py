"""The answer-loss measures against a reference built one prompt at a time from model.generate and the model's own
loss: the answer right after the prompt, and the answer after the model's own evidence (marker written by the
model, or appended when it wrote none)."""

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
