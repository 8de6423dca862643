"""fastrit.mine and NeuronSets in one process: the statistics against per-record attribution, the selection rule,
save/load, resuming after an error, refusing a folder made differently, bad records and bad arguments."""

import json

import datasets
import pytest
import torch

import fastrit
from fastrit import data, demo
from fastrit.mining import CHUNK_RECORDS, NeuronSets, active_neurons
from fastrit.mining import miner as mine_module

datasets.disable_progress_bars()

RECORDS = CHUNK_RECORDS * 2 + 5  # two whole chunks and a partial one
SETTINGS = dict(steps=2, max_examples=RECORDS, progress=False)


@pytest.fixture(scope="module")
def reader():
    return demo.load_model()


@pytest.fixture(scope="module")
def train():
    return demo.load_data("train")


@pytest.fixture(scope="module")
def mined(reader, train):
    return fastrit.mine(*reader, train, **SETTINGS)


def test_active_neurons_rule():
    scores = torch.tensor([[[1.0, 0.2, 0.19, -3.0, 0.5]], [[-1.0, -0.5, 0.0, -0.1, -2.0]]])
    assert active_neurons(scores, 0.2).tolist() == [[[True, True, False, False, True]], [[False] * 5]]


def test_statistics_equal_per_record_attribution(reader, train, mined):
    model, tokenizer = reader
    for condition in ("relevant", "irrelevant"):
        counts = torch.zeros(3, 512, dtype=torch.int64)
        sums = torch.zeros(3, 512, dtype=torch.float64)
        for index in range(RECORDS):  # one record at a time, no padding, no chunks
            batch = data.prompts(train, tokenizer, condition=condition, seed=0, indices=[index], model=model)
            scores = fastrit.attribute(model, **batch.tensors(), steps=2).scores[0]
            top = scores.amax(dim=1, keepdim=True)
            counts += ((scores > 0) & (scores >= 0.2 * top)).long()
            sums += scores.double()
        assert torch.equal(mined.counts[condition], counts)
        assert torch.equal(mined.mean_scores[condition], (sums / RECORDS).float())
        assert mined.examples[condition] == RECORDS and mined.skipped[condition] == {}


def test_selection_rule(mined):
    for share, top_n in ((0.3, None), (0.1, None), (0.3, 4)):
        sets = mined.select(share=share, top_n=top_n, target_layers=2)
        masks = {}
        for condition in ("relevant", "irrelevant"):
            counts = mined.counts[condition]
            if top_n is None:
                expected = (counts > 0) & (counts / RECORDS >= share)
            else:  # by count, ties to the lower index, never a neuron that was never active
                expected = torch.zeros_like(counts, dtype=torch.bool)
                for layer in range(3):
                    order = sorted(range(512), key=lambda i: (-int(counts[layer, i]), i))[:top_n]
                    expected[layer, order] = counts[layer, order] > 0
            masks[condition] = expected
            assert torch.equal(sets.masks[condition], expected)
        exclusive = masks["relevant"] & ~masks["irrelevant"]
        assert torch.equal(sets.masks["relevant_exclusive"], exclusive)
        assert torch.equal(sets.masks["irrelevant_exclusive"], masks["irrelevant"] & ~masks["relevant"])
        per_layer = exclusive.sum(dim=1).tolist()
        assert sets.target_layers == sorted(range(3), key=lambda layer: (-per_layer[layer], layer))[:2]
        for layer, indices in sets.relevant_exclusive.items():
            assert indices.tolist() == torch.nonzero(exclusive[layer]).flatten().tolist()
    with pytest.raises(ValueError, match="^share"):
        mined.select(share=0)
    with pytest.raises(ValueError, match="^top_n"):
        mined.select(top_n=0)
    with pytest.raises(ValueError, match="^target_layers"):
        mined.select(target_layers=4)


def test_save_load_and_plots(mined, tmp_path):
    mined.save(tmp_path)
    loaded = NeuronSets.load(tmp_path)
    assert loaded == mined and loaded is not mined
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["neurons_per_layer"] == mined.set_sizes()
    assert summary["target_layers"] == mined.target_layers
    assert summary["model"]["model_type"] == "llama" and summary["model"]["num_layers"] == 3
    assert not list(tmp_path.glob(".*.tmp"))
    paths = mined.plot(tmp_path / "plots")
    assert [p.name for p in paths] == ["neurons_per_layer.png", "activation_shares.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in paths)
    with pytest.raises(FileNotFoundError, match="neuron_sets"):
        NeuronSets.load(tmp_path / "plots")


def test_resuming_after_an_error_counts_every_record_once(reader, train, mined, tmp_path, monkeypatch):
    calls = []
    original = mine_module._ChunkAttributor.__call__

    def fail_on_third_chunk(self, records):
        calls.append(records.start)
        if len(calls) == 3:
            raise RuntimeError("interrupted")
        return original(self, records)

    monkeypatch.setattr(mine_module._ChunkAttributor, "__call__", fail_on_third_chunk)
    with pytest.raises(RuntimeError, match="interrupted"):
        fastrit.mine(*reader, train, out_dir=tmp_path, **SETTINGS)
    assert not (tmp_path / "neuron_sets.safetensors").exists()
    monkeypatch.setattr(mine_module._ChunkAttributor, "__call__", original)
    resumed = fastrit.mine(*reader, train, out_dir=tmp_path, **SETTINGS)
    assert resumed == mined
    assert NeuronSets.load(tmp_path) == mined
    # a finished folder: run again, nothing is attributed, the selection may change
    monkeypatch.setattr(mine_module._ChunkAttributor, "__call__", fail_on_third_chunk)
    calls.clear()
    again = fastrit.mine(*reader, train, out_dir=tmp_path, **{**SETTINGS, "share": 0.1})
    assert calls == [] and again == mined.select(share=0.1)


def test_a_folder_made_differently_is_refused(reader, train, tmp_path):
    model, tokenizer = reader
    fastrit.mine(model, tokenizer, train, out_dir=tmp_path, **{**SETTINGS, "max_examples": 4})
    before = sorted(p.name for p in tmp_path.rglob("*"))
    with pytest.raises(ValueError, match=r"steps: 2 there, 3 now"):
        fastrit.mine(model, tokenizer, train, out_dir=tmp_path, **{**SETTINGS, "max_examples": 4, "steps": 3})
    with pytest.raises(ValueError, match=r"data\.sha256"):
        fastrit.mine(model, tokenizer, demo.load_data("dev"), out_dir=tmp_path, **{**SETTINGS, "max_examples": 4})
    other = type(model)(model.config)
    with pytest.raises(ValueError, match=r"model\.weights_sha256"):
        fastrit.mine(other, tokenizer, train, out_dir=tmp_path, **{**SETTINGS, "max_examples": 4})
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


def test_bad_records_are_skipped_and_counted(reader, train):
    rows = train.records.select(range(6)).to_list()
    rows[1] = {**rows[1], "ctxs": [c for c in rows[1]["ctxs"] if not c["has_answer"]]}  # no relevant passage
    rows[2] = {**rows[2], "ctxs": [c for c in rows[2]["ctxs"] if c["has_answer"]]}  # no irrelevant passage
    rows.append({"question": "", "answers": ["x"], "ctxs": []})  # skipped on loading
    rag = data.load(datasets.Dataset.from_list(rows))
    assert rag.skipped == {"empty question": 1}
    sets = fastrit.mine(*reader, rag, steps=2, progress=False)
    assert sets.examples == {"relevant": 5, "irrelevant": 5}
    assert sets.skipped == {"relevant": {"no relevant passage": 1},
                            "irrelevant": {"fewer than 5 irrelevant passages": 1}}


@pytest.mark.parametrize("argument, value", [
    ("threshold", 0.0), ("threshold", 1.5), ("share", 0), ("top_n", 0), ("target_layers", 4), ("k", 0),
    ("steps", 0), ("method", "simpson"), ("max_examples", 0), ("batch_size", -1),
])
def test_bad_arguments_name_themselves_and_write_nothing(reader, train, tmp_path, argument, value):
    with pytest.raises(ValueError, match=f"^{argument}"):
        fastrit.mine(*reader, train, out_dir=tmp_path / "out", **{**SETTINGS, argument: value})
    assert not (tmp_path / "out").exists()
