"""The prepare benchmark runs end to end (tiny model, every provider in its own process) and writes its results."""

import json
import math

import pytest

from benchmarks import bench_prepare


def test_quick_benchmark_writes_results(tmp_path):
    rows = bench_prepare.main(["--quick", "--out", str(tmp_path)])
    assert [r["provider"] for r in rows] == list(bench_prepare.PROVIDERS)
    for r in rows:
        for key in ("rss_after_imports_mib", "rss_prepared_mib", "peak_rss_mib", "peak_over_start_mib", "step_s",
                    "step_min_s", "step_max_s", "step_cpu_s", "first_loss", "last_loss"):
            assert math.isfinite(r[key]) and r[key] > 0, (r["provider"], key, r[key])
        assert r["peak_rss_mib"] >= r["rss_prepared_mib"] and r["peak_rss_mib"] >= r["rss_after_imports_mib"]
        assert r["step_min_s"] <= r["step_s"] <= r["step_max_s"]
        trains = r["kind"] != "floor"
        ratios = ("peak_vs_plain", "peak_over_start_vs_plain", "step_vs_plain")
        for key in ("trainable_params", "changing_params", *ratios):
            assert (math.isfinite(r[key]) and r[key] > 0) if trains else not r[key], (r["provider"], key, r[key])
        # the head + loss floor is subtracted only where the model's own loss runs
        if not trains or r["loss"] != "model":
            assert r["excl_head_vs_plain"] is None, r["provider"]
        else:
            assert r["excl_head_vs_plain"] is None or math.isfinite(r["excl_head_vs_plain"]), r["provider"]
        # the planner's prediction for the row's settings, beside the measurement
        assert (r["plan_mib"] > 0 and math.isfinite(r["plan_vs_measured"])) if trains else r["plan_mib"] is None
    by_name = {r["provider"]: r for r in rows}
    for train in ("mlp", "neurons", "lora"):
        assert by_name[f"plain {train}"]["peak_vs_plain"] == by_name[f"plain {train}"]["step_vs_plain"] == 1.0
    # the plain way changes only the chosen neurons, and fastrit trains as many parameters
    assert by_name["plain neurons"]["plain_neurons_others_unchanged"] is True
    assert by_name["plain neurons"]["changing_params"] == by_name["fastrit neurons"]["trainable_params"]
    assert by_name["plain neurons"]["trainable_params"] > by_name["plain neurons"]["changing_params"]
    assert by_name["plain lora"]["trainable_params"] == by_name["fastrit lora"]["trainable_params"]
    saved = json.loads((tmp_path / "bench_prepare_quick.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(rows))
    assert {"platform", "cpu_count", "torch", "transformers", "peft"} <= set(saved["env"])
    assert saved["settings"]["targets"] == bench_prepare.QUICK["targets"]
    assert (tmp_path / "bench_prepare_quick.csv").read_text().startswith("provider,kind,train,")
    assert (tmp_path / "bench_prepare_quick.png").stat().st_size > 0


def test_rounds_merge_into_medians_of_measurements_and_of_per_round_ratios():
    def row(provider, kind, step, peak):
        return {"provider": provider, "kind": kind, "train": "neurons", "loss": "model", "step_s": step,
                "step_min_s": step - 0.1, "step_max_s": step + 0.1, "step_cpu_s": 2 * step, "peak_rss_mib": peak + 800,
                "peak_over_start_mib": peak, "peak_over_prepared_mib": peak - 100, "rss_after_imports_mib": 800,
                "rss_prepared_mib": 900}

    rounds = [[row("plain neurons", "plain", plain, 1000), row("fastrit neurons", "fastrit", fast, 400)]
              for plain, fast in ((2.0, 1.8), (3.0, 3.3), (2.5, 2.0))]
    plain, fast = bench_prepare.merge_rounds(rounds)
    assert fast["step_s"] == 2.0 and plain["step_s"] == 2.5
    assert fast["step_vs_plain_rounds"] == pytest.approx([0.9, 1.1, 0.8]) and math.isclose(fast["step_vs_plain"], 0.9)
    assert fast["peak_over_start_vs_plain"] == 0.4 and fast["rounds"] == 3
    assert fast["step_min_s"] == 1.7 and fast["step_max_s"] == 3.4
