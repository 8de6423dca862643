"""NeuroRITTrainer and fastrit.tune on the embedded reader: the stages' examples, the loss on targets only, both
stages run, a run interrupted in stage 2 resumes to the same weights bit for bit, bad input before training."""

import pytest
import torch
import transformers

import fastrit
from fastrit import data, demo
from fastrit.tuning.stages import stage_data

DEACTIVATE = {0: [1, 2, 3], 2: [4, 5]}
NEURONS = {1: list(range(0, 512, 8)), 2: list(range(1, 512, 8))}


def _records(n: int, split: str = "train") -> data.RagData:
    full = demo.load_data(split)
    return data.RagData(full.records.select(range(n)))


def _tune(out, callbacks=None, **kwargs):
    model, tokenizer = demo.load_model()
    settings = dict(output_dir=out, deactivate=DEACTIVATE, train_layers=[1, 2], train="neurons", neurons=NEURONS,
                    max_steps=3, batch_size=4, save_steps=1, logging_steps=1, learning_rate=1e-3, warmup=0,
                    optimizer="adamw", progress=False, quantize_frozen="nf4")
    settings.update(kwargs)
    return fastrit.tune(model, tokenizer, _records(24), callbacks=callbacks, **settings), tokenizer


def test_stage_examples_put_the_loss_on_the_target_only():
    model, tokenizer = demo.load_model()
    records = _records(12)
    denoise = stage_data(records, tokenizer, "denoise")
    distill = stage_data(records, tokenizer, "distill")
    for built in (denoise, distill):
        assert len(built) > 0
        for row in built.dataset:
            ids, labels = row["input_ids"], row["labels"]
            assert len(ids) == len(labels) and ids[-1] == tokenizer.eos_token_id
            start = next(i for i, v in enumerate(labels) if v != -100)
            assert all(v == -100 for v in labels[:start]) and labels[start:] == ids[start:]
    first = denoise.dataset[0]
    answer = tokenizer.decode([t for t in first["labels"] if t != -100], skip_special_tokens=True)
    assert answer.strip() == records.records[denoise.records[0]]["answers"][0]
    row = distill.dataset[0]
    target = tokenizer.decode([t for t in row["labels"] if t != -100], skip_special_tokens=True)
    record = records.records[distill.records[0]]
    expected = data.evidence_target(record)  # "Evidence: <sentence> Answer: <answer>"
    assert expected.startswith("Evidence: ") and data.evidence(record) in expected
    assert f"Answer : {record['answers'][0]}" in target and target.strip().endswith(record["answers"][0])
    assert len(distill) + distill.skipped.get("no_evidence", 0) + distill.skipped.get("too_long", 0) \
        == len(denoise)


def test_both_stages_train_only_the_declared_neurons(tmp_path):
    model, tokenizer = _tune(tmp_path / "run")
    assert (tmp_path / "run" / "1-denoise" / "delta.safetensors").is_file()
    assert (tmp_path / "run" / "2-distill" / "delta.safetensors").is_file()
    restored = fastrit.load_delta(demo.load_model()[0], tmp_path / "run" / "2-distill" / "delta.safetensors")
    ids = stage_data(_records(4, "dev"), tokenizer, "denoise").dataset[0]["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(restored(torch.tensor([ids])).logits, model(torch.tensor([ids])).logits,
                                   rtol=0, atol=0)
    base = demo.load_model()[0]
    fresh = fastrit.prepare(base, deactivate=DEACTIVATE, train_layers=[1, 2], train="neurons", neurons=NEURONS)
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, fresh.get_parameter(n))]
    assert changed and all(p.requires_grad for n, p in model.named_parameters() if n in changed)


class _Interrupt(transformers.TrainerCallback):
    """Stops the run with an error after ``step`` optimizer steps of the stage whose folder ends with ``stage``."""

    def __init__(self, stage: str, step: int):
        self.stage, self.step = stage, step

    def on_step_end(self, args, state, control, **kwargs):
        if args.output_dir.endswith(self.stage) and state.global_step == self.step:
            raise KeyboardInterrupt("killed")


def test_a_run_interrupted_in_stage_two_resumes_to_the_same_weights(tmp_path):
    whole, _ = _tune(tmp_path / "whole")
    with pytest.raises(KeyboardInterrupt):
        _tune(tmp_path / "cut", callbacks=[_Interrupt("2-distill", 2)])
    assert not (tmp_path / "cut" / "2-distill" / "delta.safetensors").exists()
    assert (tmp_path / "cut" / "2-distill" / "checkpoint-1").is_dir()  # killed before step 2's checkpoint
    assert not (tmp_path / "cut" / "2-distill" / "checkpoint-2").exists()
    resumed, _ = _tune(tmp_path / "cut")
    for name, param in whole.named_parameters():
        assert torch.equal(param, resumed.get_parameter(name)), name


def test_bad_input_is_refused_before_training(tmp_path, monkeypatch):
    model, tokenizer = demo.load_model()
    with pytest.raises(ValueError, match="^stages"):
        fastrit.tune(model, tokenizer, _records(8), output_dir=tmp_path / "a", stages=("denoise", "polish"),
                     train_layers=[1])
    no_answers = data.RagData(_records(8).records.map(lambda r: {"answers": []}))
    with pytest.raises(ValueError, match="^data"):
        fastrit.tune(model, tokenizer, no_answers, output_dir=tmp_path / "b", train_layers=[1])
    no_evidence = data.RagData(_records(8).records.map(
        lambda r: {"ctxs": [{**c, "has_answer": False} for c in r["ctxs"]]}))
    with pytest.raises(ValueError, match="^data"):
        fastrit.tune(model, tokenizer, no_evidence, output_dir=tmp_path / "c", train_layers=[1])
    with pytest.raises(ValueError, match="^optimizer"):
        fastrit.tune(model, tokenizer, _records(8), output_dir=tmp_path / "d", train_layers=[1], optimizer="sgd")
    other = tmp_path / "e"
    other.mkdir()
    (other / "something.txt").write_text("x")
    with pytest.raises(ValueError, match="^output_dir"):
        fastrit.tune(model, tokenizer, _records(8), output_dir=other, train_layers=[1])
    assert getattr(model, "fastrit_preparation", None) is None  # nothing was prepared
    # with eval_data the loss before training is measured on the model as given, but prepare's checks come first:
    # a refusal costs no evaluation, leaves no folder behind and the model unprepared
    def no_eval(*args, **kwargs):
        raise AssertionError("evaluated before prepare's checks")

    monkeypatch.setattr("fastrit.tuning.trainer.answer_loss", no_eval)
    monkeypatch.setattr("fastrit.tuning.trainer.answer_loss_over_own_evidence", no_eval)
    for bad, message in (({"train_layers": [7], "deactivate": None}, "^train_layers"),
                         ({"train_layers": [1], "deactivate": {0: [4096]}}, "^deactivate"),
                         ({"train_layers": [1], "train": "everything"}, "^train"),
                         ({"train_layers": [1], "quantize_frozen": "int3"}, "^quantize_frozen")):
        with pytest.raises(ValueError, match=message):
            fastrit.tune(model, tokenizer, _records(8), output_dir=tmp_path / "h", eval_data=_records(2, "dev"),
                         **bad)
        assert not (tmp_path / "h").exists() and getattr(model, "fastrit_preparation", None) is None
    _tune(tmp_path / "f", stages=("denoise",), max_steps=1)
    with pytest.raises(ValueError, match="^output_dir") as refused:
        _tune(tmp_path / "f", stages=("denoise",), max_steps=2)
    assert "max_steps: 1 there, 2 now" in str(refused.value) and "fingerprint" not in str(refused.value)
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(ValueError, match="^output_dir: .* exists and is not a directory"):
        _tune(tmp_path / "a_file", stages=("denoise",), max_steps=1)
    reader, _ = demo.load_model()
    with pytest.raises(ValueError, match="^model"):
        fastrit.NeuroRITTrainer(reader, transformers.TrainingArguments(output_dir=str(tmp_path / "g"),
                                                                       report_to=[], use_cpu=True))


def test_a_resumed_run_makes_prepares_choices_as_the_interrupted_run_made_them(tmp_path, monkeypatch):
    # quantize_frozen="auto" depends on the memory free at the time and the deactivation limit on forward passes:
    # a resumed run takes both from the interrupted run's fastrit_run.json instead of choosing again
    import json
    import sys

    from fastrit.nn import NF4Linear
    from tests.tuning.test_prepare_auto import _fake_sets

    sets = _fake_sets(demo.load_model()[0])
    auto = dict(neuron_sets=sets, deactivate="irrelevant_exclusive", train="mlp", quantize_frozen="auto",
                stages=("denoise",))
    whole, _ = _tune(tmp_path / "whole", **auto)
    with pytest.raises(KeyboardInterrupt):
        _tune(tmp_path / "cut", callbacks=[_Interrupt("1-denoise", 2)], **auto)
    prepared = json.loads((tmp_path / "cut" / "fastrit_run.json").read_text())["prepared"]
    assert prepared["quantize_frozen"] is None and prepared["gradient_checkpointing"] is False
    assert prepared["deactivated"] == {str(layer): v.tolist()
                                       for layer, v in whole.fastrit_preparation.deactivated.items()}
    assert prepared["deactivated"], "the tolerance kept no neuron: the test would not see the deactivation pinned"

    def choose_again(*args, **kwargs):
        raise AssertionError("prepare chose again on resume")

    monkeypatch.setattr("fastrit.tuning.auto.choose_for_model", lambda *a, **k: ("nf4", True, "pretend: no memory"))
    monkeypatch.setattr(sys.modules["fastrit.tuning.prepare"], "limit_deactivation", choose_again)
    resumed, _ = _tune(tmp_path / "cut", **auto)
    assert not any(isinstance(m, NF4Linear) for m in resumed.modules()) and not resumed.is_activation_checkpointing
    assert {str(layer): v.tolist() for layer, v in resumed.fastrit_preparation.deactivated.items()} \
        == prepared["deactivated"]
    for name, param in whole.named_parameters():
        assert torch.equal(param, resumed.get_parameter(name)), name
