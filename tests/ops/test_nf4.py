"""NF4 in bitsandbytes' exact format: same packed bytes and QuantState, same dequantization, both ways."""

import pytest
import torch
import torch.nn.functional as F

import fastrit.ops as ops
from tests.ops.conftest import BACKENDS

bnbf = pytest.importorskip("bitsandbytes.functional")
from bitsandbytes.backends.default.ops import _dequantize_4bit_compute  # noqa: E402

NF4_SHAPES = [(64, 64), (7, 13), (128, 176), (1, 1000), (33,), (3, 5, 256)]
BLOCKSIZES = (64, 128, 256)
FLOATS = [torch.float32, torch.bfloat16, torch.float16]


def weight(shape, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(*shape, generator=gen).to(dtype)
    w.view(-1)[:3] = 0  # an exact zero and, for small shapes, an all-zero leading run
    return w


def bnb_dequantize_definition(packed, state):
    """bitsandbytes' own definition (its default backend), usable for every shape."""
    absmax = state.absmax
    if state.nested:
        absmax = bnbf.dequantize_blockwise(state.absmax, state.state2)
        absmax += state.offset
    code = bnbf.get_4bit_type("nf4", device=packed.device)
    return _dequantize_4bit_compute(packed.reshape(-1), absmax.float(), code, state.blocksize, state.shape, state.dtype)


def bnb_cpu_kernel_is_right(shape, blocksize):
    # bitsandbytes 0.50's AVX512 CPU dequantize_4bit indexes blocks per row: right only when the
    # last dimension is a multiple of the block size (or odd, where it falls back to its definition)
    return shape[-1] % blocksize == 0 or shape[-1] % 2 == 1


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("shape", NF4_SHAPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_nf4_bit_exact_with_bitsandbytes(backend, shape, blocksize, dtype, compress):
    w = weight(shape, dtype)
    want_packed, want_state = bnbf.quantize_4bit(w, blocksize=blocksize, compress_statistics=compress, quant_type="nf4")
    packed, state = ops.nf4_quantize(w, blocksize, compress, backend=backend)
    # our bytes and state = bitsandbytes' bytes and state
    assert torch.equal(packed, want_packed)
    assert state.nested == want_state.nested and state.blocksize == blocksize and state.dtype == dtype
    assert tuple(state.shape) == tuple(shape) and torch.equal(state.code, want_state.code)
    assert torch.equal(state.absmax, want_state.absmax)
    if compress:
        assert torch.equal(state.offset, want_state.offset)
        assert torch.equal(state.state2.absmax, want_state.state2.absmax)
    # our dequantization of bitsandbytes' bytes = bitsandbytes' dequantization
    ours = ops.nf4_dequantize(want_packed, want_state, backend=backend)
    assert ours.dtype == dtype and ours.shape == w.shape
    assert torch.equal(ours, bnb_dequantize_definition(want_packed, want_state))
    if bnb_cpu_kernel_is_right(shape, blocksize):
        assert torch.equal(ours, bnbf.dequantize_4bit(want_packed, want_state))
    # and bitsandbytes reads our bytes and state back to the same weight
    assert torch.equal(bnb_dequantize_definition(packed, state), ours)


@pytest.mark.skipif("cpp" not in BACKENDS, reason="the compiled extension is not built")
@pytest.mark.parametrize("dtype,shape", [(torch.float32, (2048, 2048)), (torch.bfloat16, (4096, 2048)),
                                         (torch.float16, (4096, 2048))], ids=str)
def test_nf4_dequantize_large_output_on_cpu(dtype, shape):
    """16 MiB outputs, which the CPU kernel allocates asking for transparent huge pages."""
    w = weight(shape, dtype, seed=1)
    packed, state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    ours = ops.nf4_dequantize(packed, state, backend="cpp")
    assert ours.element_size() * ours.numel() >= 16 << 20
    assert torch.equal(ours, bnbf.dequantize_4bit(packed, state))


@pytest.mark.parametrize("backend", BACKENDS)
def test_nf4_linear_gradients(backend):
    w = weight((24, 64), torch.float32)
    packed, state = ops.nf4_quantize(w, 64, backend=backend)
    x = torch.randn(5, 64, requires_grad=True)
    bias = torch.randn(24, requires_grad=True)
    out = ops.nf4_linear(x, packed, state, bias, backend=backend)
    dense = bnb_dequantize_definition(packed, state)
    x2, b2 = x.detach().clone().requires_grad_(), bias.detach().clone().requires_grad_()
    want = F.linear(x2, dense, b2)
    grad = torch.randn_like(want)
    out.backward(grad)
    want.backward(grad)
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(bias.grad, b2.grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_quant_state_that_does_not_match_is_refused(backend):
    packed, state = ops.nf4_quantize(weight((64, 64), torch.float32), 64, False, backend=backend)
    with pytest.raises(ValueError, match="quant_state"):
        ops.nf4_dequantize(packed[:-1], state, backend=backend)
    other_packed, other_state = ops.nf4_quantize(weight((64, 128), torch.float32), 64, False, backend=backend)
    with pytest.raises(ValueError, match="quant_state"):
        ops.nf4_dequantize(packed, other_state, backend=backend)
    _, fp4_state = bnbf.quantize_4bit(weight((64, 64), torch.float32), quant_type="fp4")
    with pytest.raises(ValueError, match="quant_state"):
        ops.nf4_dequantize(packed, fp4_state, backend=backend)
    with pytest.raises(TypeError, match="quant_state"):
        ops.nf4_dequantize(packed, {"absmax": state.absmax}, backend=backend)
    with pytest.raises(TypeError, match="packed"):
        ops.nf4_dequantize(packed.to(torch.int32), state, backend=backend)
    with pytest.raises(ValueError, match="blocksize"):
        ops.nf4_quantize(weight((64, 64), torch.float32), 100, backend=backend)
    with pytest.raises(ValueError, match="x"):
        ops.nf4_linear(torch.randn(3, 32), packed, state, backend=backend)
