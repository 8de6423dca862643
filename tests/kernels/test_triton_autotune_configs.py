"""Every autotune config of every Triton kernel in fastrit.kernels, each launched alone, against the reference
(fastrit/ops/reference.py).

An autotuner launches only the config that wins its benchmark on the GPU at hand; a config whose block sizes drop a
ragged tail, read past a tile or leave a loop remainder unprocessed stays unseen until another GPU or another shape
makes it win. Here each config is given to its kernel's autotuner as the only one (``configs`` patched for the test)
and the kernel runs through its own launcher (``fastrit.kernels.*_fwd`` / ``*_bwd``), as the ops call it;
``best_config`` then proves that this config is the one that ran. Shapes follow the config: more than one tile on
every tiled axis, each with a ragged end, and every inner loop run more than once.

Two forms:

- GPU (``make gpu-test``, TRITON_INTERPRET=0): each autotuner's own config list, on CUDA tensors; marked ``gpu``.
- CPU (``make test``, TRITON_INTERPRET=1): under the interpreter every autotuner holds one small config
  (``kernels/_common.autotune_configs``). The GPU lists are read from a second copy of each kernel module, executed
  with ``_common.INTERPRET`` set to False (:func:`gpu_configs`), and each runs under the interpreter on CPU tensors.
  The interpreter ignores ``num_warps`` / ``num_stages``: this form proves each config's tiling, masks and loop
  bounds; what depends on the hardware (registers, shared memory, compilation itself) needs the GPU form.

What is compared, element by element (``u = 2**-24``, float32's unit roundoff; a ``dtype`` ulp is the spacing of that
dtype's values at the larger of the two magnitudes):

- IG interpolation, NF4 quantization (codes and absmax) and dequantization: bit for bit.
- SwiGLU forward and backward: the bounds of :func:`swiglu_bounds` (a few float32 ulps plus one ulp of a 16-bit
  output), derived from the operations each side performs.
- Sums of products (IG accumulation, the IG linear epilogue, the sparse weight gradients): :func:`sum_bound`, the
  classical forward error bound of a float32 dot product, for both sides, plus one ulp of a 16-bit output.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import pkgutil
from unittest import mock

import pytest
import torch
import triton
from triton.runtime.autotuner import Autotuner
from triton.runtime.errors import OutOfResources, PTXASError

from fastrit import kernels as K
from fastrit.ops import reference as ref

INTERPRET = K._common.INTERPRET
if INTERPRET:
    DEVICE = "cpu"
elif torch.cuda.is_available():
    DEVICE = "cuda"
    pytestmark = pytest.mark.gpu  # part of `make gpu-test`
else:
    DEVICE = None
    pytestmark = pytest.mark.skip(reason="Triton kernels need TRITON_INTERPRET=1 or a CUDA GPU")

U = 2.0**-24  # float32 unit roundoff
#: significand bits after the point, per dtype
_MANTISSA = {torch.float32: 23, torch.bfloat16: 7, torch.float16: 10}

# ---------------------------------------------------------------------------------------------------------------------
# element-wise bounds (also used by tests/ops/test_ops_gpu.py)


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float64 spacing of ``dtype``'s values at ``|x|``: ``2**(e - mantissa)`` for ``|x|`` in ``[2**e, 2**(e+1))``,
    and the subnormal spacing below the smallest normal number."""
    a = x.detach().abs().double().clamp(min=torch.finfo(dtype).tiny)
    _, exponent = torch.frexp(a)  # a = m * 2**exponent with m in [0.5, 1)
    return torch.ldexp(torch.ones_like(a), exponent - 1 - _MANTISSA[dtype])


def assert_within(got: torch.Tensor, want: torch.Tensor, bound: torch.Tensor, what: str, out_ulps: int) -> None:
    """``|got - want| <= bound + out_ulps * ulp(max(|got|, |want|))`` at every element (float64), and NaN exactly
    where ``want`` has NaN. ``bound`` is the float32 arithmetic's share, ``out_ulps`` the rounding to the output dtype
    (one ulp: two values within less than an ulp round to at most one ulp apart)."""
    assert got.shape == want.shape and got.dtype == want.dtype, (what, got.shape, got.dtype, want.shape, want.dtype)
    g, w = got.detach().double(), want.detach().double()
    assert torch.equal(g.isnan(), w.isnan()), f"{what}: NaN at other places"
    g, w = g.nan_to_num(), w.nan_to_num()
    err = (g - w).abs()
    limit = bound.double().to(err.device) + out_ulps * ulp(torch.maximum(g.abs(), w.abs()), got.dtype)
    bad = err > limit
    if bool(bad.any()):
        index = int(torch.argmax((err - limit).reshape(-1)))
        where = tuple(int(i) for i in torch.unravel_index(torch.tensor(index), err.shape))
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {err.numel()} elements out of bound; worst at {where}: got {g[where]:.9g}, "
            f"want {w[where]:.9g}, |diff| {err[where]:.3g} > {limit[where]:.3g} ({got.dtype})")


def out_ulps(dtype: torch.dtype) -> int:
    """The rounding to the output dtype: none for float32 outputs (both sides end in float32), one ulp otherwise."""
    return 0 if dtype == torch.float32 else 1


def swiglu_bounds(gate, up, grad_out=None, keep=None) -> dict[str, torch.Tensor]:
    """Per-element bounds (float64, absolute) on ``|kernel - reference|`` for SwiGLU's forward and backward in float32
    arithmetic, before the rounding to the output dtype (see :func:`assert_within`).

    The fastest side is Triton on a GPU: ``tl.exp(t)`` is ``ex2.approx(t * log2(e))``: rounding the product moves the
    exponent by up to ``2|x|u``, and ``ex2.approx`` adds at most ``8u`` (2**-21, budgeted above its specification);
    ``1 + e`` one rounding, the float32 division (``div.full.f32``, at most 2 ulp) ``4u``: the sigmoid within
    ``(2|x| + 13)u``. The reference (PyTorch's silu/sigmoid: ``expf`` within 2 ulp, IEEE division) and the CUDA
    backend (the same expressions as the reference) within ``6u``; the numpy interpreter within both. Products add
    ``u`` each. So, relative to the exact values: forward ``x*sig*up`` and ``d_up = g*x*sig`` within ``(2|x| + 24)u``;
    ``d_gate = g*up*sig*(1 + x(1 - sig))``: the sum ``1 + x(1 - sig)`` may cancel (at ``x ~ -1.28``), so its bound is
    relative to the larger term, ``(4|x| + 52)u * |g*up*sig| * (1 + |x|)``. The smallest normal float32 is added to
    each bound: a subnormal intermediate may be flushed on one side only.
    """
    x = gate.detach().double()
    k = 1.0 if keep is None else keep.double()
    sig = torch.sigmoid(x)
    floor = torch.finfo(torch.float32).tiny
    out = {"forward": (2 * x.abs() + 24) * U * (x * sig * up.double() * k).abs() + floor}
    if grad_out is not None:
        g = grad_out.detach().double() * k
        out["d_up"] = (2 * x.abs() + 24) * U * (g * x * sig).abs() + floor
        out["d_gate"] = (4 * x.abs() + 52) * U * (g * up.double() * sig).abs() * (1 + x.abs()) + floor
    return out


def sum_bound(terms: int, magnitude: torch.Tensor) -> torch.Tensor:
    """Bound (float64) on ``|kernel - reference|`` for float32 sums of ``terms`` products, ``magnitude`` the same sums
    of the products' absolute values (then any float32 multiplication of the sum, e.g. by the activation).

    A float32 dot product of n terms is within ``n * u * sum|a_i b_i|`` of the exact one whatever the order (Higham,
    Accuracy and Stability of Numerical Algorithms, 3.1). The kernel side is given ``4u`` per term: tensor cores
    accumulate with truncation and alignment to the largest addend (Fasi et al., 2021), not round-to-nearest. The
    reference side ``u`` per term (float32 GEMMs, TF32 off). Plus ``4u`` for the final products on either side.
    """
    return (5 * terms + 4) * U * magnitude.detach().double()


# ---------------------------------------------------------------------------------------------------------------------
# the kernels and their GPU config lists


def kernel_modules() -> list:
    """Every module of fastrit.kernels."""
    return [importlib.import_module(f"{K.__name__}.{info.name}") for info in pkgutil.iter_modules(K.__path__)]


def autotuned(module) -> dict[str, Autotuner]:
    """``name -> autotuner`` of every @triton.autotune kernel defined in ``module``."""
    return {name: value for name, value in vars(module).items() if isinstance(value, Autotuner)}


def live_kernels() -> dict[str, Autotuner]:
    """The autotuners the launchers use."""
    return {name: kernel for module in kernel_modules() for name, kernel in autotuned(module).items()}


@functools.cache
def gpu_configs() -> dict[str, tuple[triton.Config, ...]]:
    """``kernel name -> its GPU autotune configs``: the autotuner's own on a GPU; under the interpreter (where it holds
    one small config), those of a second copy of its module executed with ``_common.INTERPRET = False``. The copy's
    kernels are only read: every launch goes through the real module."""
    if not INTERPRET:
        return {name: tuple(kernel.configs) for name, kernel in live_kernels().items()}
    found = {}
    modules = kernel_modules()  # imported first, with the real INTERPRET (fastrit.kernels imports them lazily)
    with mock.patch.object(K._common, "INTERPRET", False):
        for module in modules:
            spec = importlib.util.spec_from_file_location(f"{module.__name__}_gpu_configs", module.__file__)
            copy = importlib.util.module_from_spec(spec)  # package fastrit.kernels: relative imports resolve
            spec.loader.exec_module(copy)
            found.update({name: tuple(kernel.configs) for name, kernel in autotuned(copy).items()})
    return found


def config_id(config: triton.Config) -> str:
    sizes = "-".join(f"{key[6:] if key.startswith('BLOCK_') else key}{value}" for key, value in config.kwargs.items())
    return f"{sizes}-w{config.num_warps}s{config.num_stages}"


def _sparse_float32(config: triton.Config) -> bool:
    """Whether ``config`` is one of the sparse-gradient kernels' float32-operand configs (else a 16-bit one)."""
    return config.all_kwargs() in [c.all_kwargs() for c in K.sparse_grad.configs_for(True)]


# ---------------------------------------------------------------------------------------------------------------------
# one case per kernel: (config, variant) -> launch through the launcher and compare


def rand(*shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape) * scale).to(device=DEVICE, dtype=dtype)


def _dtype(name: str) -> torch.dtype:
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def case_ig_interpolate(cfg, dtype):
    block_d, block_m = cfg.kwargs["BLOCK_D"], cfg.kwargs["BLOCK_M"]
    n, d, m = 3, block_d // 2 + 7, block_m + 3  # N*D: two tiles, the second ragged; steps: two tiles, ragged
    base, direction = rand(n, d, dtype=_dtype(dtype)), rand(n, d, dtype=_dtype(dtype))
    alphas = torch.rand(m, device=DEVICE)
    got = K.ig_interpolate_fwd(base, direction, alphas)
    assert torch.equal(got, ref.ig_interpolate(base, direction, alphas))


def _weighted_sum_magnitude(grads, weights):
    return torch.einsum("k,kni->ni", weights.double().abs(), grads.double().abs())


def case_ig_weighted_sum(cfg, variant):
    block = cfg.kwargs["BLOCK"]
    m, n, i = 5, 3, block // 2 + 7  # N*I: two tiles, the second ragged; the loop over steps runs 5 times
    weights = torch.rand(m, device=DEVICE) - 0.25
    if variant == "act":  # HAS_ACT: ig_accumulate
        act, grads = rand(n, i, dtype=torch.bfloat16), rand(m, n, i, dtype=torch.bfloat16)
        got = K.ig_accumulate_fwd(act, grads, weights)
        want = ref.ig_accumulate(act, grads, weights)
        magnitude = act.double().abs() * _weighted_sum_magnitude(grads, weights)
    else:  # the bare weighted sum ig_accumulate_linear starts with
        grads = rand(m, n, i)
        got = K.ig._weighted_sum(grads, weights, None)
        want = torch.einsum("k,kni->ni", weights, grads)
        magnitude = _weighted_sum_magnitude(grads, weights)
    assert_within(got, want, sum_bound(m, magnitude), f"weighted sum ({variant})", out_ulps(got.dtype))


def case_ig_linear_act(cfg, dtype):
    block_n, block_i, block_h = (cfg.kwargs[k] for k in ("BLOCK_N", "BLOCK_I", "BLOCK_H"))
    m, n, i, h = 3, block_n + 3, block_i + 5, 2 * block_h + 3  # two ragged tiles per axis; the H loop runs 3 times
    dt = _dtype(dtype)
    act, grad_resid, weight_down = rand(n, i, dtype=dt), rand(m, n, h, dtype=dt), rand(h, i, dtype=dt)
    weights = torch.rand(m, device=DEVICE)
    got = K.ig_accumulate_linear_fwd(act, grad_resid, weight_down, weights)
    want = ref.ig_accumulate_linear(act, grad_resid, weight_down, weights)
    magnitude = act.double().abs() * (_weighted_sum_magnitude(grad_resid, weights) @ weight_down.double().abs())
    assert_within(got, want, sum_bound(m + h, magnitude), "ig_accumulate_linear", 0)


def _swiglu_inputs(cfg, variant):
    dtype, with_keep = variant
    n, i = cfg.kwargs["BLOCK_N"] + 3, cfg.kwargs["BLOCK_I"] + 5  # two ragged tiles per axis
    gate, up, grad_out = rand(n, i, dtype=_dtype(dtype), scale=3.0), rand(n, i, dtype=_dtype(dtype)), \
        rand(n, i, dtype=_dtype(dtype))
    keep = (torch.arange(i) % 3 != 1).to(DEVICE) if with_keep else None
    return gate, up, grad_out, keep


def case_swiglu_fwd(cfg, variant):
    gate, up, _, keep = _swiglu_inputs(cfg, variant)
    got = K.swiglu_fwd(gate, up, keep)
    want = ref.swiglu_forward(gate, up, keep)
    assert_within(got, want, swiglu_bounds(gate, up, keep=keep)["forward"], "swiglu forward", out_ulps(got.dtype))


def case_swiglu_bwd(cfg, variant):
    gate, up, grad_out, keep = _swiglu_inputs(cfg, variant)
    d_gate, d_up = K.swiglu_bwd(grad_out, gate, up, keep)
    want_gate, want_up = ref.swiglu_backward(grad_out, gate, up, keep)
    bounds = swiglu_bounds(gate, up, grad_out, keep)
    assert_within(d_gate, want_gate, bounds["d_gate"], "swiglu d_gate", out_ulps(d_gate.dtype))
    assert_within(d_up, want_up, bounds["d_up"], "swiglu d_up", out_ulps(d_up.dtype))


def _indices(k, size):
    """``k`` indices in ``[0, size)``, unsorted, with a repeat, touching both ends."""
    idx = torch.randperm(size)[:k]
    idx[0], idx[1], idx[2] = size - 1, 0, idx[-1]
    return idx.to(DEVICE)


def _sparse_dtype(cfg) -> torch.dtype:
    # the configs the autotuner keeps for float32 operands run on float32 ones, the 16-bit ones on bfloat16
    return torch.float32 if _sparse_float32(cfg) else torch.bfloat16


def case_row_sparse_grad(cfg, _variant):
    block_a, block_b, block_n = (cfg.kwargs[k] for k in ("BLOCK_A", "BLOCK_B", "BLOCK_N"))
    k, n_in, n = block_a + 3, block_b + 5, 2 * block_n + 3  # ragged tiles; the N loop runs 3 times
    dtype = _sparse_dtype(cfg)
    grad_out, x = rand(n, k + 11, dtype=dtype), rand(n, n_in, dtype=dtype)
    rows = _indices(k, k + 11)
    got = K.row_sparse_grad_fwd(grad_out, x, rows)
    want = ref.row_sparse_grad(grad_out, x, rows)
    magnitude = grad_out.double().abs()[:, rows].t() @ x.double().abs()
    assert_within(got, want, sum_bound(n, magnitude), "row_sparse_grad", out_ulps(dtype))


def case_col_sparse_grad(cfg, _variant):
    block_a, block_b, block_n = (cfg.kwargs[k] for k in ("BLOCK_A", "BLOCK_B", "BLOCK_N"))
    hidden, k, n = block_a + 3, block_b + 5, 2 * block_n + 3
    dtype = _sparse_dtype(cfg)
    grad_out, h = rand(n, hidden, dtype=dtype), rand(n, k + 11, dtype=dtype)
    cols = _indices(k, k + 11)
    got = K.col_sparse_grad_fwd(grad_out, h, cols)
    want = ref.col_sparse_grad(grad_out, h, cols)
    magnitude = grad_out.double().abs().t() @ h.double().abs()[:, cols]
    assert_within(got, want, sum_bound(n, magnitude), "col_sparse_grad", out_ulps(dtype))


def nf4_weight(n_blocks: int, blocksize: int, tail: int) -> torch.Tensor:
    """bfloat16 ``[n_blocks * blocksize + tail]``: each block's largest magnitude a power of two (its first element,
    so that the reciprocal of absmax is exact under either rule, GPU included), block 1 all zeros."""
    exponents = torch.randint(-3, 4, (n_blocks + 1,)).double()
    scale = torch.exp2(exponents).repeat_interleave(blocksize)[: n_blocks * blocksize + tail]
    w = (torch.rand(scale.numel(), dtype=torch.float64) * 2 - 1) * scale
    w[::blocksize] = scale[::blocksize] * torch.where(torch.rand(n_blocks + (tail > 0)) < 0.5, -1.0, 1.0)
    w[blocksize : 2 * blocksize] = 0.0
    return w.to(device=DEVICE, dtype=torch.bfloat16)  # rounding keeps every |value| <= its block's power of two


def case_nf4_quantize(cfg, variant):
    rule, blocksize = variant
    blocks = cfg.kwargs["BLOCKS"]
    # two programs, the second ragged; the last block partial (37 values, an odd count: a padded byte)
    w = nf4_weight(blocks + 2, blocksize, 37)
    packed, absmax = K.nf4_quantize_fwd(w, blocksize, rule)
    want_packed, want_absmax = ref.nf4_quantize_blocks(w, blocksize, rule)
    assert torch.equal(absmax, want_absmax)
    assert torch.equal(packed, want_packed), int((packed != want_packed).sum())


def case_nf4_dequantize(cfg, rule):
    blocksize = 64
    numel = cfg.kwargs["BLOCK"] + 37  # two programs, the second ragged; odd: the last byte's low nibble unused
    blocks = -(-numel // blocksize)
    packed = torch.randint(0, 256, ((numel + 1) // 2, 1), dtype=torch.uint8).to(DEVICE)
    absmax = (torch.rand(blocks) * 3).to(DEVICE)
    absmax[0] = 1e-39  # a subnormal scale: flushed by rule "cuda"
    got = K.nf4_dequantize_fwd(packed, absmax, blocksize, (numel,), torch.bfloat16, rule)
    assert torch.equal(got, ref.nf4_dequantize_blocks(packed, absmax, blocksize, (numel,), torch.bfloat16, rule))


#: the NF4 rules each form runs: on CUDA tensors the ops always use "cuda"; on CPU tensors "cpu", and the
#: interpreter runs both
NF4_RULES = ("cpu", "cuda") if INTERPRET else ("cuda",)

#: kernel name -> (case, variants)
CASES = {
    "ig_interpolate_kernel": (case_ig_interpolate, ["bf16", "fp32"]),
    "ig_weighted_sum_kernel": (case_ig_weighted_sum, ["act", "no_act"]),
    "ig_linear_act_kernel": (case_ig_linear_act, ["bf16", "fp32"]),
    "swiglu_fwd_kernel": (case_swiglu_fwd, [("bf16", True), ("fp32", False)]),
    "swiglu_bwd_kernel": (case_swiglu_bwd, [("bf16", True), ("fp32", False)]),
    "row_sparse_grad_kernel": (case_row_sparse_grad, ["-"]),
    "col_sparse_grad_kernel": (case_col_sparse_grad, ["-"]),
    "nf4_quantize_kernel": (case_nf4_quantize, [(rule, bs) for rule in NF4_RULES for bs in (64, 4096)]),
    "nf4_dequantize_kernel": (case_nf4_dequantize, list(NF4_RULES)),
}


def _variant_id(variant) -> str:
    if isinstance(variant, tuple):
        return "-".join("keep" if v is True else "all" if v is False else str(v) for v in variant)
    return str(variant)


PARAMS = [pytest.param(name, config, variant, id=f"{name[:-7]}-{config_id(config)}-{_variant_id(variant)}")
          for name, (_, variants) in CASES.items() for config in gpu_configs().get(name, ())
          for variant in variants]


@pytest.fixture(autouse=True)
def _seed_and_full_precision():
    torch.manual_seed(0)
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")  # the reference's float32 GEMMs without TF32
    yield
    torch.set_float32_matmul_precision(precision)


def test_every_autotuned_kernel_has_a_case_and_its_gpu_configs():
    """Every ``triton.autotune`` kernel of fastrit.kernels is covered below (a new one fails here until it has a case),
    and the GPU config lists read are the GPU ones: under the interpreter the live autotuners hold one config each,
    the lists read hold more."""
    live = live_kernels()
    lists = gpu_configs()
    assert set(live) == set(lists) == set(CASES)
    for name, kernel in live.items():
        assert len(lists[name]) >= 2, name
        assert len(kernel.configs) == (1 if INTERPRET else len(lists[name])), name
    sparse = lists["row_sparse_grad_kernel"]
    assert {_sparse_float32(c) for c in sparse} == {True, False}  # both operand families are run


@pytest.mark.parametrize("name,config,variant", PARAMS)
def test_autotune_config_against_reference(name, config, variant, monkeypatch):
    """One config of one kernel, alone, through the kernel's launcher: its output equals the reference within the
    element-wise bound of the op (see the module docstring), on shapes with ragged tiles on every axis. A config that
    does not fit the GPU at hand (registers, shared memory: the autotuner skips it there too) is skipped, saying so."""
    kernel = live_kernels()[name]
    monkeypatch.setattr(kernel, "configs", [config])
    monkeypatch.setattr(kernel, "best_config", None, raising=False)
    case, _ = CASES[name]
    try:
        case(config, variant)
    except (OutOfResources, PTXASError) as error:  # the autotuner passes over such a config on this GPU too
        pytest.skip(f"{config_id(config)} does not fit this GPU: {type(error).__name__}: {error}")
    assert kernel.best_config is config  # this config, and no other, was launched
