"""fastrit.data.synthetic: invented entities, disjoint splits, passages of every kind, has_answer by construction."""

import datasets
import pytest

from fastrit import data
from fastrit.data import world

datasets.disable_progress_bars()


@pytest.fixture(scope="module")
def records():
    return {split: data.synthetic(300, split=split, seed=3, k=5).records.to_list() for split in world.SPLITS}


def _pair(record):
    """(entity, attribute) of a record, read back from its question."""
    for attribute, (questions, _) in world.ATTRIBUTES.items():
        for template in questions:
            head, tail = template.split("{e}")
            if record["question"].startswith(head) and record["question"].endswith(tail):
                return record["question"][len(head) : len(record["question"]) - len(tail)], attribute
    raise AssertionError(record["question"])


def test_splits_share_no_entity_attribute_pair(records):
    pairs = {split: {_pair(r) for r in rows} for split, rows in records.items()}
    assert not pairs["train"] & pairs["dev"] and not pairs["train"] & pairs["test"] and not pairs["dev"] & pairs["test"]


def test_every_record_has_relevant_passages_and_every_kind_of_irrelevant_one(records):
    names = set(world.entity_names())
    for rows in records.values():
        for record in rows:
            entity, _ = _pair(record)
            relevant = [c for c in record["ctxs"] if c["has_answer"]]
            irrelevant = [c for c in record["ctxs"] if not c["has_answer"]]
            assert 1 <= len(relevant) <= 3 and len(irrelevant) >= 5
            assert all(c["title"] == entity and record["answers"][0] in c["text"].split() for c in relevant)
            family = next(f for f in world._FAMILIES if entity in f)
            titles = [c["title"] for c in irrelevant]
            assert entity in titles  # another attribute of the same entity
            assert any(t in family and t != entity for t in titles)  # a near-miss name
            assert any(t not in family for t in titles)  # another entity
            assert set(titles) <= names


def test_computed_has_answer_equals_the_ground_truth(records, tmp_path):
    # written without has_answer, loaded back: the SQuAD-normalised match recovers every passage's label
    rows = records["test"]
    stripped = [{**r, "ctxs": [{"title": c["title"], "text": c["text"]} for c in r["ctxs"]]} for r in rows]
    path = tmp_path / "stripped.jsonl"
    data.RagData(datasets.Dataset.from_list(stripped)).save(path)
    assert data.load(path).records.to_list() == rows


@pytest.mark.parametrize("kind", ["jsonl", "json", "parquet"])
def test_synthetic_records_round_trip_through_every_format(tmp_path, kind):
    generated = data.synthetic(40, split="dev", seed=5)
    assert data.load(generated.save(tmp_path / f"dev.{kind}")).records.to_list() == generated.records.to_list()


def test_same_seed_same_records_and_answers_are_drawn_afresh():
    a = data.synthetic(200, seed=11).records.to_list()
    assert a == data.synthetic(200, seed=11).records.to_list()
    assert a != data.synthetic(200, seed=12).records.to_list()
    # a pair asked twice gets its value drawn afresh: the benchmark cannot be memorised
    answers = {}
    for record in data.synthetic(3000, seed=11).records:
        answers.setdefault(_pair(record), set()).add(record["answers"][0])
    assert any(len(values) > 1 for values in answers.values())


def test_vocabulary_covers_every_word():
    vocabulary = set(world.vocabulary())
    for record in data.synthetic(200, split="test", seed=2).records:
        words = record["question"].split() + record["answers"]
        for ctx in record["ctxs"]:
            words += ctx["title"].split() + ctx["text"].split()
        assert set(words) <= vocabulary


def test_bad_arguments_name_themselves():
    with pytest.raises(ValueError, match="^n:"):
        data.synthetic(-1)
    with pytest.raises(ValueError, match="^split:"):
        data.synthetic(3, split="validation")
    with pytest.raises(ValueError, match="^k:"):
        data.synthetic(3, k=0)
