"""The mining benchmark runs end to end (few records) and writes its JSON, CSV and plot."""

import json

from benchmarks import bench_mining


def test_quick_benchmark_writes_results(tmp_path):
    rows = bench_mining.main(["--quick", "--repeats", "1", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "bench_mining_quick.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(rows))
    assert {(r["model"], r["provider"]) for r in rows} == {
        (m, p) for m in ("reader", "bench") for p in ("attribution only", "mine", "mine --out")}
    assert all(r["median_s"] > 0 and r["examples"] == 2 * r["records"] for r in rows)
    assert all((r["bookkeeping_in_run"] is None) == (r["provider"] == "attribution only") for r in rows)
    assert all(r["bookkeeping_in_run"] is None or r["bookkeeping_in_run"] > 0 for r in rows)
    bench_lengths = next(r["mean_prompt_tokens"] for r in rows if r["model"] == "bench")
    assert all(450 <= n <= 512 for n in bench_lengths.values())
    assert (tmp_path / "bench_mining_quick.csv").read_text().startswith("model,provider,")
    assert (tmp_path / "bench_mining_quick.png").stat().st_size > 0
