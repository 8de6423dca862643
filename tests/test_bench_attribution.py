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
