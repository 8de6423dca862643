"""The kernel microbenchmark runs every op on tiny shapes and writes its table, JSON, CSV and plot."""

import json

import pytest

pytest.importorskip("matplotlib")

import fastrit  # noqa: E402
from benchmarks import bench_kernels  # noqa: E402

TINY = {
    "ig_interpolate": "3x7x13",
    "ig_accumulate": "3x7x13",
    "ig_accumulate_linear": "3x7x5x13",
    "swiglu": "7x13",
    "row_sparse_grad": "7x13x5x3",
    "col_sparse_grad": "7x5x13x3",
    "nf4_quantize": "8x64",
    "nf4_dequantize": "8x64",
}


@pytest.mark.parametrize("op", list(TINY))
def test_every_op_is_benchmarked(tmp_path, op):
    rows = bench_kernels.main(["--op", op, "--shape", TINY[op], "--no-compile", "--min-run-time", "0.01",
                               "--out", str(tmp_path), "--name", op])
    providers = {row.provider for row in rows}
    assert "torch" in providers
    if fastrit.backends()["cpp"] == "available":
        assert "cpp" in providers
    saved = json.loads((tmp_path / f"{op}.json").read_text())
    assert all(row["median_ms"] > 0 and row["gbps"] > 0 for row in saved["rows"])
    assert (tmp_path / f"{op}.png").stat().st_size > 0


def test_shape_must_match_the_op():
    with pytest.raises(SystemExit):
        bench_kernels.main(["--op", "swiglu", "--shape", "7x13x5"])


def test_several_ops_each_at_its_own_shape(tmp_path):
    ops = ["swiglu", "nf4_dequantize"]
    rows = bench_kernels.main(["--op", ops[0], "--op", ops[1], "--shape", f"swiglu={TINY['swiglu']}",
                               "--shape", f"nf4_dequantize={TINY['nf4_dequantize']}", "--no-compile",
                               "--min-run-time", "0.01", "--rounds", "1", "--out", str(tmp_path), "--name", "two"])
    assert {(row.op, row.shape) for row in rows} == {(op, TINY[op]) for op in ops}
    assert {row["op"] for row in json.loads((tmp_path / "two.json").read_text())["rows"]} == set(ops)


@pytest.mark.parametrize("argv", [
    ["--op", "swiglu", "--op", "ig_accumulate", "--shape", "7x13"],  # SIZES alone: which op?
    ["--op", "swiglu", "--shape", "ig_accumulate=3x7x13"],  # an op that is not run
    ["--op", "swiglu", "--shape", "swigloo=7x13"],  # no such op
    ["--op", "swiglu", "--op", "ig_accumulate", "--shape", "ig_accumulate=7x13"],  # wrong number of sizes
])
def test_op_shapes_must_name_an_op_that_runs_with_its_sizes(argv):
    with pytest.raises(SystemExit):
        bench_kernels.main(argv)


def test_threads_are_recorded_and_used(tmp_path, monkeypatch):
    from torch.utils import benchmark

    seen = []
    original = benchmark.Timer.__init__

    def spy(self, *args, num_threads=1, **kwargs):
        seen.append(num_threads)
        original(self, *args, num_threads=num_threads, **kwargs)

    monkeypatch.setattr(benchmark.Timer, "__init__", spy)
    bench_kernels.main(["--op", "ig_accumulate", "--shape", TINY["ig_accumulate"], "--no-compile", "--threads", "2",
                        "--rounds", "2", "--min-run-time", "0.01", "--out", str(tmp_path), "--name", "t"])
    assert seen and set(seen) == {2}  # not the Timer default of 1
    assert json.loads((tmp_path / "t.json").read_text())["env"]["threads"] == 2


@pytest.mark.parametrize("flag", ["--threads", "--rounds"])
def test_threads_and_rounds_must_be_positive(flag):
    with pytest.raises(SystemExit):
        bench_kernels.main(["--op", "swiglu", flag, "0"])
