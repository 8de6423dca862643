"""fastrit.evaluate: batched, left-padded greedy generation gives the predictions of a plain per-example loop,
and exact match is computed on them with the SQuAD normalisation."""

import datasets
import pytest
import torch
import transformers

import fastrit
from fastrit import data
from fastrit.data import world
from tests.tiny_models import word_tokenizer

datasets.disable_progress_bars()


@pytest.fixture(scope="module")
def reader(tmp_path_factory):
    """A tiny random Llama over the synthetic vocabulary, saved and loaded back (the real loading code)."""
    tokenizer = word_tokenizer(world.vocabulary() + ["Passage", ":", ".", "?", "Question", "Answer"])
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, initializer_range=0.5,
    )
    path = tmp_path_factory.mktemp("reader")
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(path)
    return model, transformers.AutoTokenizer.from_pretrained(path)


def test_batched_evaluation_equals_a_per_example_greedy_loop(reader):
    model, tokenizer = reader
    rag = data.synthetic(20, split="test", seed=9, k=3)
    model.train()  # evaluate must not leave it changed
    scores, predictions = fastrit.evaluate(model, tokenizer, rag, conditions=("relevant", "noisy"), k=3,
                                           batch_size=7, max_new_tokens=4, return_predictions=True)
    assert model.training
    model.eval()
    for condition in ("relevant", "noisy"):
        built = data.prompts(rag, tokenizer, condition=condition, k=3)
        assert [p["record"] for p in predictions[condition]] == built.records == list(range(20))
        for row, got in enumerate(predictions[condition]):
            ids = torch.tensor([built.prompt_ids[row]])
            with torch.no_grad():
                out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            want = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
            assert got["prediction"] == want
            assert got["correct"] == (data.normalize_answer(want) in map(data.normalize_answer, got["answers"]))
        assert scores[condition] == sum(p["correct"] for p in predictions[condition]) / 20


def test_exact_match_counts_a_model_that_copies_the_answer(reader, monkeypatch):
    # a stand-in generate that answers with the gold answer for even records and a wrong word for odd ones:
    # EM must be exactly one half, whatever the batch size
    model, tokenizer = reader
    rag = data.synthetic(10, split="dev", seed=1, k=3)
    answers = [tokenizer(f" {r['answers'][0]}", add_special_tokens=False)["input_ids"] for r in rag.records]
    built = data.prompts(rag, tokenizer, condition="relevant", k=3)
    by_prompt = {tuple(p): r for p, r in zip(built.prompt_ids, built.records, strict=True)}

    def fake_generate(input_ids, attention_mask, max_new_tokens, **kwargs):
        rows = []
        for ids, mask in zip(input_ids, attention_mask, strict=True):
            record = by_prompt[tuple(ids[mask.bool()].tolist())]
            tokens = answers[record] if record % 2 == 0 else tokenizer(" Question", add_special_tokens=False)[
                "input_ids"]
            rows.append(torch.cat([ids, torch.tensor(tokens + [tokenizer.eos_token_id])]))
        return torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=tokenizer.pad_token_id)

    monkeypatch.setattr(model, "generate", fake_generate)
    for batch_size in (1, 3, 10):
        assert fastrit.evaluate(model, tokenizer, rag, conditions=("relevant",), k=3, batch_size=batch_size) == {
            "relevant": 0.5}


def test_the_answer_after_the_marker_is_what_is_scored(reader, monkeypatch):
    # a stand-in generate writing "Passage : <gold> . Answer : <gold>" (right), "... Answer : Question" (wrong:
    # the gold answer earlier in the text does not count) or the bare gold answer without a marker (scored as is)
    model, tokenizer = reader
    rag = data.synthetic(9, split="dev", seed=2, k=3)
    built = data.prompts(rag, tokenizer, condition="relevant", k=3)
    by_prompt = {tuple(p): r for p, r in zip(built.prompt_ids, built.records, strict=True)}

    def ids(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    def fake_generate(input_ids, attention_mask, max_new_tokens, **kwargs):
        rows = []
        for prompt, mask in zip(input_ids, attention_mask, strict=True):
            record = by_prompt[tuple(prompt[mask.bool()].tolist())]
            gold = rag.records[record]["answers"][0]
            text = [f" Passage: {gold}. Answer: {gold}", f" Passage: {gold}. Answer: Question", f" {gold}"][record % 3]
            rows.append(torch.cat([prompt, torch.tensor(ids(text) + [tokenizer.eos_token_id])]))
        return torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=tokenizer.pad_token_id)

    monkeypatch.setattr(model, "generate", fake_generate)
    for batch_size in (2, 9):
        scores, predictions = fastrit.evaluate(model, tokenizer, rag, conditions=("relevant",), k=3,
                                               batch_size=batch_size, answer_marker=data.ANSWER_MARKER,
                                               return_predictions=True)
        assert scores == {"relevant": 6 / 9}
        assert [p["correct"] for p in predictions["relevant"]] == [r % 3 != 1 for r in range(9)]
    assert fastrit.evaluate(model, tokenizer, rag, conditions=("relevant",), k=3) == {"relevant": 3 / 9}


def test_bad_arguments_name_themselves(reader):
    model, tokenizer = reader
    rag = data.synthetic(2, seed=0)
    with pytest.raises(ValueError, match="^batch_size:"):
        fastrit.evaluate(model, tokenizer, rag, batch_size=0)
    with pytest.raises(ValueError, match="^max_new_tokens:"):
        fastrit.evaluate(model, tokenizer, rag, max_new_tokens=0)
    with pytest.raises(ValueError, match="^condition:"):
        fastrit.evaluate(model, tokenizer, rag, conditions=("clean",))
