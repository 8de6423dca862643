"""`fastrit tune` and `fastrit plan` on the embedded default: they run with small settings, write what they say,
and user errors are one line with a non-zero exit."""

import json

import pytest

from fastrit import data, demo
from fastrit.cli import main


def test_tune_on_mined_sets_and_export(tmp_path, capsys):
    mined = tmp_path / "mined"
    assert main(["mine", "--out", str(mined), "--max-examples", "8", "--steps", "2", "--no-progress"]) == 0
    out = tmp_path / "tuned"
    dev = data.RagData(demo.load_data("dev").records.select(range(16))).save(tmp_path / "dev.jsonl")
    argv = ["tune", "--neuron-sets", str(mined), "--out", str(out), "--max-steps", "denoise=2,distill=1",
            "--batch-size", "2", "--optimizer", "adamw", "--save-steps", "1", "--no-progress",
            "--eval-data", str(dev), "--export", str(tmp_path / "export")]
    assert main(argv) == 0
    losses = json.loads((out / "eval_loss.json").read_text())
    assert set(losses) == {"before", "denoise", "distill"}
    assert set(losses["before"]) == set(losses["denoise"]) == {"answer_after_prompt", "answer_over_own_evidence"}
    assert set(losses["distill"]) == {"answer_after_prompt", "answer_over_own_evidence", "answer_after_own_evidence",
                                      "marker_written"}
    assert (out / "1-denoise" / "delta.safetensors").is_file() and (out / "2-distill" / "delta.safetensors").is_file()
    assert (tmp_path / "export" / "config.json").is_file()
    assert "noisy-context answer loss" in capsys.readouterr().out


def test_plan_prints_fastrit_beside_the_plain_way(capsys):
    assert main(["plan", "llama-3-8b", "--train", "neurons", "--neurons", "1433"]) == 0
    text = capsys.readouterr().out
    assert "fastrit" in text and "plain way" in text and f"{3 * 3 * 4096 * 1433:,} trainable" in text


@pytest.mark.parametrize("argv, message", [
    (["tune", "--neuron-sets", "{tmp}/missing"], "--neuron-sets: no such folder"),
    (["tune"], "--train-layers"),
    (["tune", "--train-layers", "1", "--stages", "denoise,polish"], "stages"),
    (["plan", "{tmp}/nothing"], "CONFIG"),
    (["plan", "llama-3-8b", "--train", "neurons"], "neurons"),
])
def test_user_errors_are_one_line(tmp_path, capsys, argv, message):
    argv = [arg.format(tmp=tmp_path) for arg in argv]
    if argv[0] == "tune":
        argv += ["--out", str(tmp_path / "out"), "--max-steps", "1", "--no-progress"]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"fastrit {argv[0]}: error:") and message in err[0], err
