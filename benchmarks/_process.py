"""What the memory benchmarks share: each configuration in a fresh Python process, and that process's own memory.

The parent runs ``python -m <module> --worker NAME --worker-settings JSON``; the worker prints one line
``<mark><row as JSON>`` (:func:`print_row`), which :func:`run_worker` returns. In the worker, :func:`status_mib`
reads ``VmRSS`` / ``VmHWM`` from /proc/self/status, :func:`release_freed_memory` returns what glibc keeps, and
:func:`reset_peak` restarts ``VmHWM`` from the current RSS (Linux ``clear_refs`` 5).
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def status_mib(field: str) -> float:
    """``VmRSS`` / ``VmHWM`` of this process from /proc/self/status, in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"{field} not in /proc/self/status")


def release_freed_memory() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def print_row(mark: str, row: dict) -> None:
    print(mark + json.dumps(row), flush=True)


def run_worker(module: str, name: str, settings: dict, mark: str, env: dict[str, str] | None = None) -> dict:
    """Run ``module``'s worker ``name`` with ``settings`` in a fresh process (``env`` added to the environment);
    the row it printed. A failed worker raises RuntimeError with the end of its output."""
    command = [sys.executable, "-m", module, "--worker", name, "--worker-settings", json.dumps(settings)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env={**os.environ, **(env or {})})
    lines = [line for line in done.stdout.splitlines() if line.startswith(mark)]
    if done.returncode or not lines:
        raise RuntimeError(f"{name}: worker failed (exit {done.returncode}):\n{done.stdout[-3000:]}\n"
                           f"{done.stderr[-6000:]}")
    return json.loads(lines[-1][len(mark):])
