"""The real-model benchmark runs end to end (on the embedded reader, a few records, one step per stage) and writes
every phase's scores, the mining summary, the samples and a PNG."""

import json

import pytest

from benchmarks import bench_real
from fastrit import demo


def test_degenerate_flags_a_repeated_phrase_only():
    assert bench_real.degenerate("The answer is 1. The answer is 1. The answer is 1.")
    assert not bench_real.degenerate("The language of Lumamu is Paboish.")
    assert not bench_real.degenerate("")


def test_quick_real_benchmark_writes_every_phase(tmp_path):
    result = bench_real.main(["--model", str(demo.READER_DIR), "--test", "4", "--train-records", "32",
                              "--mine-records", "4", "--mine-steps", "2", "--steps", "denoise=1,distill=2",
                              "--batch-size", "2", "--max-new-tokens", "4", "--samples", "2", "--no-progress",
                              "--out", str(tmp_path), "--name", "quick"])
    assert set(result["scores"]) == {"before", "neuro-rit", "baseline"}
    for per_condition in result["scores"].values():
        assert set(per_condition) == {"relevant", "noisy"}
        for scores in per_condition.values():
            assert scores["n"] == 4
            assert {"accuracy", "em", "f1", "abstain", "degenerate"} <= set(scores)
    assert {"load", "before", "mine", "neuro-rit", "neuro-rit eval", "baseline", "baseline eval"} <= set(
        result["phases"])
    assert result["baseline"]["settings"]["deactivate"] is None
    assert all(len(samples) == 2 for samples in result["samples"].values())
    written = json.loads((tmp_path / "quick.json").read_text())
    assert written["scores"] == result["scores"]
    assert written["settings"]["steps"] == {"denoise": 1, "distill": 2}
    assert (tmp_path / "quick.png").stat().st_size > 0


def test_steps_must_name_every_stage(tmp_path, capsys):
    with pytest.raises(SystemExit):
        bench_real.main(["--model", str(demo.READER_DIR), "--steps", "denoise=3", "--out", str(tmp_path)])
    assert "--steps" in capsys.readouterr().err
