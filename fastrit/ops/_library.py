"""Fake (meta) kernels and autograd for the compiled ops ``torch.ops.fastrit.*``.

The schemas live in csrc/ops.cpp (``TORCH_LIBRARY(fastrit, m)``); this module is imported once the
extension has loaded, so that torch.compile, FakeTensor tracing and ``torch.library.opcheck`` see
every op, and ``swiglu_fwd`` is differentiable through ``swiglu_bwd``.
"""

from __future__ import annotations

import math

import torch


@torch.library.register_fake("fastrit::ig_interpolate")
def _(base, direction, alphas):
    return base.new_empty((alphas.shape[0], *base.shape))


@torch.library.register_fake("fastrit::ig_accumulate")
def _(act, grads, weights):
    return act.new_empty(act.shape, dtype=torch.float32)


@torch.library.register_fake("fastrit::ig_accumulate_linear")
def _(act, grad_resid, weight_down, weights):
    return act.new_empty(act.shape, dtype=torch.float32)


@torch.library.register_fake("fastrit::swiglu_fwd")
def _(gate, up, keep):
    return gate.new_empty(gate.shape)


@torch.library.register_fake("fastrit::swiglu_bwd")
def _(grad_out, gate, up, keep):
    return gate.new_empty(gate.shape), gate.new_empty(gate.shape)


@torch.library.register_fake("fastrit::row_sparse_grad")
def _(grad_out, x, rows):
    return x.new_empty((rows.shape[0], x.shape[1]))


@torch.library.register_fake("fastrit::col_sparse_grad")
def _(grad_out, h, cols):
    return h.new_empty((grad_out.shape[1], cols.shape[0]))


@torch.library.register_fake("fastrit::nf4_quantize")
def _(weight, blocksize):
    numel = weight.numel()
    packed = weight.new_empty(((numel + 1) // 2, 1), dtype=torch.uint8)
    return packed, weight.new_empty((math.ceil(numel / blocksize),), dtype=torch.float32)


@torch.library.register_fake("fastrit::nf4_dequantize")
def _(packed, absmax, blocksize, shape, dtype):
    return packed.new_empty(shape, dtype=dtype)


def _swiglu_setup(ctx, inputs, output):
    gate, up, keep = inputs
    ctx.save_for_backward(gate, up, keep)


def _swiglu_backward(ctx, grad_out):
    gate, up, keep = ctx.saved_tensors
    d_gate, d_up = torch.ops.fastrit.swiglu_bwd(grad_out.contiguous(), gate, up, keep)
    return d_gate, d_up, None


torch.library.register_autograd("fastrit::swiglu_fwd", _swiglu_backward, setup_context=_swiglu_setup)
