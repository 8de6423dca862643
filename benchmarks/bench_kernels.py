"""Kernel microbenchmarks: every fastrit op on every provider available here.

Providers: ``torch`` (eager PyTorch: the reference expression, or for swiglu ``silu(g)*u*keep`` with
autograd), ``compiled`` (torch.compile of the same), ``triton``, ``cpp`` and ``cuda`` (fastrit's
kernels), and ``bitsandbytes`` for the NF4 ops. On CPU tensors times come from
``torch.utils.benchmark`` with the process's intra-op thread count (``--threads``; median with
20th/80th percentiles of the measured blocks, providers interleaved over ``--rounds``); on a GPU from
``triton.testing.do_bench(quantiles=[0.5, 0.2, 0.8])``. Triton under the CPU interpreter is not
timed (it runs numpy, not the kernel). Each row reports the bytes an ideal kernel moves and the
achieved GB/s.

Examples::

    python -m benchmarks.bench_kernels                       # every op at its default shape
    python -m benchmarks.bench_kernels --op swiglu --shape 2048x5632
    python -m benchmarks.bench_kernels --op ig_accumulate_linear --shape 20x512x256x704 --dtype bf16
    python -m benchmarks.bench_kernels --op swiglu --op nf4_dequantize --shape swiglu=2048x14336 \
        --shape nf4_dequantize=4096x14336 --dtype bf16       # several ops, each at its own shape
    python -m benchmarks.bench_kernels --threads 1 --name bench_kernels_1thread   # one CPU thread
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

import fastrit
import fastrit.ops as ops
from fastrit.ops import reference

RESULTS = Path(__file__).parent / "results"
_SETTINGS = ("THP_MEM_ALLOC_ENABLE", "OMP_NUM_THREADS", "FASTRIT_CPU_GEMM", "CUDA_VISIBLE_DEVICES")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

#: op -> (default shape, what the numbers mean)
SHAPES = {
    "ig_interpolate": ((20, 512, 704), "m x N x D"),
    "ig_accumulate": ((20, 512, 704), "m x N x I"),
    "ig_accumulate_linear": ((20, 512, 256, 704), "m x N x H x I"),
    "swiglu": ((2048, 5632), "N x I (forward + backward)"),
    "row_sparse_grad": ((2048, 5632, 2048, 512), "N x O x In x k"),
    "col_sparse_grad": ((2048, 2048, 5632, 512), "N x H x I x k"),
    "nf4_quantize": ((4096, 4096), "out x in (blocksize 64)"),
    "nf4_dequantize": ((4096, 4096), "out x in (blocksize 64)"),
}


@dataclass
class Row:
    op: str
    shape: str
    dtype: str
    provider: str
    median_ms: float
    p20_ms: float
    p80_ms: float
    bytes: int
    gbps: float
    speedup_vs_torch: float | None = None


@dataclass
class Case:
    op: str
    shape: tuple[int, ...]
    bytes: int
    providers: dict[str, Callable[[], object]]


def _randn(*shape: int, dtype: torch.dtype, device: str, requires_grad: bool = False) -> torch.Tensor:
    return torch.randn(*shape, device=device).to(dtype).requires_grad_(requires_grad)


def _fastrit_providers(call: Callable[[str], object], device: str) -> dict[str, Callable[[], object]]:
    """The fastrit backends that can run (and be timed) on ``device``."""
    status = ops.backends()
    names = ["cuda", "triton"] if device == "cuda" else ["cpp"]
    return {name: (lambda name=name: call(name)) for name in names if status[name] == "available"}


def make_case(op: str, shape: tuple[int, ...], dtype: torch.dtype, device: str, compiled: bool) -> Case:
    es = torch.finfo(dtype).bits // 8
    r = lambda *s, **k: _randn(*s, dtype=dtype, device=device, **k)  # noqa: E731
    compile_ = (lambda fn: torch.compile(fn)) if compiled else None

    if op == "ig_interpolate":
        m, n, d = shape
        base, direction, alphas = r(n, d), r(n, d), torch.rand(m, device=device)
        eager = reference.ig_interpolate
        args = (base, direction, alphas)
        nbytes = (2 * n * d + m * n * d) * es
    elif op == "ig_accumulate":
        m, n, i = shape
        args = (r(n, i), r(m, n, i), torch.rand(m, device=device))
        eager = reference.ig_accumulate
        nbytes = (n * i + m * n * i) * es + n * i * 4
    elif op == "ig_accumulate_linear":
        m, n, h, i = shape
        args = (r(n, i), r(m, n, h), r(h, i), torch.rand(m, device=device))
        eager = reference.ig_accumulate_linear
        nbytes = (n * i + m * n * h + h * i) * es + n * i * 4
    elif op == "swiglu":
        n, i = shape
        gate, up, grad = r(n, i, requires_grad=True), r(n, i, requires_grad=True), r(n, i)
        keep = torch.rand(i, device=device) > 0.1

        def eager_fn(g, u, k):
            return F.silu(g) * u * k

        def run(fn):
            def step():
                gate.grad = up.grad = None
                fn().backward(grad)

            return step

        providers = {"torch": run(lambda: eager_fn(gate, up, keep))}
        if compiled:
            fn = torch.compile(eager_fn)
            providers["compiled"] = run(lambda: fn(gate, up, keep))
        status = ops.backends()
        for name in (["cuda", "triton"] if device == "cuda" else ["cpp"]):
            if status[name] == "available":
                providers[name] = run(lambda name=name: ops.swiglu(gate, up, keep, backend=name))
        return Case(op, shape, 8 * n * i * es, providers)  # fwd: 2 in 1 out; bwd: 3 in 2 out
    elif op == "row_sparse_grad":
        n, o, inp, k = shape
        args = (r(n, o), r(n, inp), torch.randperm(o, device=device)[:k])
        eager = reference.row_sparse_grad
        nbytes = (n * k + n * inp + k * inp) * es
    elif op == "col_sparse_grad":
        n, h, i, k = shape
        args = (r(n, h), r(n, i), torch.randperm(i, device=device)[:k])
        eager = reference.col_sparse_grad
        nbytes = (n * h + n * k + h * k) * es
    elif op in ("nf4_quantize", "nf4_dequantize"):
        return _nf4_case(op, shape, dtype, device, compiled)
    else:
        raise ValueError(f"--op: unknown op {op!r}; expected one of {', '.join(SHAPES)}")

    providers = {"torch": lambda: eager(*args)}
    if compile_:
        fn = compile_(eager)
        providers["compiled"] = lambda: fn(*args)
    public = getattr(ops, op)
    providers.update(_fastrit_providers(lambda name: public(*args, backend=name), device))
    return Case(op, shape, nbytes, providers)


def _nf4_case(op: str, shape: tuple[int, ...], dtype: torch.dtype, device: str, compiled: bool) -> Case:
    import bitsandbytes.functional as bnbf

    weight = _randn(*shape, dtype=dtype, device=device)
    numel, es = weight.numel(), torch.finfo(dtype).bits // 8
    packed_bytes, absmax_bytes = (numel + 1) // 2, math.ceil(numel / 64) * 4
    if op == "nf4_quantize":
        providers = {
            "torch": lambda: reference.nf4_quantize_blocks(weight, 64),
            "bitsandbytes": lambda: bnbf.quantize_4bit(weight, blocksize=64, compress_statistics=False,
                                                       quant_type="nf4"),
        }
        if compiled:
            fn = torch.compile(reference.nf4_quantize_blocks)
            providers["compiled"] = lambda: fn(weight, 64)
        providers.update(_fastrit_providers(
            lambda name: ops.nf4_quantize(weight, 64, compress_statistics=False, backend=name), device))
        return Case(op, shape, numel * es + packed_bytes + absmax_bytes, providers)
    packed, state = bnbf.quantize_4bit(weight, blocksize=64, compress_statistics=False, quant_type="nf4")
    providers = {
        "torch": lambda: reference.nf4_dequantize_blocks(packed, state.absmax, 64, shape, dtype),
        "bitsandbytes": lambda: bnbf.dequantize_4bit(packed, state),
    }
    if compiled:
        fn = torch.compile(reference.nf4_dequantize_blocks)
        providers["compiled"] = lambda: fn(packed, state.absmax, 64, shape, dtype)
    providers.update(_fastrit_providers(lambda name: ops.nf4_dequantize(packed, state, backend=name), device))
    return Case(op, shape, numel * es + packed_bytes + absmax_bytes, providers)


def _quantiles(times_s: list[float]) -> tuple[float, float, float]:
    """(median, 20th percentile, 80th percentile) of per-call times in seconds, in milliseconds."""
    ordered = sorted(times_s)

    def quantile(q: float) -> float:
        position = q * (len(ordered) - 1)
        low = math.floor(position)
        high = min(low + 1, len(ordered) - 1)
        return (ordered[low] + (ordered[high] - ordered[low]) * (position - low)) * 1e3

    return quantile(0.5), quantile(0.2), quantile(0.8)


def time_providers(providers: dict[str, Callable[[], object]], device: str, min_run_time: float, rounds: int,
                   threads: int) -> dict[str, tuple[float, float, float] | Exception]:
    """(median, p20, p80) in milliseconds per provider, or the exception that stopped it.

    On the CPU the providers are timed in ``rounds`` interleaved rounds of ``min_run_time / rounds``
    seconds each (torch.utils.benchmark blocks, with ``threads`` intra-op threads), so that a slow
    phase of a shared machine lands on every provider instead of on whichever ran then; the quantiles
    are over all blocks of all rounds. On a GPU each provider gets one triton.testing.do_bench.
    """
    results: dict[str, tuple[float, float, float] | Exception] = {}
    runnable = {}
    for name, fn in providers.items():
        try:
            fn()  # warm-up (and compilation for the compiled provider)
            runnable[name] = fn
        except Exception as error:  # a provider that cannot run here is reported, not fatal
            results[name] = error
    if device == "cuda":
        import triton.testing

        for name, fn in runnable.items():
            results[name] = tuple(triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8]))
        return dict((name, results[name]) for name in providers)
    from torch.utils import benchmark

    # Timer runs its statement with `num_threads` threads (its default is 1, not the process's setting).
    timers = {name: benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads)
              for name, fn in runnable.items()}
    block_times: dict[str, list[float]] = {name: [] for name in timers}
    for _ in range(rounds):
        for name, timer in timers.items():
            block_times[name].extend(timer.blocked_autorange(min_run_time=min_run_time / rounds).times)
    results.update((name, _quantiles(times)) for name, times in block_times.items())
    return dict((name, results[name]) for name in providers)


def run(ops_to_run: list[str], shapes: dict[str, tuple[int, ...]], dtype_name: str, device: str,
        compiled: bool, min_run_time: float, rounds: int = 3, threads: int | None = None) -> list[Row]:
    """Time every provider of every op in ``ops_to_run``; ``threads`` intra-op threads on the CPU
    (default: torch.get_num_threads())."""
    threads = threads or torch.get_num_threads()
    rows = []
    dtype = DTYPES[dtype_name]
    for op in ops_to_run:
        case = make_case(op, shapes[op], dtype, device, compiled)
        shape = "x".join(map(str, case.shape))
        op_rows = []
        for provider, result in time_providers(case.providers, device, min_run_time, rounds, threads).items():
            if isinstance(result, Exception):
                print(f"  {op:22s} {provider:12s} failed: {type(result).__name__}: {result}")
                continue
            median, p20, p80 = result
            op_rows.append(Row(op, shape, dtype_name, provider, median, p20, p80, case.bytes,
                               case.bytes / (median * 1e-3) / 1e9))
        torch_ms = next((r.median_ms for r in op_rows if r.provider == "torch"), None)
        for row in op_rows:
            row.speedup_vs_torch = torch_ms / row.median_ms if torch_ms else None
            print(f"  {row.op:22s} {row.shape:18s} {row.dtype:5s} {row.provider:12s} {row.median_ms:10.3f} ms "
                  f"[{row.p20_ms:.3f}, {row.p80_ms:.3f}]  {row.gbps:8.2f} GB/s  x{row.speedup_vs_torch:.2f} vs torch",
                  flush=True)
        rows.extend(op_rows)
    return rows


def environment(device: str, threads: int) -> dict:
    return {
        "machine": platform.machine(),
        "processor": platform.processor(),
        "cpu_count": os.cpu_count(),
        "threads": threads,
        # settings that change the CPU figures (THP_MEM_ALLOC_ENABLE: huge pages for every torch allocation)
        "env": {name: os.environ[name] for name in _SETTINGS if name in os.environ},
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "fastrit": fastrit.__version__,
        "backends": ops.backends(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def write(rows: list[Row], env: dict, out_dir: Path, name: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps({"env": env, "rows": [asdict(r) for r in rows]}, indent=2))
    with open(out_dir / f"{name}.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(asdict(rows[0])))
        writer.writeheader()
        writer.writerows(asdict(r) for r in rows)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    op_names = list(dict.fromkeys(r.op for r in rows))
    providers = list(dict.fromkeys(r.provider for r in rows))
    fig, ax = plt.subplots(figsize=(max(8, 1.6 * len(op_names)), 4.5))
    width = 0.8 / len(providers)
    for j, provider in enumerate(providers):
        xs, ys = [], []
        for i, op in enumerate(op_names):
            row = next((r for r in rows if r.op == op and r.provider == provider), None)
            if row is not None:
                xs.append(i + j * width)
                ys.append(row.gbps)
        ax.bar(xs, ys, width, label=provider)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(op_names))], op_names, rotation=20, fontsize=8)
    ax.set_ylabel("achieved GB/s (ideal bytes / median time)")
    ax.set_title(f"fastrit kernels, {env['device']}, {rows[0].dtype}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / f"{name}.png", dpi=110)
    plt.close(fig)


def parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shape: expected sizes like 2048x5632, got {text!r}") from None
    if not shape or any(size < 1 for size in shape):
        raise argparse.ArgumentTypeError(f"--shape: sizes must be >= 1, got {text!r}")
    return shape


def parse_shape_option(text: str) -> tuple[str | None, tuple[int, ...]]:
    """``--shape``: ``SIZES`` (for the one ``--op``) or ``OP=SIZES`` -> (op or None, sizes)."""
    op, sep, sizes = text.rpartition("=")
    if sep and op not in SHAPES:
        raise argparse.ArgumentTypeError(f"--shape: unknown op {op!r} in {text!r}; expected one of {', '.join(SHAPES)}")
    return (op or None), parse_shape(sizes)


def _shapes(parser: argparse.ArgumentParser, chosen: list[str],
            options: list[tuple[str | None, tuple[int, ...]]]) -> dict[str, tuple[int, ...]]:
    """Every op's default shape, overridden by the ``--shape`` options (checked against ``chosen``)."""
    shapes = dict((op, shape) for op, (shape, _) in SHAPES.items())
    for op, shape in options:
        if op is None:
            if len(chosen) != 1:
                parser.error("--shape SIZES needs exactly one --op (for several, --shape OP=SIZES)")
            op = chosen[0]
        elif op not in chosen:
            parser.error(f"--shape: {op} is not among the ops to run ({', '.join(chosen)})")
        expected = len(SHAPES[op][0])
        if len(shape) != expected:
            parser.error(f"--shape: {op} takes {expected} sizes ({SHAPES[op][1]})")
        shapes[op] = shape
    return shapes


def main(argv: list[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--op", action="append", choices=list(SHAPES), help="op to benchmark (repeatable; default all)")
    parser.add_argument("--shape", type=parse_shape_option, action="append", default=[],
                        help="sizes for the one --op, e.g. 2048x5632 (see the op's default), or OP=SIZES "
                             "(repeatable), e.g. swiglu=2048x14336")
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile provider")
    parser.add_argument("--min-run-time", type=float, default=1.0, help="seconds per CPU measurement")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per CPU measurement")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="intra-op threads on the CPU (default: torch's setting, here %(default)s)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--name", default="bench_kernels", help="output file stem")
    args = parser.parse_args(argv)
    chosen = args.op or list(SHAPES)
    shapes = _shapes(parser, chosen, args.shape)
    if args.rounds < 1:
        parser.error("--rounds: must be >= 1")
    if args.threads < 1:
        parser.error("--threads: must be >= 1")
    print(f"device {args.device}, dtype {args.dtype}, {args.threads} CPU threads, backends {ops.backends()}")
    rows = run(chosen, shapes, args.dtype, args.device, not args.no_compile, args.min_run_time, args.rounds,
               args.threads)
    if rows:
        write(rows, environment(args.device, args.threads), args.out, args.name)
        print(f"wrote {args.out / args.name}.json, .csv, .png")
    return rows


if __name__ == "__main__":
    main()
