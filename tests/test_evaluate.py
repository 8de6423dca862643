"""fastrit.evaluate: batched, left-padded greedy generation gives the predictions of a plain per-example loop (also
when a second token, a generation config's or a chat template's end of turn, stops it), and accuracy, exact match,
token F1 and abstention are computed on them with the SQuAD normalisation."""

import datasets
import pytest
import torch
import transformers

import fastrit
from fastrit import data
from fastrit.data import world
from fastrit.data.turns import stop_token_ids
from fastrit.evaluate import greedy_continuations
from tests.tiny_models import word_tokenizer

datasets.disable_progress_bars()


@pytest.fixture(scope="module")
def reader(tmp_path_factory):
    """A tiny random Llama over the synthetic vocabulary, saved and loaded back (the real loading code)."""
    tokenizer = word_tokenizer(world.vocabulary() + ["Passage", ":", ".", "?", "Question", "Answer", "unknown"])
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
            assert got["contains"] == data.contains_answer(want, got["answers"])
            assert got["f1"] == data.token_f1(want, got["answers"])
            assert got["abstained"] == data.abstains(want)
        rows = predictions[condition]
        assert scores[condition] == {
            "accuracy": sum(p["contains"] for p in rows) / 20, "em": sum(p["correct"] for p in rows) / 20,
            "f1": sum(p["f1"] for p in rows) / 20, "abstain": sum(p["abstained"] for p in rows) / 20, "n": 20}


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
            "relevant": {"accuracy": 0.5, "em": 0.5, "f1": 0.5, "abstain": 0.0, "n": 10}}


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
        assert scores["relevant"]["em"] == scores["relevant"]["accuracy"] == 6 / 9
        assert [p["correct"] for p in predictions["relevant"]] == [r % 3 != 1 for r in range(9)]
    # without the marker only the bare answers are exact, but every continuation holds the gold answer
    whole = fastrit.evaluate(model, tokenizer, rag, conditions=("relevant",), k=3)["relevant"]
    assert whole["em"] == 3 / 9 and whole["accuracy"] == 1.0 and whole["n"] == 9


def test_bad_arguments_name_themselves(reader):
    model, tokenizer = reader
    rag = data.synthetic(2, seed=0)
    with pytest.raises(ValueError, match="^batch_size:"):
        fastrit.evaluate(model, tokenizer, rag, batch_size=0)
    with pytest.raises(ValueError, match="^max_new_tokens:"):
        fastrit.evaluate(model, tokenizer, rag, max_new_tokens=0)
    with pytest.raises(ValueError, match="^condition:"):
        fastrit.evaluate(model, tokenizer, rag, conditions=("clean",))


def _fake_generate(tokenizer, rag, built, write):
    """A stand-in ``model.generate`` that continues each prompt with ``write(record, gold)`` and the end token."""
    by_prompt = {tuple(p): r for p, r in zip(built.prompt_ids, built.records, strict=True)}

    def generate(input_ids, attention_mask, max_new_tokens, **kwargs):
        rows = []
        for prompt, mask in zip(input_ids, attention_mask, strict=True):
            record = by_prompt[tuple(prompt[mask.bool()].tolist())]
            text = write(record, rag.records[record]["answers"][0])
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            rows.append(torch.cat([prompt, torch.tensor(ids + [tokenizer.eos_token_id])]))
        return torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=tokenizer.pad_token_id)

    return generate


def test_accuracy_counts_a_sentence_answer_that_exact_match_misses(reader, monkeypatch):
    # per record: the bare answer (exact), the answer in a sentence (contained, not exact), "unknown" in a sentence
    # (an abstention), a wrong word
    model, tokenizer = reader
    rag = data.synthetic(8, split="dev", seed=3, k=3)
    built = data.prompts(rag, tokenizer, condition="relevant", k=3)
    texts = ["{gold}", "The capital is {gold} .", "The capital is unknown .", "Question"]
    monkeypatch.setattr(model, "generate", _fake_generate(
        tokenizer, rag, built, lambda record, gold: texts[record % 4].format(gold=gold)))
    scores, predictions = fastrit.evaluate(model, tokenizer, rag, conditions=("relevant",), k=3, batch_size=3,
                                           return_predictions=True)
    rows = predictions["relevant"]
    assert [(p["correct"], p["contains"], p["abstained"]) for p in rows] == [
        [(True, True, False), (False, True, False), (False, False, True), (False, False, False)][r % 4]
        for r in range(8)]
    for p in rows:
        assert p["f1"] == data.token_f1(p["prediction"], p["answers"])
        words = len(data.normalize_answer(p["answers"][0]).split())
        if p["record"] % 4 == 1:  # "capital is <gold>": precision words / (words + 2), recall 1
            assert p["f1"] == pytest.approx(2 * words / (2 * words + 2))
    assert scores["relevant"] == {"accuracy": 0.5, "em": 0.25, "abstain": 0.25, "n": 8,
                                  "f1": pytest.approx(sum(p["f1"] for p in rows) / 8)}
    assert 0.25 < scores["relevant"]["f1"] < 0.5


def _most_common_later_token(model, tokenizer, built, max_new_tokens, stops):
    """The token greedy generation (stopped at ``stops``) writes most often after the first answer token: a second
    stop token there ends some answers early, not before they start."""
    new = greedy_continuations(
        model.eval(), built.tensors(range(len(built))), max_new_tokens, built.pad_token_id, stops)
    counts: dict[int, int] = {}
    for tokens in new.tolist():
        for token in tokens[1:]:
            if token not in (*stops, tokenizer.pad_token_id):
                counts[token] = counts.get(token, 0) + 1
    return max(counts, key=counts.get)


def _per_example_answers(model, tokenizer, built, max_new_tokens, stops):
    """Each prompt alone through ``model.generate`` (no padding) with ``stops``, cut before the stop token."""
    answers, stopped = [], 0
    for prompt in built.prompt_ids:
        ids = torch.tensor([prompt])
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=stops)
        tokens = out[0, ids.shape[1]:].tolist()
        if tokens and tokens[-1] in stops:
            tokens = tokens[:-1]
            stopped += len(tokens) > 0
        answers.append(tokenizer.decode(tokens, skip_special_tokens=True).strip())
    return answers, stopped


def test_a_second_stop_token_of_the_generation_config_ends_the_answer(reader, monkeypatch):
    model, tokenizer = reader
    rag = data.synthetic(16, split="test", seed=5, k=3)
    built = data.prompts(rag, tokenizer, condition="relevant", k=3)
    eos = tokenizer.eos_token_id
    second = _most_common_later_token(model, tokenizer, built, 6, [eos])
    before = fastrit.evaluate(model, tokenizer, rag, conditions=("relevant",), k=3, batch_size=5, max_new_tokens=6,
                              return_predictions=True)[1]["relevant"]
    monkeypatch.setattr(model.generation_config, "eos_token_id", [eos, second])
    assert stop_token_ids(tokenizer, model) == sorted([eos, second])
    after = fastrit.evaluate(model, tokenizer, rag, conditions=("relevant",), k=3, batch_size=5, max_new_tokens=6,
                             return_predictions=True)[1]["relevant"]
    want, stopped = _per_example_answers(model, tokenizer, built, 6, [eos, second])
    assert [p["prediction"] for p in after] == want
    assert stopped > 0  # the second token did end some answers after they began ...
    assert [p["prediction"] for p in after] != [p["prediction"] for p in before]  # ... which it did not before
    assert tokenizer.convert_ids_to_tokens(second) not in " ".join(want).split()


CHAT = ("{% for m in messages %}<|im_start|> {{ m['role'] }} : {{ m['content'] }} <|im_end|>{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|> assistant :{% endif %}")


@pytest.fixture
def chat_reader():
    """A tiny random Llama with a chat tokenizer: ``<|im_end|>`` ends a turn; a newline is a token."""
    import tokenizers

    tokenizer = word_tokenizer(world.vocabulary() + ["Passage", ":", ".", "?", "Question", "Answer", "user",
                                                     "assistant"], chat_template=CHAT)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.add_tokens([tokenizers.AddedToken("\n", normalized=False)])
    torch.manual_seed(1)
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, initializer_range=0.5,
    )
    return transformers.LlamaForCausalLM(config).eval(), tokenizer


def test_a_chat_models_end_of_turn_ends_the_answer(chat_reader):
    model, tokenizer = chat_reader
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert stop_token_ids(tokenizer, model) == sorted([tokenizer.eos_token_id, end_of_turn])
    rag = data.synthetic(16, split="test", seed=6, k=3)
    built = data.prompts(rag, tokenizer, condition="noisy", k=3)
    assert all(text.startswith("<|im_start|> user :") for text in built.texts)  # template=None: the chat template
    # the model writes <|im_end|> wherever it wrote its most common later token: swap their output rows
    later = _most_common_later_token(model, tokenizer, built, 6, [tokenizer.eos_token_id])
    with torch.no_grad():
        head = model.lm_head.weight
        head[[later, end_of_turn]] = head[[end_of_turn, later]].clone()
    _, predictions = fastrit.evaluate(model, tokenizer, rag, conditions=("noisy",), k=3, batch_size=6,
                                      max_new_tokens=6, return_predictions=True)
    want, stopped = _per_example_answers(model, tokenizer, built, 6, stop_token_ids(tokenizer, model))
    assert [p["prediction"] for p in predictions["noisy"]] == want
    assert stopped > 0
    # stopped at the end-of-turn token only, the same model generates past it
    _, plain = _per_example_answers(model, tokenizer, built, 6, [tokenizer.eos_token_id])
    assert plain < stopped


def test_stop_at_newline_scores_the_first_line(chat_reader, monkeypatch):
    model, tokenizer = chat_reader
    rag = data.synthetic(9, split="dev", seed=7, k=3)
    built = data.prompts(rag, tokenizer, condition="relevant", k=3)
    texts = ["{gold}\nPassage", "\n{gold}\nQuestion", "Question\n{gold}"]  # a newline first does not end it
    monkeypatch.setattr(model, "generate", _fake_generate(
        tokenizer, rag, built, lambda record, gold: texts[record % 3].format(gold=gold)))
    cut, predictions = fastrit.evaluate(model, tokenizer, rag, conditions=("relevant",), k=3, stop_at_newline=True,
                                        return_predictions=True)
    assert [p["prediction"] for p in predictions["relevant"]] == [
        [gold, gold, "Question"][r % 3] for r, gold in enumerate(a[0] for a in rag.records["answers"])]
    assert cut["relevant"] == {"accuracy": 6 / 9, "em": 6 / 9, "f1": 6 / 9, "abstain": 0.0, "n": 9}
    whole = fastrit.evaluate(model, tokenizer, rag, conditions=("relevant",), k=3)["relevant"]
    assert whole["em"] == 0.0 and whole["accuracy"] == 1.0
    # with the marker, the first line of what follows it
    texts[:] = ["Passage\nAnswer : {gold}\nPassage"] * 3
    marked = fastrit.evaluate(model, tokenizer, rag, conditions=("relevant",), k=3, stop_at_newline=True,
                              answer_marker=data.ANSWER_MARKER)["relevant"]
    assert marked["em"] == 1.0


def test_the_marker_is_found_after_a_chat_header_and_after_a_word(chat_reader, monkeypatch):
    # a byte-level BPE tokenizer (as Llama 3 and Qwen have) tokenizes "Answer:" right after the chat template's
    # "assistant\n" without the space it has after a word: both spellings are the marker
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    model, _ = chat_reader
    rag = data.synthetic(6, split="dev", seed=8, k=1)
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    corpus = [data.prompts(rag, word_tokenizer(["x"]), condition="relevant", k=1).texts, ["Evidence: Answer:"] * 50]
    core.train_from_iterator([t for part in corpus for t in part], trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<pad>", "</s>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", eos_token="</s>", padding_side="left",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        chat_template="{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                      "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    ids = tokenizer(data.ANSWER_MARKER, add_special_tokens=False)["input_ids"]
    assert ids != tokenizer(" " + data.ANSWER_MARKER, add_special_tokens=False)["input_ids"]
    built = data.prompts(rag, tokenizer, condition="relevant", k=1)
    assert len(built) == 6 and built.texts[0].endswith("assistant\n")
    texts = ["Answer: {gold}", "Evidence: it is {gold}. Answer: {gold}", "Evidence: {gold}. Answer: Question"]
    monkeypatch.setattr(model, "generate", _fake_generate(
        tokenizer, rag, built, lambda record, gold: texts[record % 3].format(gold=gold)))
    _, predictions = fastrit.evaluate(model, tokenizer, rag, conditions=("relevant",), k=1,
                                      answer_marker=data.ANSWER_MARKER, return_predictions=True)
    golds = [a[0] for a in rag.records["answers"]]
    assert [p["prediction"] for p in predictions["relevant"]] == [
        [gold, gold, "Question"][r % 3] for r, gold in enumerate(golds)]


@pytest.mark.parametrize("end_first", [True, False])
def test_stage_twos_metric_ends_the_evidence_at_every_stop_token(chat_reader, monkeypatch, end_first):
    # the evidence a model writes ends where generation stops: a chat model that writes its tokenizer's end of
    # sequence rather than <|im_end|> has ended its turn, and a marker after it was not written
    from fastrit.tuning import metrics

    model, tokenizer = chat_reader
    rag = data.synthetic(4, split="dev", seed=9, k=3)
    built = data.prompts(rag, tokenizer, condition="noisy", k=3)
    by_prompt = {tuple(p): r for p, r in zip(built.prompt_ids, built.records, strict=True)}
    words = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")

    def generate(input_ids, attention_mask, max_new_tokens, **kwargs):
        rows = []
        for prompt, mask in zip(input_ids, attention_mask, strict=True):
            gold = rag.records[by_prompt[tuple(prompt[mask.bool()].tolist())]]["answers"][0]
            ids = words("Passage") + [tokenizer.eos_token_id] * end_first + words(f"{data.ANSWER_MARKER} {gold}")
            rows.append(torch.cat([prompt, torch.tensor(ids + [end_of_turn])]))
        return torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=tokenizer.pad_token_id)

    monkeypatch.setattr(model, "generate", generate)
    measured = metrics.answer_loss_after_evidence(model, tokenizer, rag, k=3)
    assert measured.examples == 4 and measured.marker_written == (0.0 if end_first else 1.0)
