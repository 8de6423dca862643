"""fastrit.data.load: the canonical schema from JSONL, JSON, parquet and 🤗 datasets; variants; bad input."""

import json
import logging

import datasets
import pytest

from fastrit import data

datasets.disable_progress_bars()

RECORDS = [
    {
        "question": "Who founded Zorbia?",
        "answers": ["Mira Tal", "Tal"],
        "ctxs": [
            {"title": "Zorbia", "text": "Zorbia is old. It was founded by Mira Tal in 1203.", "has_answer": True},
            {"title": "Quen", "text": "Quen was founded by Oro Vent.", "has_answer": False},
        ],
    },
    {
        "question": "What is the capital of Quen?",
        "answers": ["Lodra"],
        "ctxs": [{"title": "", "text": "The capital of Quen is Lodra!", "has_answer": True}],
    },
    {"question": "Which river crosses Ilm?", "answers": ["the Sava"], "ctxs": []},
]


def write(path, records, kind):
    if kind == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    elif kind == "json":
        path.write_text(json.dumps(records))
    else:
        datasets.Dataset.from_list(records, features=data.FEATURES).to_parquet(str(path))
    return path


@pytest.mark.parametrize("kind", ["jsonl", "json", "parquet", "dataset", "dataset_dict"])
def test_every_source_loads_the_same_records(tmp_path, kind):
    if kind == "dataset":
        source = datasets.Dataset.from_list(RECORDS, features=data.FEATURES)
        loaded = data.load(source)
    elif kind == "dataset_dict":
        dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(RECORDS[:1]),
                                   "test": datasets.Dataset.from_list(RECORDS, features=data.FEATURES)})
        loaded = data.load(dd, split="test")
    else:
        loaded = data.load(write(tmp_path / f"r.{kind}", RECORDS, kind))
    assert loaded.records.to_list() == RECORDS
    assert loaded.records.features == data.FEATURES
    assert loaded.skipped == {}


@pytest.mark.parametrize("kind", ["jsonl", "json", "parquet"])
def test_save_round_trip(tmp_path, kind):
    loaded = data.load(write(tmp_path / "in.jsonl", RECORDS, "jsonl"))
    path = loaded.save(tmp_path / "sub" / f"out.{kind}")
    assert data.load(path).records.to_list() == RECORDS
    assert sorted(p.name for p in path.parent.iterdir()) == [f"out.{kind}"]  # no temporary file left


def test_variant_formats_load(tmp_path):
    variants = [
        # one answer as a string, under "answer"; passages with id/score and no title; has_answer computed
        {"question": "Who founded Zorbia?", "answer": "Mira Tal",
         "ctxs": [{"id": "7", "score": 3.5, "text": "It was founded by Mira Tal."},
                  {"id": "8", "score": 1.0, "text": "Mira was born in Tal."}]},
        # "answers" as one string; a passage as a plain string; has_answer as 0/1
        {"question": "Capital of Quen?", "answers": "Lodra",
         "ctxs": ["The capital of Quen is Lodra.", {"title": "Quen", "text": "No capital here.", "has_answer": 0}]},
    ]
    loaded = data.load(write(tmp_path / "v.jsonl", variants, "jsonl"))
    assert loaded.records.to_list() == [
        {"question": "Who founded Zorbia?", "answers": ["Mira Tal"],
         "ctxs": [{"title": "", "text": "It was founded by Mira Tal.", "has_answer": True},
                  {"title": "", "text": "Mira was born in Tal.", "has_answer": False}]},
        {"question": "Capital of Quen?", "answers": ["Lodra"],
         "ctxs": [{"title": "", "text": "The capital of Quen is Lodra.", "has_answer": True},
                  {"title": "Quen", "text": "No capital here.", "has_answer": False}]},
    ]


def test_has_answer_is_a_normalised_token_match():
    assert data.contains_answer("It was founded by THE Mira Tal.", ["the mira, tal"])  # case, articles, punctuation
    assert not data.contains_answer("Mira-Tal", ["mira tal"])  # SQuAD removes the hyphen: "miratal"
    assert not data.contains_answer("a party of artists", ["art"])  # whole tokens only
    assert not data.contains_answer("anything", ["", "  "])
    assert data.normalize_answer("  The  Sava, river! ") == "sava river"


def test_bad_records_are_skipped_and_counted(tmp_path, caplog):
    bad = [
        {"answers": ["x"], "ctxs": []},
        {"question": "  ", "answers": ["x"], "ctxs": []},
        {"question": "q?", "answers": [], "ctxs": []},
        {"question": "q?", "answer": "", "ctxs": []},
        {"question": "q?", "answers": ["x"], "ctxs": "not a list"},
        {"question": "q?", "answers": ["x"]},
        {"question": "q?", "answers": ["x"], "ctxs": [{"title": "t", "text": "fine"}, {"title": "no text"}]},
    ]
    path = write(tmp_path / "mixed.jsonl", RECORDS[:1] + bad + RECORDS[1:], "jsonl")
    with caplog.at_level(logging.INFO, logger="fastrit.data"):
        loaded = data.load(path)
    assert loaded.records.to_list() == RECORDS
    assert loaded.skipped == {"missing question": 1, "empty question": 1, "no answer": 2, "ctxs not a list": 2,
                              "passage without text": 1}
    assert set(loaded.skipped) <= set(data.SKIP_REASONS)
    summary = [r.getMessage() for r in caplog.records if r.name == "fastrit.data"]
    assert len(summary) == 1 and "3 records" in summary[0] and "2 no answer" in summary[0]


def test_malformed_files_name_the_file_and_place(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(RECORDS[0]) + "\n" + "{not json\n")
    with pytest.raises(ValueError, match=r"broken\.jsonl: line 2: invalid JSON"):
        data.load(path)
    path = write(tmp_path / "typed.json", [RECORDS[0], {"question": 7, "answers": ["x"], "ctxs": []}], "json")
    with pytest.raises(ValueError, match=r"typed\.json: record 1: question: expected a string"):
        data.load(path)
    path = tmp_path / "notparquet.parquet"
    path.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(ValueError, match=r"notparquet\.parquet: not a readable parquet file"):
        data.load(path)
    path = write(tmp_path / "list.json", {"records": RECORDS}, "json")
    with pytest.raises(ValueError, match=r"list\.json: expected a JSON list"):
        data.load(path)


def test_missing_or_unsupported_sources(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.jsonl"):
        data.load(tmp_path / "nowhere.jsonl")
    (tmp_path / "r.csv").write_text("question\n")
    with pytest.raises(ValueError, match="source: expected a"):
        data.load(tmp_path / "r.csv")
    with pytest.raises(TypeError, match="source"):
        data.load(RECORDS)
    one = datasets.Dataset.from_list(RECORDS[:1])
    dd = datasets.DatasetDict({"a": one, "b": one})
    with pytest.raises(ValueError, match="split"):
        data.load(dd)


def test_a_failed_save_leaves_nothing(tmp_path):
    loaded = data.load(datasets.Dataset.from_list(RECORDS, features=data.FEATURES))
    with pytest.raises(ValueError, match="path"):
        loaded.save(tmp_path / "out.csv")
    assert list(tmp_path.iterdir()) == []


def test_evidence_is_the_sentence_of_a_relevant_passage_with_the_answer():
    loaded = data.load(datasets.Dataset.from_list(RECORDS, features=data.FEATURES))
    assert data.evidence(loaded.records[0]) == "It was founded by Mira Tal in 1203."
    assert data.evidence(loaded.records[1]) == "The capital of Quen is Lodra!"
    assert data.evidence(loaded.records[2]) is None  # no passage
    # only has_answer passages count, even if another passage happens to mention the answer
    record = {"question": "q", "answers": ["Oro Vent"],
              "ctxs": [{"title": "", "text": "Oro Vent was here.", "has_answer": False}]}
    assert data.evidence(record) is None


def test_a_failed_load_writes_nothing(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(cache))
    sources = tmp_path / "sources"
    sources.mkdir()
    broken_line = sources / "broken.jsonl"
    broken_line.write_text(json.dumps(RECORDS[0]) + "\n{not json\n")
    wrong_type = sources / "wrong.json"
    wrong_type.write_text(json.dumps([RECORDS[0], {**RECORDS[1], "question": 7}]))
    not_parquet = sources / "broken.parquet"
    not_parquet.write_bytes(b"PAR1 but not really")

    def failing_loads():
        for source in (broken_line, wrong_type, not_parquet):
            with pytest.raises(ValueError, match=str(source.name)):
                data.load(source)

    failing_loads()  # into a cache folder that does not exist yet
    assert not cache.exists()

    good = write(sources / "good.jsonl", RECORDS, "jsonl")
    assert len(data.load(good)) == len(RECORDS)
    written = sorted(p.relative_to(cache) for p in cache.rglob("*"))
    failing_loads()  # beside the cache of another source
    assert sorted(p.relative_to(cache) for p in cache.rglob("*")) == written
    assert len(data.load(good)) == len(RECORDS)  # the unchanged source reuses its cache
    assert len(list((cache / "fastrit_load").iterdir())) == 1
