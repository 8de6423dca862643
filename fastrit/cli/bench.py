"""``fastrit bench``: run the benchmarks of a source checkout (benchmarks/bench_*.py) with their own options."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from ._common import HelpFormatter

__all__ = ["BENCHMARKS", "add_parsers", "checkout_root"]

#: name -> what it measures (the module is benchmarks.bench_<name>)
BENCHMARKS = {
    "attribution": "fastrit.attribute against the knowledge-neurons loop and Captum",
    "kernels": "the Triton and C++ kernels against PyTorch",
    "reader": "the embedded reader's exact match per context condition",
    "mining": "fastrit.mine's throughput against its own attribution time",
    "prepare": "a prepared model's training memory and step time against the plain way",
    "tune": "two-stage tuning of the embedded reader: the noisy-context answer loss",
    "8b_cpu": "one real training step of a Llama-3-8B-shaped model on this CPU, beside plan_memory",
    "attribution_memory": "fastrit.attribute's peak RSS on Llama-3-8B-wide 2- and 4-layer models, beside "
                          "plan_attribution",
}


def add_parsers(subparsers: argparse._SubParsersAction) -> None:
    listing = "; ".join(f"{name}: {text}" for name, text in BENCHMARKS.items())
    parser = subparsers.add_parser(
        "bench", formatter_class=HelpFormatter,
        help="run a benchmark (or all) of the source checkout",
        description=f"Run benchmarks/bench_NAME.py of the source checkout fastrit is installed from, with the "
                    f"options that follow NAME (see `fastrit bench NAME --help`); results go to "
                    f"benchmarks/results/. The benchmarks: {listing}.",
    )
    parser.add_argument("name", metavar="NAME", choices=(*BENCHMARKS, "all"),
                        help=f"one of {', '.join(BENCHMARKS)}, or all (each with its defaults, as `make bench`)")
    parser.add_argument("options", nargs=argparse.REMAINDER, metavar="...",
                        help="the benchmark's own options, passed on as they are")
    parser.set_defaults(run=run_bench)


def checkout_root() -> Path:
    """The source checkout holding benchmarks/ (fastrit installed in place, ``pip install -e``); else an error."""
    root = Path(__file__).resolve().parents[2]
    if not (root / "benchmarks" / "bench_prepare.py").is_file():
        raise FileNotFoundError(f"NAME: the benchmarks live in fastrit's source checkout (benchmarks/), and fastrit "
                                f"runs from {root}, which has none; install from a clone with `make install`")
    return root


def run_bench(args: argparse.Namespace) -> None:
    root = checkout_root()
    if args.name == "all" and args.options:
        raise ValueError("NAME: 'all' runs every benchmark with its defaults and takes no options")
    names = list(BENCHMARKS) if args.name == "all" else [args.name]
    for name in names:
        command = [sys.executable, "-m", f"benchmarks.bench_{name}", *args.options]
        print(f"fastrit bench: {' '.join(command[1:])}", flush=True)
        status = subprocess.run(command, cwd=root).returncode
        if status != 0:
            raise OSError(f"benchmarks.bench_{name} exited with status {status}")
