"""Triton kernels of the sign codec: kernel -> launcher; the public ops live in :mod:`.sign`.

Importing this module imports ``triton``; :mod:`.sign` does so only for CUDA
tensors (or under ``TRITON_INTERPRET=1``, see :mod:`._backend`). Launchers take
contiguous tensors, allocate outputs and validate their tile sizes; they do not
re-check what the public ops check.

Bit ``i`` of byte ``j`` is ``x[8 j + i] >= 0``: a byte is built from a
``[bytes, 8]`` tile as the sum of ``bit << i`` (the bits are disjoint). The same
bytes read as little-endian int32 words hold 32 signs each.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from distcomp.kernels._checks import check_contiguous, check_pow2, decode_layout, next_pow2, row_major

BYTES_PER_PROGRAM = 512
"""Packed bytes (8 values each) per program of the elementwise kernels: 4096 values."""
VALUES_PER_PROGRAM = 4096
"""Values per program of the block-scaled kernels (several small blocks, or one tile of a large one)."""
MAX_TILE = 8192
"""Largest block tile held in registers; larger blocks are walked tile by tile."""


@triton.jit
def _pack_signs_kernel(x_ptr, bits_ptr, n, nbytes, BYTES: tl.constexpr):
    byte = tl.program_id(0).to(tl.int64) * BYTES + tl.arange(0, BYTES)
    bit = tl.arange(0, 8)
    offs = byte[:, None] * 8 + bit[None, :]
    # Values past the end load as -1: their bits are 0, as in the reference's zero padding.
    x = tl.load(x_ptr + offs, mask=offs < n, other=-1.0)
    packed = tl.sum((x >= 0).to(tl.int32) << bit[None, :], axis=1)
    tl.store(bits_ptr + byte, packed.to(tl.uint8), mask=byte < nbytes)


@triton.jit
def _unpack_signs_kernel(bits_ptr, out_ptr, numel, nbytes, BYTES: tl.constexpr):
    byte = tl.program_id(0).to(tl.int64) * BYTES + tl.arange(0, BYTES)
    bit = tl.arange(0, 8)
    b = tl.load(bits_ptr + byte, mask=byte < nbytes, other=0).to(tl.int32)
    signs = tl.where(((b[:, None] >> bit[None, :]) & 1) != 0, 1.0, -1.0)
    offs = byte[:, None] * 8 + bit[None, :]
    tl.store(out_ptr + offs, signs.to(out_ptr.dtype.element_ty), mask=offs < numel)


@triton.jit
def _block_tile(x_ptr, res_ptr, blk, blk_ok, t, block, TILE_BYTES: tl.constexpr, EF: tl.constexpr):
    # Tile t ([GROUP, TILE_BYTES, 8] values) of each block: offsets, which bytes are inside, the corrected values.
    col_byte = t * TILE_BYTES + tl.arange(0, TILE_BYTES)
    byte_ok = blk_ok[:, None] & (col_byte[None, :] < block // 8)
    offs = blk[:, None, None] * block + (col_byte[:, None] * 8 + tl.arange(0, 8)[None, :])[None, :, :]
    x = tl.load(x_ptr + offs, mask=byte_ok[:, :, None], other=0.0).to(tl.float32)
    if EF:
        x += tl.load(res_ptr + offs, mask=byte_ok[:, :, None], other=0.0)
    return x, offs, byte_ok, col_byte


@triton.jit
def _store_bits(x, bits_ptr, bits_base, col_byte, byte_ok):
    packed = tl.sum((x >= 0).to(tl.int32) << tl.arange(0, 8)[None, None, :], axis=2)
    tl.store(bits_ptr + bits_base[:, None] + col_byte[None, :], packed.to(tl.uint8), mask=byte_ok)


@triton.jit
def _store_residual(x, scale, res_out_ptr, offs, byte_ok):
    s = scale[:, None, None]
    tl.store(res_out_ptr + offs, x - tl.where(x >= 0, s, -s), mask=byte_ok[:, :, None])


@triton.jit
def _sign_encode_kernel(
    x_ptr,
    res_ptr,
    res_out_ptr,
    bits_ptr,
    scales_ptr,
    nblocks,
    block,
    num_tiles,
    row_blocks,
    bits_stride,
    scales_stride,
    GROUP: tl.constexpr,
    TILE_BYTES: tl.constexpr,
    EF: tl.constexpr,
    ONE_TILE: tl.constexpr,
):
    # GROUP blocks per program. Bits do not depend on the scale, so they are stored as
    # tiles go by; the new residual does: a block of one tile is corrected from
    # registers (one pass over memory), a longer one is read again. Inputs are
    # contiguous rows; bits and scales rows may be strided (columns of a payload).
    blk = tl.program_id(0).to(tl.int64) * GROUP + tl.arange(0, GROUP)
    blk_ok = blk < nblocks
    row = blk // row_blocks
    col_blk = blk - row * row_blocks
    bits_base = row * bits_stride + col_blk * (block // 8)
    scale_at = scales_ptr + row * scales_stride + col_blk
    if ONE_TILE:
        x, offs, byte_ok, col_byte = _block_tile(x_ptr, res_ptr, blk, blk_ok, 0, block, TILE_BYTES, EF)
        _store_bits(x, bits_ptr, bits_base, col_byte, byte_ok)
        total = tl.sum(tl.sum(tl.abs(x), axis=2), axis=1)
        scale = tl.math.div_rn(total, block.to(tl.float32))
        tl.store(scale_at, scale, mask=blk_ok)
        if EF:
            _store_residual(x, scale, res_out_ptr, offs, byte_ok)
    else:
        total = tl.zeros([GROUP], dtype=tl.float32)
        for t in range(num_tiles):
            x, offs, byte_ok, col_byte = _block_tile(x_ptr, res_ptr, blk, blk_ok, t, block, TILE_BYTES, EF)
            _store_bits(x, bits_ptr, bits_base, col_byte, byte_ok)
            total += tl.sum(tl.sum(tl.abs(x), axis=2), axis=1)
        scale = tl.math.div_rn(total, block.to(tl.float32))
        tl.store(scale_at, scale, mask=blk_ok)
        if EF:
            for t in range(num_tiles):
                x, offs, byte_ok, col_byte = _block_tile(x_ptr, res_ptr, blk, blk_ok, t, block, TILE_BYTES, EF)
                _store_residual(x, scale, res_out_ptr, offs, byte_ok)


@triton.jit
def _sign_decode_kernel(
    bits_ptr,
    bits_stride,
    scales_ptr,
    scales_stride,
    out_ptr,
    sum_rows,
    row_bytes,
    block,
    alpha,
    BYTES: tl.constexpr,
    ACCUMULATE: tl.constexpr,
):
    # Output row o (+)= alpha * the sum of input rows o * sum_rows ... (o + 1) * sum_rows - 1,
    # one tile of columns per program; input rows may be strided (payload views).
    # Columns in int32 (rows are shorter than 2**31 values: cheap division); rows in int64.
    byte = tl.program_id(0) * BYTES + tl.arange(0, BYTES)
    out_row = tl.program_id(1).to(tl.int64)
    ok = byte < row_bytes
    sblk = (byte * 8) // block
    bit = tl.arange(0, 8)
    acc = tl.zeros([BYTES, 8], dtype=tl.float32)
    for i in range(sum_rows):
        r = out_row * sum_rows + i
        b = tl.load(bits_ptr + r * bits_stride + byte, mask=ok, other=0).to(tl.int32)
        s = tl.load(scales_ptr + r * scales_stride + sblk, mask=ok, other=0.0)[:, None]
        acc += tl.where(((b[:, None] >> bit[None, :]) & 1) != 0, s, -s)
    offs = out_row * row_bytes * 8 + byte[:, None] * 8 + bit[None, :]
    if ACCUMULATE:
        acc = tl.load(out_ptr + offs, mask=ok[:, None], other=0.0) + alpha * acc
    else:
        acc = alpha * acc
    tl.store(out_ptr + offs, acc, mask=ok[:, None])


def pack_signs_triton(x: torch.Tensor, bytes_per_program: int = BYTES_PER_PROGRAM) -> torch.Tensor:
    """Triton :func:`~distcomp.kernels.sign.pack_signs_ref` of contiguous ``x``."""
    check_contiguous(x, "pack_signs_triton", "x")
    check_pow2(bytes_per_program, "pack_signs_triton", "bytes_per_program")
    n = x.numel()
    nbytes = -(-n // 8)
    bits = torch.empty(nbytes, dtype=torch.uint8, device=x.device)
    if nbytes:
        _pack_signs_kernel[(triton.cdiv(nbytes, bytes_per_program),)](x, bits, n, nbytes, BYTES=bytes_per_program)
    return bits


def unpack_signs_triton(
    bits: torch.Tensor, numel: int, dtype: torch.dtype = torch.float32, bytes_per_program: int = BYTES_PER_PROGRAM
) -> torch.Tensor:
    """Triton :func:`~distcomp.kernels.sign.unpack_signs_ref` of contiguous ``bits``."""
    check_contiguous(bits, "unpack_signs_triton", "bits")
    check_pow2(bytes_per_program, "unpack_signs_triton", "bytes_per_program")
    out = torch.empty(numel, dtype=dtype, device=bits.device)
    nbytes = -(-numel // 8)
    if nbytes:
        _unpack_signs_kernel[(triton.cdiv(nbytes, bytes_per_program),)](
            bits, out, numel, nbytes, BYTES=bytes_per_program
        )
    return out


def _block_tiling(block: int, values_per_program: int, max_tile: int) -> tuple[int, int, int]:
    """``(blocks per program, bytes per tile, tiles per block)`` for blocks of ``block`` values."""
    check_pow2(values_per_program, "sign kernels", "values_per_program", lo=8)
    check_pow2(max_tile, "sign kernels", "max_tile", lo=8)
    tile = min(next_pow2(block), max_tile)
    group = max(1, values_per_program // tile)
    return group, tile // 8, -(-block // tile)


def _encode(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    residual_out: torch.Tensor | None,
    block: int,
    values_per_program: int,
    max_tile: int,
    out: tuple[torch.Tensor, torch.Tensor] | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the encode kernel (with error feedback when ``residual`` is given); returns ``(bits, scales)``."""
    rows, length = x.shape
    group, tile_bytes, num_tiles = _block_tiling(block, values_per_program, max_tile)
    if out is None:
        bits = torch.empty(rows, length // 8, dtype=torch.uint8, device=x.device)
        scales = torch.empty(rows, length // block, dtype=torch.float32, device=x.device)
    else:
        bits, scales = (
            row_major(out[0], "sign_encode_triton", "bits out"),
            row_major(out[1], "sign_encode_triton", "scales out"),
        )
        if bits is not out[0] or scales is not out[1]:
            raise ValueError("sign_encode_triton: out rows must be contiguous")
    nblocks = rows * (length // block)
    if nblocks:
        ef = residual is not None
        _sign_encode_kernel[(triton.cdiv(nblocks, group),)](
            x,
            residual if ef else x,
            residual_out if ef else x,
            bits,
            scales,
            nblocks,
            block,
            num_tiles,
            length // block,
            bits.stride(0),
            scales.stride(0),
            GROUP=group,
            TILE_BYTES=tile_bytes,
            EF=ef,
            ONE_TILE=num_tiles == 1,
        )
    return bits, scales


def sign_encode_triton(
    x: torch.Tensor,
    block: int,
    values_per_program: int = VALUES_PER_PROGRAM,
    max_tile: int = MAX_TILE,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton :func:`~distcomp.kernels.sign.sign_encode_ref` of contiguous rows ``x [r, L]``.

    The results go into ``out``'s row views if given.
    """
    check_contiguous(x, "sign_encode_triton", "x")
    return _encode(x, None, None, block, values_per_program, max_tile, out)


def sign_encode_ef_triton(
    grad: torch.Tensor,
    residual: torch.Tensor,
    block: int,
    residual_out: torch.Tensor | None = None,
    values_per_program: int = VALUES_PER_PROGRAM,
    max_tile: int = MAX_TILE,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton :func:`~distcomp.kernels.sign.sign_encode_ef_ref`.

    One pass over memory (two for blocks over ``max_tile``).
    """
    for name, t in (("grad", grad), ("residual", residual), ("residual_out", residual_out)):
        if t is not None:
            check_contiguous(t, "sign_encode_ef_triton", name)
    res_out = residual if residual_out is None else residual_out
    return _encode(grad, residual, res_out, block, values_per_program, max_tile, out)


def sign_decode_triton(
    bits: torch.Tensor,
    scales: torch.Tensor,
    block: int,
    out: torch.Tensor | None = None,
    accumulate: bool = False,
    alpha: float = 1.0,
    bytes_per_program: int = BYTES_PER_PROGRAM,
) -> torch.Tensor:
    """Triton decode of ``bits [r, L/8]`` with ``scales [r, L/block]`` into contiguous fp32 ``out``.

    ``bits`` and ``scales`` may have any row stride (views into payload rows).
    ``out`` holds ``r * L`` values (row by row) or ``L`` values (the rows are
    summed); it is overwritten with ``alpha * decoded`` or, with ``accumulate``,
    has ``alpha * decoded`` added to it. Returns ``out`` as ``[r, L]`` (``[L]`` when summed).
    """
    bits, scales = row_major(bits, "sign_decode_triton", "bits"), row_major(scales, "sign_decode_triton", "scales")
    check_pow2(bytes_per_program, "sign_decode_triton", "bytes_per_program")
    rows, row_blocks = scales.shape
    length = row_blocks * block
    if out is None:
        out = torch.empty(rows * length, dtype=torch.float32, device=bits.device)
    check_contiguous(out, "sign_decode_triton", "out")
    out_rows, shape = decode_layout(out.numel(), rows, length, "sign_decode_triton")
    if length >= 2**31:
        raise ValueError(f"sign_decode_triton: rows of {length} values are too long for int32 columns; split them")
    if length and rows:
        grid = (triton.cdiv(length // 8, bytes_per_program), out_rows)
        _sign_decode_kernel[grid](
            bits,
            bits.stride(0),
            scales,
            scales.stride(0),
            out,
            rows // out_rows,
            length // 8,
            block,
            float(alpha),
            BYTES=bytes_per_program,
            ACCUMULATE=accumulate,
        )
    elif not accumulate:
        out.zero_()
    return out.view(shape)
