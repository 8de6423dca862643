"""``make gpu-bench`` (benchmarks.gpu_bench): its reduced CPU form runs every step and writes the JSON, the table and
the log; what only the GPU form meets (pytest's counts, timeouts, the deadline, no CUDA device, a failing op or
step) is checked with stand-ins for the commands."""

import json
import re
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")  # bench_kernels draws its plot

from benchmarks import gpu_bench  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def test_cpu_smoke_runs_every_step_and_writes_the_json_the_table_and_the_log(tmp_path):
    report = gpu_bench.main(["--cpu-smoke", "--out", str(tmp_path)])
    steps = {step["name"]: step for step in report["steps"]}
    assert list(steps) == list(gpu_bench.STEPS)
    for step in steps.values():
        assert step["status"] in ("ok", "failed", "skipped") and step["seconds"] >= 0, step
    assert steps["environment"]["status"] == "ok", steps["environment"]
    assert steps["gpu_test"]["status"] in ("ok", "skipped"), steps["gpu_test"]
    assert steps["attribution"]["status"] == "ok", steps["attribution"]
    assert steps["kernels"]["status"] == "ok", steps["kernels"]
    assert steps["tuning"]["status"] == "skipped" and "issue 27" in steps["tuning"]["reason"]

    environment = report["environment"]
    assert environment["extension"] == "ok" and environment["versions"]["torch"] != "absent"
    if steps["gpu_test"]["status"] == "ok":
        counts = steps["gpu_test"]["results"]["counts"]
        assert sum(counts.get(name, 0) for name in ("passed", "skipped")) > 0 and not counts.get("failed")
    rows = steps["attribution"]["results"]["rows"]
    assert rows and all(row["median_s"] > 0 and row["peak_mib"] > 0 for row in rows)
    assert any("speedup" in row and "forwards_of_time" in row for row in rows)
    kernels = steps["kernels"]["results"]
    assert set(kernels["ops"]) == set(gpu_bench.KERNELS_SMOKE)
    assert {row["op"] for row in kernels["rows"]} == set(gpu_bench.KERNELS_SMOKE)
    assert all(row["median_ms"] > 0 and row["provider"] for row in kernels["rows"])

    saved = json.loads((tmp_path / "gpu_bench_cpu_smoke.json").read_text())
    assert saved["mode"] == "cpu_smoke" and [step["name"] for step in saved["steps"]] == list(gpu_bench.STEPS)
    table = (tmp_path / "gpu_bench_cpu_smoke.md").read_text()
    for name in gpu_bench.STEPS:
        assert re.search(rf"^\| {name} \| (ok|failed|skipped) \|", table, re.MULTILINE), name
    assert "## attribution at real shapes" in table and "## kernels" in table
    assert "bench_attribution" in (tmp_path / "gpu_bench_cpu_smoke.log").read_text()


@pytest.mark.parametrize("output,counts", [
    ("....\n1 failed, 90 passed, 5 skipped, 2 deselected, 1 warning in 12.34s\n",
     {"failed": 1, "passed": 90, "skipped": 5, "deselected": 2, "warning": 1}),
    ("===== 23 skipped, 3 errors in 0.51s =====", {"skipped": 23, "error": 3}),
    ("..s.F.....   [ 30%]\n..E\n", {"passed": 10, "skipped": 1, "failed": 1, "error": 1, "partial": True}),
])
def test_pytest_counts_from_the_summary_line_or_the_progress(output, counts):
    assert gpu_bench.pytest_counts(output) == counts


def test_a_command_past_its_timeout_is_stopped_with_its_output():
    start = time.perf_counter()
    code = "import subprocess, sys, time; print('started', flush=True); " \
           "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); time.sleep(60)"
    outcome = gpu_bench.run_command([sys.executable, "-c", code], 3, {})
    assert outcome.returncode is None and not outcome.ok
    assert "started" in outcome.output and "timeout of 3 s" in outcome.error()
    assert time.perf_counter() - start < 30  # the grandchild was killed too: nothing held the pipe


def test_past_the_deadline_the_steps_are_skipped(tmp_path):
    report = gpu_bench.main(["--cpu-smoke", "--deadline", "1", "--out", str(tmp_path)])
    assert all(step["status"] == "skipped" for step in report["steps"])
    assert "deadline" in report["steps"][0]["reason"]
    assert (tmp_path / "gpu_bench_cpu_smoke.md").is_file()


def _context(tmp_path, smoke=False):
    return gpu_bench.Context(smoke, tmp_path, "t", {}, dict(gpu_bench.BUDGETS), gpu_bench.DEADLINE_S)


def test_gpu_form_without_cuda_skips_the_gpu_steps(tmp_path, monkeypatch):
    seen = {}

    def environment(ctx, timeout):
        seen.update(interpret=ctx.env.get("TRITON_INTERPRET"), timeout=timeout)
        ctx.cuda = False
        return gpu_bench.ok({})

    monkeypatch.setitem(gpu_bench.STEPS, "environment", environment)
    report = gpu_bench.main(["--out", str(tmp_path), "--budget", "gpu_test=100", "--budget", "kernels=0"])
    assert seen["interpret"] == "0"  # the GPU path, as `make gpu-test`
    # its own budget plus what the later steps do not reserve: gpu_test's 90 s less and no kernels
    saved = gpu_bench.BUDGETS["gpu_test"] - 100 + gpu_bench.BUDGETS["kernels"]
    assert seen["timeout"] == pytest.approx(gpu_bench.BUDGETS["environment"] + saved, abs=1)
    steps = {step["name"]: step for step in report["steps"]}
    for name in gpu_bench.NEEDS_CUDA:
        assert steps[name]["status"] == "skipped" and "no CUDA" in steps[name]["reason"]
    assert json.loads((tmp_path / "gpu_bench.json").read_text())["mode"] == "gpu"


def test_a_failing_step_does_not_stop_the_later_ones(tmp_path, monkeypatch):
    ran = []

    def broken(ctx, timeout):
        raise RuntimeError("no such thing")

    def fine(ctx, timeout):
        ran.append(timeout)
        return gpu_bench.ok({})

    for name in gpu_bench.STEPS:
        monkeypatch.setitem(gpu_bench.STEPS, name, broken if name == "environment" else fine)
    report = gpu_bench.main(["--cpu-smoke", "--out", str(tmp_path)])
    assert report["steps"][0]["status"] == "failed" and "RuntimeError: no such thing" in report["steps"][0]["error"]
    assert len(ran) == len(gpu_bench.STEPS) - 1
    assert "## error: environment" in (tmp_path / "gpu_bench_cpu_smoke.md").read_text()


def test_failed_gpu_tests_are_counted_and_listed(tmp_path):
    ctx = _context(tmp_path)
    output = "..F.\nFAILED tests/ops/test_ops_gpu.py::test_x - AssertionError\n1 failed, 3 passed in 2.00s\n"
    ctx.run = lambda command, timeout, label: gpu_bench.Outcome(command, 1, output, 2.0, timeout)
    step = gpu_bench.step_gpu_test(ctx, 100)
    assert step["status"] == "failed"
    assert step["results"]["counts"] == {"failed": 1, "passed": 3}
    assert step["results"]["failures"] == ["FAILED tests/ops/test_ops_gpu.py::test_x - AssertionError"]


def test_gpu_form_runs_one_process_per_kernel_and_keeps_the_ops_that_ran(tmp_path):
    ctx, commands = _context(tmp_path), []

    def run(command, timeout, label):
        commands.append((command, timeout))
        op = command[command.index("--op") + 1]
        if op.startswith("nf4"):
            return gpu_bench.Outcome(command, 1, "ModuleNotFoundError: No module named 'bitsandbytes'", 1.0, timeout)
        row = {"op": op, "shape": "1", "dtype": "bf16", "provider": "torch", "median_ms": 1.0, "p20_ms": 1.0,
               "p80_ms": 1.0, "bytes": 1, "gbps": 1.0, "speedup_vs_torch": 1.0}
        Path(command[command.index("--out") + 1], "kernels.json").write_text(json.dumps({"rows": [row]}))
        return gpu_bench.Outcome(command, 0, f"  {op:22s} triton       failed: CompilationError: boom\n", 1.0, timeout)

    ctx.run = run
    step = gpu_bench.step_kernels(ctx, 80)
    assert len(commands) == len(gpu_bench.KERNELS_8B)
    assert commands[0][1] == pytest.approx(80 / len(gpu_bench.KERNELS_8B), rel=0.05)  # an equal share
    command = commands[3][0]
    assert command[command.index("--device") + 1] == "cuda" and "swiglu=2048x14336" in command
    assert step["status"] == "failed" and "nf4_quantize, nf4_dequantize" in step["error"]
    ops = step["results"]["ops"]
    assert ops["swiglu"]["status"] == "ok" and ops["swiglu"]["provider_errors"] == {"triton": "CompilationError: boom"}
    assert "bitsandbytes" in ops["nf4_quantize"]["error"]
    assert len(step["results"]["rows"]) == len(gpu_bench.KERNELS_8B) - 2


def test_kernel_processes_per_op_on_cuda_and_per_dtype_in_the_smoke_form():
    assert gpu_bench.kernel_groups(gpu_bench.KERNELS_8B, per_op=True) == [
        (dtype, [op]) for op, (_, dtype) in gpu_bench.KERNELS_8B.items()]
    groups = gpu_bench.kernel_groups(gpu_bench.KERNELS_SMOKE, per_op=False)
    assert [op for _, ops in groups for op in ops] == list(gpu_bench.KERNELS_SMOKE)
    assert len(groups) == len({dtype for _, dtype in gpu_bench.KERNELS_SMOKE.values()})


def test_the_gpu_test_files_hold_the_gpu_tests_and_the_deselected_compile_guard():
    files = gpu_bench.gpu_test_files()
    assert {"tests/ops/test_ops_gpu.py", "tests/attribution/test_gpu.py", "tests/kernels/test_triton_kernels.py"} <= \
        set(files)
    path, _, name = gpu_bench.COMPILE_GUARD.partition("::")
    assert path in files and f"def {name}(" in (ROOT / path).read_text()
    assert set(gpu_bench.SMOKE_GPU_TESTS) <= set(files)


@pytest.mark.parametrize("option", ["nope=3", "kernels=-1", "kernels=fast"])
def test_budgets_name_a_step_and_seconds(option):
    with pytest.raises(SystemExit):
        gpu_bench.main(["--budget", option])
