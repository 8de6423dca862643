"""NF4 block quantization in bitsandbytes' format, bit-exact with ``fastrit/ops/reference.py``.

Quantize: per block of ``blocksize`` consecutive elements of the flattened weight, ``absmax`` (float32); a full
block is multiplied by ``1 / max(absmax, 1e-38)``, the final partial block divided by its absmax clamped to
``>= 1e-38`` (and that clamped value is the one stored); clamped to ``[-1, 1]``; the code index is the number of
the 15 float32 midpoints ``(code[i] + code[i + 1]) / 2`` strictly below the value (``torch.bucketize``,
``right=False``). Two codes per byte, the even element in the high nibble; an odd numel pads one ``0.0``
element (code 7). Divisions are correctly rounded (``div_rn``), so results match on GPUs too.

Dequantize: ``code[q] * absmax[block]`` in float32, then cast.

The code table is duplicated here (``fastrit.kernels`` sits below ``fastrit.ops``); the tests check that it
equals ``reference.NF4_CODE``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import autotune_configs, cast_out

#: bitsandbytes' NF4 table, ascending; index = the 4-bit code.
NF4_CODE = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)

_TABLES: dict[tuple[str, int | None], tuple[torch.Tensor, torch.Tensor]] = {}


def _tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(code [16], midpoints [15])`` float32 on ``device``, made once per device."""
    key = (device.type, device.index)
    if key not in _TABLES:
        code = torch.tensor(NF4_CODE, dtype=torch.float32, device=device)
        _TABLES[key] = (code, (code[:-1] + code[1:]) / 2)
    return _TABLES[key]


@triton.autotune(
    configs=autotune_configs(
        [
            triton.Config({"BLOCKS": 1}, num_warps=1),
            triton.Config({"BLOCKS": 4}, num_warps=2),
            triton.Config({"BLOCKS": 8}, num_warps=4),
            triton.Config({"BLOCKS": 16}, num_warps=4),
        ],
        triton.Config({"BLOCKS": 2}),
    ),
    key=["NUMEL", "BLOCKSIZE"],
)
@triton.jit
def nf4_quantize_kernel(
    x,
    midpoints,
    packed,
    absmax,
    NUMEL,
    FULL,
    N_BLOCKS,
    BLOCKSIZE: tl.constexpr,
    HALF: tl.constexpr,
    BLOCKS: tl.constexpr,
):
    """BLOCKS quantization blocks per program, each as its even and odd elements ``[BLOCKS, HALF]``.

    ``HALF`` is ``BLOCKSIZE // 2`` rounded up to a power of two (the rest masked); ``FULL`` is the number of
    elements in full blocks.
    """
    i_p = tl.program_id(0)
    o_b = i_p.to(tl.int64) * BLOCKS + tl.arange(0, BLOCKS)  # block ids
    o_j = tl.arange(0, HALF)  # pair index within a block
    m_b = o_b < N_BLOCKS
    o_e = o_b[:, None] * BLOCKSIZE + 2 * o_j[None, :]  # even elements
    o_o = o_e + 1
    m_p = m_b[:, None] & (o_j < BLOCKSIZE // 2)[None, :]
    m_e = m_p & (o_e < NUMEL)
    m_o = m_p & (o_o < NUMEL)  # an odd numel: the missing last element reads as the 0.0 pad
    b_e = tl.load(x + o_e, mask=m_e, other=0.0).to(tl.float32)
    b_o = tl.load(x + o_o, mask=m_o, other=0.0).to(tl.float32)

    b_amax = tl.maximum(tl.max(tl.abs(b_e), axis=1), tl.max(tl.abs(b_o), axis=1))  # [BLOCKS]
    # 1e-38 is below float32's smallest normal: a bare literal would be typed float64
    b_clamped = tl.maximum(b_amax, tl.full([BLOCKS], 1e-38, tl.float32))
    b_tail = (o_b * BLOCKSIZE) >= FULL  # the final partial block (there is at most one)
    tl.store(absmax + o_b, tl.where(b_tail, b_clamped, b_amax), mask=m_b)

    b_inv = tl.div_rn(tl.full([BLOCKS], 1.0, tl.float32), b_clamped)
    b_div = tl.broadcast_to(b_clamped[:, None], [BLOCKS, HALF])
    b_tail = b_tail[:, None]
    b_se = tl.where(b_tail, tl.div_rn(b_e, b_div), b_e * b_inv[:, None])
    b_so = tl.where(b_tail, tl.div_rn(b_o, b_div), b_o * b_inv[:, None])
    b_se = tl.minimum(tl.maximum(b_se, -1.0), 1.0)
    b_so = tl.minimum(tl.maximum(b_so, -1.0), 1.0)

    b_qe = tl.zeros([BLOCKS, HALF], dtype=tl.int32)
    b_qo = tl.zeros([BLOCKS, HALF], dtype=tl.int32)
    for i in tl.static_range(15):
        b_mid = tl.load(midpoints + i)
        b_qe += (b_se > b_mid).to(tl.int32)
        b_qo += (b_so > b_mid).to(tl.int32)
    b_byte = ((b_qe << 4) | b_qo).to(tl.uint8)
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
    key=["NUMEL", "BLOCKSIZE"],
)
@triton.jit
def nf4_dequantize_kernel(packed, absmax, code, out, NUMEL, BLOCKSIZE: tl.constexpr, BLOCK: tl.constexpr):
    """``out[e] = code[nibble(e)] * absmax[e // BLOCKSIZE]``, one element per lane (coalesced stores)."""
    i_p = tl.program_id(0)
    o_e = i_p.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m_e = o_e < NUMEL
    b_byte = tl.load(packed + o_e // 2, mask=m_e, other=0).to(tl.int32)
    b_q = tl.where(o_e % 2 == 0, b_byte >> 4, b_byte & 0xF)
    b_code = tl.load(code + b_q)  # the 16-entry table stays in cache
    b_scale = tl.load(absmax + o_e // BLOCKSIZE, mask=m_e, other=0.0)
    tl.store(out + o_e, cast_out(b_code * b_scale, out.dtype.element_ty), mask=m_e)


def nf4_quantize_fwd(weight: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(packed uint8 [(numel + 1) // 2, 1], absmax float32 [ceil(numel / blocksize)])`` of ``weight``.

    ``blocksize`` must be even (bitsandbytes' are powers of two from 32 to 4096): a byte never straddles blocks.
    """
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
    _, midpoints = _tables(weight.device)
    full = numel - numel % blocksize

    def grid(meta):
        return (triton.cdiv(n_blocks, meta["BLOCKS"]),)

    nf4_quantize_kernel[grid](
        flat,
        midpoints,
        packed,
        absmax,
        numel,
        full,
        n_blocks,
        BLOCKSIZE=blocksize,
        HALF=triton.next_power_of_2(blocksize // 2),
    )
    return packed, absmax


def nf4_dequantize_fwd(
    packed: torch.Tensor, absmax: torch.Tensor, blocksize: int, shape: torch.Size | tuple, dtype: torch.dtype
) -> torch.Tensor:
    """The weight of ``shape`` and ``dtype`` from :func:`nf4_quantize_fwd`'s output: ``code[q] * absmax``."""
    out = torch.empty(tuple(int(s) for s in shape), dtype=dtype, device=packed.device)
    numel = out.numel()
    if numel == 0:
        return out
    code, _ = _tables(packed.device)

    def grid(meta):
        return (triton.cdiv(numel, meta["BLOCK"]),)

    nf4_dequantize_kernel[grid](packed, absmax, code, out, numel, BLOCKSIZE=int(blocksize))
    return out
