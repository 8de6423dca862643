"""NF4 block quantization in bitsandbytes' format, bit-exact with ``fastrit/ops/reference.py``.

bitsandbytes' CPU backend and its CUDA kernels round differently; each launcher takes the ``rule`` of
``reference.nf4_quantize_blocks`` (default: the tensor's device, "cuda" on CUDA tensors, "cpu" otherwise).

Quantize, rule "cpu": per block of ``blocksize`` consecutive elements of the flattened weight, ``absmax``
(float32); a full block is multiplied by ``1 / max(absmax, 1e-38)``, the final partial block divided by its
absmax clamped to ``>= 1e-38`` (and that clamped value is the one stored); clamped to ``[-1, 1]``; the code is
the number of the 15 float32 midpoints ``(code[i] + code[i + 1]) / 2`` strictly below the value. Divisions are
correctly rounded (``div_rn``).

Quantize, rule "cuda" (bitsandbytes' CUDA kernels): subnormals flushed; absmax is the largest ``|x|`` ignoring
NaN, from ``-FLT_MAX`` (a partial block's 0.0 padding takes part), stored as it is; each element times
``rcp.approx.ftz.f32(absmax)`` (inline PTX on a GPU, so 1/0 = inf and an all-zero block codes as 0), the code
the number of ``NF4_CUDA_THRESHOLDS`` strictly below it (NaN: 0).

Both: two codes per byte, the even element in the high nibble; an odd numel pads one ``0.0`` element. A block
is read in chunks of at most ``_CHUNK`` element pairs (absmax pass, then the coding pass), so that registers
never hold a whole 4096-element block.

Dequantize: ``code[q] * absmax[block]`` in float32 (rule "cuda": flush-to-zero multiply), then cast.

The tables (``NF4_CODE``, ``NF4_CUDA_THRESHOLDS``) are those of :mod:`fastrit.kernels.nf4_code`, the one NF4 table that
``fastrit.ops.reference`` and csrc/nf4_code.h take theirs from.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import autotune_configs, cast_out, flush_subnormal, mul_ftz, on_device, rcp_approx_ftz, size_bucket
from .nf4_code import NF4_CODE, NF4_CUDA_THRESHOLDS

RULES = ("cpu", "cuda")

#: element pairs of one block processed at a time
_CHUNK = 128

_TABLES: dict[tuple[str, int | None], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}


def _tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(code [16], midpoints [15], CUDA thresholds [15])`` float32 on ``device``, made once per device."""
    key = (device.type, device.index)
    if key not in _TABLES:
        code = torch.tensor(NF4_CODE, dtype=torch.float32, device=device)
        bits = torch.tensor(NF4_CUDA_THRESHOLDS, dtype=torch.int64).to(torch.int32)
        _TABLES[key] = (code, (code[:-1] + code[1:]) / 2, bits.view(torch.float32).to(device))
    return _TABLES[key]


def _rule(device: torch.device, rule: str | None) -> str:
    if rule is None:
        return "cuda" if device.type == "cuda" else "cpu"
    if rule not in RULES:
        raise ValueError(f"rule: expected one of {RULES}, got {rule!r}")
    return rule


@triton.jit
def _nf4_magnitude(b_x, m_block, CUDA_RULE: tl.constexpr):
    """What a block's maximum is taken over: ``|x|``; rule "cuda": flushed, NaN and lanes outside the block
    as ``-FLT_MAX`` (ignored). Elements past the end of the weight were loaded as 0.0 and count as 0."""
    if CUDA_RULE:
        b_a = tl.abs(flush_subnormal(b_x))
        return tl.where(m_block & (b_x == b_x), b_a, -3.4028234663852886e38)
    else:
        return tl.abs(b_x)


@triton.jit
def _nf4_codes(b_s, thresholds):
    """The number of the 15 ``thresholds`` strictly below each value (NaN: 0), int32."""
    b_q = tl.zeros(b_s.shape, dtype=tl.int32)
    for i in tl.static_range(15):
        b_q += (b_s > tl.load(thresholds + i)).to(tl.int32)
    return b_q


@triton.autotune(
    configs=autotune_configs(
        [
            triton.Config({"BLOCKS": 1}, num_warps=1),
            triton.Config({"BLOCKS": 1}, num_warps=4),
            triton.Config({"BLOCKS": 4}, num_warps=2),
            triton.Config({"BLOCKS": 8}, num_warps=4),
            triton.Config({"BLOCKS": 16}, num_warps=4),
        ],
        triton.Config({"BLOCKS": 2}),
    ),
    key=["NUMEL_BUCKET", "BLOCKSIZE", "CUDA_RULE"],
)
@triton.jit
def nf4_quantize_kernel(
    x,
    thresholds,
    packed,
    absmax,
    NUMEL,
    FULL,
    N_BLOCKS,
    NUMEL_BUCKET,
    BLOCKSIZE: tl.constexpr,
    CHUNK: tl.constexpr,
    CUDA_RULE: tl.constexpr,
    BLOCKS: tl.constexpr,
):
    """BLOCKS quantization blocks per program, each read as ``[BLOCKS, CHUNK]`` even and odd elements at a time.

    ``CHUNK`` is a power of two, at most ``_CHUNK``, and at least ``BLOCKSIZE // 2`` if that is smaller (the rest
    masked); ``FULL`` is the number of elements in full blocks; ``thresholds`` the 15 bucket bounds of the rule.
    """
    i_p = tl.program_id(0)
    o_b = i_p.to(tl.int64) * BLOCKS + tl.arange(0, BLOCKS)  # block ids
    m_b = o_b < N_BLOCKS
    o_j = tl.arange(0, CHUNK)  # pair index within a chunk
    if CUDA_RULE:
        b_amax = tl.full([BLOCKS], -3.4028234663852886e38, tl.float32)
    else:
        b_amax = tl.zeros([BLOCKS], dtype=tl.float32)
    for j0 in range(0, BLOCKSIZE // 2, CHUNK):
        m_p = m_b[:, None] & (j0 + o_j < BLOCKSIZE // 2)[None, :]
        o_e = o_b[:, None] * BLOCKSIZE + 2 * (j0 + o_j)[None, :]  # even elements
        b_e = tl.load(x + o_e, mask=m_p & (o_e < NUMEL), other=0.0).to(tl.float32)
        b_o = tl.load(x + o_e + 1, mask=m_p & (o_e + 1 < NUMEL), other=0.0).to(tl.float32)
        b_amax = tl.maximum(b_amax, tl.max(_nf4_magnitude(b_e, m_p, CUDA_RULE), axis=1))
        b_amax = tl.maximum(b_amax, tl.max(_nf4_magnitude(b_o, m_p, CUDA_RULE), axis=1))

    if CUDA_RULE:
        tl.store(absmax + o_b, b_amax, mask=m_b)
        b_inv = rcp_approx_ftz(b_amax)[:, None]
    else:
        # 1e-38 is below float32's smallest normal: a bare literal would be typed float64
        b_clamped = tl.maximum(b_amax, tl.full([BLOCKS], 1e-38, tl.float32))
        b_tail = (o_b * BLOCKSIZE) >= FULL  # the final partial block (there is at most one)
        tl.store(absmax + o_b, tl.where(b_tail, b_clamped, b_amax), mask=m_b)
        b_inv = tl.div_rn(tl.full([BLOCKS], 1.0, tl.float32), b_clamped)[:, None]
        b_div = tl.broadcast_to(b_clamped[:, None], [BLOCKS, CHUNK])
        b_tail = b_tail[:, None]

    for j0 in range(0, BLOCKSIZE // 2, CHUNK):
        m_p = m_b[:, None] & (j0 + o_j < BLOCKSIZE // 2)[None, :]
        o_e = o_b[:, None] * BLOCKSIZE + 2 * (j0 + o_j)[None, :]
        m_e = m_p & (o_e < NUMEL)
        b_e = tl.load(x + o_e, mask=m_e, other=0.0).to(tl.float32)
        b_o = tl.load(x + o_e + 1, mask=m_p & (o_e + 1 < NUMEL), other=0.0).to(tl.float32)  # the odd pad: 0.0
        if CUDA_RULE:
            b_se = mul_ftz(b_e, b_inv)
            b_so = mul_ftz(b_o, b_inv)
        else:
            b_se = tl.where(b_tail, tl.div_rn(b_e, b_div), b_e * b_inv)
            b_so = tl.where(b_tail, tl.div_rn(b_o, b_div), b_o * b_inv)
            b_se = tl.minimum(tl.maximum(b_se, -1.0), 1.0)
            b_so = tl.minimum(tl.maximum(b_so, -1.0), 1.0)
        b_byte = ((_nf4_codes(b_se, thresholds) << 4) | _nf4_codes(b_so, thresholds)).to(tl.uint8)
        tl.store(packed + o_e // 2, b_byte, mask=m_e)


@triton.autotune(
    configs=autotune_configs(
        [
            triton.Config({"BLOCK": 1024}, num_warps=4),
            triton.Config({"BLOCK": 2048}, num_warps=8),
            triton.Config({"BLOCK": 4096}, num_warps=8),
        ],
        triton.Config({"BLOCK": 256}),
    ),
    key=["NUMEL_BUCKET", "BLOCKSIZE", "CUDA_RULE"],
)
@triton.jit
def nf4_dequantize_kernel(
    packed, absmax, code, out, NUMEL, NUMEL_BUCKET, BLOCKSIZE: tl.constexpr, CUDA_RULE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """``out[e] = code[nibble(e)] * absmax[e // BLOCKSIZE]``, one element per lane (coalesced stores)."""
    i_p = tl.program_id(0)
    o_e = i_p.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m_e = o_e < NUMEL
    b_byte = tl.load(packed + o_e // 2, mask=m_e, other=0).to(tl.int32)
    b_q = tl.where(o_e % 2 == 0, b_byte >> 4, b_byte & 0xF)
    b_code = tl.load(code + b_q)  # the 16-entry table stays in cache
    b_scale = tl.load(absmax + o_e // BLOCKSIZE, mask=m_e, other=0.0)
    if CUDA_RULE:
        b_w = mul_ftz(b_code, b_scale)
    else:
        b_w = b_code * b_scale
    tl.store(out + o_e, cast_out(b_w, out.dtype.element_ty), mask=m_e)


def nf4_quantize_grid(n_blocks: int):
    """The launch grid of :func:`nf4_quantize_kernel` for ``n_blocks`` quantization blocks."""
    return lambda meta: (triton.cdiv(n_blocks, meta["BLOCKS"]),)


def nf4_dequantize_grid(numel: int):
    """The launch grid of :func:`nf4_dequantize_kernel` for ``numel`` output elements."""
    return lambda meta: (triton.cdiv(numel, meta["BLOCK"]),)


@on_device
def nf4_quantize_fwd(
    weight: torch.Tensor, blocksize: int, rule: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(packed uint8 [(numel + 1) // 2, 1], absmax float32 [ceil(numel / blocksize)])`` of ``weight``.

    ``blocksize`` must be even (bitsandbytes' are powers of two from 32 to 4096): a byte never straddles blocks.
    ``rule``: "cpu" or "cuda" (bitsandbytes' CPU backend or CUDA kernels); default the tensor's device type.
    """
    rule = _rule(weight.device, rule)
    blocksize = int(blocksize)
    if blocksize <= 0 or blocksize % 2:
        raise ValueError(f"blocksize must be a positive even integer, got {blocksize}")
    flat = weight.reshape(-1)
    numel = flat.numel()
    n_blocks = triton.cdiv(numel, blocksize)
    packed = torch.empty(((numel + 1) // 2, 1), dtype=torch.uint8, device=weight.device)
    absmax = torch.empty((n_blocks,), dtype=torch.float32, device=weight.device)
    if numel == 0:
        return packed, absmax
    _, midpoints, cuda_thresholds = _tables(weight.device)
    cuda_rule = rule == "cuda"
    nf4_quantize_kernel[nf4_quantize_grid(n_blocks)](
        flat,
        cuda_thresholds if cuda_rule else midpoints,
        packed,
        absmax,
        numel,
        numel - numel % blocksize,
        n_blocks,
        size_bucket(numel),
        BLOCKSIZE=blocksize,
        CHUNK=min(triton.next_power_of_2(blocksize // 2), _CHUNK),
        CUDA_RULE=cuda_rule,
    )
    return packed, absmax


@on_device
def nf4_dequantize_fwd(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    blocksize: int,
    shape: torch.Size | tuple,
    dtype: torch.dtype,
    rule: str | None = None,
) -> torch.Tensor:
    """The weight of ``shape`` and ``dtype`` from :func:`nf4_quantize_fwd`'s output: ``code[q] * absmax``."""
    rule = _rule(packed.device, rule)
    out = torch.empty(tuple(int(s) for s in shape), dtype=dtype, device=packed.device)
    numel = out.numel()
    if numel == 0:
        return out
    code, _, _ = _tables(packed.device)
    nf4_dequantize_kernel[nf4_dequantize_grid(numel)](
        packed, absmax, code, out, numel, size_bucket(numel), BLOCKSIZE=int(blocksize), CUDA_RULE=rule == "cuda"
    )
    return out
