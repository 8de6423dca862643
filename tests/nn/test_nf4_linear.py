"""NF4Linear against bitsandbytes itself (bytes, state, dequantization, Linear4bit) and plain PyTorch autograd."""

import copy
import os

import pytest
import torch
import torch.nn.functional as F

import fastrit
from fastrit.nn.nf4_linear import NF4Linear
from tests.ops.conftest import BACKENDS

bnb = pytest.importorskip("bitsandbytes")
bnbf = pytest.importorskip("bitsandbytes.functional")
from tests.ops.test_nf4 import bnb_cpu_kernel_is_right  # noqa: E402
from tests.ops.test_nf4 import bnb_dequantize_definition as bnb_definition  # noqa: E402

SHAPES = [(7, 5), (1000, 63), (1, 1), (96, 128), (10, 100)]  # [out, in]: odd numel, odd in, one value, ...
FLOATS = [torch.float32, torch.bfloat16, torch.float16]
# x dtype together with its tolerance (the reference computes the same products: only summation order may differ)
X_DTYPES = [
    pytest.param(torch.float32, 1e-6, id="fp32"),
    pytest.param(torch.bfloat16, 1e-2, id="bf16"),
    pytest.param(torch.float16, 1e-3, id="fp16"),
]


def make_weight(shape, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(*shape, generator=gen).to(dtype)
    w.view(-1)[:2] = 0  # an exact zero (and an all-zero block for the 1x1 weight)
    return w


def make_linear(in_features, out_features, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Linear(in_features, out_features).to(dtype)


def bnb_linear4bit(linear, quant_type="nf4", compress_statistics=True):
    """A bitsandbytes Linear4bit holding ``linear``'s weights, quantized the way bitsandbytes does it: the float
    weight is loaded into the (not yet quantized) Params4bit, and moving the module to a device quantizes it."""
    module = bnb.nn.Linear4bit(
        linear.in_features, linear.out_features, bias=linear.bias is not None,
        compress_statistics=compress_statistics, quant_type=quant_type,
    )
    module.load_state_dict(linear.state_dict())
    assert not module.weight.bnb_quantized
    module = module.to("cpu")  # Params4bit.to(device) -> _quantize -> bitsandbytes.functional.quantize_4bit
    assert module.weight.bnb_quantized and module.weight.dtype == torch.uint8
    return module


# ---------------------------------------------------------------------------- bytes and state


@pytest.mark.parametrize("compress", [True, False], ids=["nested", "plain"])
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_from_linear_bytes_and_dequantize_equal_bitsandbytes(shape, dtype, compress):
    out_features, in_features = shape
    linear = make_linear(in_features, out_features, dtype)
    with torch.no_grad():
        linear.weight.copy_(make_weight(shape, dtype))
    layer = NF4Linear.from_linear(linear, compress_statistics=compress)
    want_packed, want = bnbf.quantize_4bit(
        linear.weight.detach(), blocksize=64, compress_statistics=compress, quant_type="nf4"
    )
    assert layer.packed.dtype == torch.uint8 and layer.packed.shape == ((out_features * in_features + 1) // 2, 1)
    assert torch.equal(layer.packed, want_packed)
    state = layer.quant_state
    assert state.quant_type == "nf4" and state.blocksize == 64 and state.nested == compress
    assert tuple(state.shape) == shape and state.dtype == dtype == layer.weight_dtype
    assert torch.equal(state.code, want.code) and torch.equal(state.absmax, want.absmax)
    if compress:
        assert torch.equal(state.offset, want.offset) and state.state2.blocksize == want.state2.blocksize
        assert torch.equal(state.state2.absmax, want.state2.absmax)
        assert torch.equal(state.state2.code, want.state2.code)
    dense = layer.dequantize()
    assert dense.dtype == dtype and dense.shape == shape
    assert torch.equal(dense, bnb_definition(want_packed, want))
    if bnb_cpu_kernel_is_right(shape, 64):
        assert torch.equal(dense, bnbf.dequantize_4bit(want_packed, want))
    assert torch.equal(layer.bias, linear.bias.detach())


def test_from_weight_other_blocksize_and_no_bias():
    w = make_weight((48, 256), torch.bfloat16)
    layer = NF4Linear.from_weight(w, blocksize=128)
    want_packed, want = bnbf.quantize_4bit(w, blocksize=128, compress_statistics=True, quant_type="nf4")
    assert torch.equal(layer.packed, want_packed) and layer.bias is None
    assert torch.equal(layer.dequantize(), bnbf.dequantize_4bit(want_packed, want))
    assert repr(layer) == "NF4Linear(in_features=256, out_features=48, bias=False, nf4, blocksize=128, nested=True)"


# ---------------------------------------------------------------------------- forward and backward


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("x_dtype, tol", X_DTYPES)
@pytest.mark.parametrize("shape", [(7, 5), (96, 64)], ids=str)
def test_forward_and_grad_equal_pytorch_on_dequantized_weight(shape, x_dtype, tol, bias, backend):
    out_features, in_features = shape
    linear = torch.nn.Linear(in_features, out_features, bias=bias)
    layer = NF4Linear.from_linear(linear, backend=backend)
    assert layer.backend == backend
    dense = bnb_definition(layer.packed, layer.quant_state)  # independent of fastrit's kernels
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, in_features, generator=gen).to(x_dtype).requires_grad_()
    grad_out = torch.randn(2, 3, out_features, generator=gen).to(x_dtype)

    y = layer(x)
    y.backward(grad_out)
    x_ref = x.detach().clone().requires_grad_()
    bias_ref = None if not bias else linear.bias.detach().to(x_dtype)
    y_ref = F.linear(x_ref, dense.to(x_dtype), bias_ref)
    y_ref.backward(grad_out)

    assert y.dtype == x_dtype and y.shape == (2, 3, out_features)
    assert x.grad.dtype == x_dtype and x.grad.shape == x.shape
    torch.testing.assert_close(y, y_ref, rtol=tol, atol=tol)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=tol, atol=tol)
    # no parameter, buffer or gradient anywhere in the module
    assert list(layer.parameters()) == []
    assert all(not t.requires_grad and t.grad is None for t in layer.buffers())


def test_forward_of_a_bf16_weight_on_fp32_input():
    w = make_weight((20, 30), torch.bfloat16)
    layer = NF4Linear.from_weight(w, torch.randn(20))
    x = torch.randn(4, 30)
    dense = bnbf.dequantize_4bit(*bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4"))
    assert torch.equal(layer.dequantize(), dense)
    torch.testing.assert_close(layer(x), F.linear(x, dense.float(), layer.bias), rtol=1e-6, atol=1e-6)


def test_the_dequantized_weight_is_kept_for_backward_which_dequantizes_nothing(monkeypatch):
    """The forward pass dequantizes once and autograd keeps that weight (nothing else weight-sized); backward
    reuses it: no second dequantization, and the input gradient is plain autograd's on the dequantized weight."""
    import fastrit.ops.nf4 as nf4_ops

    out_features, in_features = 96, 128
    layer = NF4Linear.from_linear(torch.nn.Linear(in_features, out_features))
    x = torch.randn(4, in_features, requires_grad=True)
    calls = []
    real = nf4_ops.nf4_dequantize
    monkeypatch.setattr(nf4_ops, "nf4_dequantize", lambda *a, **k: calls.append(1) or real(*a, **k))
    saved = []

    def pack(t):
        saved.append((t.numel(), t.dtype))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    assert len(calls) == 1
    assert [s for s in saved if s[0] == out_features * in_features and s[1].is_floating_point] == [
        (out_features * in_features, torch.float32)]
    y.sum().backward()
    assert len(calls) == 1  # backward reused the forward's weight
    want = torch.ones(4, out_features) @ real(layer.packed, layer.quant_state)
    torch.testing.assert_close(x.grad, want, rtol=1e-6, atol=1e-6)
    with torch.no_grad():  # no gradient needed: nothing kept
        saved.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            layer(x)
        assert saved == []


def test_nothing_ever_requires_grad():
    layer = NF4Linear.from_linear(torch.nn.Linear(16, 8))
    layer.requires_grad_(True)  # no parameters: a no-op
    assert list(layer.parameters()) == [] and all(not b.requires_grad for b in layer.buffers())
    x = torch.randn(3, 16)
    assert not layer(x).requires_grad  # nothing to differentiate
    x.requires_grad_()
    y = layer(x)
    assert y.requires_grad
    y.sum().backward()
    assert x.grad is not None and all(b.grad is None for b in layer.buffers())
    with torch.no_grad():
        assert not layer(x).requires_grad


# ---------------------------------------------------------------------------- bitsandbytes Linear4bit


@pytest.mark.parametrize("compress", [True, False], ids=["nested", "plain"])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_from_bnb_adopts_the_same_bytes_and_computes_the_same(x_dtype, compress):
    linear = make_linear(128, 96)
    module = bnb_linear4bit(linear, compress_statistics=compress)
    bytes_before = module.weight.data.clone()
    layer = NF4Linear.from_bnb(module)
    want = module.weight.quant_state
    assert torch.equal(layer.packed, bytes_before) and layer.packed.data_ptr() != module.weight.data_ptr()
    assert layer.nested == compress and layer.blocksize == want.blocksize and layer.weight_dtype == want.dtype
    assert torch.equal(layer.absmax, want.absmax)
    if compress:
        assert torch.equal(layer.offset, want.offset) and torch.equal(layer.nested_absmax, want.state2.absmax)
    assert torch.equal(layer.dequantize(), bnbf.dequantize_4bit(module.weight.data, want))
    assert torch.equal(layer.bias, linear.bias.detach())
    # bnb's forward in training mode (or on inputs that need grad) is F.linear on its dequantized weight
    x = torch.randn(2, 5, 128).to(x_dtype)
    assert module.training
    assert torch.equal(layer(x), module(x))
    assert torch.equal(module.weight.data, bytes_before)  # the bnb module is untouched


def test_from_bnb_after_bnb_repacked_it_for_cpu_inference():
    """An eval-mode, no-grad Linear4bit forward on an AVX512-BF16 CPU repacks the weight in place (another byte
    layout, absmax dequantized to bfloat16): from_bnb restores the codes and adopts that absmax."""
    linear = make_linear(128, 96)
    module = bnb_linear4bit(linear)
    bytes_before = module.weight.data.clone()
    absmax_before = bnbf.dequantize_blockwise(module.weight.quant_state.absmax, module.weight.quant_state.state2)
    absmax_before += module.weight.quant_state.offset
    module.eval()
    x = torch.randn(3, 128)
    if bnbf.has_avx512bf16():
        with torch.no_grad():
            y_bnb = module(x)  # bitsandbytes repacks here
    else:  # the same conversion bitsandbytes applies, without its AVX512-BF16 kernel to run the forward
        y_bnb = None
        module.weight.data, module.weight.quant_state = bnbf._convert_weight_packed_for_cpu(
            module.weight.data, module.weight.quant_state
        )
    assert module.weight.quant_state.packing_format_for_cpu and module.weight.data.shape == (96, 64)
    layer = NF4Linear.from_bnb(module)
    assert torch.equal(layer.packed, bytes_before)  # the codes, restored losslessly
    assert not layer.nested and layer.weight_dtype == torch.float32
    assert torch.equal(layer.absmax, absmax_before.to(torch.bfloat16).float())
    if y_bnb is not None:  # bitsandbytes computes this one in bfloat16
        torch.testing.assert_close(layer(x), y_bnb, rtol=2e-2, atol=2e-2)


def test_from_bnb_refuses_fp4_unquantized_and_other_modules():
    linear = make_linear(64, 32)
    with pytest.raises(ValueError, match="module.*nf4.*'fp4'"):
        NF4Linear.from_bnb(bnb_linear4bit(linear, quant_type="fp4"))
    raw = bnb.nn.Linear4bit(64, 32, quant_type="nf4")  # still float: not quantized yet
    with pytest.raises(ValueError, match="module.*not quantized"):
        NF4Linear.from_bnb(raw)
    with pytest.raises(TypeError, match="module.*Linear4bit"):
        NF4Linear.from_bnb(linear)


# ---------------------------------------------------------------------------- state_dict, devices and dtypes


@pytest.mark.parametrize("compress", [True, False], ids=["nested", "plain"])
def test_state_dict_round_trip_into_a_fresh_layer(compress):
    w = make_weight((40, 70), torch.bfloat16)
    layer = NF4Linear.from_weight(w, torch.randn(40), compress_statistics=compress)
    fresh = NF4Linear(70, 40, bias=True, nested=compress, weight_dtype=torch.bfloat16)
    x = torch.randn(5, 70)
    assert not torch.equal(fresh(x), layer(x))
    fresh.load_state_dict(layer.state_dict())
    assert torch.equal(fresh.packed, layer.packed) and torch.equal(fresh(x), layer(x))
    assert torch.equal(fresh.dequantize(), layer.dequantize())
    assert fresh.bias.dtype == torch.float32  # the saved bias, not cast to the fresh layer's bf16
    assert "code" not in layer.state_dict()  # the NF4 table is rebuilt, never saved
    clone = copy.deepcopy(layer)
    assert torch.equal(clone(x), layer(x))
    # a layer of another configuration refuses the state instead of casting it
    other = NF4Linear(70, 40, bias=True, nested=not compress, weight_dtype=torch.bfloat16)
    with pytest.raises(RuntimeError):
        other.load_state_dict(layer.state_dict())
    with pytest.raises(RuntimeError, match="absmax: expected"):
        other.load_state_dict(layer.state_dict(), strict=False)


def test_dtype_conversion_keeps_the_quantized_weight():
    layer = NF4Linear.from_weight(make_weight((30, 64)), torch.randn(30))
    x = torch.randn(2, 64)
    dense, y = layer.dequantize(), layer(x)
    dtypes = {name: b.dtype for name, b in layer.named_buffers() if name != "bias"}
    for convert in (lambda m: m.to(torch.float64), lambda m: m.half(), lambda m: m.to("cpu", torch.bfloat16)):
        convert(layer)
        assert {name: b.dtype for name, b in layer.named_buffers() if name != "bias"} == dtypes
        assert layer.packed.dtype == torch.uint8 and layer.weight_dtype == torch.float32
        assert torch.equal(layer.dequantize(), dense)
    assert layer.to(torch.float32) is layer and layer.bias.dtype == torch.float32
    torch.testing.assert_close(layer(x), y, rtol=1e-2, atol=1e-2)  # the bias went through bf16


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_moves_every_buffer_and_matches_bitsandbytes():
    if os.environ.get("TRITON_INTERPRET") == "1" and fastrit.backends()["cuda"] != "available":
        pytest.skip("no compiled CUDA kernels and Triton is in interpreter mode (run with make gpu-test)")
    w = make_weight((96, 128))
    layer = NF4Linear.from_weight(w, torch.randn(96)).cuda()
    assert all(b.is_cuda for b in layer.buffers()) and layer.quant_state.code.is_cuda
    packed, state = bnbf.quantize_4bit(w.cuda(), blocksize=64, compress_statistics=True, quant_type="nf4")
    cuda_layer = NF4Linear.from_weight(w.cuda(), torch.randn(96, device="cuda"))
    assert torch.equal(cuda_layer.packed, packed)
    assert torch.equal(cuda_layer.dequantize(), bnbf.dequantize_4bit(packed, state))
    x = torch.randn(4, 128, device="cuda", requires_grad=True)
    dense = bnbf.dequantize_4bit(layer.packed, layer.quant_state)  # bitsandbytes' CUDA kernel
    assert torch.equal(layer.dequantize(), dense)
    y = layer(x)
    torch.testing.assert_close(y, F.linear(x, dense, layer.bias), rtol=1e-5, atol=1e-5)
    y.sum().backward()
    torch.testing.assert_close(x.grad, dense.sum(0).expand(4, -1), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------- bad input


def test_bad_input_names_the_argument():
    with pytest.raises(ValueError, match="weight"):
        NF4Linear.from_weight(torch.randn(10))
    with pytest.raises(TypeError, match="weight"):
        NF4Linear.from_weight(torch.ones(4, 4, dtype=torch.int32))
    with pytest.raises(TypeError, match="weight"):
        NF4Linear.from_weight([[1.0, 2.0]])
    with pytest.raises(ValueError, match="bias"):
        NF4Linear.from_weight(torch.randn(4, 8), torch.randn(8))
    with pytest.raises(ValueError, match="blocksize"):
        NF4Linear.from_weight(torch.randn(4, 8), blocksize=48)
    with pytest.raises(TypeError, match="linear"):
        NF4Linear.from_linear(torch.nn.Conv1d(2, 2, 1))
    with pytest.raises(ValueError, match="in_features"):
        NF4Linear(0, 4)
    layer = NF4Linear.from_weight(torch.randn(4, 8))
    with pytest.raises(ValueError, match="x"):
        layer(torch.randn(3, 7))
    with pytest.raises(TypeError, match="x"):
        layer(torch.ones(3, 8, dtype=torch.int64))
