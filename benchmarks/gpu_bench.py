"""One-shot GPU benchmark, ``make gpu-bench`` (``python -m benchmarks.gpu_bench``): whoever is lent a GPU runs it
once and gets one JSON and one table. Designed to finish within 8 minutes on an H100 or H200.

Steps, in order, each in its own processes with a timeout (``--budget STEP=SECONDS``; a step may also use what the
steps before it left unused, and the steps after it keep theirs), each recorded with its status (``ok``, ``failed``
with the last lines of its output, or ``skipped`` with why), wall seconds and results. A failing step does not stop
the later ones; past the total deadline (``--deadline``, 7.5 minutes) the remaining steps are recorded as skipped.

1. ``environment``: Python, torch / triton / transformers / bitsandbytes versions, every GPU's name, compute
   capability, memory and multiprocessors (``torch.cuda.get_device_properties``), the driver (nvidia-smi),
   ``import fastrit._C`` (built by ``make install``; this script builds nothing) and ``fastrit.backends()``.
2. ``gpu_test``: ``make gpu-test``'s run (``pytest -q -m gpu`` with ``TRITON_INTERPRET=0``) over the test files
   that mark tests ``gpu`` (:func:`gpu_test_files`: the same tests, without importing the modules that hold none,
   which may need packages a GPU machine lacks), without the sm_80/sm_90 compile guard (:data:`COMPILE_GUARD`: it
   needs no GPU, runs in ``make test`` and compiles for minutes); passed / failed / skipped counts from pytest's
   summary line (from its progress if it timed out), the FAILED / ERROR lines and the reasons for skips.
3. ``attribution``: ``python -m benchmarks.bench_attribution --only-real-shapes --device cuda --repeats 3``
   (:mod:`benchmarks.attribution_real_shapes`: seconds, forwards of time and FLOPs, speedup over the reference loop,
   max |delta|, peak MiB per row).
4. ``kernels``: every op of :mod:`benchmarks.bench_kernels` at Llama-3-8B's shapes (:data:`KERNELS_8B`) on CUDA,
   one process per op, so that a CUDA fault or a hang costs that op only.
5. ``tuning``: one training step at Llama-3-8B's layer shapes (:data:`TUNING_8B`: its config with the decoder cut to
   4 layers, the full 128,256-token vocabulary, bf16, random weights drawn on the GPU, the MLPs of layers 0-2
   trainable, 1 x 2048 tokens), in one process (``--worker tuning``), for each of :data:`TUNING_SETTINGS`:
   ``fastrit.prepare(quantize_frozen="nf4", gradient_checkpointing=True)``, then, if the time left allows, dense
   without checkpointing. bitsandbytes' 8-bit AdamW (torch's AdamW without bitsandbytes) and
   ``fastrit.tuning.causal_lm_loss``; a warm-up step, then the median of 5 steps split into forward, backward and
   optimizer (a device synchronisation around each), ``torch.cuda.max_memory_allocated`` over them beside
   ``fastrit.plan_memory``'s peak for the same settings (ratio plan / measured). Rows are printed as they are
   measured: a worker stopped at its timeout keeps the settings it finished.

Without a CUDA device the GPU steps are recorded as skipped. ``--cpu-smoke`` is the reduced form that the tests run
(tiny shapes on the CPU, the gpu-marked tests of one file, the tuning step on a tiny Llama; a minute or two), so that
this script cannot rot.
``--offline`` (a machine without network, such as a lent GPU box) keeps pip and the Hugging Face hub from being
asked for SmolLM2's weights (the scenario then uses random weights of its shape).

Results in ``--out`` (default benchmarks/results/): ``gpu_bench.json`` (the environment and every step),
``gpu_bench.md`` (one line per step, then the attribution rows, the kernel rows and any errors) and
``gpu_bench.log`` (every command's whole output); ``gpu_bench_cpu_smoke.*`` with ``--cpu-smoke``. The JSON and
the table are rewritten after every step, so a run stopped from outside keeps what it measured. Exit status 1 when
a step failed.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks._process import ROOT, print_row

RESULTS = Path(__file__).parent / "results"
ENV_MARK = "GPU_BENCH_ENVIRONMENT "
DEADLINE_S = 450.0  # 7.5 minutes
SMOKE_DEADLINE_S = 240.0
MIN_STEP_S = 5.0  # a step (or a kernel process) with less time than this is skipped
TAIL_LINES = 40

#: step -> its time budget in seconds on a GPU (an H100/H200 estimate; together the deadline) and in the smoke form.
#: The tuning step's 45 s (imports, two 1.9 B-parameter models built and prepared, 2 x 6 steps) came out of attribution
#: (120 -> 100) and kernels (110 -> 85); in the smoke form (about 10 s here) its 35 s out of attribution (90 -> 80) and
#: kernels (60 -> 55). Each form's budgets add up to at most its deadline (a step is allotted the deadline less the
#: later steps' budgets).
BUDGETS = {"environment": 30.0, "gpu_test": 190.0, "attribution": 100.0, "kernels": 85.0, "tuning": 45.0}
SMOKE_BUDGETS = {"environment": 30.0, "gpu_test": 40.0, "attribution": 80.0, "kernels": 55.0, "tuning": 35.0}
NEEDS_CUDA = ("gpu_test", "attribution", "kernels", "tuning")

#: the compile guard of the Triton and CUDA kernels: no GPU needed (it runs in `make test`), minutes of compiling
COMPILE_GUARD = ("tests/kernels/test_triton_package.py::"
                 "test_every_kernel_compiles_for_sm80_and_sm90_without_spills_or_oversized_grids")
#: the smoke form's gpu-marked tests (skipped without a GPU: the command, the skips and the parsing run)
SMOKE_GPU_TESTS = ("tests/attribution/test_gpu.py",)

#: op -> (sizes, dtype) at Llama-3-8B's shapes (hidden 4096, MLP 14,336; sizes as bench_kernels.SHAPES names them).
#: The IG ops in float32, as the attribution engine calls them, at 20 steps x 512 positions; the rest in bf16:
#: SwiGLU and the sparse gradients of 2048 tokens (1433 neurons = 10% of a layer), NF4 of a down_proj weight.
KERNELS_8B: dict[str, tuple[tuple[int, ...], str]] = {
    "ig_interpolate": ((20, 512, 4096), "fp32"),
    "ig_accumulate": ((20, 512, 14336), "fp32"),
    "ig_accumulate_linear": ((20, 512, 4096, 14336), "fp32"),
    "swiglu": ((2048, 14336), "bf16"),
    "row_sparse_grad": ((2048, 14336, 4096, 1433), "bf16"),
    "col_sparse_grad": ((2048, 4096, 14336, 1433), "bf16"),
    "nf4_quantize": ((4096, 14336), "bf16"),
    "nf4_dequantize": ((4096, 14336), "bf16"),
}
#: the same ops at tiny shapes in float32, for the CPU smoke form (one dtype: one bench_kernels process)
KERNELS_SMOKE: dict[str, tuple[tuple[int, ...], str]] = {
    "ig_interpolate": ((3, 7, 13), "fp32"),
    "ig_accumulate": ((3, 7, 13), "fp32"),
    "ig_accumulate_linear": ((3, 7, 5, 13), "fp32"),
    "swiglu": ((7, 13), "fp32"),
    "row_sparse_grad": ((7, 13, 5, 3), "fp32"),
    "col_sparse_grad": ((7, 5, 13, 3), "fp32"),
    "nf4_quantize": ((8, 64), "fp32"),
    "nf4_dequantize": ((8, 64), "fp32"),
}


def tail(text: str, lines: int = TAIL_LINES) -> str:
    """The last ``lines`` non-empty lines of ``text``."""
    return "\n".join([line for line in text.splitlines() if line.strip()][-lines:])


@dataclass
class Outcome:
    """One finished (or stopped) command: exit status (None: stopped at its timeout), merged output, seconds."""

    command: list[str]
    returncode: int | None
    output: str
    seconds: float
    timeout: float

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def error(self) -> str:
        """What went wrong, with the end of the output."""
        why = f"stopped at its timeout of {self.timeout:.0f} s" if self.returncode is None else \
            f"exit status {self.returncode}"
        return f"{' '.join(self.command[1:])}: {why}\n{tail(self.output)}"


def run_command(command: list[str], timeout: float, env: dict[str, str]) -> Outcome:
    """Run ``command`` in the repository root with stdout and stderr merged; past ``timeout`` seconds its whole
    process group is killed (pytest's and torch.compile's children too) and the output so far is kept."""
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, errors="replace", start_new_session=True)
    try:
        output, _ = process.communicate(timeout=timeout)
        returncode: int | None = process.returncode
    except subprocess.TimeoutExpired:
        _kill_group(process)
        try:
            output, _ = process.communicate(timeout=30)
        except subprocess.TimeoutExpired:  # a grandchild that left the group still holds the pipe
            output = "(no output: a child process kept it open after the timeout)"
        returncode = None
    finally:
        if process.poll() is None:  # interrupted (Ctrl-C): leave nothing running
            _kill_group(process)
    return Outcome(command, returncode, output, time.perf_counter() - start, timeout)


def _kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@dataclass
class Context:
    """What the steps share: the form, the subprocess environment, the log, and the clock."""

    smoke: bool
    out: Path
    stem: str
    env: dict[str, str]
    budgets: dict[str, float]
    deadline_s: float
    compile: bool = False
    cuda: bool | None = None  # from the environment step
    start: float = field(default_factory=time.perf_counter)

    @property
    def log(self) -> Path:
        return self.out / f"{self.stem}.log"

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def run(self, command: list[str], timeout: float, label: str) -> Outcome:
        """:func:`run_command`, its output appended to the log."""
        print(f"[{self.elapsed():6.1f} s] {label}: {' '.join(command[1:])} (timeout {timeout:.0f} s)", flush=True)
        outcome = run_command(command, timeout, self.env)
        status = "timed out" if outcome.returncode is None else f"exit {outcome.returncode}"
        with open(self.log, "a") as log:
            log.write(f"### {label}: {' '.join(command)}\n{outcome.output}\n### {status}, {outcome.seconds:.1f} s\n\n")
        print(f"[{self.elapsed():6.1f} s] {label}: {status} after {outcome.seconds:.1f} s", flush=True)
        return outcome


def ok(results: dict) -> dict:
    return {"status": "ok", "results": results}


def failed(error: str, results: dict | None = None) -> dict:
    return {"status": "failed", "error": error, "results": results or {}}


def skipped(reason: str) -> dict:
    return {"status": "skipped", "reason": reason, "results": {}}


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# ----------------------------------------------------------------------------------------------------- environment

def probe_environment() -> dict:
    """Versions, GPUs, driver, the extension and fastrit's backends, from inside a fresh process."""
    import importlib
    from importlib import metadata

    import torch

    info: dict = {"python": platform.python_version(), "executable": sys.executable, "platform": platform.platform(),
                  "cpu_count": os.cpu_count(), "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET")}
    versions = {}
    for package in ("torch", "triton", "transformers", "bitsandbytes", "datasets"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "absent"
    info["versions"] = versions
    info["torch_cuda"] = torch.version.cuda
    info["cuda_available"] = torch.cuda.is_available()
    info["gpus"] = []
    for index in range(torch.cuda.device_count() if info["cuda_available"] else 0):
        props = torch.cuda.get_device_properties(index)
        info["gpus"].append({"name": props.name, "capability": f"{props.major}.{props.minor}",
                             "memory_gib": round(props.total_memory / 2**30, 1),
                             "multiprocessors": props.multi_processor_count})
    info["driver"] = _driver_version()
    try:  # what stops either import (a missing package, an extension built for another torch) is the finding
        importlib.import_module("fastrit._C")
        info["extension"] = "ok"
    except Exception as error:  # noqa: BLE001
        info["extension"] = f"{type(error).__name__}: {error}"
    try:
        import fastrit

        info["versions"]["fastrit"] = fastrit.__version__
        info["backends"] = fastrit.backends()
    except Exception as error:  # noqa: BLE001
        info["versions"]["fastrit"] = f"{type(error).__name__}: {error}"
    return info


def _driver_version() -> str | None:
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=15)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip().splitlines()[0] if done.returncode == 0 and done.stdout.strip() else None


def step_environment(ctx: Context, timeout: float) -> dict:
    outcome = ctx.run([sys.executable, "-m", "benchmarks.gpu_bench", "--worker", "environment"], timeout,
                      "environment")
    lines = [line for line in outcome.output.splitlines() if line.startswith(ENV_MARK)]
    if not outcome.ok or not lines:
        return failed(outcome.error())
    info = json.loads(lines[-1][len(ENV_MARK):])
    ctx.cuda = info["cuda_available"]
    if info["extension"] != "ok":
        return failed(f"import fastrit._C: {info['extension']} (build it with `make install`)", info)
    return ok(info)


# ------------------------------------------------------------------------------------------------------- gpu tests

_SUMMARY = re.compile(r"(\d+) (passed|failed|skipped|deselected|errors?|xfailed|xpassed|warnings?)\b")
_PROGRESS = re.compile(r"^([.sFExX]+)\s*(\[\s*\d+%\])?$")
_PROGRESS_NAMES = {".": "passed", "s": "skipped", "F": "failed", "E": "error", "x": "xfailed", "X": "xpassed"}


def pytest_counts(output: str) -> dict:
    """Counts per outcome from pytest's summary line (``3 failed, 90 passed, 5 skipped in 12.34s``); without one
    (pytest was stopped), from its ``-q`` progress characters, with ``partial: True``."""
    for line in reversed(output.splitlines()):
        if re.search(r"\bin [\d.]+s\b", line) and (found := _SUMMARY.findall(line)):
            return {name.rstrip("s") if name in ("errors", "warnings") else name: int(count)
                    for count, name in found}
    counts: dict = {}
    for line in output.splitlines():
        if match := _PROGRESS.match(line.strip()):
            for char in match.group(1):
                counts[_PROGRESS_NAMES[char]] = counts.get(_PROGRESS_NAMES[char], 0) + 1
    return {**counts, "partial": True}


def gpu_test_files() -> list[str]:
    """The test files that mark tests ``gpu`` (``pytest.mark.gpu`` in a decorator, ``pytestmark`` or ``marks=``)."""
    return sorted(str(path.relative_to(ROOT)) for path in (ROOT / "tests").rglob("test_*.py")
                  if "mark.gpu" in path.read_text(encoding="utf-8"))


def step_gpu_test(ctx: Context, timeout: float) -> dict:
    targets = list(SMOKE_GPU_TESTS) if ctx.smoke else [*gpu_test_files(), "--deselect", COMPILE_GUARD]
    # a test module that cannot be imported (a test-only package missing on the GPU machine) costs its own tests only
    command = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-rfEs", "--continue-on-collection-errors", *targets]
    outcome = ctx.run(command, timeout, "gpu_test")
    lines = outcome.output.splitlines()
    counts = pytest_counts(outcome.output)
    results = {"command": " ".join(command[1:]), "counts": counts,
               "failures": [line for line in lines if line.startswith(("FAILED", "ERROR"))][:50],
               "skip_reasons": [line for line in lines if line.startswith("SKIPPED")][:50]}
    if not outcome.ok:
        return failed(outcome.error(), results)
    if not ctx.smoke and not counts.get("passed"):
        return failed("no gpu test passed (were they all skipped? see skip_reasons)", results)
    return ok(results)


# ----------------------------------------------------------------------------------------------------- attribution

def step_attribution(ctx: Context, timeout: float) -> dict:
    options = ["--quick", "--device", "cpu", "--repeats", "1"] if ctx.smoke else ["--device", "cuda", "--repeats", "3"]
    with tempfile.TemporaryDirectory(prefix="gpu_bench_attribution_") as parts:
        command = [sys.executable, "-m", "benchmarks.bench_attribution", "--only-real-shapes", *options,
                   "--out", parts]
        outcome = ctx.run(command, timeout, "attribution")
        found = sorted(Path(parts).glob("*real_shapes.json"))
        report = _read_json(found[0]) if found else None
    rows = (report or {}).get("real_shapes") or []
    results = {"command": " ".join(command[1:-2]), "rows": rows}
    if not outcome.ok:
        return failed(outcome.error(), results)
    if not rows:
        return failed(f"no real_shapes rows in {[path.name for path in found]}\n{tail(outcome.output)}", results)
    return ok(results)


# --------------------------------------------------------------------------------------------------------- kernels

_PROVIDER_FAILED = re.compile(r"^\s+(\w+)\s+(\S+)\s+failed: (.*)$")


def kernel_groups(specs: dict[str, tuple[tuple[int, ...], str]], per_op: bool) -> list[tuple[str, list[str]]]:
    """``(dtype, ops)`` per bench_kernels process: one op each (on CUDA: a fault or a hang costs that op only), or
    consecutive ops of one dtype together (the CPU smoke form, where the imports are the cost)."""
    groups: list[tuple[str, list[str]]] = []
    for op, (_, dtype) in specs.items():
        if per_op or not groups or groups[-1][0] != dtype:
            groups.append((dtype, [op]))
        else:
            groups[-1][1].append(op)
    return groups


def _kernel_command(ctx: Context, specs: dict, dtype: str, ops: list[str], out: str) -> list[str]:
    command = [sys.executable, "-m", "benchmarks.bench_kernels", "--device", "cpu" if ctx.smoke else "cuda",
               "--dtype", dtype, "--out", out, "--name", "kernels"]
    command += ["--min-run-time", "0.01", "--rounds", "1"] if ctx.smoke else []
    command += [] if ctx.compile else ["--no-compile"]
    for op in ops:
        command += ["--op", op, "--shape", f"{op}={'x'.join(map(str, specs[op][0]))}"]
    return command


def step_kernels(ctx: Context, timeout: float) -> dict:
    specs = KERNELS_SMOKE if ctx.smoke else KERNELS_8B
    groups = kernel_groups(specs, per_op=not ctx.smoke)
    end = time.perf_counter() + timeout
    rows: list[dict] = []
    ops: dict[str, dict] = {}
    for index, (dtype, names) in enumerate(groups):
        share = (end - time.perf_counter()) / (len(groups) - index)  # an equal part of what is left
        if share < MIN_STEP_S:
            ops.update((op, {"status": "skipped", "reason": "the step's time budget is spent"}) for op in names)
            continue
        with tempfile.TemporaryDirectory(prefix="gpu_bench_kernels_") as parts:
            command = _kernel_command(ctx, specs, dtype, names, parts)
            outcome = ctx.run(command, share, f"kernels {' '.join(names)}")
            saved = _read_json(Path(parts) / "kernels.json") or {}
        provider_errors: dict[str, dict[str, str]] = {}
        for line in outcome.output.splitlines():
            if match := _PROVIDER_FAILED.match(line):
                provider_errors.setdefault(match.group(1), {})[match.group(2)] = match.group(3)[:500]
        for op in names:
            op_rows = [row for row in saved.get("rows", []) if row["op"] == op]
            entry = {"status": "ok" if op_rows else "failed", "shape": "x".join(map(str, specs[op][0])),
                     "dtype": dtype, "seconds": round(outcome.seconds, 1)}
            if not op_rows:
                entry["error"] = outcome.error() if not outcome.ok else f"no rows for {op}\n{tail(outcome.output)}"
            if op in provider_errors:
                entry["provider_errors"] = provider_errors[op]
            ops[op] = entry
            rows += op_rows
    results = {"ops": ops, "rows": rows}
    statuses = {entry["status"] for entry in ops.values()}
    if "failed" in statuses:
        bad = [op for op, entry in ops.items() if entry["status"] == "failed"]
        return failed(f"{len(bad)} of {len(ops)} ops failed: {', '.join(bad)} (see results.ops)", results)
    if "ok" not in statuses:
        return skipped("the step's time budget is spent") | {"results": results}
    return ok(results)


# ---------------------------------------------------------------------------------------------------------- tuning

TUNING_MARK = "GPU_BENCH_TUNING "
#: the tuning step's run on a GPU: Llama-3-8B's layer shapes and vocabulary (fastrit.memory.BUILT_IN_CONFIGS), its
#: decoder cut to ``layers``, the MLPs of ``train_layers`` trainable, ``batch`` x ``seq`` random tokens, every
#: position labelled; one warm-up step, then ``timed_steps``
TUNING_8B = {"config": "llama-3-8b", "layers": 4, "train_layers": [0, 1, 2], "seq": 2048, "batch": 1,
             "dtype": "bfloat16", "device": "cuda", "timed_steps": 5}
#: the same code at a tiny Llama shape on the CPU (the smoke form)
TUNING_SMOKE = {"config": {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 176, "num_hidden_layers": 4,
                           "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
                           "tie_word_embeddings": False},
                "layers": 4, "train_layers": [0, 1, 2], "seq": 32, "batch": 1, "dtype": "bfloat16", "device": "cpu",
                "timed_steps": 2}
#: the settings timed, in order: what fastrit.tune does on a small GPU, then (if the time left allows) on a large one
TUNING_SETTINGS = (
    {"name": "nf4+checkpointing", "quantize_frozen": "nf4", "gradient_checkpointing": True},
    {"name": "dense", "quantize_frozen": None, "gradient_checkpointing": False},
)
TUNING_LR = 1e-4


def _tuning_config(spec: dict):
    import transformers

    from fastrit.memory import BUILT_IN_CONFIGS

    name = spec["config"]
    config = BUILT_IN_CONFIGS[name]() if isinstance(name, str) else transformers.LlamaConfig(**name)
    config.num_hidden_layers = spec["layers"]
    config._attn_implementation = "sdpa"
    return config


def _tuning_optimizer(params: list):
    """``(name as fastrit.plan_memory calls it, optimizer)``: bitsandbytes' 8-bit AdamW (not paged, so that its states
    count in torch's memory statistics) if it imports, else torch's AdamW."""
    import torch

    try:
        import bitsandbytes as bnb
    except ImportError:
        return "adamw", torch.optim.AdamW(params, lr=TUNING_LR, weight_decay=0.0)
    return "adamw8bit", bnb.optim.AdamW8bit(params, lr=TUNING_LR)


def tuning_row(spec: dict, setting: dict) -> dict:
    """One setting of the tuning step (in the worker): build the model with random weights on the device, prepare it,
    a warm-up step, then ``timed_steps`` steps (forward with fastrit.tuning.causal_lm_loss, backward, optimizer step,
    each between two device synchronisations); the peak memory of the timed steps beside fastrit.plan_memory's."""
    import torch
    import transformers

    import fastrit
    from fastrit.tuning import causal_lm_loss
    from fastrit.tuning.loss import device_chunk_bytes

    device = torch.device(spec["device"])
    cuda = device.type == "cuda"
    dtype = getattr(torch, spec["dtype"])
    config = _tuning_config(spec)
    seconds: dict = {}

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    start = time.perf_counter()
    torch.manual_seed(0)
    with torch.device(device):  # the weights are drawn where they are used
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.to(device).train()
    sync()
    seconds["build"] = time.perf_counter() - start
    start = time.perf_counter()
    fastrit.prepare(model, deactivate=None, train_layers=list(spec["train_layers"]), train="mlp",
                    quantize_frozen=setting["quantize_frozen"],
                    gradient_checkpointing=setting["gradient_checkpointing"])
    sync()
    seconds["prepare"] = time.perf_counter() - start
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer_name, optimizer = _tuning_optimizer(params)
    generator = torch.Generator(device=device).manual_seed(1)
    input_ids = torch.randint(0, config.vocab_size, (spec["batch"], spec["seq"]), device=device, generator=generator)

    def step() -> tuple[float, float, float, float]:
        sync()
        t0 = time.perf_counter()
        loss = causal_lm_loss(model, input_ids, input_ids)
        sync()
        t1 = time.perf_counter()
        loss.backward()
        sync()
        t2 = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        t3 = time.perf_counter()
        return t1 - t0, t2 - t1, t3 - t2, float(loss.detach())

    start = time.perf_counter()
    first = step()  # compiles, allocates the optimizer's states
    seconds["warm_up"] = time.perf_counter() - start
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        held = torch.cuda.memory_allocated(device)
    timed = [step() for _ in range(spec["timed_steps"])]
    peak = torch.cuda.max_memory_allocated(device) if cuda else None
    plan = fastrit.plan_memory(config, seq_len=spec["seq"], batch_size=spec["batch"], train="mlp",
                               train_layers=list(spec["train_layers"]), quantize_frozen=setting["quantize_frozen"],
                               gradient_checkpointing=setting["gradient_checkpointing"], dtype=spec["dtype"],
                               optimizer=optimizer_name, device=spec["device"],
                               loss_chunk_bytes=device_chunk_bytes(device))  # what causal_lm_loss took
    median = {name: statistics.median(t[index] for t in timed)
              for index, name in enumerate(("forward_s", "backward_s", "optimizer_s"))}
    step_s = statistics.median(sum(t[:3]) for t in timed)
    row = {
        "name": setting["name"], "status": "ok", "quantize_frozen": setting["quantize_frozen"],
        "gradient_checkpointing": setting["gradient_checkpointing"], "optimizer": optimizer_name,
        "trainable_params": sum(p.numel() for p in params), "plan_trainable_params": plan.trainable_params,
        "step_s": step_s, **median, "steps_s": [round(sum(t[:3]), 6) for t in timed],
        "tokens_per_s": spec["batch"] * spec["seq"] / step_s, "seconds": seconds,
        "loss_first": first[3], "loss_last": timed[-1][3],
        "measured_peak_bytes": peak, "held_before_step_bytes": held if cuda else None,
        "plan_peak_bytes": plan.peak_bytes, "plan_vs_measured": plan.peak_bytes / peak if peak else None,
        "plan_breakdown_bytes": dict(plan.breakdown),
    }
    return row  # the model, its optimizer and the step are freed with this frame


def tuning_worker(smoke: bool, seconds: float | None) -> None:
    """Print one :data:`TUNING_MARK` row per setting of :data:`TUNING_SETTINGS` as it is measured; a setting that the
    time left (``seconds`` since the start) would likely not hold, going by the average so far, is a skipped row."""
    spec = TUNING_SMOKE if smoke else TUNING_8B
    start = time.perf_counter()
    for index, setting in enumerate(TUNING_SETTINGS):
        elapsed = time.perf_counter() - start
        if index and seconds is not None and elapsed + elapsed / index > 0.9 * seconds:
            print_row(TUNING_MARK, {"name": setting["name"], "status": "skipped",
                                    "reason": f"{elapsed:.0f} s of {seconds:.0f} s spent: no time for another"})
            continue
        print_row(TUNING_MARK, tuning_row(spec, setting))
        gc.collect()  # the previous setting's model goes before the next is built
        if spec["device"] == "cuda":
            import torch

            torch.cuda.empty_cache()


def tuning_model(spec: dict) -> str:
    """The tuning step's model and run, in words."""
    name = spec["config"] if isinstance(spec["config"], str) else "tiny Llama"
    return (f"{name} layer shapes, {spec['layers']} decoder layers, MLPs of layers {spec['train_layers']} trainable, "
            f"{spec['batch']} x {spec['seq']} tokens, {spec['dtype']} on {spec['device']}, "
            f"median of {spec['timed_steps']} steps after a warm-up")


def step_tuning(ctx: Context, timeout: float) -> dict:
    command = [sys.executable, "-m", "benchmarks.gpu_bench", "--worker", "tuning", "--worker-seconds",
               f"{timeout:.0f}", *(["--cpu-smoke"] if ctx.smoke else [])]
    outcome = ctx.run(command, timeout, "tuning")
    rows = [json.loads(line[len(TUNING_MARK):]) for line in outcome.output.splitlines()
            if line.startswith(TUNING_MARK)]
    measured = [row for row in rows if row.get("status") == "ok"]
    results = {"command": " ".join(command[1:]), "model": tuning_model(TUNING_SMOKE if ctx.smoke else TUNING_8B),
               "rows": rows}
    if outcome.returncode is None and measured:  # stopped at its timeout: what it measured stands
        missing = [s["name"] for s in TUNING_SETTINGS if s["name"] not in {row["name"] for row in rows}]
        return ok({**results, "partial": f"stopped at its timeout of {timeout:.0f} s before {', '.join(missing)}"})
    if not outcome.ok:
        return failed(outcome.error(), results)
    if not measured:
        return failed(f"no setting was measured\n{tail(outcome.output)}", results)
    return ok(results)


#: the steps, in order
STEPS: dict[str, Callable[[Context, float], dict]] = {
    "environment": step_environment,
    "gpu_test": step_gpu_test,
    "attribution": step_attribution,
    "kernels": step_kernels,
    "tuning": step_tuning,
}


# ------------------------------------------------------------------------------------------------- runner, output

def run_step(ctx: Context, name: str, later: list[str]) -> dict:
    """One step within its time: its own budget plus whatever the steps before left, less the later ones' budgets."""
    allotted = ctx.deadline_s - ctx.elapsed() - sum(ctx.budgets[step] for step in later)
    start = time.perf_counter()
    if not ctx.smoke and name in NEEDS_CUDA and ctx.cuda is False:
        record = skipped("no CUDA device (torch.cuda.is_available() is False)")
    elif ctx.budgets[name] <= 0 < BUDGETS[name]:
        record = skipped(f"no time budget (--budget {name}=0)")
    elif ctx.budgets[name] > 0 and allotted < MIN_STEP_S:
        record = skipped(f"the total deadline of {ctx.deadline_s:.0f} s is reached")
    else:
        try:
            record = STEPS[name](ctx, allotted)
        except Exception:  # noqa: BLE001 - a failing step must not stop the later ones
            record = failed(tail(traceback.format_exc()))
    return {"name": name, "status": record["status"], "seconds": round(time.perf_counter() - start, 1),
            "budget_s": ctx.budgets[name], "timeout_s": round(max(allotted, 0.0), 1) if ctx.budgets[name] else 0.0,
            **{key: value for key, value in record.items() if key != "status"}}


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _number(value: object, spec: str) -> str:
    return format(value, spec) if isinstance(value, (int, float)) else "-"


def step_summary(step: dict) -> str:
    """One line of a step's key numbers (or why it failed or was skipped)."""
    results = step.get("results") or {}
    if step["name"] == "environment" and results:
        gpus = "; ".join(f"{gpu['name']} (sm {gpu['capability']}, {gpu['memory_gib']} GiB, "
                         f"{gpu['multiprocessors']} SMs)" for gpu in results["gpus"]) or "no GPU"
        versions = ", ".join(f"{name} {version}" for name, version in results["versions"].items())
        return f"{gpus}, driver {results['driver']}, CUDA {results['torch_cuda']}; {versions}; " \
               f"fastrit._C {results['extension']}"
    if step["name"] == "gpu_test" and results:
        counts = results["counts"]
        words = ", ".join(f"{counts.get(name, 0)} {name}" for name in ("passed", "failed", "error", "skipped"))
        return words + (" (stopped: counts so far)" if counts.get("partial") else "")
    if step["name"] == "attribution" and results.get("rows"):
        return f"{len(results['rows'])} rows ({len({row['scenario'] for row in results['rows']})} scenarios)"
    if step["name"] == "kernels" and results.get("ops"):
        done = sum(entry["status"] == "ok" for entry in results["ops"].values())
        return f"{done} of {len(results['ops'])} ops, {len(results['rows'])} rows"
    if step["name"] == "tuning" and results.get("rows"):
        parts = []
        for row in results["rows"]:
            if row.get("status") != "ok":
                parts.append(f"{row['name']}: skipped")
                continue
            memory = f"plan {_gib(row['plan_peak_bytes'])} GiB"
            if row.get("measured_peak_bytes"):
                memory = f"peak {_gib(row['measured_peak_bytes'])} GiB, {memory} (x{row['plan_vs_measured']:.2f})"
            parts.append(f"{row['name']}: {1000 * row['step_s']:.0f} ms/step, {memory}")
        return "; ".join(parts) + (f" ({results['partial']})" if results.get("partial") else "")
    if step["status"] == "ok":
        return ""
    why = step.get("reason") or step.get("error") or ""
    return why.splitlines()[0] if why else ""


def _gib(value: object) -> str:
    return f"{value / 2**30:.3g}" if isinstance(value, (int, float)) else "-"


def _ms(value: object) -> str:
    return f"{1000 * value:.1f}" if isinstance(value, (int, float)) else "-"


def markdown(report: dict) -> str:
    """The table: one line per step, then the attribution and kernel rows, then the errors."""
    lines = [f"# fastrit gpu_bench ({report['mode']})", "",
             f"{report['started']}, {report.get('wall_s', 0):.0f} s of a {report['deadline_s']:.0f} s deadline", "",
             "| step | status | seconds | budget s | summary |", "| --- | --- | ---: | ---: | --- |"]
    lines += [f"| {step['name']} | {step['status']} | {step['seconds']:.1f} | {step['budget_s']:.0f} | "
              f"{_cell(step_summary(step))} |" for step in report["steps"]]
    steps = {step["name"]: step for step in report["steps"]}
    attribution = (steps.get("attribution", {}).get("results") or {}).get("rows") or []
    if attribution:
        lines += ["", "## attribution at real shapes", "",
                  "| scenario | provider | seconds | forwards of time | forwards of FLOPs | speedup | max abs delta "
                  "| peak MiB |", "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        lines += [f"| {row['scenario']} | {row['provider']} | {_number(row.get('median_s'), '.4f')} | "
                  f"{_number(row.get('forwards_of_time'), '.2f')} | {_number(row.get('forwards_of_flops'), '.2f')} | "
                  f"{_number(row.get('speedup'), '.1f')} | {_number(row.get('max_abs_delta'), '.2e')} | "
                  f"{_number(row.get('peak_mib'), '.0f')} |" for row in attribution]
    kernels = (steps.get("kernels", {}).get("results") or {}).get("rows") or []
    if kernels:
        lines += ["", "## kernels", "",
                  "| op | shape | dtype | provider | median ms | p20-p80 ms | GB/s | x vs torch |",
                  "| --- | --- | --- | --- | ---: | ---: | ---: | ---: |"]
        lines += [f"| {row['op']} | {row['shape']} | {row['dtype']} | {row['provider']} | {row['median_ms']:.3f} | "
                  f"{row['p20_ms']:.3f}-{row['p80_ms']:.3f} | {row['gbps']:.1f} | "
                  f"{_number(row.get('speedup_vs_torch'), '.2f')} |" for row in kernels]
    tuning = steps.get("tuning", {}).get("results") or {}
    measured = [row for row in tuning.get("rows") or [] if row.get("status") == "ok"]
    if measured:
        lines += ["", "## tuning step", "", tuning["model"], "",
                  "| setting | optimizer | step ms | forward ms | backward ms | optimizer ms | tokens/s | peak GiB "
                  "| plan GiB | plan / peak | loss first, last |",
                  "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        lines += [f"| {row['name']} | {row['optimizer']} | {_ms(row['step_s'])} | {_ms(row['forward_s'])} | "
                  f"{_ms(row['backward_s'])} | {_ms(row['optimizer_s'])} | {row['tokens_per_s']:.0f} | "
                  f"{_gib(row['measured_peak_bytes'])} | {_gib(row['plan_peak_bytes'])} | "
                  f"{_number(row.get('plan_vs_measured'), '.2f')} | {row['loss_first']:.4f}, {row['loss_last']:.4f} |"
                  for row in measured]
    errors = [(step["name"], step["error"]) for step in report["steps"] if step.get("error")]
    errors += [(f"kernels {op}", entry["error"]) for op, entry in
               ((steps.get("kernels", {}).get("results") or {}).get("ops") or {}).items() if entry.get("error")]
    for name, error in errors:
        lines += ["", f"## error: {name}", "", "```", error, "```"]
    return "\n".join(lines) + "\n"


def write_outputs(ctx: Context, report: dict) -> None:
    report["wall_s"] = round(ctx.elapsed(), 1)
    (ctx.out / f"{ctx.stem}.json").write_text(json.dumps(report, indent=2))
    (ctx.out / f"{ctx.stem}.md").write_text(markdown(report))


def _budget_option(text: str) -> tuple[str, float]:
    step, _, seconds = text.partition("=")
    try:
        value = float(seconds)
    except ValueError:
        value = -1.0
    if step not in STEPS or value < 0:
        raise argparse.ArgumentTypeError(f"--budget: expected STEP=SECONDS with STEP one of {', '.join(STEPS)} and "
                                         f"SECONDS >= 0, got {text!r}")
    return step, value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-smoke", action="store_true", help="the reduced CPU form (tiny shapes, about a minute)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="output folder (default: %(default)s)")
    parser.add_argument("--budget", type=_budget_option, action="append", default=[], metavar="STEP=SECONDS",
                        help=f"a step's time budget (repeatable; 0 skips it); GPU defaults: "
                             f"{', '.join(f'{k} {v:.0f}' for k, v in BUDGETS.items())}")
    parser.add_argument("--deadline", type=float, help=f"total seconds (default {DEADLINE_S:.0f}; smoke "
                                                        f"{SMOKE_DEADLINE_S:.0f})")
    parser.add_argument("--offline", action="store_true",
                        help="no network: pip and the Hugging Face hub are not asked (PIP_NO_INDEX, HF_HUB_OFFLINE)")
    parser.add_argument("--compile", action="store_true", help="also the torch.compile provider of the kernels "
                                                                "(tens of seconds of compiling per op)")
    parser.add_argument("--worker", choices=["environment", "tuning"], help=argparse.SUPPRESS)
    parser.add_argument("--worker-seconds", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.deadline is not None and args.deadline <= 0:
        parser.error("--deadline: expected seconds > 0")
    return args


def main(argv: list[str] | None = None) -> dict:
    """Run every step; the report (also written to ``--out``)."""
    args = parse_args(argv)
    if args.worker == "environment":
        print_row(ENV_MARK, probe_environment())
        return {}
    if args.worker == "tuning":
        tuning_worker(args.cpu_smoke, args.worker_seconds)
        return {}
    smoke = args.cpu_smoke
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if not smoke:
        env["TRITON_INTERPRET"] = "0"  # as `make gpu-test`: the GPU path, not the CPU interpreter
    if args.offline:
        env.update(PIP_NO_INDEX="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    budgets = {**(SMOKE_BUDGETS if smoke else BUDGETS), **dict(args.budget)}
    deadline = args.deadline or (SMOKE_DEADLINE_S if smoke else DEADLINE_S)
    ctx = Context(smoke, args.out, "gpu_bench_cpu_smoke" if smoke else "gpu_bench", env, budgets, deadline,
                  compile=args.compile)
    ctx.out.mkdir(parents=True, exist_ok=True)
    ctx.log.write_text("")
    report: dict = {"mode": "cpu_smoke" if smoke else "gpu", "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    "argv": list(argv if argv is not None else sys.argv[1:]), "deadline_s": deadline,
                    "budgets_s": budgets, "environment": {}, "steps": []}
    names = list(STEPS)
    for index, name in enumerate(names):
        step = run_step(ctx, name, names[index + 1:])
        report["steps"].append(step)
        if name == "environment":
            report["environment"] = step["results"]
        write_outputs(ctx, report)
    print(markdown(report))
    print(f"wrote {ctx.out / ctx.stem}.json, .md, .log in {ctx.elapsed():.0f} s")
    return report


if __name__ == "__main__":
    sys.exit(1 if any(step["status"] == "failed" for step in main().get("steps", [])) else 0)
