"""Backends, dtypes and tolerances shared by the op tests."""

import os

import pytest
import torch

import fastrit.ops as ops

# dtype together with its tolerance (relative to the largest reference magnitude)
DTYPES = [
    pytest.param(torch.float32, 1e-5, id="fp32"),
    pytest.param(torch.bfloat16, 2e-2, id="bf16"),
    pytest.param(torch.float16, 2e-3, id="fp16"),
]


def runnable_backends():
    """Backends that can run on CPU tensors here: torch, cpp (if built), triton (interpreter)."""
    status = ops.backends()
    names = ["torch"]
    if status["cpp"] == "available":
        names.append("cpp")
    if status["triton"] == "available" and os.environ.get("TRITON_INTERPRET") == "1":
        try:
            import fastrit.kernels.ig  # noqa: F401
        except ImportError:
            pass
        else:
            names.append("triton")
    return names


BACKENDS = runnable_backends()


def assert_close(got: torch.Tensor, want: torch.Tensor, tol: float) -> None:
    assert got.shape == want.shape and got.dtype == want.dtype, (got.shape, got.dtype, want.shape, want.dtype)
    if want.numel() == 0:
        return
    got, want = got.detach().float(), want.detach().float()
    scale = float(want.abs().max()) or 1.0
    err = float((got - want).abs().max())
    assert err <= tol * scale, f"max error {err:.3e} > {tol:.1e} x {scale:.3e}"
