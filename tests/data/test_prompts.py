"""fastrit.data.prompts: the passage mix of each condition, truncation that keeps question and answer, the
chat template, determinism, and tensors ready for fastrit.attribute."""

import types

import datasets
import pytest

from fastrit import data
from fastrit.data import world
from fastrit.data.prompts import DEFAULT_TEMPLATE, format_passage
from tests.tiny_models import word_tokenizer

datasets.disable_progress_bars()

CHAT = "{% for m in messages %}<s> {{ m['role'] }} : {{ m['content'] }} </s>{% endfor %}<s> assistant :"


@pytest.fixture(scope="module")
def tokenizer():
    return word_tokenizer(world.vocabulary() + ["Passage", ":", ".", "?", "Question", "Answer", "user", "assistant"],
                          chat_template=CHAT)


@pytest.fixture(scope="module")
def records():
    return data.synthetic(60, split="test", seed=4, k=5)


def _passages_in(prompt: str, record: dict) -> list[dict]:
    return [c for c in record["ctxs"] if format_passage(c) in prompt]


@pytest.mark.parametrize("k", [1, 3, 5])
@pytest.mark.parametrize("condition", data.CONDITIONS)
def test_passage_mix_of_every_condition(records, tokenizer, condition, k):
    out = data.prompts(records, tokenizer, condition=condition, k=k, template=DEFAULT_TEMPLATE)
    assert len(out) == len(records) and out.skipped == {}
    for text, index in zip(out.texts, out.records, strict=True):
        record = records.records[index]
        shown = _passages_in(text, record)
        relevant = [c for c in shown if c["has_answer"]]
        if condition == "relevant":
            assert relevant == shown and len(shown) == min(k, sum(c["has_answer"] for c in record["ctxs"]))
        elif condition == "irrelevant":
            assert not relevant and len(shown) == k
        else:
            assert len(relevant) == 1 and len(shown) == k
        assert text.endswith(f"Question: {record['question']}\nAnswer:")


def test_answer_tokens_continue_the_prompt(records, tokenizer):
    out = data.prompts(records, tokenizer, condition="noisy")
    for target, index in zip(out.target_ids, out.records, strict=True):
        assert tokenizer.decode(target) == records.records[index]["answers"][0]


def test_truncation_keeps_question_and_answer(records, tokenizer):
    full = data.prompts(records, tokenizer, condition="noisy", k=5, template=DEFAULT_TEMPLATE)
    for max_length in (60, 40, 25):
        out = data.prompts(records, tokenizer, condition="noisy", k=5, max_length=max_length,
                           template=DEFAULT_TEMPLATE)
        assert len(out) + sum(out.skipped.values()) == len(records)
        for text, prompt, target, index in zip(out.texts, out.prompt_ids, out.target_ids, out.records, strict=True):
            record = records.records[index]
            assert len(prompt) + len(target) - 1 <= max_length
            assert text.endswith(f"Question: {record['question']}\nAnswer:")
            assert target == full.target_ids[full.records.index(index)]
            # the relevant passage is the last to go: it is still there, perhaps shortened
            assert "Passage" in text
    tiny = data.prompts(records, tokenizer, condition="noisy", k=5, max_length=8)  # not even the question fits
    assert len(tiny) == 0 and tiny.skipped == {"longer than max_length=8": len(records)}


def test_default_max_length_is_the_model_maximum_positions(records, tokenizer):
    from transformers import LlamaConfig

    config = LlamaConfig(max_position_embeddings=40)
    by_model = data.prompts(records, tokenizer, condition="noisy", model=config)
    explicit = data.prompts(records, tokenizer, condition="noisy", max_length=40)
    assert by_model.prompt_ids == explicit.prompt_ids and by_model.skipped == explicit.skipped
    assert by_model.prompt_ids != data.prompts(records, tokenizer, condition="noisy").prompt_ids
    with pytest.raises(ValueError, match="model"):  # a config that names no limit
        data.prompts(records, tokenizer, condition="noisy", model=types.SimpleNamespace(model_type="custom"))


def test_prompts_of_chosen_records_equal_those_of_all(records, tokenizer):
    full = data.prompts(records, tokenizer, condition="noisy", seed=3)
    some = data.prompts(records, tokenizer, condition="noisy", seed=3, indices=[7, 2, 40])
    assert some.records == [7, 2, 40]
    assert some.texts == [full.texts[full.records.index(i)] for i in (7, 2, 40)]
    with pytest.raises(ValueError, match="indices"):
        data.prompts(records, tokenizer, condition="noisy", indices=[len(records)])


def test_records_without_the_needed_passages_are_skipped(tokenizer):
    rows = [
        {"question": "Who founded Tesaro ?", "answers": ["Kudoson"],
         "ctxs": [{"title": "", "text": "Tesaro was founded by Kudoson .", "has_answer": True}]},
        {"question": "Who founded Tesaro ?", "answers": ["Kudoson"],
         "ctxs": [{"title": "", "text": "Tesaro is an old land .", "has_answer": False}]},
    ]
    rag = data.RagData(datasets.Dataset.from_list(rows, features=data.FEATURES))
    assert data.prompts(rag, tokenizer, condition="relevant", k=3).records == [0]
    assert data.prompts(rag, tokenizer, condition="relevant", k=3).skipped == {"no relevant passage": 1}
    assert data.prompts(rag, tokenizer, condition="irrelevant", k=1).records == [1]
    noisy = data.prompts(rag, tokenizer, condition="noisy", k=2)
    assert noisy.records == [] and noisy.skipped == {"fewer than 1 irrelevant passages": 1, "no relevant passage": 1}


def test_templates(records, tokenizer):
    template = "Question: {question}\n{passages}\nAnswer:"
    custom = data.prompts(records, tokenizer, condition="relevant", template=template)
    assert custom.texts[0].startswith("Question: ")
    chat = data.prompts(records, tokenizer, condition="relevant", template="chat")
    assert chat.texts[0].startswith("<s> user : ") and chat.texts[0].endswith("<s> assistant :")
    assert data.prompts(records, tokenizer, condition="relevant").texts == chat.texts  # None: the chat template
    with pytest.raises(ValueError, match="^template:"):
        data.prompts(records, tokenizer, condition="relevant", template="no placeholders")
    with pytest.raises(ValueError, match="^condition:"):
        data.prompts(records, tokenizer, condition="clean")


def test_same_seed_same_prompts(records, tokenizer):
    a = data.prompts(records, tokenizer, condition="noisy", seed=1)
    assert a.texts == data.prompts(records, tokenizer, condition="noisy", seed=1).texts
    assert a.texts != data.prompts(records, tokenizer, condition="noisy", seed=2).texts


def test_tensors_are_left_padded_for_attribution_and_generation(records, tokenizer):
    out = data.prompts(records, tokenizer, condition="noisy", k=3)
    batch = out.tensors(range(5))
    assert batch["input_ids"].shape == batch["attention_mask"].shape and batch["input_ids"].shape[0] == 5
    for row in range(5):
        n = len(out.prompt_ids[row])
        assert batch["attention_mask"][row].sum() == n and batch["attention_mask"][row, -1] == 1
        assert batch["input_ids"][row, -n:].tolist() == out.prompt_ids[row]
        assert batch["input_ids"][row, :-n].eq(tokenizer.pad_token_id).all()
        target = batch["target_ids"][row]
        assert target[target != -100].tolist() == out.target_ids[row]


def test_a_chat_template_that_writes_the_bos_token_gets_no_second_one():
    from tokenizers.processors import TemplateProcessing

    from tests.tiny_models import word_tokenizer

    tokenizer = word_tokenizer(["hello", "world", "Answer", ":"],
                               chat_template="{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}")
    bos = (tokenizer.bos_token, tokenizer.bos_token_id)  # a tokenizer that adds BOS itself, as Llama-3's does
    tokenizer._tokenizer.post_processor = TemplateProcessing(single=f"{bos[0]} $A", special_tokens=[bos])
    assert tokenizer("hello")["input_ids"][0] == bos[1]
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hello world"}], tokenize=False)
    assert prompt.startswith(tokenizer.bos_token)
    prompt_ids, answer_ids = data.encode_pair(tokenizer, prompt, "world")
    assert prompt_ids.count(tokenizer.bos_token_id) == 1
    assert answer_ids == tokenizer(" world", add_special_tokens=False)["input_ids"]
