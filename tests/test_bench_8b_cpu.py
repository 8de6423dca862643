"""The 8B CPU benchmark's code path on a small Llama-shaped config: a real step in each mode (finite loss, every
trainable tensor changed, every frozen tensor and NF4 byte unchanged), the planner's prediction beside it."""

import json
import math

from benchmarks import bench_8b_cpu


def test_quick_step_in_each_mode_is_real_and_planned(tmp_path):
    rows = bench_8b_cpu.main(["--quick", "--out", str(tmp_path)])
    assert [r["mode"] for r in rows] == list(bench_8b_cpu.MODES)
    for r in rows:
        assert math.isfinite(r["loss"]) and r["loss"] > 0
        assert r["trainable_params"] == r["plan_trainable_params"] > 0
        assert r["tensors_changed"] == r["trainable_tensors"] > 0 and r["changed_share_min"] > 0.5
        assert r["frozen_unchanged"] is True and r["frozen_tensors"] > 0
        assert r["plan_gib"] > 0 and math.isfinite(r["plan_vs_measured"]) and r["peak_over_start_gib"] > 0
        assert all(r["seconds"][phase] > 0 for phase in ("build", "prepare", "forward", "backward", "optimizer"))
    mlp, neurons = rows
    hidden, layers = bench_8b_cpu.QUICK["config"]["hidden_size"], len(bench_8b_cpu.QUICK["targets"])
    assert neurons["trainable_params"] == 3 * hidden * bench_8b_cpu.QUICK["neurons"] * layers
    assert mlp["trainable_params"] == 3 * hidden * bench_8b_cpu.QUICK["config"]["intermediate_size"] * layers
    saved = json.loads((tmp_path / "bench_8b_cpu_quick.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(rows)) and saved["settings"]["seq"] == bench_8b_cpu.QUICK["seq"]
    assert (tmp_path / "bench_8b_cpu_quick.png").stat().st_size > 0
