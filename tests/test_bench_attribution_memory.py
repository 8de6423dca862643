"""The attribution-memory benchmark's code path on a small Llama-shaped config, in this process (the worker's numbers
are then this process's, not a measurement): a real attribution, the plan beside it, the files it writes."""

import csv
import json
import math

from benchmarks import bench_attribution_memory as bench


def test_quick_worker_attributes_plans_and_writes(tmp_path):
    layers, tokens, answer, dtype = bench.QUICK[1]
    row = bench.worker({"layers": layers, "tokens": tokens, "answer_tokens": answer, "dtype": dtype, "quick": True})
    assert row["delta_finite"] and row["scores_shape"] == [1, layers, bench.QUICK_WIDTHS["intermediate_size"]]
    assert row["chunk_rows"] == layers * (bench.STEPS + 1)
    assert row["plan_gib"] > row["plan_breakdown_gib"]["weights"] > 0 and math.isfinite(row["ratio"])
    assert row["measured_gib"] >= row["rss_built_gib"] > 0
    bench.write([row], {"python": "test"}, tmp_path, "quick", "title")
    saved = json.loads((tmp_path / "quick.json").read_text())
    assert saved["rows"] == json.loads(json.dumps([row])) and saved["tolerance"] == bench.TOLERANCE
    with open(tmp_path / "quick.csv") as handle:
        assert float(next(csv.DictReader(handle))["ratio"]) == row["ratio"]
    assert (tmp_path / "quick.png").stat().st_size > 0
