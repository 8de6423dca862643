"""The one NF4 code table (fastrit.kernels.nf4_code): the generated C++ header and every Python user agree with it,
bit for bit, and with bitsandbytes' own table."""

import importlib
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastrit.nn import nf4_linear
from fastrit.ops import reference

# (imported by name: ruff's import sorting files fastrit.kernels, which setup.py maps from kernels/, as third-party)
nf4_code = importlib.import_module("fastrit.kernels.nf4_code")

ROOT = Path(__file__).resolve().parents[2]
HEADER = ROOT / "csrc" / "nf4_code.h"


def float32_bits(value: float) -> int:
    """The float32 bit pattern ``value`` rounds to."""
    return struct.unpack("<I", struct.pack("<f", value))[0]


def tensor_bits(tensor: torch.Tensor) -> list[int]:
    return [b & 0xFFFFFFFF for b in tensor.float().cpu().view(torch.int32).tolist()]


def header_macro(name: str) -> list[str]:
    """The comma-separated items of the ``#define name`` (continued with backslashes) in csrc/nf4_code.h."""
    match = re.search(rf"#define {name}((?:[^\n]*\\\n)*[^\n]*)\n", HEADER.read_text())
    assert match, name
    return [item.strip() for item in match.group(1).replace("\\\n", " ").split(",")]


def test_header_is_the_generators_output():
    # regenerate with: python kernels/nf4_code.py > csrc/nf4_code.h
    assert HEADER.read_text() == nf4_code.c_header()


def test_table_values_are_float32_and_ordered():
    assert len(nf4_code.NF4_CODE) == 16 and len(nf4_code.NF4_CUDA_THRESHOLDS) == 15
    for value in nf4_code.NF4_CODE:
        assert struct.unpack("<f", struct.pack("<f", value))[0] == value  # exactly a float32
    assert list(nf4_code.NF4_CODE) == sorted(nf4_code.NF4_CODE)
    thresholds = [struct.unpack("<f", struct.pack("<I", bits))[0] for bits in nf4_code.NF4_CUDA_THRESHOLDS]
    assert thresholds == sorted(thresholds)
    # each threshold lies between its two codes, at most 1 ulp from their float32 midpoint
    code = torch.tensor(nf4_code.NF4_CODE, dtype=torch.float32)
    midpoints = tensor_bits((code[:-1] + code[1:]) / 2)
    assert all(abs(a - b) <= 1 for a, b in zip(midpoints, nf4_code.NF4_CUDA_THRESHOLDS, strict=True))


def test_header_literals_are_the_table_bit_for_bit():
    literals = header_macro("FASTRIT_NF4_CODE_VALUES")
    assert all(item.endswith("f") for item in literals)
    assert [float32_bits(float(item[:-1])) for item in literals] == [float32_bits(v) for v in nf4_code.NF4_CODE]
    assert [int(item.rstrip("u"), 16) for item in header_macro("FASTRIT_NF4_CUDA_THRESHOLD_BITS")] == list(
        nf4_code.NF4_CUDA_THRESHOLDS
    )


def test_python_users_read_the_one_table():
    assert reference.NF4_CODE is nf4_code.NF4_CODE
    assert reference.NF4_CUDA_THRESHOLDS is nf4_code.NF4_CUDA_THRESHOLDS
    want = [float32_bits(v) for v in nf4_code.NF4_CODE]
    assert tensor_bits(reference.nf4_code(torch.device("cpu"))) == want
    assert tensor_bits(nf4_linear.NF4Linear.from_weight(torch.randn(4, 64), None).code) == want
    assert tensor_bits(reference.nf4_cuda_thresholds(torch.device("cpu"))) == list(nf4_code.NF4_CUDA_THRESHOLDS)


def test_triton_kernels_read_the_one_table():
    pytest.importorskip("triton")
    from fastrit.kernels import nf4

    assert nf4.NF4_CODE is nf4_code.NF4_CODE and nf4.NF4_CUDA_THRESHOLDS is nf4_code.NF4_CUDA_THRESHOLDS


def test_table_is_bitsandbytes_table():
    bnbf = pytest.importorskip("bitsandbytes.functional")
    want = bnbf.get_4bit_type("nf4", device="cpu")
    assert tensor_bits(want) == [float32_bits(v) for v in nf4_code.NF4_CODE]


def test_table_imports_without_triton():
    # every floor may import the table: it must not pull in triton (nor does `import fastrit`)
    code = "import sys, fastrit.kernels.nf4_code; print('triton' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "False"
