"""`fastrit prepare`, `fastrit eval` and `fastrit export` on the embedded default: the delta that prepare writes is
what eval and export read, the export answers as the model it came from, and user errors are one line."""

import json
import re

import pytest
import transformers

import fastrit
from fastrit import demo
from fastrit.cli import main
from fastrit.cli._common import delta_path
from fastrit.tuning.stages import stage_data


def test_prepare_eval_and_export_agree(tmp_path, capsys):
    mined = tmp_path / "mined"
    assert main(["mine", "--out", str(mined), "--max-examples", "8", "--steps", "2", "--no-progress"]) == 0
    delta = tmp_path / "prepared.safetensors"
    assert main(["prepare", "--neuron-sets", str(mined), "--train", "neurons", "--out", str(delta)]) == 0
    printed = capsys.readouterr().out
    assert "trainable" in printed and delta.is_file()
    assert "the untrained model after deactivation" in printed and "deactivated: {" in printed
    # deactivation limited on the prompts tune would check: the first 8 noisy-context training prompts
    sets = fastrit.NeuronSets.load(mined)
    model, tokenizer = demo.load_model()
    train = fastrit.data.RagData(demo.load_data("train").records.select(range(32)))
    prompts = stage_data(train, tokenizer, "denoise").prompts(8)
    fastrit.prepare(model, sets, train="neurons", check_prompts=prompts)
    written = fastrit.load_delta(demo.load_model()[0], delta).fastrit_preparation
    assert {k: v.tolist() for k, v in written.deactivated.items()} \
        == {k: v.tolist() for k, v in model.fastrit_preparation.deactivated.items()}
    whole = tmp_path / "whole.safetensors"
    assert main(["prepare", "--neuron-sets", str(mined), "--check-prompts", "0", "--out", str(whole)]) == 0
    assert "the untrained model after" not in capsys.readouterr().out
    assert {k: v.tolist() for k, v in fastrit.load_delta(demo.load_model()[0], whole)
            .fastrit_preparation.deactivated.items()} \
        == {k: v.tolist() for k, v in sets.irrelevant_exclusive.items() if len(v)}
    scores = tmp_path / "scores.json"
    assert main(["eval", "--delta", str(delta), "--max-examples", "12", "--max-new-tokens", "4", "--no-progress",
                 "--out", str(scores)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].split() == ["condition", "accuracy", "EM", "F1", "abstain", "n"]
    assert [line.split()[0] for line in printed[1:3]] == ["relevant", "noisy"]
    written = json.loads(scores.read_text())
    assert set(written["scores"]) == {"relevant", "noisy"} and written["records"] == 12
    for condition, row in written["scores"].items():
        assert set(row) == {"accuracy", "em", "f1", "abstain", "n"} and row["n"] == 12
        assert written["em"][condition] == row["em"] <= row["f1"] and row["em"] <= row["accuracy"]
    # the same numbers from the library: the delta loaded onto the shipped reader
    model, tokenizer = demo.load_model()
    fastrit.load_delta(model, delta)
    test = fastrit.data.RagData(demo.load_data("test").records.select(range(12)))
    assert fastrit.evaluate(model, tokenizer, test, max_new_tokens=4) == written["scores"]
    export = tmp_path / "export"
    assert main(["export", "--delta", str(delta), "--out", str(export)]) == 0
    plain = transformers.AutoModelForCausalLM.from_pretrained(export).eval()
    assert fastrit.evaluate(plain, transformers.AutoTokenizer.from_pretrained(export), test,
                            max_new_tokens=4) == written["scores"]


def test_eval_stop_at_newline_is_passed_on_and_recorded(tmp_path, monkeypatch):
    import importlib

    module = importlib.import_module("fastrit.evaluate")  # the module: fastrit.evaluate is also the function
    seen = {}
    real = module.evaluate

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, "evaluate", spy)
    scores = tmp_path / "scores.json"
    assert main(["eval", "--max-examples", "3", "--max-new-tokens", "2", "--conditions", "relevant",
                 "--stop-at-newline", "--no-progress", "--out", str(scores)]) == 0
    written = json.loads(scores.read_text())
    assert seen["stop_at_newline"] is True and written["stop_at_newline"] is True
    assert list(written["scores"]) == ["relevant"] and written["scores"]["relevant"]["n"] == 3


def test_a_tune_folder_names_its_last_finished_stage(tmp_path):
    for stage in ("1-denoise", "2-distill", "10-extra"):
        (tmp_path / stage).mkdir()
    (tmp_path / "1-denoise" / "delta.safetensors").write_bytes(b"")
    (tmp_path / "2-distill" / "delta.safetensors").write_bytes(b"")
    assert delta_path(str(tmp_path)) == tmp_path / "2-distill" / "delta.safetensors"
    with pytest.raises(FileNotFoundError, match="^--delta"):
        delta_path(str(tmp_path / "1-denoise" / "missing"))


@pytest.mark.parametrize("argv, message", [
    (["eval", "--conditions", "relevant,muddy"], "--conditions"),
    (["eval", "--delta", "{tmp}/missing"], "--delta: no such file"),
    (["eval", "--delta", "{tmp}"], "--delta: .* no finished"),
    (["eval", "--out", "{tmp}/no/such/scores.json"], "--out: no such folder"),
    (["prepare"], "--train-layers"),
    (["prepare", "--train-layers", "1", "--check-prompts", "-1"], "--check-prompts"),
    (["prepare", "--train-layers", "1", "--out", "{tmp}/no/such/delta.safetensors"], "--out: no such folder"),
    (["export", "--delta", "{tmp}/a-file", "--out", "{tmp}"], "--out: .* not an empty folder"),
])
def test_user_errors_are_one_line(tmp_path, capsys, argv, message):
    (tmp_path / "a-file").write_text("")
    argv = [arg.format(tmp=tmp_path) for arg in argv]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"fastrit {argv[0]}: error:"), err
    assert re.search(message, err[0]), err


@pytest.mark.parametrize("command", ["mine", "eval", "tune", "attribute"])
def test_a_malformed_data_file_is_one_line_and_leaves_no_output(tmp_path, capsys, command):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answers": ["a"], "ctxs": []}\n{"question": "q2", "answers": [\n')
    out = tmp_path / "out"
    argv = [command, "--data", str(bad), "--out", str(out / "scores.json" if command == "eval" else out)]
    argv += ["--no-progress", *(["--train-layers", "1", "--max-steps", "1"] if command == "tune" else [])]
    if command == "eval":
        out.mkdir()
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"fastrit {command}: error:"), err
    assert "bad.jsonl: line 2" in err[0] and "invalid JSON" in err[0], err
    assert not out.exists() or not any(out.iterdir())  # nothing half-written


def test_demo_out_that_cannot_be_written_is_one_line_and_leaves_nothing(tmp_path, capsys):
    (tmp_path / "a-file").write_text("")
    assert main(["demo", "--out", str(tmp_path / "a-file" / "demo"), "--no-progress"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fastrit demo: error:") and "--out" in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]
