"""The tuning benchmark runs end to end on a few records and writes the loss before and after each stage."""

import json
import math

from benchmarks import bench_tune


def test_quick_tuning_benchmark_writes_the_losses(tmp_path):
    result = bench_tune.main(["--quick", "--out", str(tmp_path)])
    losses = result["noisy_answer_loss"]
    assert set(losses) == {"before", "denoise", "distill"}
    assert set(losses["distill"]) == {"answer_after_prompt", "answer_over_own_evidence", "answer_after_own_evidence",
                                      "marker_written"}
    assert set(result["noisy_exact_match"]) == {"before", "distill"}
    assert all(math.isfinite(v) for point in losses.values() for v in point.values())
    assert result["trainable_params"] > 0
    assert json.loads((tmp_path / "bench_tune_quick.json").read_text())["noisy_answer_loss"] == losses
