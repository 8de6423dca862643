"""The attribution benchmark runs end to end (tiny shapes) and writes its table, JSON, CSV and plot."""

import json

import pytest

pytest.importorskip("captum")
pytest.importorskip("matplotlib")
pytest.importorskip("knowledge_neurons")

from benchmarks import bench_attribution  # noqa: E402


def test_quick_benchmark_writes_results(tmp_path):
    report = bench_attribution.main(["--quick", "--repeats", "1", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "bench_attribution_quick.json").read_text())
    assert saved["summary"] == report["summary"]
    providers = {(row["scenario"], row["provider"]) for row in saved["rows"]}
    assert ("last", "fastrit") in providers and ("all", "captum (with delta)") in providers
    for kind in ("gpt2", "bert"):
        assert (f"kn_{kind}", "knowledge-neurons 0.0.2") in providers and (f"kn_{kind}", "fastrit.compat") in providers
        assert saved["summary"][f"kn_{kind}_max_rel_difference"] <= 1e-4
    assert all(row["median_s"] > 0 and row["gflops"] > 0 for row in saved["rows"])
    assert (tmp_path / "bench_attribution_quick.csv").read_text().startswith("scenario,provider,")
    assert (tmp_path / "bench_attribution_quick.png").stat().st_size > 0
    assert saved["env"]["torch"] and saved["summary"]["deltas"]["gausslegendre_8"]["max_abs_delta"] >= 0


def test_quick_real_shapes_write_their_rows(tmp_path):
    report = bench_attribution.main(["--quick", "--only-real-shapes", "--repeats", "1", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "bench_attribution_quick_real_shapes.json").read_text())
    rows = saved["real_shapes"]
    assert rows == json.loads(json.dumps(report["real_shapes"]))
    assert {row["scenario"] for row in rows} == {"smollm2_1tok", "smollm2_3tok"}
    for row in rows:
        assert row["median_s"] > 0 and row["gflops"] > 0 and row["peak_mib"] > 0
        if row["provider"] != "forward":
            assert row["forwards_of_time"] > 0 and row["forwards_of_flops"] > 0 and row["speedup"] > 0
            assert row["max_abs_delta"] >= 0
        if row["provider"].startswith("reference"):
            assert row["reference_delta_difference"] < 1e-4  # the loop's delta is fastrit's at the same rule
            assert row["reference_score_rel_error"] < 1e-4
        if row["provider"] == "fastrit (auto)":
            assert row["delta_within_reference"]
    assert (tmp_path / "bench_attribution_quick_real_shapes.csv").read_text().startswith("scenario,provider,")
