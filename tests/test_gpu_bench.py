"""``make gpu-bench`` (benchmarks.gpu_bench): its reduced CPU form runs every step and writes the JSON, the table and
the log; what only the GPU form meets (pytest's counts, timeouts, the deadline, no CUDA device, a failing op or
step) is checked with stand-ins for the commands."""

import json
import math
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
    assert steps["tuning"]["status"] == "ok", steps["tuning"]

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
    tuning = steps["tuning"]["results"]
    assert "--worker tuning" in tuning["command"] and "--cpu-smoke" in tuning["command"]
    rows = {row["name"]: row for row in tuning["rows"]}
    assert list(rows) == [setting["name"] for setting in gpu_bench.TUNING_SETTINGS]
    for setting in gpu_bench.TUNING_SETTINGS:
        row = rows[setting["name"]]
        assert row["status"] == "ok" and row["quantize_frozen"] == setting["quantize_frozen"]
        assert row["gradient_checkpointing"] == setting["gradient_checkpointing"]
        assert min(row["forward_s"], row["backward_s"], row["optimizer_s"]) > 0
        assert len(row["steps_s"]) == gpu_bench.TUNING_SMOKE["timed_steps"]
        assert min(row["steps_s"]) <= row["step_s"] <= max(row["steps_s"])  # the median step
        assert row["trainable_params"] == row["plan_trainable_params"] > 0  # the planner prepares as prepare does
        assert math.isfinite(row["loss_first"]) and math.isfinite(row["loss_last"])
        assert row["plan_peak_bytes"] > 0 and row["optimizer"] in ("adamw8bit", "adamw")
        assert row["measured_peak_bytes"] is None and row["plan_vs_measured"] is None  # no CUDA memory on the CPU

    saved = json.loads((tmp_path / "gpu_bench_cpu_smoke.json").read_text())
    assert saved["mode"] == "cpu_smoke" and [step["name"] for step in saved["steps"]] == list(gpu_bench.STEPS)
    table = (tmp_path / "gpu_bench_cpu_smoke.md").read_text()
    for name in gpu_bench.STEPS:
        assert re.search(rf"^\| {name} \| (ok|failed|skipped) \|", table, re.MULTILINE), name
    assert "## attribution at real shapes" in table and "## kernels" in table and "## tuning step" in table
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
    assert {"tests/ops/test_ops_gpu.py", "tests/attribution/test_gpu.py", "tests/kernels/test_triton_package.py"} <= \
        set(files)
    path, _, name = gpu_bench.COMPILE_GUARD.partition("::")
    assert path in files and f"def {name}(" in (ROOT / path).read_text()
    assert set(gpu_bench.SMOKE_GPU_TESTS) <= set(files)


@pytest.mark.parametrize("option", ["nope=3", "kernels=-1", "kernels=fast"])
def test_budgets_name_a_step_and_seconds(option):
    with pytest.raises(SystemExit):
        gpu_bench.main(["--budget", option])


def test_budgets_add_up_to_at_most_the_deadline():
    """A step is allotted the deadline less the later steps' budgets: budgets adding up to more would starve the first
    steps (the environment probe would get seconds)."""
    assert sum(gpu_bench.BUDGETS.values()) <= gpu_bench.DEADLINE_S
    assert sum(gpu_bench.SMOKE_BUDGETS.values()) <= gpu_bench.SMOKE_DEADLINE_S
    assert set(gpu_bench.BUDGETS) == set(gpu_bench.SMOKE_BUDGETS) == set(gpu_bench.STEPS)
    assert all(seconds > 0 for seconds in gpu_bench.BUDGETS.values())


def _tuning_row(name, peak=None):
    return {"name": name, "status": "ok", "optimizer": "adamw8bit", "step_s": 0.1, "forward_s": 0.03,
            "backward_s": 0.06, "optimizer_s": 0.01, "tokens_per_s": 20480.0, "measured_peak_bytes": peak,
            "plan_peak_bytes": 11 * 2**30, "plan_vs_measured": 11 * 2**30 / peak if peak else None,
            "loss_first": 11.9, "loss_last": 11.8}


def _tuning_output(*rows) -> str:
    return "".join(f"{gpu_bench.TUNING_MARK}{json.dumps(row)}\n" for row in rows)


def test_gpu_form_of_the_tuning_step_runs_its_worker_and_reports_plan_against_peak(tmp_path):
    ctx, commands = _context(tmp_path), []
    rows = [_tuning_row("nf4+checkpointing", 10 * 2**30), _tuning_row("dense", 20 * 2**30)]

    def run(command, timeout, label):
        commands.append((command, timeout))
        return gpu_bench.Outcome(command, 0, "loading\n" + _tuning_output(*rows), 30.0, timeout)

    ctx.run = run
    step = gpu_bench.step_tuning(ctx, 45)
    assert step["status"] == "ok" and step["results"]["rows"] == rows
    command, timeout = commands[0]
    assert command[command.index("--worker") + 1] == "tuning" and "--cpu-smoke" not in command
    assert float(command[command.index("--worker-seconds") + 1]) == timeout == 45
    assert step["results"]["model"].startswith("llama-3-8b layer shapes, 4 decoder layers")
    summary = gpu_bench.step_summary({"name": "tuning", "status": "ok", "results": step["results"]})
    assert "nf4+checkpointing: 100 ms/step, peak 10 GiB, plan 11 GiB (x1.10)" in summary
    report = {"mode": "gpu", "started": "now", "deadline_s": 450, "steps": [
        {"name": "tuning", "status": "ok", "seconds": 30.0, "budget_s": 45, **step}]}
    table = gpu_bench.markdown(report)
    assert "## tuning step" in table and "| dense | adamw8bit | 100.0 | 30.0 | 60.0 | 10.0 | 20480 | 20 | 11 | 0.55 |" \
        in table


def test_a_tuning_worker_stopped_at_its_timeout_keeps_what_it_measured(tmp_path):
    ctx = _context(tmp_path)
    ctx.run = lambda command, timeout, label: gpu_bench.Outcome(
        command, None, _tuning_output(_tuning_row("nf4+checkpointing", 2**30)), timeout, timeout)
    step = gpu_bench.step_tuning(ctx, 45)
    assert step["status"] == "ok" and len(step["results"]["rows"]) == 1
    assert "before dense" in step["results"]["partial"]
    ctx.run = lambda command, timeout, label: gpu_bench.Outcome(command, None, "building\n", timeout, timeout)
    step = gpu_bench.step_tuning(ctx, 45)
    assert step["status"] == "failed" and "timeout of 45 s" in step["error"]


def test_a_failing_tuning_worker_fails_the_step_with_what_it_measured(tmp_path):
    ctx = _context(tmp_path)
    output = _tuning_output(_tuning_row("nf4+checkpointing", 2**30)) + "torch.OutOfMemoryError: CUDA out of memory\n"
    ctx.run = lambda command, timeout, label: gpu_bench.Outcome(command, 1, output, 5.0, timeout)
    step = gpu_bench.step_tuning(ctx, 45)
    assert step["status"] == "failed" and "out of memory" in step["error"]
    assert [row["name"] for row in step["results"]["rows"]] == ["nf4+checkpointing"]
    ctx.run = lambda command, timeout, label: gpu_bench.Outcome(command, 0, "nothing\n", 5.0, timeout)
    assert gpu_bench.step_tuning(ctx, 45)["status"] == "failed"


def test_the_tuning_worker_skips_a_setting_the_time_left_would_not_hold(monkeypatch, capsys):
    def row(spec, setting):
        time.sleep(0.3)
        return {"name": setting["name"], "status": "ok"}

    monkeypatch.setattr(gpu_bench, "tuning_row", row)
    gpu_bench.tuning_worker(True, 0.5)  # 0.3 s spent: another 0.3 s would pass 90 % of 0.5 s
    printed = [json.loads(line[len(gpu_bench.TUNING_MARK):]) for line in capsys.readouterr().out.splitlines()]
    assert [(r["name"], r["status"]) for r in printed] == [("nf4+checkpointing", "ok"), ("dense", "skipped")]
    gpu_bench.tuning_worker(True, 10.0)
    printed = [json.loads(line[len(gpu_bench.TUNING_MARK):]) for line in capsys.readouterr().out.splitlines()]
    assert [r["status"] for r in printed] == ["ok", "ok"]
