"""1-bit sign packing, and the block-scaled sign codec built on it.

Bit ``i`` of byte ``j`` holds ``x[8 j + i] >= 0`` (zero packs as positive).
The scale of a block is ``mean(|x|)``, which minimises ``||x - s * sign(x)||``.
"""

from __future__ import annotations

import torch

from distcomp.kernels._checks import check_block, check_dtype, check_float

# Eight 0/1 bytes read as one little-endian int64, times this constant, carry
# byte i's bit to bit 56 + i with no overlapping partial products.
_GATHER_BITS = 0x0102040810204080


def pack_signs_ref(x: torch.Tensor) -> torch.Tensor:
    """Signs of ``x`` (flattened) as bits, 8 per byte; length ``ceil(numel / 8)``."""
    flat = x.reshape(-1)
    n = flat.numel()
    nonneg = flat >= 0
    if n % 8:
        nonneg = torch.cat([nonneg, nonneg.new_zeros(8 - n % 8)])
    words = nonneg.view(torch.uint8).view(torch.int64)
    return ((words * _GATHER_BITS) >> 56).bitwise_and_(0xFF).to(torch.uint8)


def _sign_table(device: torch.device) -> torch.Tensor:
    """``[256, 8]`` fp32: row ``v`` holds ``+1``/``-1`` for bits 0..7 of byte ``v``."""
    table = _SIGN_TABLES.get(device)
    if table is None:
        bits = (torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1
        table = _SIGN_TABLES[device] = (bits * 2 - 1).to(torch.float32).to(device)
    return table


_SIGN_TABLES: dict[torch.device, torch.Tensor] = {}


def unpack_signs_ref(bits: torch.Tensor, numel: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``+1``/``-1`` of dtype ``dtype`` for the first ``numel`` packed signs."""
    # One gather of 8 values per byte: much faster than shifting every bit.
    signs = torch.index_select(_sign_table(bits.device), 0, bits.reshape(-1).to(torch.int32))
    return signs.view(-1)[:numel].to(dtype)


def pack_signs(x: torch.Tensor) -> torch.Tensor:
    """Public op of :func:`pack_signs_ref`."""
    check_float(x, "pack_signs")
    return pack_signs_ref(x)


def unpack_signs(bits: torch.Tensor, numel: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Public op of :func:`unpack_signs_ref`."""
    check_dtype(bits, torch.uint8, "unpack_signs", "bits")
    if numel < 0 or numel > bits.numel() * 8:
        raise ValueError(f"unpack_signs: numel={numel} does not fit in {bits.numel()} bytes")
    return unpack_signs_ref(bits, numel, dtype)


def sign_encode_ref(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows ``x[r]`` (length a multiple of ``block`` and of 8) to ``(bits [r, L/8], scales [r, L/block])``."""
    rows, length = x.shape
    blocks = x.reshape(rows, length // block, block)
    scales = torch.linalg.vector_norm(blocks, ord=1, dim=-1, dtype=torch.float32).div_(block)
    return pack_signs_ref(x).view(rows, length // 8), scales


def sign_decode_ref(
    bits: torch.Tensor, scales: torch.Tensor, block: int, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Inverse of :func:`sign_encode_ref`: fp32 rows ``sign * scale`` (written into ``out`` if given)."""
    rows, nblocks = scales.shape
    if out is None:
        out = torch.empty(rows * nblocks * block, dtype=torch.float32, device=bits.device)
    table = _sign_table(bits.device)
    torch.index_select(table, 0, bits.reshape(-1).to(torch.int32), out=out.view(-1, 8))
    out.view(rows, nblocks, block).mul_(scales.unsqueeze(-1))
    return out.view(rows, nblocks * block)


def sign_encode(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Public op of :func:`sign_encode_ref` (``x`` is 2-D)."""
    check_float(x, "sign_encode")
    if x.dim() != 2:
        raise ValueError(f"sign_encode: expected 2-D rows, got shape {tuple(x.shape)}")
    check_block(x.shape[1], block, "sign_encode")
    check_block(x.shape[1], 8, "sign_encode")
    return sign_encode_ref(x, block)


def sign_decode(
    bits: torch.Tensor, scales: torch.Tensor, block: int, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Public op of :func:`sign_decode_ref`; ``out``, if given, is a contiguous fp32 tensor of the result's size."""
    check_dtype(bits, torch.uint8, "sign_decode", "bits")
    check_dtype(scales, torch.float32, "sign_decode", "scales")
    if bits.numel() * 8 != scales.numel() * block:
        raise ValueError(f"sign_decode: {bits.numel()} bytes of bits do not match {scales.numel()} blocks of {block}")
    if out is not None and (out.dtype != torch.float32 or out.numel() != bits.numel() * 8 or not out.is_contiguous()):
        raise ValueError("sign_decode: out must be a contiguous float32 tensor with 8 values per byte of bits")
    return sign_decode_ref(bits, scales, block, out)
