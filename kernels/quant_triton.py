"""Triton kernels of block-wise int8/int4 quantization: kernel -> launcher; public ops in :mod:`.quant`.

Importing this module imports ``triton`` (see :mod:`._backend`). The scale of
a block is ``absmax / qmax`` and codes are ``x / scale`` rounded, both with
IEEE division (``div_rn``), so deterministic rounding matches the reference
bit for bit. Stochastic rounding is ``floor(v + u)`` with ``u`` from Philox
(``tl.rand``) keyed by a seed drawn from the caller's generator and the
element's flat index: seeded and reproducible, but a different stream from
the reference's (which dithers with 256 levels; this one is unbiased to fp32
precision).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from distcomp.kernels._checks import as_rows, check_contiguous, check_pow2, decode_layout, next_pow2, row_major

VALUES_PER_PROGRAM = 4096
"""Values per program (several small blocks, or one tile of a large one)."""
MAX_TILE = 8192
"""Largest block tile held in registers; larger blocks take two passes over memory."""
QMAX = {8: 127, 4: 7}


@triton.jit
def _round_half_even(v):
    # floor(v + 0.5) is wrong just below 0.5 (v + 0.5 rounds up to 1.0); this is exact.
    r = tl.floor(v)
    f = v - r
    odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
    return r + ((f > 0.5) | ((f == 0.5) & odd)).to(tl.float32)


@triton.jit
def _tile_offsets(blk, blk_ok, t, block, TILE_PAIRS: tl.constexpr):
    # Value offsets [GROUP, TILE_PAIRS, 2] of tile t of each block, and which pairs are in the block.
    col_pair = t * TILE_PAIRS + tl.arange(0, TILE_PAIRS)
    pair_ok = blk_ok[:, None] & (col_pair[None, :] < block // 2)
    offs = blk[:, None, None] * block + (col_pair[:, None] * 2 + tl.arange(0, 2)[None, :])[None, :, :]
    return offs, pair_ok, col_pair


@triton.jit
def _load_tile(x_ptr, res_ptr, blk, blk_ok, t, block, TILE_PAIRS: tl.constexpr, EF: tl.constexpr):
    # Tile t of each block as fp32, plus the residual with error feedback.
    offs, pair_ok, col_pair = _tile_offsets(blk, blk_ok, t, block, TILE_PAIRS)
    x = tl.load(x_ptr + offs, mask=pair_ok[:, :, None], other=0.0).to(tl.float32)
    if EF:
        x += tl.load(res_ptr + offs, mask=pair_ok[:, :, None], other=0.0)
    return x, offs, pair_ok, col_pair


@triton.jit
def _store_codes(
    x,
    offs,
    pair_ok,
    col_pair,
    q_base,
    scale,
    seed,
    q_ptr,
    res_out_ptr,
    QMAX: tl.constexpr,
    STOCHASTIC: tl.constexpr,
    PACKED: tl.constexpr,
    EF: tl.constexpr,
):
    # Divide (not multiply by a reciprocal): 1/scale overflows for blocks of tiny values.
    divisor = tl.where(scale > 0, scale, 1.0)[:, None, None]
    v = tl.math.div_rn(x, divisor)
    if STOCHASTIC:
        v = tl.floor(v + tl.rand(seed, offs))
    else:
        v = _round_half_even(v)
    qf = tl.minimum(tl.maximum(v, -QMAX), QMAX)
    q = qf.to(tl.int32)
    if PACKED:
        # Element 2i in the low nibble, 2i+1 in the high one.
        byte = tl.sum((q & 0xF) << (tl.arange(0, 2) * 4)[None, None, :], axis=2)
        tl.store(q_ptr + q_base[:, None] + col_pair[None, :], byte.to(tl.uint8), mask=pair_ok)
    else:
        col = col_pair[:, None] * 2 + tl.arange(0, 2)[None, :]
        tl.store(q_ptr + q_base[:, None, None] + col[None, :, :], q.to(tl.int8), mask=pair_ok[:, :, None])
    if EF:
        tl.store(res_out_ptr + offs, x - qf * scale[:, None, None], mask=pair_ok[:, :, None])


@triton.jit
def _block_scale(amax, bad, QMAX: tl.constexpr):
    # bad is the sum of x * 0 over the block: NaN when the block holds an inf or a NaN, which
    # then shows in its scale (tl.max need not propagate NaN).
    return tl.math.div_rn(amax, tl.full(amax.shape, QMAX, tl.float32)) + bad


@triton.jit
def _quantize_kernel(
    x_ptr,
    res_ptr,
    res_out_ptr,
    q_ptr,
    scales_ptr,
    seed_ptr,
    nblocks,
    block,
    num_tiles,
    row_blocks,
    q_stride,
    scales_stride,
    QMAX: tl.constexpr,
    GROUP: tl.constexpr,
    TILE_PAIRS: tl.constexpr,
    STOCHASTIC: tl.constexpr,
    PACKED: tl.constexpr,
    ONE_TILE: tl.constexpr,
    EF: tl.constexpr,
):
    # GROUP blocks per program in tiles of [TILE_PAIRS, 2] values (pairs make int4 bytes);
    # a block of one tile is read once, a longer one twice (absmax, then codes). Inputs
    # are contiguous rows; code and scale rows may be strided (columns of a payload).
    blk = tl.program_id(0).to(tl.int64) * GROUP + tl.arange(0, GROUP)
    blk_ok = blk < nblocks
    row = blk // row_blocks
    col_blk = blk - row * row_blocks
    q_base = row * q_stride + col_blk * (block // 2 if PACKED else block)
    scale_at = scales_ptr + row * scales_stride + col_blk
    if STOCHASTIC:
        seed = tl.load(seed_ptr)
    else:
        seed = 0
    if ONE_TILE:
        x, offs, pair_ok, col_pair = _load_tile(x_ptr, res_ptr, blk, blk_ok, 0, block, TILE_PAIRS, EF)
        amax = tl.max(tl.max(tl.abs(x), axis=2), axis=1)
        scale = _block_scale(amax, tl.sum(tl.sum(x * 0.0, axis=2), axis=1), QMAX)
        tl.store(scale_at, scale, mask=blk_ok)
        _store_codes(x, offs, pair_ok, col_pair, q_base, scale, seed, q_ptr, res_out_ptr, QMAX, STOCHASTIC, PACKED, EF)
    else:
        amax = tl.zeros([GROUP], dtype=tl.float32)
        bad = tl.zeros([GROUP], dtype=tl.float32)
        for t in range(num_tiles):
            x, offs, pair_ok, col_pair = _load_tile(x_ptr, res_ptr, blk, blk_ok, t, block, TILE_PAIRS, EF)
            amax = tl.maximum(amax, tl.max(tl.max(tl.abs(x), axis=2), axis=1))
            bad += tl.sum(tl.sum(x * 0.0, axis=2), axis=1)
        scale = _block_scale(amax, bad, QMAX)
        tl.store(scale_at, scale, mask=blk_ok)
        for t in range(num_tiles):
            x, offs, pair_ok, col_pair = _load_tile(x_ptr, res_ptr, blk, blk_ok, t, block, TILE_PAIRS, EF)
            _store_codes(
                x, offs, pair_ok, col_pair, q_base, scale, seed, q_ptr, res_out_ptr, QMAX, STOCHASTIC, PACKED, EF
            )


@triton.jit
def _dequantize_kernel(
    q_ptr,
    q_stride,
    scales_ptr,
    scales_stride,
    out_ptr,
    sum_rows,
    row_len,
    block,
    alpha,
    PAIRS: tl.constexpr,
    BITS: tl.constexpr,
    ACCUMULATE: tl.constexpr,
):
    # Output row o (+)= alpha * the sum of input rows o * sum_rows ... (o + 1) * sum_rows - 1
    # of q * scale; int4 codes come packed, two per byte; input rows may be strided.
    # Columns in int32 (rows are shorter than 2**31 values: cheap division); rows in int64.
    pair = tl.program_id(0) * PAIRS + tl.arange(0, PAIRS)
    out_row = tl.program_id(1).to(tl.int64)
    half = tl.arange(0, 2)
    col = pair[:, None] * 2 + half[None, :]
    ok = col < row_len
    sblk = col // block
    acc = tl.zeros([PAIRS, 2], dtype=tl.float32)
    for i in range(sum_rows):
        r = out_row * sum_rows + i
        if BITS == 8:
            q = tl.load(q_ptr + r * q_stride + col, mask=ok, other=0).to(tl.float32)
        else:
            b = tl.load(q_ptr + r * q_stride + pair, mask=pair < row_len // 2, other=0).to(tl.int32)
            nibble = (b[:, None] >> (half * 4)[None, :]) & 0xF
            q = ((nibble ^ 8) - 8).to(tl.float32)  # sign-extend
        acc += q * tl.load(scales_ptr + r * scales_stride + sblk, mask=ok, other=0.0)
    offs = out_row * row_len + col
    if ACCUMULATE:
        acc = tl.load(out_ptr + offs, mask=ok, other=0.0) + alpha * acc
    else:
        acc = alpha * acc
    tl.store(out_ptr + offs, acc, mask=ok)


@triton.jit
def _pack_int4_kernel(q_ptr, out_ptr, npairs, PAIRS: tl.constexpr):
    pair = tl.program_id(0).to(tl.int64) * PAIRS + tl.arange(0, PAIRS)
    half = tl.arange(0, 2)
    ok = pair < npairs
    q = tl.load(q_ptr + pair[:, None] * 2 + half[None, :], mask=ok[:, None], other=0).to(tl.int32)
    byte = tl.sum((q & 0xF) << (half * 4)[None, :], axis=1)
    tl.store(out_ptr + pair, byte.to(tl.uint8), mask=ok)


@triton.jit
def _unpack_int4_kernel(packed_ptr, out_ptr, nbytes, PAIRS: tl.constexpr):
    pair = tl.program_id(0).to(tl.int64) * PAIRS + tl.arange(0, PAIRS)
    half = tl.arange(0, 2)
    ok = pair < nbytes
    b = tl.load(packed_ptr + pair, mask=ok, other=0).to(tl.int32)
    nibble = (b[:, None] >> (half * 4)[None, :]) & 0xF
    tl.store(out_ptr + pair[:, None] * 2 + half[None, :], ((nibble ^ 8) - 8).to(tl.int8), mask=ok[:, None])


def draw_seed(generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """One int64 seed from ``generator`` as a 1-element tensor on ``device`` (no host sync on CUDA).

    Drawing advances the generator, so the generator's checkpointed state
    reproduces the rounding of every later step.
    """
    seed = torch.randint(0, 2**62, (1,), generator=generator, device=generator.device, dtype=torch.int64)
    return seed.to(device, non_blocking=True)


def _tiling(block: int, values_per_program: int, max_tile: int) -> tuple[int, int, int]:
    """``(blocks per program, value pairs per tile, tiles per block)``."""
    check_pow2(values_per_program, "quantize kernels", "values_per_program", lo=2)
    check_pow2(max_tile, "quantize kernels", "max_tile", lo=2)
    tile = min(next_pow2(block), max_tile)
    return max(1, values_per_program // tile), tile // 2, -(-block // tile)


def quantize_blockwise_triton(
    x: torch.Tensor,
    bits: int,
    block: int,
    generator: torch.Generator | None = None,
    packed: bool = False,
    values_per_program: int = VALUES_PER_PROGRAM,
    max_tile: int = MAX_TILE,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
    residual: torch.Tensor | None = None,
    residual_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton quantization of contiguous rows ``x [r, L]`` (``L`` a multiple of the even ``block``).

    Returns ``(q int8 [r, L], scales fp32 [r, L/block])``, or with ``packed`` the
    codes as bytes ``[r, L * bits / 8]`` (int4: two per byte, low nibble first),
    written into ``out``'s row views (contiguous rows, any row stride) if given.
    With a contiguous fp32 ``residual`` of ``x``'s shape, ``x + residual`` is
    quantized and ``x + residual - dequantized`` is written to ``residual_out``
    (default: over ``residual``), in the same pass.
    """
    check_contiguous(x, "quantize_blockwise_triton", "x")
    if block % 2:
        raise ValueError(f"quantize_blockwise_triton: block={block} must be even")
    for name, t in (("residual", residual), ("residual_out", residual_out)):
        if t is not None:
            check_contiguous(t, "quantize_blockwise_triton", name)
    rows, length = x.shape
    group, tile_pairs, num_tiles = _tiling(block, values_per_program, max_tile)
    width = length * bits // 8 if packed else length
    if out is None:
        q = torch.empty(rows, width, dtype=torch.uint8 if packed else torch.int8, device=x.device)
        scales = torch.empty(rows, length // block, dtype=torch.float32, device=x.device)
    else:
        q, scales = out
        if (width > 1 and q.stride(-1) != 1) or (length // block > 1 and scales.stride(-1) != 1):
            raise ValueError("quantize_blockwise_triton: out rows must be contiguous")
    nblocks = rows * (length // block)
    if nblocks:
        seed = draw_seed(generator, x.device) if generator is not None else scales
        ef = residual is not None
        res_out = residual if residual_out is None else residual_out
        _quantize_kernel[(triton.cdiv(nblocks, group),)](
            x,
            residual if ef else x,
            res_out if ef else x,
            q.view(torch.int8) if bits == 8 else q,
            scales,
            seed,
            nblocks,
            block,
            num_tiles,
            length // block,
            q.stride(0),
            scales.stride(0),
            QMAX=QMAX[bits],
            GROUP=group,
            TILE_PAIRS=tile_pairs,
            STOCHASTIC=generator is not None,
            PACKED=packed and bits == 4,
            ONE_TILE=num_tiles == 1,
            EF=ef,
        )
    return q, scales


def dequantize_blockwise_triton(
    q: torch.Tensor,
    scales: torch.Tensor,
    block: int,
    out: torch.Tensor | None = None,
    bits: int = 8,
    accumulate: bool = False,
    alpha: float = 1.0,
    pairs_per_program: int = 2048,
) -> torch.Tensor:
    """Triton dequantization of codes ``q`` (int8 ``[r, L]``, or int4 packed ``[r, L/2]`` uint8).

    ``q`` and ``scales`` may have any row stride (views into payload rows).
    ``out`` (contiguous fp32) holds ``r * L`` values (row by row) or ``L`` values
    (the rows are summed); it is overwritten with ``alpha * decoded`` or, with
    ``accumulate``, has ``alpha * decoded`` added to it. Returns ``out`` as
    ``[r, L]`` (``[L]`` when summed).
    """
    check_pow2(pairs_per_program, "dequantize_blockwise_triton", "pairs_per_program")
    rows, row_blocks = scales.shape
    length = row_blocks * block
    q = row_major(as_rows(q, rows), "dequantize_blockwise_triton", "q")
    scales = row_major(scales, "dequantize_blockwise_triton", "scales")
    if out is None:
        out = torch.empty(rows * length, dtype=torch.float32, device=q.device)
    check_contiguous(out, "dequantize_blockwise_triton", "out")
    out_rows, shape = decode_layout(out.numel(), rows, length, "dequantize_blockwise_triton")
    if length >= 2**31:
        raise ValueError(
            f"dequantize_blockwise_triton: rows of {length} values are too long for int32 columns; split them"
        )
    if length and rows:
        grid = (triton.cdiv(length, 2 * pairs_per_program), out_rows)
        _dequantize_kernel[grid](
            q.view(torch.int8) if bits == 8 else q,
            q.stride(0),
            scales,
            scales.stride(0),
            out,
            rows // out_rows,
            length,
            block,
            float(alpha),
            PAIRS=pairs_per_program,
            BITS=bits,
            ACCUMULATE=accumulate,
        )
    elif not accumulate:
        out.zero_()
    return out.view(shape)


def pack_int4_triton(q: torch.Tensor, pairs_per_program: int = 4096) -> torch.Tensor:
    """Triton :func:`~distcomp.kernels.quant.pack_int4_ref` of contiguous ``q`` (last dimension even)."""
    check_contiguous(q, "pack_int4_triton", "q")
    check_pow2(pairs_per_program, "pack_int4_triton", "pairs_per_program")
    out = torch.empty(*q.shape[:-1], q.shape[-1] // 2, dtype=torch.uint8, device=q.device)
    if out.numel():
        _pack_int4_kernel[(triton.cdiv(out.numel(), pairs_per_program),)](q, out, out.numel(), PAIRS=pairs_per_program)
    return out


def unpack_int4_triton(packed: torch.Tensor, pairs_per_program: int = 4096) -> torch.Tensor:
    """Triton :func:`~distcomp.kernels.quant.unpack_int4_ref` of contiguous ``packed``."""
    check_contiguous(packed, "unpack_int4_triton", "packed")
    check_pow2(pairs_per_program, "unpack_int4_triton", "pairs_per_program")
    out = torch.empty(*packed.shape[:-1], packed.shape[-1] * 2, dtype=torch.int8, device=packed.device)
    if packed.numel():
        _unpack_int4_kernel[(triton.cdiv(packed.numel(), pairs_per_program),)](
            packed, out, packed.numel(), PAIRS=pairs_per_program
        )
    return out
